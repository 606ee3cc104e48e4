/* formats.c - scalar reference kernels of every tensor type (dequantize and
 * dot with f32 activations), the per-type kernel table, fp16/bf16 conversion,
 * CPU feature detection and the public format API. Block layouts and
 * dequantization formulas follow ggml exactly, so results are bit-identical. */

/* Dequantization must round like ggml (q*d + m as two roundings), so never fuse. */
#if defined(__clang__)
#  pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#  pragma GCC optimize("fp-contract=off")
#endif

#include "formats.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "act_q8.h"
#include "kernels_avx2.h"
#include "status.h"
#include "types.h"

/* ---- fp16 / bf16 ---------------------------------------------------------- */

float kvs_fp16_to_fp32(kvs_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf, or NaN keeping its payload */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        /* Subnormal half: normalize, every one is a normal float. */
        uint32_t e = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round m >> shift to nearest, ties to even. */
static uint32_t shift_round_even(uint32_t m, uint32_t shift) {
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return r;
}

kvs_half kvs_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (kvs_half)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* quiet NaN */
    if (a >= 0x477ff000u) return (kvs_half)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {
        /* Normal half: rebias the exponent; a mantissa carry correctly bumps it. */
        return (kvs_half)(sign | shift_round_even(a - 0x38000000u, 13));
    }
    if (a < 0x33000000u) return (kvs_half)sign; /* below 2^-25: rounds to zero */
    /* Subnormal half, in units of 2^-24; rounding up to 0x400 gives the min normal. */
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    return (kvs_half)(sign | shift_round_even(m, 126u - e));
}

float kvs_bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Blocks may sit at any byte offset in a mapping, so read halves bytewise. */
static inline float half_at(const kvs_half *p) {
    kvs_half h;
    memcpy(&h, p, sizeof h);
    return kvs_fp16_to_fp32(h);
}

/* ---- k-quant scale unpacking (shared with the AVX2 kernels) --------------- */

void kvs_unpack_q3_k_scales(const uint8_t packed[12], int8_t out[16]) {
    /* Low nibbles in bytes 0..7 (two per byte), high 2 bits in bytes 8..11. */
    for (int j = 0; j < 16; j++) {
        uint8_t lo = j < 8 ? (packed[j] & 0x0f) : (packed[j - 8] >> 4);
        uint8_t hi = (packed[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

void kvs_unpack_k4_scales(const uint8_t packed[12], uint8_t sc[8], uint8_t mn[8]) {
    /* 6-bit values: 0..3 in the low bits of bytes 0..7, 4..7 split across bytes. */
    for (int j = 0; j < 4; j++) {
        sc[j] = packed[j] & 63;
        mn[j] = packed[j + 4] & 63;
        sc[j + 4] = (uint8_t)((packed[j + 8] & 0x0f) | ((packed[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4));
    }
}

/* ---- scalar dequantization ------------------------------------------------ */

static void dequant_f32(const void *src, float *dst, int64_t n) {
    memmove(dst, src, (size_t)n * sizeof(float));
}

static void dequant_f16(const void *src, float *dst, int64_t n) {
    const kvs_half *s = src;
    for (int64_t i = 0; i < n; i++) dst[i] = half_at(s + i);
}

static void dequant_bf16(const void *src, float *dst, int64_t n) {
    const uint8_t *s = src;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, sizeof h);
        dst[i] = kvs_bf16_to_fp32(h);
    }
}

static void dequant_q4_0(const void *src, float *dst, int64_t n) {
    const block_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK4_0; i++, b++, dst += QK4_0) {
        float d = half_at(&b->d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            dst[j] = (float)((b->qs[j] & 0x0f) - 8) * d;
            dst[j + QK4_0 / 2] = (float)((b->qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(const void *src, float *dst, int64_t n) {
    const block_q4_1 *b = src;
    for (int64_t i = 0; i < n / QK4_1; i++, b++, dst += QK4_1) {
        float d = half_at(&b->d), m = half_at(&b->m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            dst[j] = d * (float)(b->qs[j] & 0x0f) + m;
            dst[j + QK4_1 / 2] = d * (float)(b->qs[j] >> 4) + m;
        }
    }
}

/* Bit j of the little-endian 32-bit qh is the 5th bit of element j. */
static inline uint32_t load_qh(const uint8_t qh[4]) {
    return (uint32_t)qh[0] | ((uint32_t)qh[1] << 8) | ((uint32_t)qh[2] << 16) |
           ((uint32_t)qh[3] << 24);
}

static void dequant_q5_0(const void *src, float *dst, int64_t n) {
    const block_q5_0 *b = src;
    for (int64_t i = 0; i < n / QK5_0; i++, b++, dst += QK5_0) {
        float d = half_at(&b->d);
        uint32_t qh = load_qh(b->qh);
        for (int j = 0; j < QK5_0 / 2; j++) {
            int q0 = (b->qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            dst[j] = (float)(q0 - 16) * d;
            dst[j + QK5_0 / 2] = (float)(q1 - 16) * d;
        }
    }
}

static void dequant_q5_1(const void *src, float *dst, int64_t n) {
    const block_q5_1 *b = src;
    for (int64_t i = 0; i < n / QK5_1; i++, b++, dst += QK5_1) {
        float d = half_at(&b->d), m = half_at(&b->m);
        uint32_t qh = load_qh(b->qh);
        for (int j = 0; j < QK5_1 / 2; j++) {
            int q0 = (b->qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            dst[j] = d * (float)q0 + m;
            dst[j + QK5_1 / 2] = d * (float)q1 + m;
        }
    }
}

static void dequant_q8_0(const void *src, float *dst, int64_t n) {
    const block_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK8_0; i++, b++, dst += QK8_0) {
        float d = half_at(&b->d);
        for (int j = 0; j < QK8_0; j++) dst[j] = (float)b->qs[j] * d;
    }
}

/* Q2_K/Q3_K: element 32j+l of each 128-half is bits 2j..2j+1 of its quant byte l. */
static void dequant_q2_k(const void *src, float *dst, int64_t n) {
    const block_q2_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d), dmin = half_at(&b->dmin);
        for (int e = 0; e < QK_K; e++) {
            uint8_t sc = b->scales[e / 16];
            int q = (b->qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            float dl = d * (float)(sc & 0x0f), ml = dmin * (float)(sc >> 4);
            *dst++ = dl * (float)q - ml;
        }
    }
}

static void dequant_q3_k(const void *src, float *dst, int64_t n) {
    const block_q3_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d);
        int8_t sc[16];
        kvs_unpack_q3_k_scales(b->scales, sc);
        for (int e = 0; e < QK_K; e++) {
            int q = (b->qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            /* A clear high bit means "subtract 4" (ggml stores q + 4 this way). */
            if (!((b->hmask[e % 32] >> (e / 32)) & 1)) q -= 4;
            float dl = d * (float)sc[e / 16];
            *dst++ = dl * (float)q;
        }
    }
}

static void dequant_q4_k(const void *src, float *dst, int64_t n) {
    const block_q4_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d), dmin = half_at(&b->dmin);
        uint8_t sc[8], mn[8];
        kvs_unpack_k4_scales(b->scales, sc, mn);
        /* 64 elements per 32 bytes: low nibbles first, then high nibbles. */
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b->qs + 32 * c;
            float d1 = d * (float)sc[2 * c], m1 = dmin * (float)mn[2 * c];
            float d2 = d * (float)sc[2 * c + 1], m2 = dmin * (float)mn[2 * c + 1];
            for (int l = 0; l < 32; l++) dst[l] = d1 * (float)(q[l] & 0x0f) - m1;
            for (int l = 0; l < 32; l++) dst[l + 32] = d2 * (float)(q[l] >> 4) - m2;
            dst += 64;
        }
    }
}

static void dequant_q5_k(const void *src, float *dst, int64_t n) {
    const block_q5_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d), dmin = half_at(&b->dmin);
        uint8_t sc[8], mn[8];
        kvs_unpack_k4_scales(b->scales, sc, mn);
        /* As Q4_K; the 5th bit of element 32*s + l is bit s of qh[l]. */
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b->qs + 32 * c;
            float d1 = d * (float)sc[2 * c], m1 = dmin * (float)mn[2 * c];
            float d2 = d * (float)sc[2 * c + 1], m2 = dmin * (float)mn[2 * c + 1];
            for (int l = 0; l < 32; l++) {
                int q0 = (q[l] & 0x0f) | (((b->qh[l] >> (2 * c)) & 1) << 4);
                int q1 = (q[l] >> 4) | (((b->qh[l] >> (2 * c + 1)) & 1) << 4);
                dst[l] = d1 * (float)q0 - m1;
                dst[l + 32] = d2 * (float)q1 - m2;
            }
            dst += 64;
        }
    }
}

static void dequant_q6_k(const void *src, float *dst, int64_t n) {
    const block_q6_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, b++) {
        float d = half_at(&b->d);
        /* Each 128-element half: 64 ql bytes, 32 qh bytes, 8 scales. */
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            const int8_t *sc = b->scales + 8 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q0 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q1 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                dst[l] = d * (float)sc[is] * (float)q0;
                dst[l + 32] = d * (float)sc[is + 2] * (float)q1;
                dst[l + 64] = d * (float)sc[is + 4] * (float)q2;
                dst[l + 96] = d * (float)sc[is + 6] * (float)q3;
            }
            dst += 128;
        }
    }
}

/* ---- scalar dot products -------------------------------------------------- */

static float dot_f32(int64_t n, const void *row, const float *x) {
    const float *w = row;
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) acc += (double)w[i] * (double)x[i];
    return (float)acc;
}

static float dot_f16(int64_t n, const void *row, const float *x) {
    const kvs_half *w = row;
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) acc += (double)half_at(w + i) * (double)x[i];
    return (float)acc;
}

static float dot_bf16(int64_t n, const void *row, const float *x) {
    const uint8_t *w = row;
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, w + 2 * i, sizeof h);
        acc += (double)kvs_bf16_to_fp32(h) * (double)x[i];
    }
    return (float)acc;
}

/* The reference dot: dequantize one block exactly, accumulate in double. */
static float dot_blocks(int64_t n, const void *row, const float *x, kvs_dequantize_fn dq,
                        int block_elems, size_t block_bytes) {
    const uint8_t *b = row;
    float w[QK_K];
    double acc = 0.0;
    for (int64_t i = 0; i < n; i += block_elems, b += block_bytes) {
        dq(b, w, block_elems);
        for (int j = 0; j < block_elems; j++) acc += (double)w[j] * (double)x[i + j];
    }
    return (float)acc;
}

#define DEFINE_BLOCK_DOT(name, qk, block)                                   \
    static float dot_##name(int64_t n, const void *row, const float *x) { \
        return dot_blocks(n, row, x, dequant_##name, qk, sizeof(block));  \
    }

DEFINE_BLOCK_DOT(q4_0, QK4_0, block_q4_0)
DEFINE_BLOCK_DOT(q4_1, QK4_1, block_q4_1)
DEFINE_BLOCK_DOT(q5_0, QK5_0, block_q5_0)
DEFINE_BLOCK_DOT(q5_1, QK5_1, block_q5_1)
DEFINE_BLOCK_DOT(q8_0, QK8_0, block_q8_0)
DEFINE_BLOCK_DOT(q2_k, QK_K, block_q2_K)
DEFINE_BLOCK_DOT(q3_k, QK_K, block_q3_K)
DEFINE_BLOCK_DOT(q4_k, QK_K, block_q4_K)
DEFINE_BLOCK_DOT(q5_k, QK_K, block_q5_K)
DEFINE_BLOCK_DOT(q6_k, QK_K, block_q6_K)

/* ---- the kernel table ----------------------------------------------------- */

#if defined(KVS_HAVE_AVX2_BUILD)
#  define AVX2(fn) fn
#else
#  define AVX2(fn) NULL
#endif

#define KERNELS(name) {dequant_##name, dot_##name, AVX2(kvs_vec_dot_##name##_avx2)}

/* Indexed by type id; gaps (ids we do not support) stay all-NULL. */
static const kvs_type_kernels kernels[KVS_TYPE_BF16 + 1] = {
    [KVS_TYPE_F32] = KERNELS(f32),   [KVS_TYPE_F16] = KERNELS(f16),
    [KVS_TYPE_BF16] = KERNELS(bf16), [KVS_TYPE_Q4_0] = KERNELS(q4_0),
    [KVS_TYPE_Q4_1] = KERNELS(q4_1), [KVS_TYPE_Q5_0] = KERNELS(q5_0),
    [KVS_TYPE_Q5_1] = KERNELS(q5_1), [KVS_TYPE_Q8_0] = KERNELS(q8_0),
    [KVS_TYPE_Q2_K] = KERNELS(q2_k), [KVS_TYPE_Q3_K] = KERNELS(q3_k),
    [KVS_TYPE_Q4_K] = KERNELS(q4_k), [KVS_TYPE_Q5_K] = KERNELS(q5_k),
    [KVS_TYPE_Q6_K] = KERNELS(q6_k),
};

const kvs_type_kernels *kvs_type_kernels_find(int32_t type) {
    if (type < 0 || type >= (int32_t)(sizeof kernels / sizeof kernels[0])) return NULL;
    return kernels[type].dequantize ? &kernels[type] : NULL;
}

kvs_vec_dot_fn kvs_vec_dot_kernel(int32_t type, int32_t impl) {
    const kvs_type_kernels *k = kvs_type_kernels_find(type);
    if (!k) return NULL;
    switch (impl) {
    case KVS_IMPL_AUTO:
        return (kvs_avx2_available() && k->vec_dot_avx2) ? k->vec_dot_avx2 : k->vec_dot_scalar;
    case KVS_IMPL_SCALAR:
        return k->vec_dot_scalar;
    case KVS_IMPL_AVX2:
        return kvs_avx2_available() ? k->vec_dot_avx2 : NULL;
    default:
        return NULL;
    }
}

void kvs_dot_f32_4x2_scalar(int64_t n, const float *w, const float *x, float *out) {
    for (int r = 0; r < 4; r++) {
        for (int t = 0; t < 2; t++) {
            double acc = 0.0;
            for (int64_t i = 0; i < n; i++) acc += (double)w[r * n + i] * x[t * n + i];
            out[2 * r + t] = (float)acc;
        }
    }
}

void kvs_dot_f32_4x2(int64_t n, const float *w, const float *x, float *out, int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) {
        kvs_dot_f32_4x2_avx2(n, w, x, out);
        return;
    }
#endif
    (void)impl;
    kvs_dot_f32_4x2_scalar(n, w, x, out);
}

float kvs_dot_f32(int64_t n, const float *a, const float *b, int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    /* No error channel here: AVX2 requested but missing falls back to scalar. */
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) return kvs_dot_f32_avx2(n, a, b);
#endif
    return dot_f32(n, a, b);
}

/* ---- CPU features --------------------------------------------------------- */

#if defined(__x86_64__) && defined(KVS_HAVE_AVX2_BUILD)
#include <cpuid.h>

static int detect_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, f16c = (c >> 29) & 1;
    if (!fma || !osxsave || !f16c) return 0;
    /* The OS must save the XMM and YMM state (XCR0 bits 1 and 2). */
    uint32_t xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6u) != 0x6u) return 0;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
}
#else
static int detect_avx2(void) { return 0; }
#endif

int kvs_avx2_available(void) {
    /* -1 = not yet probed; the probe is idempotent, so racing threads agree. */
    static atomic_int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        v = detect_avx2();
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return v;
}

int32_t kvs_cpu_has_avx2(void) { return kvs_avx2_available(); }

/* ---- public API ----------------------------------------------------------- */

/* Shared checks of a row: a supported type and n a positive block multiple. */
static kvs_status check_row(const char *fn, int32_t type, const void *row, int64_t n) {
    const kvs_type_layout_info *info = kvs_type_layout_find(type);
    if (!info || !kvs_type_kernels_find(type)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: unsupported tensor type id %d", fn, (int)type);
    }
    if (n <= 0 || n % info->block_elems != 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT,
                        "%s: n = %lld is not a positive multiple of the %s block size %lld", fn,
                        (long long)n, info->name, (long long)info->block_elems);
    }
    if (!row) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: the %s data pointer is NULL", fn,
                        info->name);
    }
    return KVS_OK;
}

kvs_status kvs_dequantize(int32_t type, const void *src, int64_t n, float *dst) {
    kvs_status st = check_row("kvs_dequantize", type, src, n);
    if (st != KVS_OK) return st;
    if (!dst) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_dequantize: dst is NULL");
    kvs_type_kernels_find(type)->dequantize(src, dst, n);
    return KVS_OK;
}

kvs_status kvs_vec_dot(int32_t type, int32_t impl, const void *row, const float *x, int64_t n,
                       float *out) {
    kvs_status st = check_row("kvs_vec_dot", type, row, n);
    if (st != KVS_OK) return st;
    if (!x || !out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_vec_dot: x or out is NULL");
    if (impl != KVS_IMPL_AUTO && impl != KVS_IMPL_SCALAR && impl != KVS_IMPL_AVX2) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_vec_dot: unknown impl %d", (int)impl);
    }
    kvs_vec_dot_fn fn = kvs_vec_dot_kernel(type, impl);
    if (!fn) {
        return kvs_fail(KVS_ERR_UNSUPPORTED,
                        "kvs_vec_dot: AVX2 kernels are not available on this CPU or build");
    }
    *out = fn(n, row, x);
    return KVS_OK;
}

kvs_status kvs_quantize_activations(int32_t impl, const float *x, int64_t n, int8_t *q, float *d) {
    if (!x || !q || !d) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_quantize_activations: NULL buffer");
    if (n < 0 || n % QK_ACT) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_quantize_activations: n = %lld is not a multiple of %d",
                        (long long)n, QK_ACT);
    }
    if (impl == KVS_IMPL_AVX2 && !kvs_avx2_available()) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_quantize_activations: AVX2 is not available");
    }
    for (int64_t i = 0; i < n / QK_ACT; i++) {
        block_q8_act b;
        kvs_quantize_act_kernel(impl)(x + i * QK_ACT, &b, QK_ACT);
        memcpy(q + i * QK_ACT, b.qs, QK_ACT);
        d[i] = b.d;
    }
    return KVS_OK;
}
