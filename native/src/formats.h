/* formats.h - private: per-type kernel table (scalar reference + AVX2 twin). */
#ifndef KVS_FORMATS_H
#define KVS_FORMATS_H

#include <stdint.h>

#include "blocks.h"
#include "kvsink.h"

/* Dequantize n elements (a multiple of block_elems) to f32. */
typedef void (*kvs_dequantize_fn)(const void *src, float *dst, int64_t n);
/* dot(row of n elements, x); n is a multiple of block_elems. */
typedef float (*kvs_vec_dot_fn)(int64_t n, const void *row, const float *x);

/* Kernels of one type; sizes and names are in types.h. */
typedef struct kvs_type_kernels {
    kvs_dequantize_fn dequantize;   /* scalar */
    kvs_vec_dot_fn vec_dot_scalar;  /* the oracle of every faster twin */
    kvs_vec_dot_fn vec_dot_avx2;    /* NULL when not built or not written */
} kvs_type_kernels;

/* Kernels of a type id, or NULL when unsupported. */
const kvs_type_kernels *kvs_type_kernels_find(int32_t type);

/* The dot kernel for a type with impl resolved (AUTO -> best available);
 * NULL when the type is unknown or the impl unavailable. */
kvs_vec_dot_fn kvs_vec_dot_kernel(int32_t type, int32_t impl);

/* Plain f32 dot product, used by attention and batched products. */
float kvs_dot_f32(int64_t n, const float *a, const float *b, int32_t impl);

/* out[2*r + t] = dot(w + r*n, x + t*n) for 4 rows r and 2 tokens t: the
 * register tile of batched products (each load feeds several FMAs). */
void kvs_dot_f32_4x2(int64_t n, const float *w, const float *x, float *out, int32_t impl);
void kvs_dot_f32_4x2_scalar(int64_t n, const float *w, const float *x, float *out);

/* fp16/bf16 conversions (exact, portable). */
float kvs_fp16_to_fp32(kvs_half h);
kvs_half kvs_fp32_to_fp16(float f);
float kvs_bf16_to_fp32(uint16_t h);

/* 1 when the CPU and OS support AVX2+FMA+F16C and the AVX2 file was built. */
int kvs_avx2_available(void);

#endif
