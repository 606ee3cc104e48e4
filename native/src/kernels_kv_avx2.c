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
