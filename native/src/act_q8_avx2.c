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
#include "kernels_avx2.h"
#include "simd_avx2.h"

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

/* Per format: the block's integer products with x as 8 floats (unsigned
 * quants through maddubs directly, Q8_0's signed ones through the sign
 * trick), and its fp16 scale (and min) as floats: [d, m] or [d, d]. */
static inline __m256 products(__m256i w_unsigned, __m256i xq) {
    const __m256i p = _mm256_maddubs_epi16(w_unsigned, xq);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

static inline __m256i fifth_nibbles(const uint8_t *qs, const uint8_t *qh) {
    return _mm256_or_si256(nibbles32(qs), fifth_bits32(qh));
}

static inline __m256 prod_q4_0(const block_q4_0 *b, __m256i xq) { return products(nibbles32(b->qs), xq); }
static inline __m256 prod_q4_1(const block_q4_1 *b, __m256i xq) { return products(nibbles32(b->qs), xq); }
static inline __m256 prod_q5_0(const block_q5_0 *b, __m256i xq) { return products(fifth_nibbles(b->qs, b->qh), xq); }
static inline __m256 prod_q5_1(const block_q5_1 *b, __m256i xq) { return products(fifth_nibbles(b->qs, b->qh), xq); }
static inline __m256 prod_q8_0(const block_q8_0 *b, __m256i xq) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)b->qs);
    return products(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
}

static inline __m128 halves_d(const kvs_half *d) {
    uint16_t h;
    memcpy(&h, d, sizeof h);
    return _mm_cvtph_ps(_mm_set1_epi16((short)h));
}

static inline __m128 halves_dm(const kvs_half *dm) {
    int32_t v;
    memcpy(&v, dm, sizeof v);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
}

static inline __m128 dm_q4_0(const block_q4_0 *b) { return halves_d(&b->d); }
static inline __m128 dm_q4_1(const block_q4_1 *b) { return halves_dm(&b->d); }
static inline __m128 dm_q5_0(const block_q5_0 *b) { return halves_d(&b->d); }
static inline __m128 dm_q5_1(const block_q5_1 *b) { return halves_dm(&b->d); }
static inline __m128 dm_q8_0(const block_q8_0 *b) { return halves_d(&b->d); }

/* What lane 1 of the summed [d*x.d, m*x.s] pairs contributes: Q4_1/Q5_1 add
 * their min once, Q4_0/Q5_0 subtract their offset (8 or 16) times d*x.s. */
#define CONST_q4_0 (-8.0f)
#define CONST_q4_1 1.0f
#define CONST_q5_0 (-16.0f)
#define CONST_q5_1 1.0f
#define CONST_q8_0 0.0f

/* [x.d, x.s]: the activation block's first 8 bytes. */
static inline __m128 act_ds(const block_q8_act *x) { return _mm_castpd_ps(_mm_load_sd((const double *)&x->d)); }
static inline __m256i load_act(const block_q8_act *x) { return _mm256_loadu_si256((const __m256i *)x->qs); }

/* Sums of four accumulators at once: lane r of the result is hsum(a[r]). */
static inline __m128 hsum4(const __m256 a[4]) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* One step: pair = [d*x.d, m*x.s] (summed into `consts`), acc += (d*x.d) * products. */
#define Q8_STEP(name, blk, xb, xq, acc, consts)                                  \
    do {                                                                         \
        const __m128 pair = _mm_mul_ps(dm_##name(blk), act_ds(xb));              \
        consts = _mm_add_ps(consts, pair);                                       \
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(pair), prod_##name(blk, xq), acc); \
    } while (0)

/* One row (two accumulators for latency), and four rows sharing each
 * activation load (four rows also share the final horizontal sums). */
#define DEFINE_Q8_DOTS(name, block_t)                                                                 \
    float kvs_q8_dot_##name##_avx2(int64_t n, const void *row, const block_q8_act *x) {              \
        const block_t *b = row;                                                                       \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                                \
        __m128 consts = _mm_setzero_ps();                                                             \
        const int64_t nb = n / QK_ACT;                                                                \
        int64_t i = 0;                                                                                \
        for (; i + 1 < nb; i += 2) {                                                                  \
            Q8_STEP(name, b + i, x + i, load_act(x + i), acc0, consts);                               \
            Q8_STEP(name, b + i + 1, x + i + 1, load_act(x + i + 1), acc1, consts);                   \
        }                                                                                             \
        if (i < nb) Q8_STEP(name, b + i, x + i, load_act(x + i), acc0, consts);                       \
        return hsum(_mm256_add_ps(acc0, acc1)) + CONST_##name * _mm_cvtss_f32(_mm_movehdup_ps(consts)); \
    }                                                                                                 \
    void kvs_q8_dot4_##name##_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, \
                                   float out[4]) {                                                    \
        const uint8_t *base = rows;                                                                   \
        const block_t *b0 = (const block_t *)base, *b1 = (const block_t *)(base + row_bytes);        \
        const block_t *b2 = (const block_t *)(base + 2 * row_bytes), *b3 = (const block_t *)(base + 3 * row_bytes); \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        __m128 c0 = _mm_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;                                      \
        for (int64_t i = 0; i < n / QK_ACT; i++) {                                                    \
            const __m256i xq = load_act(x + i);                                                       \
            Q8_STEP(name, b0 + i, x + i, xq, acc[0], c0);                                             \
            Q8_STEP(name, b1 + i, x + i, xq, acc[1], c1);                                             \
            Q8_STEP(name, b2 + i, x + i, xq, acc[2], c2);                                             \
            Q8_STEP(name, b3 + i, x + i, xq, acc[3], c3);                                             \
        }                                                                                             \
        /* lane 1 of each c: the constant terms of rows 0..3 */                                       \
        const __m128 consts = _mm_movehl_ps(_mm_unpacklo_ps(c2, c3), _mm_unpacklo_ps(c0, c1));        \
        _mm_storeu_ps(out, _mm_add_ps(hsum4(acc), _mm_mul_ps(_mm_set1_ps(CONST_##name), consts)));    \
    }

/* Quads: unpacked once per tile, then every token costs one maddubs chain
 * per row and block; the scales of the four rows for a block come as one
 * vector (d4 * x.d), the constant terms as one FMA (c4 * x.s). */
#define DEFINE_Q8_UNPACK4(name, block_t, QUANTS, HAS_MIN, OFFSET)                                        \
    void kvs_q8_unpack4_##name##_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out) {    \
        for (int r = 0; r < 4; r++) {                                                                     \
            const block_t *b = (const block_t *)((const uint8_t *)rows + r * row_bytes);                 \
            for (int64_t i = 0; i < n / QK_ACT; i++) {                                                    \
                _mm256_storeu_si256((__m256i *)out[i].u[r], QUANTS(b + i));                               \
                const __m128 dm = dm_##name(b + i);                                                       \
                out[i].d[r] = _mm_cvtss_f32(dm);                                                          \
                out[i].c[r] = HAS_MIN ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : -(OFFSET) * _mm_cvtss_f32(dm); \
            }                                                                                             \
        }                                                                                                 \
    }

#define NIBBLES(b) nibbles32((b)->qs)
#define NIBBLES5(b) fifth_nibbles((b)->qs, (b)->qh)
DEFINE_Q8_UNPACK4(q4_0, block_q4_0, NIBBLES, 0, 8.0f)
DEFINE_Q8_UNPACK4(q4_1, block_q4_1, NIBBLES, 1, 0.0f)
DEFINE_Q8_UNPACK4(q5_0, block_q5_0, NIBBLES5, 0, 16.0f)
DEFINE_Q8_UNPACK4(q5_1, block_q5_1, NIBBLES5, 1, 0.0f)

void kvs_q8_quad_dot_avx2(int64_t nb, const q8_quad *w, const block_q8_act *x, float out[4]) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m128 consts = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256i xq = load_act(x + i);
        const __m128 scales = _mm_mul_ps(_mm_loadu_ps(w[i].d), _mm_set1_ps(x[i].d));
        consts = _mm_fmadd_ps(_mm_loadu_ps(w[i].c), _mm_set1_ps(x[i].s), consts);
        const __m256i u0 = _mm256_loadu_si256((const __m256i *)w[i].u[0]);
        const __m256i u1 = _mm256_loadu_si256((const __m256i *)w[i].u[1]);
        const __m256i u2 = _mm256_loadu_si256((const __m256i *)w[i].u[2]);
        const __m256i u3 = _mm256_loadu_si256((const __m256i *)w[i].u[3]);
        acc[0] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), products(u0, xq), acc[0]);
        acc[1] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_permute_ps(scales, 1)), products(u1, xq), acc[1]);
        acc[2] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_permute_ps(scales, 2)), products(u2, xq), acc[2]);
        acc[3] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_permute_ps(scales, 3)), products(u3, xq), acc[3]);
    }
    _mm_storeu_ps(out, _mm_add_ps(hsum4(acc), consts));
}

DEFINE_Q8_DOTS(q4_0, block_q4_0)
DEFINE_Q8_DOTS(q4_1, block_q4_1)
DEFINE_Q8_DOTS(q5_0, block_q5_0)
DEFINE_Q8_DOTS(q5_1, block_q5_1)
DEFINE_Q8_DOTS(q8_0, block_q8_0)

/* ---- K formats: super-blocks of 256, blocks of 32 ----------------------
 * Q4_K/Q5_K: block s of a super-block has scale d*sc[s] and min dmin*mn[s]
 * (each block is then a Q4_1/Q5_1 block with float scales); Q6_K has a scale
 * per 16, applied to the maddubs pairs by a madd before the float sum. */

static inline void k4_scales(const uint8_t packed[12], const kvs_half *d, const kvs_half *dmin, float dsc[8],
                             float dmn[8]) {
    uint8_t sc[8], mn[8];
    kvs_unpack_k4_scales(packed, sc, mn);
    const float fd = half_at(d), fm = half_at(dmin);
    for (int s = 0; s < 8; s++) {
        dsc[s] = fd * (float)sc[s];
        dmn[s] = fm * (float)mn[s];
    }
}

/* Block s's 32 quants: low (s even) or high nibbles of qs[32 * (s / 2) ..]. */
static inline __m256i k4_quants(const uint8_t *qs, int s) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (s / 2)));
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (s & 1))), _mm256_set1_epi8(0x0f));
}

/* Q5_K adds bit s of each qh byte as the 5th bit. */
static inline __m256i k5_quants(const uint8_t *qs, const uint8_t *qh, int s) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(s)), _mm256_set1_epi8(1));
    return _mm256_or_si256(k4_quants(qs, s), _mm256_slli_epi16(bit, 4));
}

/* acc += the super-block's products with its 8 activation blocks; returns
 * the sum of its min terms (dmin*mn[s] * x.s), to subtract. */
#define DEFINE_K4_SUPER(name, block_t, QUANTS)                                                         \
    static inline float name##_super(const block_t *b, const block_q8_act *x, __m256 *acc) {          \
        float dsc[8], dmn[8], mins = 0.0f;                                                            \
        k4_scales(b->scales, &b->d, &b->dmin, dsc, dmn);                                              \
        for (int s = 0; s < 8; s++) {                                                                 \
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(dsc[s] * x[s].d), products(QUANTS, load_act(x + s)), *acc); \
            mins += dmn[s] * x[s].s;                                                                  \
        }                                                                                             \
        return mins;                                                                                  \
    }
DEFINE_K4_SUPER(q4_k, block_q4_K, k4_quants(b->qs, s))
DEFINE_K4_SUPER(q5_k, block_q5_K, k5_quants(b->qs, b->qh, s))

/* Q6_K block k of half h: u = low | high << 4 (0..63) and (u - 32) * x as
 * maddubs(u, x) - maddubs(32, x) (each |pair| <= 2*63*127); the pairs of
 * elements 0..15 take scale 0, those of 16..31 scale 1. */
static inline float q6_k_super(const block_q6_K *b, const block_q8_act *x, __m256 *acc) {
    const float d = half_at(&b->d);
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3), offset = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; h++) {
        const __m256i ql[2] = {_mm256_loadu_si256((const __m256i *)(b->ql + 64 * h)),
                               _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32))};
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
        for (int k = 0; k < 4; k++) {
            const __m256i low = _mm256_and_si256(_mm256_srl_epi16(ql[k % 2], _mm_cvtsi32_si128(4 * (k / 2))), m4);
            const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), m2);
            const __m256i u = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
            const block_q8_act *xb = x + 4 * h + k;
            const __m256i xq = load_act(xb);
            const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(u, xq), _mm256_maddubs_epi16(offset, xq));
            const int8_t *sc = b->scales + 8 * h + 2 * k;
            const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(sc[1]), _mm_set1_epi16(sc[0]));
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb->d), _mm256_cvtepi32_ps(_mm256_madd_epi16(p, scale)), *acc);
        }
    }
    return 0.0f;
}

#define DEFINE_K_DOTS(name, block_t)                                                                  \
    float kvs_q8_dot_##name##_avx2(int64_t n, const void *row, const block_q8_act *x) {              \
        const block_t *b = row;                                                                       \
        __m256 acc = _mm256_setzero_ps();                                                             \
        float mins = 0.0f;                                                                            \
        for (int64_t i = 0; i < n / QK_K; i++) mins += name##_super(b + i, x + 8 * i, &acc);          \
        return hsum(acc) - mins;                                                                      \
    }                                                                                                 \
    void kvs_q8_dot4_##name##_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, \
                                   float out[4]) {                                                    \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        float mins[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                                     \
        for (int64_t i = 0; i < n / QK_K; i++) {                                                      \
            for (int r = 0; r < 4; r++) {                                                             \
                const block_t *b = (const block_t *)((const uint8_t *)rows + r * row_bytes) + i;      \
                mins[r] += name##_super(b, x + 8 * i, &acc[r]);                                       \
            }                                                                                         \
        }                                                                                             \
        _mm_storeu_ps(out, _mm_sub_ps(hsum4(acc), _mm_loadu_ps(mins)));                              \
    }
DEFINE_K_DOTS(q4_k, block_q4_K)
DEFINE_K_DOTS(q5_k, block_q5_K)
DEFINE_K_DOTS(q6_k, block_q6_K)

/* Quads of Q4_K/Q5_K: each block is an unsigned block with a float scale and min. */
#define DEFINE_K4_UNPACK4(name, block_t, QUANTS)                                                       \
    void kvs_q8_unpack4_##name##_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out) {  \
        for (int r = 0; r < 4; r++) {                                                                   \
            const block_t *b = (const block_t *)((const uint8_t *)rows + r * row_bytes);               \
            for (int64_t i = 0; i < n / QK_K; i++, b++) {                                               \
                float dsc[8], dmn[8];                                                                   \
                k4_scales(b->scales, &b->d, &b->dmin, dsc, dmn);                                        \
                for (int s = 0; s < 8; s++) {                                                           \
                    _mm256_storeu_si256((__m256i *)out[8 * i + s].u[r], QUANTS);                        \
                    out[8 * i + s].d[r] = dsc[s];                                                       \
                    out[8 * i + s].c[r] = -dmn[s];                                                      \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }
DEFINE_K4_UNPACK4(q4_k, block_q4_K, k4_quants(b->qs, s))
DEFINE_K4_UNPACK4(q5_k, block_q5_K, k5_quants(b->qs, b->qh, s))

#endif
