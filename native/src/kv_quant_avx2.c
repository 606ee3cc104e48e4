/* kv_quant_avx2.c - AVX2 twin of kvs_kv_dequantize_group for 8-, 4- and
 * 2-bit groups of a multiple of 8 values (other cases use the scalar code). */
#include <immintrin.h>
#include <string.h>

#include "kv_quant.h"

/* 8 quants (as 32-bit ints) -> q * scale + zero. */
static inline void store8(float *y, __m256i q, __m256 scale, __m256 zero) {
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale), zero));
}

int kvs_kv_dequantize_group_avx2(const uint8_t *in, int64_t n, int bits, float *y) {
    if (n % 8 != 0 || (bits != 8 && bits != 4 && bits != 2)) return 0;
    kvs_half scale_h, zero_h;
    memcpy(&scale_h, in, 2);
    memcpy(&zero_h, in + 2, 2);
    const __m256 scale = _mm256_set1_ps(_cvtsh_ss(scale_h)), zero = _mm256_set1_ps(_cvtsh_ss(zero_h));
    const uint8_t *p = in + 4;
    for (int64_t i = 0; i < n; i += 8) {
        __m256i q;
        if (bits == 8) {
            q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
        } else if (bits == 4) {
            uint32_t w;
            memcpy(&w, p + i / 2, 4); /* 8 nibbles, value j at bits 4j */
            q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                 _mm256_set1_epi32(15));
        } else {
            uint16_t w;
            memcpy(&w, p + i / 4, 2); /* 8 crumbs, value j at bits 2j */
            q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                 _mm256_set1_epi32(3));
        }
        store8(y + i, q, scale, zero);
    }
    return 1;
}
