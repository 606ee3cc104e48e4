/* kernels_kv_avx2.c - AVX2/FMA/F16C twins of kernels_kv.c. */
#include <immintrin.h>

#include "kernels_kv.h"

void kvs_axpy_f32_avx2(int64_t n, float a, const void *x, float *y) {
    const float *xf = x;
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(xf + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * xf[i];
}

void kvs_axpy_f16_avx2(int64_t n, float a, const void *x, float *y) {
    const kvs_half *xh = x;
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(xh + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, vx, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * _cvtsh_ss(xh[i]);
}

void kvs_score_tile_avx2(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *qb,
                         const float *wb, const float *cos_t, const float *sin_t, float *out) {
    int32_t t0 = 0;
    for (; t0 + 8 <= n; t0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int32_t d = 0; d < hd; d++) {
            const int64_t off = (int64_t)d * stride + t0;
            const __m256 coef = _mm256_fmadd_ps(_mm256_set1_ps(qb[d]), _mm256_loadu_ps(cos_t + off),
                                                _mm256_mul_ps(_mm256_set1_ps(wb[d]), _mm256_loadu_ps(sin_t + off)));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(kt + off), coef, acc);
        }
        _mm256_storeu_ps(out + t0, acc);
    }
    for (int32_t t = t0; t < n; t++) {
        float acc = 0.0f;
        for (int32_t d = 0; d < hd; d++) {
            const int64_t off = (int64_t)d * stride + t;
            acc += kt[off] * (qb[d] * cos_t[off] + wb[d] * sin_t[off]);
        }
        out[t] = acc;
    }
}

void kvs_f16_to_f32_avx2(int64_t n, const kvs_half *src, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}
