/* kernels_kv.c - scalar KV row kernels (the oracles of kernels_kv_avx2.c). */
#include "kernels_kv.h"

#include "formats.h"

void kvs_axpy_f32_scalar(int64_t n, float a, const void *x, float *y) {
    const float *xf = x;
    for (int64_t i = 0; i < n; i++) y[i] += a * xf[i];
}

void kvs_axpy_f16_scalar(int64_t n, float a, const void *x, float *y) {
    const kvs_half *xh = x;
    for (int64_t i = 0; i < n; i++) y[i] += a * kvs_fp16_to_fp32(xh[i]);
}

kvs_axpy_fn kvs_axpy_kernel(int32_t type, int32_t impl) {
    const int f16 = type == KVS_TYPE_F16;
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2) return f16 ? kvs_axpy_f16_avx2 : kvs_axpy_f32_avx2;
#endif
    return f16 ? kvs_axpy_f16_scalar : kvs_axpy_f32_scalar;
}
