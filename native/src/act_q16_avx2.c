/* act_q16_avx2.c - AVX2 twins of act_q16.c: the quantizer (bit-exact with
 * the scalar one) and Q8_0 dots, int8 weights widened to int16 and
 * multiplied by madd (pairs of s16 x s16 summed into s32). */
#include "act_q16.h"

#if defined(KVS_HAVE_AVX2_BUILD)

#include <immintrin.h>
#include <string.h>

#include "blocks.h"
#include "simd_avx2.h"

void kvs_quantize_act16_avx2(const float *x, block_q16_act *y, int64_t n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < n / QK_ACT16; i++, x += QK_ACT16, y++) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], abs_mask));
        }
        const float a = hmax(amax);
        const __m256 id = _mm256_set1_ps(a > 0.0f ? 32767.0f / a : 0.0f);
        /* packs works per 128-bit lane: 0-3,8-11 | 4-7,12-15 -> restore the order */
        for (int k = 0; k < 4; k += 2) {
            const __m256i q = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)),
                                                 _mm256_cvtps_epi32(_mm256_mul_ps(v[k + 1], id)));
            _mm256_storeu_si256((__m256i *)(y->qs + 8 * k), _mm256_permute4x64_epi64(q, 0xD8));
        }
        y->d = a / 32767.0f;
    }
}

/* The block's integer dot as 8 floats (partial sums). */
static inline __m256 block_products(const block_q8_0 *b, __m256i x_lo, __m256i x_hi) {
    const __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->qs));
    const __m256i w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b->qs + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi)));
}

float kvs_q16_dot_q8_0_avx2(int64_t n, const void *row, const block_q16_act *x) {
    const block_q8_0 *b = row;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_ACT16; i++) {
        const __m256i x_lo = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(x[i].qs + 16));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_at(&b[i].d) * x[i].d), block_products(b + i, x_lo, x_hi), acc);
    }
    return hsum(acc);
}

void kvs_q16_dot4_q8_0_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q16_act *x, float out[4]) {
    const block_q8_0 *b[4];
    __m256 acc[4];
    for (int r = 0; r < 4; r++) {
        b[r] = (const block_q8_0 *)((const uint8_t *)rows + r * row_bytes);
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < n / QK_ACT16; i++) {
        const __m256i x_lo = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(x[i].qs + 16));
        /* four rows are four streams, more than the hardware prefetcher
         * follows: fetch the next four rows' bytes at the same offset */
        for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(b[r] + i) + 4 * row_bytes, _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            const __m256 scale = _mm256_set1_ps(half_at(&b[r][i].d) * x[i].d);
            acc[r] = _mm256_fmadd_ps(scale, block_products(b[r] + i, x_lo, x_hi), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum(acc[r]);
}

#endif
