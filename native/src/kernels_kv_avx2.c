/* kernels_kv_avx2.c - AVX2/FMA/F16C twins of kernels_kv.c. */
#include <immintrin.h>

#include "kernels_kv.h"

void kvs_rotate_pair_avx2(int32_t n, float *a, float *b, const float *c, const float *s) {
    int32_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 x = _mm256_loadu_ps(a + t), y = _mm256_loadu_ps(b + t);
        const __m256 cv = _mm256_loadu_ps(c + t), sv = _mm256_loadu_ps(s + t);
        _mm256_storeu_ps(a + t, _mm256_fmsub_ps(x, cv, _mm256_mul_ps(y, sv)));
        _mm256_storeu_ps(b + t, _mm256_fmadd_ps(x, sv, _mm256_mul_ps(y, cv)));
    }
    for (; t < n; t++) {
        const float x = a[t], y = b[t];
        a[t] = x * c[t] - y * s[t];
        b[t] = x * s[t] + y * c[t];
    }
}

/* Eight keys at a time; four groups (a 32-key block) share each broadcast of q[d]. */
void kvs_dot_tile_avx2(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *q, float *out) {
    int32_t t0 = 0;
    for (; t0 + 32 <= n; t0 += 32) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int32_t d = 0; d < hd; d++) {
            const __m256 qd = _mm256_set1_ps(q[d]);
            const float *row = kt + (int64_t)d * stride + t0;
            acc[0] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row), acc[0]);
            acc[1] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 8), acc[1]);
            acc[2] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 16), acc[2]);
            acc[3] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 24), acc[3]);
        }
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + t0 + 8 * k, acc[k]);
    }
    for (; t0 + 8 <= n; t0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int32_t d = 0; d < hd; d++) {
            acc = _mm256_fmadd_ps(_mm256_set1_ps(q[d]), _mm256_loadu_ps(kt + (int64_t)d * stride + t0), acc);
        }
        _mm256_storeu_ps(out + t0, acc);
    }
    for (int32_t t = t0; t < n; t++) {
        float acc = 0.0f;
        for (int32_t d = 0; d < hd; d++) acc += q[d] * kt[(int64_t)d * stride + t];
        out[t] = acc;
    }
}

/* out stays in registers, 32 channels at a time, while the keys stream past. */
void kvs_weighted_rows_avx2(int32_t n, int32_t hd, const float *p, const float *vt, float *out) {
    int32_t d0 = 0;
    for (; d0 + 32 <= hd; d0 += 32) {
        __m256 acc[4];
        for (int k = 0; k < 4; k++) acc[k] = _mm256_loadu_ps(out + d0 + 8 * k);
        for (int32_t t = 0; t < n; t++) {
            const __m256 pt = _mm256_set1_ps(p[t]);
            const float *row = vt + (int64_t)t * hd + d0;
            for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row + 8 * k), acc[k]);
        }
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + d0 + 8 * k, acc[k]);
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        __m256 acc = _mm256_loadu_ps(out + d0);
        for (int32_t t = 0; t < n; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vt + (int64_t)t * hd + d0), acc);
        _mm256_storeu_ps(out + d0, acc);
    }
    for (; d0 < hd; d0++) {
        for (int32_t t = 0; t < n; t++) out[d0] += p[t] * vt[(int64_t)t * hd + d0];
    }
}

void kvs_f16_to_f32_avx2(int64_t n, const kvs_half *src, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}
