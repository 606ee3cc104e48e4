/* act_q8_avx2.c - AVX2 twins of act_q8.c: the activation quantizer (bit-exact
 * with the scalar one) and integer dots. Unsigned weight quants are multiplied
 * with the signed activations by maddubs (u8 x s8 -> pairs of s16; at most
 * 2*31*127, no saturation), signed Q8_0 weights through the sign trick
 * |w| x sign(x, w). Offsets (Q4_0's 8, Q5_0's 16) and mins are folded in with
 * the activation block's d*sum(q). Compiled with -mavx2 -mfma -mf16c. */
#include "act_q8.h"

#if defined(KVS_HAVE_AVX2_BUILD)

#include <immintrin.h>
#include <string.h>

#include "blocks.h"

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

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

void kvs_quantize_act_avx2(const float *x, block_q8_act *y, int64_t n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < n / QK_ACT; i++, x += QK_ACT, y++) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], abs_mask));
        }
        const float m = hmax(amax);
        const float d = m / 127.0f, id = d > 0.0f ? 127.0f / m : 0.0f;
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));
        const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        /* packs work per 128-bit lane; the permute restores element order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y->qs, _mm256_permutevar8x32_epi32(p, lane_order));
        y->d = d;
        y->s = d * (float)sum;
    }
}

/* 16 packed nibble bytes -> 32 bytes: elements 0..15 (low nibbles), then 16..31. */
static inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i v = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* Bits 0..31 of the 5th-bit word -> 0x10 in the bytes whose bit is set. */
static inline __m256i fifth_bits32(const uint8_t qh[4]) {
    uint32_t bits;
    memcpy(&bits, qh, sizeof bits);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* sum over the block of unsigned w times signed x, as 8 floats */
static inline __m256 udot(__m256i w, const block_q8_act *x) {
    const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)x->qs));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* The loop shared by every format: two accumulators for latency; `block`
 * yields the unsigned quants, scale, and the constant term d_min * x.s. */
#define Q8_DOT_LOOP(block_t, unsigned_quants, scale, min_term)               \
    const block_t *b = row;                                                   \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();           \
    float mins = 0.0f;                                                        \
    const int64_t nb = n / QK_ACT;                                            \
    int64_t i = 0;                                                            \
    for (; i + 1 < nb; i += 2) {                                              \
        const block_t *b0 = b + i, *b1 = b + i + 1;                           \
        const block_q8_act *x0 = x + i, *x1 = x + i + 1;                      \
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b0) * x0->d), udot(unsigned_quants(b0), x0), acc0); \
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b1) * x1->d), udot(unsigned_quants(b1), x1), acc1); \
        mins += min_term(b0, x0) + min_term(b1, x1);                         \
    }                                                                         \
    for (; i < nb; i++) {                                                     \
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(b + i) * x[i].d), udot(unsigned_quants(b + i), x + i), acc0); \
        mins += min_term(b + i, x + i);                                       \
    }                                                                         \
    return hsum(_mm256_add_ps(acc0, acc1)) + mins;

#define D_OF(b) half_at(&(b)->d)
#define NIBBLES(b) nibbles32((b)->qs)
#define NIBBLES5(b) _mm256_or_si256(nibbles32((b)->qs), fifth_bits32((b)->qh))
#define OFFSET8(b, x) (-8.0f * half_at(&(b)->d) * (x)->s)
#define OFFSET16(b, x) (-16.0f * half_at(&(b)->d) * (x)->s)
#define MIN_OF(b, x) (half_at(&(b)->m) * (x)->s)

float kvs_q8_dot_q4_0_avx2(int64_t n, const void *row, const block_q8_act *x) {
    Q8_DOT_LOOP(block_q4_0, NIBBLES, D_OF, OFFSET8)
}

float kvs_q8_dot_q4_1_avx2(int64_t n, const void *row, const block_q8_act *x) {
    Q8_DOT_LOOP(block_q4_1, NIBBLES, D_OF, MIN_OF)
}

float kvs_q8_dot_q5_0_avx2(int64_t n, const void *row, const block_q8_act *x) {
    Q8_DOT_LOOP(block_q5_0, NIBBLES5, D_OF, OFFSET16)
}

float kvs_q8_dot_q5_1_avx2(int64_t n, const void *row, const block_q8_act *x) {
    Q8_DOT_LOOP(block_q5_1, NIBBLES5, D_OF, MIN_OF)
}

/* Signed weights: |w| times x with w's sign moved onto it. */
float kvs_q8_dot_q8_0_avx2(int64_t n, const void *row, const block_q8_act *x) {
    const block_q8_0 *b = row;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < n / QK_ACT; i++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)b[i].qs);
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x[i].qs), w);
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), xs), ones));
        if (i & 1) acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half_at(&b[i].d) * x[i].d), p, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_at(&b[i].d) * x[i].d), p, acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

#endif
