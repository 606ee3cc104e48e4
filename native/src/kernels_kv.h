/* kernels_kv.h - private: row kernels of the KV cache's attention. */
#ifndef KVS_KERNELS_KV_H
#define KVS_KERNELS_KV_H

#include <stdint.h>

#include "blocks.h"

/* y[i] += a * x[i] for n elements of a cached row (f32 or f16). */
typedef void (*kvs_axpy_fn)(int64_t n, float a, const void *x, float *y);

void kvs_axpy_f32_scalar(int64_t n, float a, const void *x, float *y);
void kvs_axpy_f16_scalar(int64_t n, float a, const void *x, float *y);
#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_axpy_f32_avx2(int64_t n, float a, const void *x, float *y);
void kvs_axpy_f16_avx2(int64_t n, float a, const void *x, float *y);
#endif

/* The kernel for a row type (KVS_TYPE_F32/F16) and impl (SCALAR or AVX2). */
kvs_axpy_fn kvs_axpy_kernel(int32_t type, int32_t impl);

/* Attention scores of n keys held channel-major in kt (row stride `stride`),
 * each rotated by its offset t inside the segment: out[t] = sum_d kt[d][t] *
 * (qb[d] * cos_t[d][t] + wb[d] * sin_t[d][t]). RoPE at read time in one pass. */
typedef void (*kvs_score_tile_fn)(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                                  const float *wb, const float *cos_t, const float *sin_t, float *out);
void kvs_score_tile_scalar(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                           const float *wb, const float *cos_t, const float *sin_t, float *out);
#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_score_tile_avx2(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                         const float *wb, const float *cos_t, const float *sin_t, float *out);
#endif

/* f16 -> f32 conversion of n values. */
typedef void (*kvs_f16_to_f32_fn)(int64_t n, const kvs_half *src, float *dst);
void kvs_f16_to_f32_scalar(int64_t n, const kvs_half *src, float *dst);
#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_f16_to_f32_avx2(int64_t n, const kvs_half *src, float *dst);
#endif
kvs_f16_to_f32_fn kvs_f16_to_f32_kernel(int32_t impl);

/* Runs the kernel chosen by impl. */
void kvs_kv_score_tile(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                       const float *wb, const float *cos_t, const float *sin_t, float *out, int32_t impl);

#endif
