/* kernels_kv.c - scalar reference of the attention tile kernels (the oracle
 * of kernels_kv_avx2.c). */
#include "kernels_kv.h"

#include "formats.h"
#include "kvsink.h"

static void rotate_pair_scalar(int32_t n, float *a, float *b, const float *c, const float *s) {
    for (int32_t t = 0; t < n; t++) {
        const float x = a[t], y = b[t];
        a[t] = x * c[t] - y * s[t];
        b[t] = x * s[t] + y * c[t];
    }
}

static void dot_tile_scalar(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *q, float *out) {
    for (int32_t t = 0; t < n; t++) out[t] = 0.0f;
    for (int32_t d = 0; d < hd; d++) {
        for (int32_t t = 0; t < n; t++) out[t] += q[d] * kt[(int64_t)d * stride + t];
    }
}

static void weighted_rows_scalar(int32_t n, int32_t hd, const float *p, const float *vt, float *out) {
    for (int32_t t = 0; t < n; t++) {
        for (int32_t d = 0; d < hd; d++) out[d] += p[t] * vt[(int64_t)t * hd + d];
    }
}

static void f16_to_f32_scalar(int64_t n, const kvs_half *src, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = kvs_fp16_to_fp32(src[i]);
}

static const kvs_attention_kernels scalar_kernels = {rotate_pair_scalar, dot_tile_scalar, weighted_rows_scalar,
                                                     f16_to_f32_scalar};
#if defined(KVS_HAVE_AVX2_BUILD)
static const kvs_attention_kernels avx2_kernels = {kvs_rotate_pair_avx2, kvs_dot_tile_avx2, kvs_weighted_rows_avx2,
                                                   kvs_f16_to_f32_avx2};
#endif

const kvs_attention_kernels *kvs_attention_kernels_find(int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2) return &avx2_kernels;
#endif
    (void)impl;
    return &scalar_kernels;
}

kvs_f16_to_f32_fn kvs_f16_to_f32_kernel(int32_t impl) { return kvs_attention_kernels_find(impl)->f16_to_f32; }
