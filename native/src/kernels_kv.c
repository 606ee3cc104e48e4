/* kernels_kv.c - scalar reference of the attention tile kernels (the oracle
 * of kernels_kv_avx2.c). */
#include "kernels_kv.h"

#include <math.h>

#include "formats.h"
#include "kv_quant.h"
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

static void rotate_query_scalar(int32_t n_rot, int32_t hd, int neox, const float *cs, const float *sn,
                                const float *q, float scale, float *qb) {
    const int32_t half = n_rot / 2, step = neox ? 1 : 2, stride = neox ? half : 1;
    for (int32_t d = n_rot; d < hd; d++) qb[d] = scale * q[d];
    for (int32_t i = 0; i < half; i++) {
        const int32_t a = i * step, b = a + stride;
        qb[a] = scale * (q[a] * cs[i] - q[b] * sn[i]);
        qb[b] = scale * (q[a] * sn[i] + q[b] * cs[i]);
    }
}

static void dequant_groups_scalar(int bits, int32_t n_ch, int32_t n, const uint8_t *data, int64_t group_bytes,
                                  float *out, int64_t out_stride) {
    for (int32_t c = 0; c < n_ch; c++) kvs_kv_dequantize_group(data + c * group_bytes, n, bits, out + c * out_stride);
}

static float exp_shifted_scalar(int32_t n, float *x, float *max_out) {
    float max_x = -INFINITY, sum = 0.0f;
    for (int32_t i = 0; i < n; i++) max_x = x[i] > max_x ? x[i] : max_x;
    *max_out = max_x;
    if (max_x == -INFINITY) { /* nothing visible (all masked): all weights 0, as the AVX2 twin */
        for (int32_t i = 0; i < n; i++) x[i] = 0.0f;
        return 0.0f;
    }
    for (int32_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max_x);
        sum += x[i];
    }
    *max_out = max_x;
    return sum;
}

static void weighted_groups_scalar(int bits, int32_t n_tok, int32_t hd, int32_t G, const uint8_t *data,
                                   int32_t n_heads, const float *p, int64_t p_stride, float *out, int64_t out_stride) {
    const int64_t gb = kvs_kv_group_bytes(bits, G);
    float row[KVS_KV_MAX_HEAD_DIM]; /* one group: G <= head_dim */
    for (int32_t t = 0; t < n_tok; t++) {
        for (int32_t g = 0; g < hd / G; g++) {
            kvs_kv_dequantize_group(data + ((int64_t)t * (hd / G) + g) * gb, G, bits, row);
            for (int32_t j = 0; j < n_heads; j++) {
                const float w = p[j * p_stride + t];
                float *o = out + j * out_stride + g * G;
                for (int32_t d = 0; d < G; d++) o[d] += w * row[d];
            }
        }
    }
}

static void key_tile_scalar(int bits, int32_t n, const uint8_t *data, int64_t group_bytes, int32_t n_pairs,
                            const int32_t *pair_a, const int32_t *pair_b, const float *cos_rows,
                            const float *sin_rows, int64_t stride, float *kt) {
    for (int32_t k = 0; k < n_pairs; k++) {
        const int64_t a = pair_a[k], b = pair_b[k];
        kvs_kv_dequantize_group(data + a * group_bytes, n, bits, kt + a * stride);
        kvs_kv_dequantize_group(data + b * group_bytes, n, bits, kt + b * stride);
        rotate_pair_scalar(n, kt + a * stride, kt + b * stride, cos_rows + a * stride, sin_rows + a * stride);
    }
}

void kvs_fwht(int32_t n, float *x) {
    for (int32_t h = 1; h < n; h *= 2) {
        for (int32_t i = 0; i < n; i += 2 * h) {
            for (int32_t j = i; j < i + h; j++) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
    }
    const float norm = 1.0f / sqrtf((float)n);
    for (int32_t i = 0; i < n; i++) x[i] *= norm;
}

static const kvs_attention_kernels scalar_kernels = {rotate_pair_scalar, dot_tile_scalar, weighted_rows_scalar,
                                                     f16_to_f32_scalar, rotate_query_scalar, dequant_groups_scalar,
                                                     exp_shifted_scalar, weighted_groups_scalar, key_tile_scalar,
                                                     kvs_fwht};
#if defined(KVS_HAVE_AVX2_BUILD)
static const kvs_attention_kernels avx2_kernels = {kvs_rotate_pair_avx2, kvs_dot_tile_avx2, kvs_weighted_rows_avx2,
                                                   kvs_f16_to_f32_avx2, kvs_rotate_query_avx2, kvs_dequant_groups_avx2,
                                                   kvs_exp_shifted_avx2, kvs_weighted_groups_avx2, kvs_key_tile_avx2,
                                                   kvs_fwht_avx2};
#endif

const kvs_attention_kernels *kvs_attention_kernels_find(int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2) return &avx2_kernels;
#endif
    (void)impl;
    return &scalar_kernels;
}

kvs_f16_to_f32_fn kvs_f16_to_f32_kernel(int32_t impl) { return kvs_attention_kernels_find(impl)->f16_to_f32; }
