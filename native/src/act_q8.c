/* act_q8.c - scalar reference of the 8-bit-activation fast path: the
 * activation quantizer and integer dots of the 32-element weight formats.
 * Each weight block is unpacked to integers q with w = d*q + m; its dot with
 * an activation block (x = dx*qx) is then d*dx*sum(q*qx) + m*dx*sum(qx). */
#include "act_q8.h"

#include <math.h>
#include <string.h>

#include "blocks.h"
#include "formats.h"
#include "kernels_avx2.h"
#include "kvsink.h"

void kvs_quantize_act_scalar(const float *x, block_q8_act *y, int64_t n) {
    for (int64_t i = 0; i < n / QK_ACT; i++, x += QK_ACT, y++) {
        float amax = 0.0f;
        for (int j = 0; j < QK_ACT; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = d > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK_ACT; j++) {
            /* lrintf rounds half to even, as the AVX2 conversion does */
            y->qs[j] = (int8_t)lrintf(x[j] * id);
            sum += y->qs[j];
        }
        y->d = d;
        y->s = d * (float)sum;
    }
}

/* One weight block of 32 as integers: w[j] = d * q[j] + m, where q = u -
 * offset for the unsigned stored quant u. Q6_K's two scales per block are
 * folded into q (q = scale * (u - 32), d the super-block's): the integer
 * dot stays exact and the block keeps one d. */
typedef struct {
    int q[32];
    float d, m;
    int offset;   /* 0 with `signed_quants`: Q8_0, Q6_K (no quads) */
} int_block;

static float half(const kvs_half *p) {
    kvs_half h;
    memcpy(&h, p, sizeof h);
    return kvs_fp16_to_fp32(h);
}

static uint32_t fifth_bits(const uint8_t qh[4]) {
    uint32_t v;
    memcpy(&v, qh, sizeof v);
    return v;
}

/* Nibbles: element j is the low nibble of byte j, element j+16 the high one. */
static void unpack_nibbles(const uint8_t qs[16], uint32_t qh, int offset, int *q) {
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0x0f) + (int)(((qh >> j) & 1u) << 4) - offset;
        q[j + 16] = (qs[j] >> 4) + (int)(((qh >> (j + 16)) & 1u) << 4) - offset;
    }
}

/* Element j (0..31) of a nibble block, its 5th bit included. */
static int nibble_at(const uint8_t qs[16], uint32_t qh, int j) {
    const int u = j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4;
    return u + (int)(((qh >> j) & 1u) << 4);
}

/* Block i (of 32 elements) of a row, as integers. */
typedef void (*unpack_fn)(const uint8_t *row, int64_t i, int_block *b);
/* Element j of a row, dequantized as the exact path does (formats.c). */
typedef float (*weight_at_fn)(const uint8_t *row, int64_t j);

static void unpack_q4_0(const uint8_t *row, int64_t i, int_block *b) {
    const block_q4_0 *w = (const block_q4_0 *)row + i;
    unpack_nibbles(w->qs, 0, 8, b->q);
    b->d = half(&w->d);
    b->m = 0.0f;
    b->offset = 8;
}

static float weight_at_q4_0(const uint8_t *row, int64_t j) {
    const block_q4_0 *w = (const block_q4_0 *)row + j / 32;
    return (float)(nibble_at(w->qs, 0, (int)(j % 32)) - 8) * half(&w->d);
}

static void unpack_q4_1(const uint8_t *row, int64_t i, int_block *b) {
    const block_q4_1 *w = (const block_q4_1 *)row + i;
    unpack_nibbles(w->qs, 0, 0, b->q);
    b->d = half(&w->d);
    b->m = half(&w->m);
    b->offset = 0;
}

static float weight_at_q4_1(const uint8_t *row, int64_t j) {
    const block_q4_1 *w = (const block_q4_1 *)row + j / 32;
    return half(&w->d) * (float)nibble_at(w->qs, 0, (int)(j % 32)) + half(&w->m);
}

static void unpack_q5_0(const uint8_t *row, int64_t i, int_block *b) {
    const block_q5_0 *w = (const block_q5_0 *)row + i;
    unpack_nibbles(w->qs, fifth_bits(w->qh), 16, b->q);
    b->d = half(&w->d);
    b->m = 0.0f;
    b->offset = 16;
}

static float weight_at_q5_0(const uint8_t *row, int64_t j) {
    const block_q5_0 *w = (const block_q5_0 *)row + j / 32;
    return (float)(nibble_at(w->qs, fifth_bits(w->qh), (int)(j % 32)) - 16) * half(&w->d);
}

static void unpack_q5_1(const uint8_t *row, int64_t i, int_block *b) {
    const block_q5_1 *w = (const block_q5_1 *)row + i;
    unpack_nibbles(w->qs, fifth_bits(w->qh), 0, b->q);
    b->d = half(&w->d);
    b->m = half(&w->m);
    b->offset = 0;
}

static float weight_at_q5_1(const uint8_t *row, int64_t j) {
    const block_q5_1 *w = (const block_q5_1 *)row + j / 32;
    return half(&w->d) * (float)nibble_at(w->qs, fifth_bits(w->qh), (int)(j % 32)) + half(&w->m);
}

static void unpack_q8_0(const uint8_t *row, int64_t i, int_block *b) {
    const block_q8_0 *w = (const block_q8_0 *)row + i;
    for (int j = 0; j < 32; j++) b->q[j] = w->qs[j];
    b->d = half(&w->d);
    b->m = 0.0f;
    b->offset = 0;
}

static float weight_at_q8_0(const uint8_t *row, int64_t j) {
    const block_q8_0 *w = (const block_q8_0 *)row + j / 32;
    return (float)w->qs[j % 32] * half(&w->d);
}

/* Q4_K/Q5_K: sub-block s (0..7) of a super-block has scale d * sc[s] and
 * min dmin * mn[s]; its 32 quants are the low (s even) or high (s odd)
 * nibbles of qs[32 * (s / 2) ..], Q5_K's 5th bit is bit s of qh[l]. */
static void k4_block(kvs_half d, kvs_half dmin, const uint8_t scales[12], int s, int_block *b) {
    uint8_t sc[8], mn[8];
    kvs_unpack_k4_scales(scales, sc, mn);
    b->d = half(&d) * (float)sc[s];
    b->m = -(half(&dmin) * (float)mn[s]);
    b->offset = 0;
}

static void unpack_q4_k(const uint8_t *row, int64_t i, int_block *b) {
    const block_q4_K *w = (const block_q4_K *)row + i / 8;
    const int s = (int)(i % 8);
    const uint8_t *qs = w->qs + 32 * (s / 2);
    for (int l = 0; l < 32; l++) b->q[l] = (qs[l] >> (4 * (s & 1))) & 0x0f;
    k4_block(w->d, w->dmin, w->scales, s, b);
}

static void unpack_q5_k(const uint8_t *row, int64_t i, int_block *b) {
    const block_q5_K *w = (const block_q5_K *)row + i / 8;
    const int s = (int)(i % 8);
    const uint8_t *qs = w->qs + 32 * (s / 2);
    for (int l = 0; l < 32; l++) b->q[l] = ((qs[l] >> (4 * (s & 1))) & 0x0f) | (((w->qh[l] >> s) & 1) << 4);
    k4_block(w->d, w->dmin, w->scales, s, b);
}

/* Element j as formats.c dequantizes it: d1 * q - m1. */
static float k4_weight(kvs_half d, kvs_half dmin, const uint8_t scales[12], int s, int q) {
    uint8_t sc[8], mn[8];
    kvs_unpack_k4_scales(scales, sc, mn);
    return half(&d) * (float)sc[s] * (float)q - half(&dmin) * (float)mn[s];
}

static float weight_at_q4_k(const uint8_t *row, int64_t j) {
    const block_q4_K *w = (const block_q4_K *)row + j / 256;
    const int e = (int)(j % 256), s = e / 32;
    return k4_weight(w->d, w->dmin, w->scales, s, (w->qs[32 * (s / 2) + e % 32] >> (4 * (s & 1))) & 0x0f);
}

static float weight_at_q5_k(const uint8_t *row, int64_t j) {
    const block_q5_K *w = (const block_q5_K *)row + j / 256;
    const int e = (int)(j % 256), s = e / 32, l = e % 32;
    const int q = ((w->qs[32 * (s / 2) + l] >> (4 * (s & 1))) & 0x0f) | (((w->qh[l] >> s) & 1) << 4);
    return k4_weight(w->d, w->dmin, w->scales, s, q);
}

/* Q6_K: block k (0..3) of 128-half h holds elements 128h + 32k + l; its
 * low 4 bits are the low (k < 2) or high nibbles of ql[64h + 32(k % 2) + l],
 * its high 2 bits bits 2k..2k+1 of qh[32h + l], its scale scales[8h + 2k +
 * l / 16] (formats.c's order). */
static int q6_quant(const block_q6_K *w, int h, int k, int l) {
    const int low = (w->ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0f;
    return (low | (((w->qh[32 * h + l] >> (2 * k)) & 3) << 4)) - 32;
}

static void unpack_q6_k(const uint8_t *row, int64_t i, int_block *b) {
    const block_q6_K *w = (const block_q6_K *)row + i / 8;
    const int h = (int)(i % 8) / 4, k = (int)(i % 4);
    for (int l = 0; l < 32; l++) b->q[l] = w->scales[8 * h + 2 * k + l / 16] * q6_quant(w, h, k, l);
    b->d = half(&w->d);
    b->m = 0.0f;
    b->offset = 0;
}

static float weight_at_q6_k(const uint8_t *row, int64_t j) {
    const block_q6_K *w = (const block_q6_K *)row + j / 256;
    const int e = (int)(j % 256), h = e / 128, k = e % 128 / 32, l = e % 32;
    return half(&w->d) * (float)w->scales[8 * h + 2 * k + l / 16] * (float)q6_quant(w, h, k, l);
}

static float q8_dot_blocks(int64_t n, const void *row, const block_q8_act *x, unpack_fn unpack) {
    double acc = 0.0;
    for (int64_t i = 0; i < n / QK_ACT; i++, x++) {
        int_block b;
        unpack(row, i, &b);
        int32_t isum = 0;
        for (int j = 0; j < QK_ACT; j++) isum += b.q[j] * x->qs[j];
        acc += (double)(b.d * x->d) * (double)isum + (double)b.m * (double)x->s;
    }
    return (float)acc;
}

static void q8_unpack4(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out, unpack_fn unpack) {
    for (int r = 0; r < 4; r++) {
        const uint8_t *w = (const uint8_t *)rows + r * row_bytes;
        for (int64_t i = 0; i < n / QK_ACT; i++) {
            int_block b;
            unpack(w, i, &b);
            for (int j = 0; j < QK_ACT; j++) out[i].u[r][j] = (uint8_t)(b.q[j] + b.offset);
            out[i].d[r] = b.d;
            out[i].c[r] = b.m - (float)b.offset * b.d;
        }
    }
}

static void q8_quad_dot(int64_t nb, const q8_quad *w, const block_q8_act *x, float out[4]) {
    for (int r = 0; r < 4; r++) {
        double acc = 0.0;
        for (int64_t i = 0; i < nb; i++) {
            int32_t isum = 0;
            for (int j = 0; j < QK_ACT; j++) isum += (int32_t)w[i].u[r][j] * x[i].qs[j];
            acc += (double)(w[i].d[r] * x[i].d) * (double)isum + (double)w[i].c[r] * (double)x[i].s;
        }
        out[r] = (float)acc;
    }
}

/* The four-row twin is four single-row dots. */
#define DEFINE_Q8_DOT(name)                                                                         \
    static float q8_dot_##name(int64_t n, const void *row, const block_q8_act *x) {                \
        return q8_dot_blocks(n, row, x, unpack_##name);                                            \
    }                                                                                              \
    static void q8_dot4_##name(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, \
                               float out[4]) {                                                     \
        for (int r = 0; r < 4; r++) out[r] = q8_dot_##name(n, (const uint8_t *)rows + r * row_bytes, x); \
    }

#define DEFINE_Q8_UNPACK4(name)                                                                       \
    static void q8_unpack4_##name(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out) {      \
        q8_unpack4(n, rows, row_bytes, out, unpack_##name);                                           \
    }

DEFINE_Q8_DOT(q4_0)
DEFINE_Q8_DOT(q4_1)
DEFINE_Q8_DOT(q5_0)
DEFINE_Q8_DOT(q5_1)
DEFINE_Q8_DOT(q8_0)
DEFINE_Q8_DOT(q4_k)
DEFINE_Q8_DOT(q5_k)
DEFINE_Q8_DOT(q6_k)
DEFINE_Q8_UNPACK4(q4_0)
DEFINE_Q8_UNPACK4(q4_1)
DEFINE_Q8_UNPACK4(q5_0)
DEFINE_Q8_UNPACK4(q5_1)
DEFINE_Q8_UNPACK4(q4_k)
DEFINE_Q8_UNPACK4(q5_k)

/* ---- massive activations (act_q8.h) ------------------------------------ */

static void swap_floats(float *a, float *b) {
    const float t = *a;
    *a = *b;
    *b = t;
}

/* The k-th smallest of v[0..n) (0-based; v is reordered): Hoare's selection. */
static float kth_smallest(float *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const float pivot = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) swap_floats(&v[i++], &v[j--]);
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else break;
    }
    return v[k];
}

int kvs_split_outliers(const float *x, block_q8_act *y, int64_t n, float ratio, act_outliers *out, float *scratch) {
    const int64_t nb = n / QK_ACT;
    out->n = 0;
    if (!(ratio > 0.0f) || nb < 1) return 0;
    for (int64_t i = 0; i < nb; i++) scratch[i] = y[i].d;
    const float typical = kth_smallest(scratch, nb, nb / 2) * 127.0f; /* median block maximum */
    if (!(typical > 0.0f)) return 0; /* half the blocks are zero: nothing to compare with */
    const float limit = ratio * typical;
    for (int64_t i = 0; i < nb && out->n < ACT_MAX_OUTLIERS; i++) {
        if (!(y[i].d * 127.0f > limit)) continue;
        float block[QK_ACT];
        memcpy(block, x + i * QK_ACT, sizeof block);
        for (int j = 0; j < QK_ACT && out->n < ACT_MAX_OUTLIERS; j++) {
            if (!(fabsf(block[j]) > limit)) continue;
            out->index[out->n] = (int32_t)(i * QK_ACT + j);
            out->value[out->n] = block[j];
            out->n++;
            block[j] = 0.0f;
        }
        kvs_quantize_act_scalar(block, y + i, QK_ACT);
    }
    return out->n;
}

#if defined(KVS_HAVE_AVX2_BUILD)
#  define AVX2(name) {kvs_q8_dot_##name##_avx2, kvs_q8_dot4_##name##_avx2, kvs_q8_unpack4_##name##_avx2, kvs_q8_quad_dot_avx2}
#  define AVX2_SIGNED(name) {kvs_q8_dot_##name##_avx2, kvs_q8_dot4_##name##_avx2, NULL, NULL}
#else
#  define AVX2(name) {NULL, NULL, NULL, NULL}
#  define AVX2_SIGNED(name) {NULL, NULL, NULL, NULL}
#endif

typedef struct {
    int32_t type;
    kvs_q8_kernels scalar, avx2;
    weight_at_fn weight_at;   /* the outliers' weight columns */
} q8_dot_entry;

#define ENTRY(type, name) \
    {type, {q8_dot_##name, q8_dot4_##name, q8_unpack4_##name, q8_quad_dot}, AVX2(name), weight_at_##name}
#define ENTRY_SIGNED(type, name) \
    {type, {q8_dot_##name, q8_dot4_##name, NULL, NULL}, AVX2_SIGNED(name), weight_at_##name}

static const q8_dot_entry q8_dots[] = {
    ENTRY(KVS_TYPE_Q4_0, q4_0), ENTRY(KVS_TYPE_Q4_1, q4_1), ENTRY(KVS_TYPE_Q5_0, q5_0),
    ENTRY(KVS_TYPE_Q5_1, q5_1), ENTRY_SIGNED(KVS_TYPE_Q8_0, q8_0),
    ENTRY(KVS_TYPE_Q4_K, q4_k), ENTRY(KVS_TYPE_Q5_K, q5_k), ENTRY_SIGNED(KVS_TYPE_Q6_K, q6_k),
};

void kvs_q8_weight_column(int32_t type, const void *data, int64_t row_bytes, int64_t j, int64_t r0, int64_t r1,
                          float *out) {
    for (size_t i = 0; i < sizeof q8_dots / sizeof q8_dots[0]; i++) {
        if (q8_dots[i].type != type) continue;
        for (int64_t r = r0; r < r1; r++) out[r - r0] = q8_dots[i].weight_at((const uint8_t *)data + r * row_bytes, j);
        return;
    }
}

const kvs_q8_kernels *kvs_q8_kernels_find(int32_t type, int32_t impl) {
    for (size_t i = 0; i < sizeof q8_dots / sizeof q8_dots[0]; i++) {
        if (q8_dots[i].type != type) continue;
        if (impl == KVS_IMPL_SCALAR) return &q8_dots[i].scalar;
        if (kvs_avx2_available() && q8_dots[i].avx2.dot) return &q8_dots[i].avx2;
        return impl == KVS_IMPL_AUTO ? &q8_dots[i].scalar : NULL;
    }
    return NULL;
}

kvs_quantize_act_fn kvs_quantize_act_kernel(int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) return kvs_quantize_act_avx2;
#endif
    (void)impl;
    return kvs_quantize_act_scalar;
}
