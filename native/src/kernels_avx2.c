/* kernels_avx2.c - AVX2+FMA+F16C twins of the scalar dot kernels. Each block's
 * quants are widened to floats in registers, scaled (w = q*s + bias) and
 * FMA'd with the f32 activations into four independent accumulators. The
 * activations are never quantized; only the summation order differs from the
 * scalar reference. Compiled with -mavx2 -mfma -mf16c; called only after a
 * runtime CPU check. */
#include "kernels_avx2.h"

#if defined(KVS_HAVE_AVX2_BUILD)

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "blocks.h"
#include "simd_avx2.h"

/* ---- helpers -------------------------------------------------------------- */

typedef struct {
    __m256 v[4];
} acc4;

static inline acc4 acc4_zero(void) {
    acc4 a = {{_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}};
    return a;
}

static inline float acc4_sum(acc4 a) {
    return hsum(_mm256_add_ps(_mm256_add_ps(a.v[0], a.v[1]), _mm256_add_ps(a.v[2], a.v[3])));
}

static inline __m128i load16(const void *p) { return _mm_loadu_si128((const __m128i *)p); }

/* 16 signed byte quants (elements 0..15 of x): w = q*s + bias, a0/a1 += w*x. */
static inline void fma16(__m128i q, const float *x, __m256 s, __m256 bias, __m256 *a0, __m256 *a1) {
    __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
    *a0 = _mm256_fmadd_ps(_mm256_fmadd_ps(q0, s, bias), _mm256_loadu_ps(x), *a0);
    *a1 = _mm256_fmadd_ps(_mm256_fmadd_ps(q1, s, bias), _mm256_loadu_ps(x + 8), *a1);
}

/* A 32-element block with one scale and bias: q0 = elements 0..15, q1 = 16..31. */
static inline void fma32(acc4 *acc, __m128i q0, __m128i q1, const float *x, __m256 s, __m256 bias) {
    fma16(q0, x, s, bias, &acc->v[0], &acc->v[1]);
    fma16(q1, x + 16, s, bias, &acc->v[2], &acc->v[3]);
}

static inline __m128i low_nibbles(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(0x0f)); }

static inline __m128i high_nibbles(__m128i v) {
    return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f));
}

/* Bits 0..15 of `bits` to 16 bytes: 0x10 where the bit is set (a 5th quant bit). */
static inline __m128i bits16_to_0x10(uint32_t bits) {
    const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m128i sel = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    __m128i v = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)bits), spread);
    v = _mm_cmpeq_epi8(_mm_and_si128(v, sel), sel);
    return _mm_and_si128(v, _mm_set1_epi8(0x10));
}

/* Per byte: `value` where (v & mask) != 0, else 0. */
static inline __m128i select_bit(__m128i v, uint8_t mask, uint8_t value) {
    __m128i m = _mm_set1_epi8((char)mask);
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(v, m), m), _mm_set1_epi8((char)value));
}

/* 2-bit field `shift/2` of each byte. */
static inline __m128i crumbs(__m128i v, int shift) {
    return _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm_set1_epi8(3));
}

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ---- f32 / f16 / bf16 ------------------------------------------------------- */

float kvs_dot_f32_avx2(int64_t n, const float *a, const float *b) {
    acc4 acc = acc4_zero();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int k = 0; k < 4; k++) {
            __m256 av = _mm256_loadu_ps(a + i + 8 * k), bv = _mm256_loadu_ps(b + i + 8 * k);
            acc.v[k] = _mm256_fmadd_ps(av, bv, acc.v[k]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        acc.v[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc.v[0]);
    }
    float sum = acc4_sum(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

float kvs_vec_dot_f32_avx2(int64_t n, const void *row, const float *x) {
    return kvs_dot_f32_avx2(n, (const float *)row, x);
}

float kvs_vec_dot_f16_avx2(int64_t n, const void *row, const float *x) {
    const kvs_half *w = row;
    acc4 acc = acc4_zero();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int k = 0; k < 4; k++) {
            __m256 wv = _mm256_cvtph_ps(load16(w + i + 8 * k));
            acc.v[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i + 8 * k), acc.v[k]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        __m256 wv = _mm256_cvtph_ps(load16(w + i));
        acc.v[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), acc.v[0]);
    }
    float sum = acc4_sum(acc);
    for (; i < n; i++) sum += half_at(w + i) * x[i];
    return sum;
}

/* 8 bf16 values are the high halves of 8 floats. */
static inline __m256 bf16x8(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load16(p)), 16));
}

float kvs_vec_dot_bf16_avx2(int64_t n, const void *row, const float *x) {
    const uint8_t *w = row;
    acc4 acc = acc4_zero();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int k = 0; k < 4; k++) {
            __m256 wv = bf16x8(w + 2 * (i + 8 * k));
            acc.v[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i + 8 * k), acc.v[k]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        acc.v[0] = _mm256_fmadd_ps(bf16x8(w + 2 * i), _mm256_loadu_ps(x + i), acc.v[0]);
    }
    float sum = acc4_sum(acc);
    for (; i < n; i++) {
        uint32_t bits = (uint32_t)w[2 * i] << 16 | (uint32_t)w[2 * i + 1] << 24;
        float f;
        memcpy(&f, &bits, sizeof f);
        sum += f * x[i];
    }
    return sum;
}

/* ---- 32-element quants ---------------------------------------------------- */

float kvs_vec_dot_q4_0_avx2(int64_t n, const void *row, const float *x) {
    const block_q4_0 *b = row;
    const __m128i eight = _mm_set1_epi8(8);
    const __m256 zero = _mm256_setzero_ps();
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK4_0; i++, b++, x += QK4_0) {
        __m128i v = load16(b->qs);
        __m128i q0 = _mm_sub_epi8(low_nibbles(v), eight);
        __m128i q1 = _mm_sub_epi8(high_nibbles(v), eight);
        fma32(&acc, q0, q1, x, _mm256_set1_ps(half_at(&b->d)), zero);
    }
    return acc4_sum(acc);
}

float kvs_vec_dot_q4_1_avx2(int64_t n, const void *row, const float *x) {
    const block_q4_1 *b = row;
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK4_1; i++, b++, x += QK4_1) {
        __m128i v = load16(b->qs);
        fma32(&acc, low_nibbles(v), high_nibbles(v), x, _mm256_set1_ps(half_at(&b->d)),
              _mm256_set1_ps(half_at(&b->m)));
    }
    return acc4_sum(acc);
}

float kvs_vec_dot_q5_0_avx2(int64_t n, const void *row, const float *x) {
    const block_q5_0 *b = row;
    const __m128i sixteen = _mm_set1_epi8(16);
    const __m256 zero = _mm256_setzero_ps();
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK5_0; i++, b++, x += QK5_0) {
        __m128i v = load16(b->qs);
        uint32_t qh = load_u32(b->qh);
        __m128i q0 = _mm_or_si128(low_nibbles(v), bits16_to_0x10(qh & 0xffffu));
        __m128i q1 = _mm_or_si128(high_nibbles(v), bits16_to_0x10(qh >> 16));
        fma32(&acc, _mm_sub_epi8(q0, sixteen), _mm_sub_epi8(q1, sixteen), x,
              _mm256_set1_ps(half_at(&b->d)), zero);
    }
    return acc4_sum(acc);
}

float kvs_vec_dot_q5_1_avx2(int64_t n, const void *row, const float *x) {
    const block_q5_1 *b = row;
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK5_1; i++, b++, x += QK5_1) {
        __m128i v = load16(b->qs);
        uint32_t qh = load_u32(b->qh);
        __m128i q0 = _mm_or_si128(low_nibbles(v), bits16_to_0x10(qh & 0xffffu));
        __m128i q1 = _mm_or_si128(high_nibbles(v), bits16_to_0x10(qh >> 16));
        fma32(&acc, q0, q1, x, _mm256_set1_ps(half_at(&b->d)), _mm256_set1_ps(half_at(&b->m)));
    }
    return acc4_sum(acc);
}

float kvs_vec_dot_q8_0_avx2(int64_t n, const void *row, const float *x) {
    const block_q8_0 *b = row;
    const __m256 zero = _mm256_setzero_ps();
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK8_0; i++, b++, x += QK8_0) {
        fma32(&acc, load16(b->qs), load16(b->qs + 16), x, _mm256_set1_ps(half_at(&b->d)), zero);
    }
    return acc4_sum(acc);
}

/* ---- k-quants (256-element super-blocks) ---------------------------------- */

/* Q2_K/Q3_K: element 32j+l of each 128-half is bits 2j..2j+1 of its quant byte l. */
float kvs_vec_dot_q2_k_avx2(int64_t n, const void *row, const float *x) {
    const block_q2_K *b = row;
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d), dmin = half_at(&b->dmin);
        for (int h = 0; h < 2; h++, x += 128) {
            __m128i v0 = load16(b->qs + 32 * h), v1 = load16(b->qs + 32 * h + 16);
            const uint8_t *sc = b->scales + 8 * h;
            for (int j = 0; j < 4; j++) {
                uint8_t s0 = sc[2 * j], s1 = sc[2 * j + 1];
                fma16(crumbs(v0, 2 * j), x + 32 * j, _mm256_set1_ps(d * (float)(s0 & 0x0f)),
                      _mm256_set1_ps(-(dmin * (float)(s0 >> 4))), &acc.v[0], &acc.v[1]);
                fma16(crumbs(v1, 2 * j), x + 32 * j + 16, _mm256_set1_ps(d * (float)(s1 & 0x0f)),
                      _mm256_set1_ps(-(dmin * (float)(s1 >> 4))), &acc.v[2], &acc.v[3]);
            }
        }
    }
    return acc4_sum(acc);
}

/* A clear high bit means q - 4 (ggml's encoding of the signed 3-bit quant). */
static inline __m128i q3_quants(__m128i low2, __m128i hmask, uint8_t bit) {
    return _mm_sub_epi8(_mm_add_epi8(low2, select_bit(hmask, bit, 4)), _mm_set1_epi8(4));
}

float kvs_vec_dot_q3_k_avx2(int64_t n, const void *row, const float *x) {
    const block_q3_K *b = row;
    const __m256 zero = _mm256_setzero_ps();
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d);
        int8_t sc[16];
        kvs_unpack_q3_k_scales(b->scales, sc);
        __m128i hm0 = load16(b->hmask), hm1 = load16(b->hmask + 16);
        for (int h = 0; h < 2; h++, x += 128) {
            __m128i v0 = load16(b->qs + 32 * h), v1 = load16(b->qs + 32 * h + 16);
            for (int j = 0; j < 4; j++) {
                uint8_t bit = (uint8_t)(1u << (4 * h + j));
                __m128i q0 = q3_quants(crumbs(v0, 2 * j), hm0, bit);
                __m128i q1 = q3_quants(crumbs(v1, 2 * j), hm1, bit);
                __m256 s0 = _mm256_set1_ps(d * (float)sc[8 * h + 2 * j]);
                __m256 s1 = _mm256_set1_ps(d * (float)sc[8 * h + 2 * j + 1]);
                fma16(q0, x + 32 * j, s0, zero, &acc.v[0], &acc.v[1]);
                fma16(q1, x + 32 * j + 16, s1, zero, &acc.v[2], &acc.v[3]);
            }
        }
    }
    return acc4_sum(acc);
}

/* Q4_K/Q5_K: each 64 elements are the low then high nibbles of 32 quant bytes. */
float kvs_vec_dot_q4_k_avx2(int64_t n, const void *row, const float *x) {
    const block_q4_K *b = row;
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d), dmin = half_at(&b->dmin);
        uint8_t sc[8], mn[8];
        kvs_unpack_k4_scales(b->scales, sc, mn);
        for (int c = 0; c < 4; c++, x += 64) {
            __m128i v0 = load16(b->qs + 32 * c), v1 = load16(b->qs + 32 * c + 16);
            fma32(&acc, low_nibbles(v0), low_nibbles(v1), x, _mm256_set1_ps(d * (float)sc[2 * c]),
                  _mm256_set1_ps(-(dmin * (float)mn[2 * c])));
            fma32(&acc, high_nibbles(v0), high_nibbles(v1), x + 32,
                  _mm256_set1_ps(d * (float)sc[2 * c + 1]),
                  _mm256_set1_ps(-(dmin * (float)mn[2 * c + 1])));
        }
    }
    return acc4_sum(acc);
}

float kvs_vec_dot_q5_k_avx2(int64_t n, const void *row, const float *x) {
    const block_q5_K *b = row;
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d), dmin = half_at(&b->dmin);
        uint8_t sc[8], mn[8];
        kvs_unpack_k4_scales(b->scales, sc, mn);
        __m128i h0 = load16(b->qh), h1 = load16(b->qh + 16);
        for (int c = 0; c < 4; c++, x += 64) {
            __m128i v0 = load16(b->qs + 32 * c), v1 = load16(b->qs + 32 * c + 16);
            /* The 5th bit of 32-element group s is bit s of qh[l]. */
            uint8_t blo = (uint8_t)(1u << (2 * c)), bhi = (uint8_t)(1u << (2 * c + 1));
            __m128i lo0 = _mm_or_si128(low_nibbles(v0), select_bit(h0, blo, 0x10));
            __m128i lo1 = _mm_or_si128(low_nibbles(v1), select_bit(h1, blo, 0x10));
            __m128i hi0 = _mm_or_si128(high_nibbles(v0), select_bit(h0, bhi, 0x10));
            __m128i hi1 = _mm_or_si128(high_nibbles(v1), select_bit(h1, bhi, 0x10));
            fma32(&acc, lo0, lo1, x, _mm256_set1_ps(d * (float)sc[2 * c]),
                  _mm256_set1_ps(-(dmin * (float)mn[2 * c])));
            fma32(&acc, hi0, hi1, x + 32, _mm256_set1_ps(d * (float)sc[2 * c + 1]),
                  _mm256_set1_ps(-(dmin * (float)mn[2 * c + 1])));
        }
    }
    return acc4_sum(acc);
}

/* Q6_K group k of a 128-half: nibble k>>1 of ql[32*(k&1)..], bits 2k.. of qh, minus 32. */
static inline __m128i q6_quants(__m128i ql, __m128i qh, int k) {
    __m128i lo = (k >> 1) ? high_nibbles(ql) : low_nibbles(ql);
    __m128i hi = _mm_slli_epi16(crumbs(qh, 2 * k), 4);
    return _mm_sub_epi8(_mm_or_si128(lo, hi), _mm_set1_epi8(32));
}

float kvs_vec_dot_q6_k_avx2(int64_t n, const void *row, const float *x) {
    const block_q6_K *b = row;
    const __m256 zero = _mm256_setzero_ps();
    acc4 acc = acc4_zero();
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d);
        for (int h = 0; h < 2; h++, x += 128) {
            const uint8_t *ql = b->ql + 64 * h;
            const int8_t *sc = b->scales + 8 * h;
            __m128i qh0 = load16(b->qh + 32 * h), qh1 = load16(b->qh + 32 * h + 16);
            for (int k = 0; k < 4; k++) {
                const uint8_t *src = ql + 32 * (k & 1);
                __m128i q0 = q6_quants(load16(src), qh0, k);
                __m128i q1 = q6_quants(load16(src + 16), qh1, k);
                __m256 s0 = _mm256_set1_ps(d * (float)sc[2 * k]);
                __m256 s1 = _mm256_set1_ps(d * (float)sc[2 * k + 1]);
                fma16(q0, x + 32 * k, s0, zero, &acc.v[0], &acc.v[1]);
                fma16(q1, x + 32 * k + 16, s1, zero, &acc.v[2], &acc.v[3]);
            }
        }
    }
    return acc4_sum(acc);
}

#endif /* KVS_HAVE_AVX2_BUILD */

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 4 weight rows x 2 tokens: 8 accumulators, 6 loads per 8 FMAs. */
void kvs_dot_f32_4x2_avx2(int64_t n, const float *w, const float *x, float *out) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + n + i);
        for (int r = 0; r < 4; r++) {
            const __m256 wr = _mm256_loadu_ps(w + r * n + i);
            acc[2 * r] = _mm256_fmadd_ps(wr, x0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(wr, x1, acc[2 * r + 1]);
        }
    }
    for (int k = 0; k < 8; k++) out[k] = hsum256(acc[k]);
    for (; i < n; i++) {
        for (int r = 0; r < 4; r++) {
            out[2 * r] += w[r * n + i] * x[i];
            out[2 * r + 1] += w[r * n + i] * x[n + i];
        }
    }
}

/* gate = silu(gate) * up; sigmoid from e = exp(-|g|) <= 1, so exp never overflows:
 * 1 / (1 + e) for g >= 0, e / (1 + e) below. */
void kvs_swiglu_avx2(float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign)); /* exp(-|g|) */
        const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), g); /* g's sign bit picks e/(1+e) */
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* gate = gelu_tanh(gate) * up. 0.5 * (1 + tanh(u)) is sigmoid(2u), so this is
 * the SwiGLU kernel's overflow-free sigmoid at 2u = 2 sqrt(2/pi) (g + 0.044715 g^3). */
void kvs_geglu_avx2(float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 k = _mm256_set1_ps(2.0f * 0.7978845608f), a = _mm256_set1_ps(0.044715f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 u2 = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(a, g), _mm256_mul_ps(g, g), g));
        const __m256 e = exp_nonpositive(_mm256_or_ps(u2, sign)); /* exp(-|2u|) */
        const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), u2); /* u's sign bit picks e/(1+e) */
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) {
        const float g = gate[i];
        gate[i] = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g))) * up[i];
    }
}
