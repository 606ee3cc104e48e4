/* simd_avx2.h - private: small AVX2/F16C helpers shared by the *_avx2.c
 * kernels. Include only from files compiled with -mavx2 -mfma -mf16c. */
#ifndef KVS_SIMD_AVX2_H
#define KVS_SIMD_AVX2_H

#include <immintrin.h>
#include <string.h>

#include "blocks.h"

/* Blocks may sit at any byte offset, so read halves bytewise. */
static inline float half_at(const kvs_half *p) {
    kvs_half h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
