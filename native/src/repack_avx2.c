/* repack_avx2.c - AVX2 twins of the packed kernels (repack.c). Lane r of
 * every vector is row r of the group: a 32-byte run gives 4 quants of each
 * of the 8 rows, the matching 4 activation bytes are broadcast to all lanes,
 * and maddubs + one madd per block leave row r's integer dot in lane r. The
 * rows' 8 fp16 scales convert in one cvtph, and 8 outputs leave in one store.
 * Compiled with -mavx2 -mfma -mf16c. */
#include "repack.h"

#if defined(KVS_HAVE_AVX2_BUILD)

#include <immintrin.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Tokens whose products share one unpacking of a block in registers. */
#define TOKEN_TILE 4

/* One token streams the weights from memory faster than the hardware
 * prefetcher alone fetches them: ask for the lines 2 KiB ahead (measured
 * best of 0.5..4 KiB; +20% on a 128 MiB matrix). */
#define PREFETCH_BYTES 2048

ALWAYS_INLINE void prefetch_block(const void *block, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) _mm_prefetch((const char *)block + PREFETCH_BYTES + off, _MM_HINT_T0);
}

/* Activation bytes p[0..3] in every 32-bit lane. */
ALWAYS_INLINE __m256i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

ALWAYS_INLINE __m256 halves8(const kvs_half *h) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)); }

/* The 4 runs of a nibble block as unsigned quants: lo[j] holds elements
 * 4j..4j+3 of each row, hi[j] elements 16+4j..16+4j+3. */
typedef struct {
    __m256i lo[4], hi[4];
} nibble_runs;

ALWAYS_INLINE nibble_runs unpack_runs(const uint8_t *qs) {
    const __m256i mask = _mm256_set1_epi8(0x0f);
    nibble_runs w;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        w.lo[j] = _mm256_and_si256(v, mask);
        w.hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    return w;
}

/* Lane r: row r's integer dot with the activation block xq, as a float. The
 * 8 maddubs results add up in int16: each lane is at most 8 * 2 * 15 * 127 =
 * 30480, so nothing saturates, and one madd widens the block. */
ALWAYS_INLINE __m256 nibble_dot(const nibble_runs *w, const int8_t *xq) {
    __m256i s = _mm256_maddubs_epi16(w->lo[0], broadcast4(xq));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w->hi[0], broadcast4(xq + 16)));
#pragma GCC unroll 4
    for (int j = 1; j < 4; j++) {
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w->lo[j], broadcast4(xq + 4 * j)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w->hi[j], broadcast4(xq + 16 + 4 * j)));
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

/* Signed Q8_0 runs go through the sign trick |w| x sign(x, w); a pair of
 * products reaches 2 * 128 * 127, so every run widens to int32 on its own. */
ALWAYS_INLINE __m256 byte_dot(const __m256i absw[8], const int8_t *qs, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        const __m256i p = _mm256_maddubs_epi16(absw[j], _mm256_sign_epi8(broadcast4(xq + 4 * j), w));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
    }
    return _mm256_cvtepi32_ps(s);
}

/* nt (a constant after inlining, at most TOKEN_TILE) tokens against one
 * nibble group: acc += d * x.d * isum + c * x.s, where c is the min (Q4_1)
 * or the scale (Q4_0); the constant term is scaled once at the end by
 * c_scale (1 for the min, -8 for Q4_0's offset). */
ALWAYS_INLINE void nibble_tile(int64_t nb, const uint8_t *blocks, size_t block_bytes, size_t c_offset,
                               size_t qs_offset, float c_scale, const block_q8_act *x, int nt, float *y,
                               int64_t y_stride) {
    __m256 acc[TOKEN_TILE], acc_c[TOKEN_TILE];
    for (int t = 0; t < nt; t++) acc[t] = acc_c[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = blocks + i * (int64_t)block_bytes;
        if (nt == 1) prefetch_block(b, block_bytes);
        const nibble_runs w = unpack_runs(b + qs_offset);
        const __m256 d = halves8((const kvs_half *)b), c = halves8((const kvs_half *)(b + c_offset));
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const block_q8_act *xt = x + t * nb + i;
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xt->d)), nibble_dot(&w, xt->qs), acc[t]);
            acc_c[t] = _mm256_fmadd_ps(c, _mm256_set1_ps(xt->s), acc_c[t]);
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm256_storeu_ps(y + t * y_stride, _mm256_fmadd_ps(_mm256_set1_ps(c_scale), acc_c[t], acc[t]));
    }
}

ALWAYS_INLINE void byte_tile(int64_t nb, const block_q8_0x8 *b, const block_q8_act *x, int nt, float *y,
                             int64_t y_stride) {
    __m256 acc[TOKEN_TILE];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        if (nt == 1) prefetch_block(b + i, sizeof *b);
        __m256i absw[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) absw[j] = _mm256_abs_epi8(_mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * j)));
        const __m256 d = halves8(b[i].d);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const block_q8_act *xt = x + t * nb + i;
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xt->d)), byte_dot(absw, b[i].qs, xt->qs), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(y + t * y_stride, acc[t]);
}

/* The tile of each format for nt tokens (a constant at every use). */
#define Q4_0_TILE(xs, nt, ys)                                                                              \
    nibble_tile(nb, group, sizeof(block_q4_0x8), offsetof(block_q4_0x8, d), offsetof(block_q4_0x8, qs), -8.0f, \
                xs, nt, ys, y_stride)
#define Q4_1_TILE(xs, nt, ys)                                                                              \
    nibble_tile(nb, group, sizeof(block_q4_1x8), offsetof(block_q4_1x8, m), offsetof(block_q4_1x8, qs), 1.0f, \
                xs, nt, ys, y_stride)
#define Q8_0_TILE(xs, nt, ys) byte_tile(nb, group, xs, nt, ys, y_stride)

/* One token is a tile of one; a batch goes in tiles of TOKEN_TILE (4)
 * tokens, then a remainder of 2 and of 1. */
#define DEFINE_PACKED_KERNELS(name, TILE)                                                                   \
    void kvs_repack_gemv_##name##_avx2(int64_t n, const void *group, const block_q8_act *x,                \
                                       float out[REPACK_ROWS]) {                                            \
        const int64_t nb = n / QK_ACT, y_stride = 0;                                                        \
        TILE(x, 1, out);                                                                                    \
    }                                                                                                       \
    void kvs_repack_gemm_##name##_avx2(int64_t n, const void *group, const block_q8_act *x, int64_t n_tokens, \
                                       float *y, int64_t y_stride) {                                        \
        const int64_t nb = n / QK_ACT;                                                                      \
        int64_t t = 0;                                                                                      \
        for (; t + TOKEN_TILE <= n_tokens; t += TOKEN_TILE) TILE(x + t * nb, TOKEN_TILE, y + t * y_stride); \
        if (t + 2 <= n_tokens) {                                                                            \
            TILE(x + t * nb, 2, y + t * y_stride);                                                          \
            t += 2;                                                                                         \
        }                                                                                                   \
        if (t < n_tokens) TILE(x + t * nb, 1, y + t * y_stride);                                            \
    }

_Static_assert(TOKEN_TILE == 4, "the remainder of a batch is taken as 2 + 1 tokens");

DEFINE_PACKED_KERNELS(q4_0, Q4_0_TILE)
DEFINE_PACKED_KERNELS(q4_1, Q4_1_TILE)
DEFINE_PACKED_KERNELS(q8_0, Q8_0_TILE)

/* ---- one column of the packed weights (the outlier terms, act_q8.h) ----------
 * Lane r is row r of a group: the 32-byte run holding element e gives row r's
 * byte in bytes 4r..4r+3 of lane r, shifted down and masked; the 8 scales
 * (and mins) convert in one cvtph each. Multiply and add stay separate, so
 * the lanes equal the scalar twin's d * q + m bit for bit. Rows outside full
 * groups (a partial first or last group) take the scalar element loop. */

/* Lane r: byte k % 4 of the 32-bit lane r of the run at p. */
ALWAYS_INLINE __m256i run_bytes(const uint8_t *p, int k) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_and_si256(_mm256_srli_epi32(v, 8 * (k % 4)), _mm256_set1_epi32(0xff));
}

/* Element e of the 8 rows of a nibble block's runs, unsigned. */
ALWAYS_INLINE __m256 nibble_lanes(const uint8_t *qs, int e) {
    const int k = e % 16;
    __m256i q = run_bytes(qs + 32 * (k / 4), k);
    q = e < 16 ? _mm256_and_si256(q, _mm256_set1_epi32(0x0f)) : _mm256_srli_epi32(q, 4);
    return _mm256_cvtepi32_ps(q);
}

/* Element e of the 8 rows of a byte block's runs, signed. */
ALWAYS_INLINE __m256 byte_lanes(const int8_t *qs, int e) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * (e / 4)));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * (e % 4)), 24));
}

static __m256 column_lanes(int32_t type, const uint8_t *b, int e) {
    switch (type) {
    case KVS_TYPE_Q4_0: {
        const block_q4_0x8 *q = (const block_q4_0x8 *)b;
        return _mm256_mul_ps(halves8(q->d), _mm256_sub_ps(nibble_lanes(q->qs, e), _mm256_set1_ps(8.0f)));
    }
    case KVS_TYPE_Q4_1: {
        const block_q4_1x8 *q = (const block_q4_1x8 *)b;
        return _mm256_add_ps(_mm256_mul_ps(halves8(q->d), nibble_lanes(q->qs, e)), halves8(q->m));
    }
    default: {
        const block_q8_0x8 *q = (const block_q8_0x8 *)b;
        return _mm256_mul_ps(halves8(q->d), byte_lanes(q->qs, e));
    }
    }
}

static void column_avx2(int32_t type, size_t block_bytes, const kvs_repack_kernels *scalar, const void *packed,
                        int64_t n_cols, int64_t j, int64_t r0, int64_t r1, float *out) {
    const int64_t g0 = (r0 + REPACK_ROWS - 1) / REPACK_ROWS, g1 = r1 / REPACK_ROWS;
    if (g0 >= g1) {
        scalar->column(packed, n_cols, j, r0, r1, out);
        return;
    }
    if (r0 < g0 * REPACK_ROWS) scalar->column(packed, n_cols, j, r0, g0 * REPACK_ROWS, out);
    const int64_t group_bytes = n_cols / QK_ACT * REPACK_ROWS * (int64_t)block_bytes;
    const uint8_t *column = (const uint8_t *)packed + j / QK_ACT * REPACK_ROWS * (int64_t)block_bytes;
    for (int64_t g = g0; g < g1; g++) {
        _mm256_storeu_ps(out + g * REPACK_ROWS - r0, column_lanes(type, column + g * group_bytes, (int)(j % QK_ACT)));
    }
    if (g1 * REPACK_ROWS < r1) scalar->column(packed, n_cols, j, g1 * REPACK_ROWS, r1, out + (g1 * REPACK_ROWS - r0));
}

#define DEFINE_COLUMN_AVX2(name, type, block)                                                                   \
    void kvs_repack_column_##name##_avx2(const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1,  \
                                         float *out) {                                                          \
        column_avx2(type, sizeof(block), kvs_repack_kernels_find(type, KVS_IMPL_SCALAR), packed, n_cols, j, r0, \
                    r1, out);                                                                                   \
    }

DEFINE_COLUMN_AVX2(q4_0, KVS_TYPE_Q4_0, block_q4_0)
DEFINE_COLUMN_AVX2(q4_1, KVS_TYPE_Q4_1, block_q4_1)
DEFINE_COLUMN_AVX2(q8_0, KVS_TYPE_Q8_0, block_q8_0)

#endif
