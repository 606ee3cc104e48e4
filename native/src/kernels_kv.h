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

#endif
