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

void kvs_score_tile_scalar(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                           const float *wb, const float *cos_t, const float *sin_t, float *out) {
    for (int32_t t = 0; t < n; t++) out[t] = 0.0f;
    for (int32_t d = 0; d < hd; d++) {
        const float *k = kt + (int64_t)d * stride, *c = cos_t + (int64_t)d * stride, *s = sin_t + (int64_t)d * stride;
        for (int32_t t = 0; t < n; t++) out[t] += k[t] * (qb[d] * c[t] + wb[d] * s[t]);
    }
}

void kvs_kv_score_tile(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                       const float *wb, const float *cos_t, const float *sin_t, float *out, int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2) {
        kvs_score_tile_avx2(n, hd, stride, kt, qb, wb, cos_t, sin_t, out);
        return;
    }
#endif
    kvs_score_tile_scalar(n, hd, stride, kt, qb, wb, cos_t, sin_t, out);
}

void kvs_f16_to_f32_scalar(int64_t n, const kvs_half *src, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = kvs_fp16_to_fp32(src[i]);
}

kvs_f16_to_f32_fn kvs_f16_to_f32_kernel(int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2) return kvs_f16_to_f32_avx2;
#endif
    return kvs_f16_to_f32_scalar;
}

kvs_axpy_fn kvs_axpy_kernel(int32_t type, int32_t impl) {
    const int f16 = type == KVS_TYPE_F16;
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2) return f16 ? kvs_axpy_f16_avx2 : kvs_axpy_f32_avx2;
#endif
    return f16 ? kvs_axpy_f16_scalar : kvs_axpy_f32_scalar;
}
