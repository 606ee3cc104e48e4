/* repack.c - packing weights into 8-row interleaved groups (repack.h) and
 * the scalar twins of the packed kernels. The twins read the packed layout
 * but do the unpacked scalar dot's arithmetic in its order (act_q8.c), so
 * packed and unpacked scalar products agree bit for bit. */
#include "repack.h"

#include <string.h>

#include "formats.h"
#include "status.h"

/* Where the fields of one original block lie, and how its group packs. */
typedef struct {
    int32_t type;
    size_t block_bytes; /* bytes of one original block (of 32 elements)     */
    size_t qs_offset;   /* offset of qs in an original block                */
    int has_min;        /* a second fp16 (the min) follows d                */
    int runs;           /* runs of 32 packed bytes: 4 (nibbles), 8 (bytes)  */
} repack_format;

static const repack_format formats[] = {
    {KVS_TYPE_Q4_0, sizeof(block_q4_0), offsetof(block_q4_0, qs), 0, 4},
    {KVS_TYPE_Q4_1, sizeof(block_q4_1), offsetof(block_q4_1, qs), 1, 4},
    {KVS_TYPE_Q8_0, sizeof(block_q8_0), offsetof(block_q8_0, qs), 0, 8},
};

static const repack_format *format_find(int32_t type) {
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
        if (formats[i].type == type) return &formats[i];
    }
    return NULL;
}

int kvs_repack_supported(int32_t type) { return format_find(type) != NULL; }

size_t kvs_repack_bytes(int32_t type, int64_t n_rows, int64_t n_cols) {
    const repack_format *f = format_find(type);
    if (!f || n_rows < REPACK_ROWS || n_cols < QK_ACT) return 0;
    return (size_t)(n_rows / REPACK_ROWS) * REPACK_ROWS * (size_t)(n_cols / QK_ACT) * f->block_bytes;
}

/* Block i of 8 rows -> one packed block: d[8], then m[8] for formats with a
 * min, then the runs (bytes 4r..4r+3 of run j = row r's qs[4j..4j+3]). */
static void pack_block(const repack_format *f, const uint8_t *const blocks[REPACK_ROWS], uint8_t *dst) {
    const size_t halves = REPACK_ROWS * sizeof(kvs_half);
    uint8_t *qs = dst + halves * (size_t)(1 + f->has_min);
    for (int r = 0; r < REPACK_ROWS; r++) {
        memcpy(dst + r * sizeof(kvs_half), blocks[r], sizeof(kvs_half));
        if (f->has_min) memcpy(dst + halves + r * sizeof(kvs_half), blocks[r] + sizeof(kvs_half), sizeof(kvs_half));
        for (int j = 0; j < f->runs; j++) memcpy(qs + 32 * j + 4 * r, blocks[r] + f->qs_offset + 4 * j, 4);
    }
}

kvs_status kvs_repack(int32_t type, const void *src, int64_t row_bytes, int64_t n_rows, int64_t n_cols, void *dst) {
    const repack_format *f = format_find(type);
    if (!f) return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_repack: type id %d has no packed kernels", (int)type);
    const int64_t nb = n_cols / QK_ACT;
    uint8_t *out = dst;
    for (int64_t g = 0; g < n_rows / REPACK_ROWS; g++) {
        const uint8_t *rows = (const uint8_t *)src + g * REPACK_ROWS * row_bytes;
        for (int64_t i = 0; i < nb; i++, out += REPACK_ROWS * f->block_bytes) {
            const uint8_t *blocks[REPACK_ROWS];
            for (int r = 0; r < REPACK_ROWS; r++) blocks[r] = rows + r * row_bytes + i * (int64_t)f->block_bytes;
            pack_block(f, blocks, out);
        }
    }
    return KVS_OK;
}

/* ---- scalar twins ---------------------------------------------------------- */

static float half(const kvs_half *p) {
    kvs_half h;
    memcpy(&h, p, sizeof h);
    return kvs_fp16_to_fp32(h);
}

/* Element e (0..31) of row r: byte e % 16 of the row's original qs holds
 * elements e % 16 (low nibble) and e % 16 + 16 (high nibble). */
static int packed_nibble(const uint8_t *qs, int r, int e) {
    const int k = e % 16;
    const uint8_t byte = qs[32 * (k / 4) + 4 * r + k % 4];
    return e < 16 ? byte & 0x0f : byte >> 4;
}

static int packed_byte(const int8_t *qs, int r, int e) { return qs[32 * (e / 4) + 4 * r + e % 4]; }

/* One row's block term, as act_q8.c's q8_dot_blocks adds it: w = d*q + m. */
static double block_term(int32_t isum, float d, float m, const block_q8_act *x) {
    return (double)(d * x->d) * (double)isum + (double)m * (double)x->s;
}

static void gemv_q4_0(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]) {
    const block_q4_0x8 *b = group;
    for (int r = 0; r < REPACK_ROWS; r++) {
        double acc = 0.0;
        for (int64_t i = 0; i < n / QK_ACT; i++) {
            int32_t isum = 0;
            for (int e = 0; e < QK_ACT; e++) isum += (packed_nibble(b[i].qs, r, e) - 8) * x[i].qs[e];
            acc += block_term(isum, half(&b[i].d[r]), 0.0f, x + i);
        }
        out[r] = (float)acc;
    }
}

static void gemv_q4_1(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]) {
    const block_q4_1x8 *b = group;
    for (int r = 0; r < REPACK_ROWS; r++) {
        double acc = 0.0;
        for (int64_t i = 0; i < n / QK_ACT; i++) {
            int32_t isum = 0;
            for (int e = 0; e < QK_ACT; e++) isum += packed_nibble(b[i].qs, r, e) * x[i].qs[e];
            acc += block_term(isum, half(&b[i].d[r]), half(&b[i].m[r]), x + i);
        }
        out[r] = (float)acc;
    }
}

static void gemv_q8_0(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]) {
    const block_q8_0x8 *b = group;
    for (int r = 0; r < REPACK_ROWS; r++) {
        double acc = 0.0;
        for (int64_t i = 0; i < n / QK_ACT; i++) {
            int32_t isum = 0;
            for (int e = 0; e < QK_ACT; e++) isum += packed_byte(b[i].qs, r, e) * x[i].qs[e];
            acc += block_term(isum, half(&b[i].d[r]), 0.0f, x + i);
        }
        out[r] = (float)acc;
    }
}

/* Element e of row r in packed block b, dequantized as the exact path does. */
static float packed_weight(int32_t type, const uint8_t *b, int r, int e) {
    switch (type) {
    case KVS_TYPE_Q4_0: {
        const block_q4_0x8 *q = (const block_q4_0x8 *)b;
        return half(&q->d[r]) * (float)(packed_nibble(q->qs, r, e) - 8);
    }
    case KVS_TYPE_Q4_1: {
        const block_q4_1x8 *q = (const block_q4_1x8 *)b;
        return half(&q->d[r]) * (float)packed_nibble(q->qs, r, e) + half(&q->m[r]);
    }
    default: {
        const block_q8_0x8 *q = (const block_q8_0x8 *)b;
        return half(&q->d[r]) * (float)packed_byte(q->qs, r, e);
    }
    }
}

static void weight_column(int32_t type, const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1,
                          float *out) {
    const repack_format *f = format_find(type);
    const int64_t group_bytes = n_cols / QK_ACT * REPACK_ROWS * (int64_t)f->block_bytes;
    const uint8_t *column = (const uint8_t *)packed + j / QK_ACT * REPACK_ROWS * (int64_t)f->block_bytes;
    for (int64_t r = r0; r < r1; r++) {
        out[r - r0] = packed_weight(type, column + r / REPACK_ROWS * group_bytes, (int)(r % REPACK_ROWS), (int)(j % QK_ACT));
    }
}

#define DEFINE_COLUMN(name, type)                                                                                 \
    static void column_##name(const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1, float *out) { \
        weight_column(type, packed, n_cols, j, r0, r1, out);                                                     \
    }

DEFINE_COLUMN(q4_0, KVS_TYPE_Q4_0)
DEFINE_COLUMN(q4_1, KVS_TYPE_Q4_1)
DEFINE_COLUMN(q8_0, KVS_TYPE_Q8_0)

/* The batched twin is the one-token twin per token. */
#define DEFINE_GEMM(name)                                                                                \
    static void gemm_##name(int64_t n, const void *group, const block_q8_act *x, int64_t n_tokens, float *y, \
                            int64_t y_stride) {                                                          \
        for (int64_t t = 0; t < n_tokens; t++) gemv_##name(n, group, x + t * (n / QK_ACT), y + t * y_stride); \
    }

DEFINE_GEMM(q4_0)
DEFINE_GEMM(q4_1)
DEFINE_GEMM(q8_0)

#if defined(KVS_HAVE_AVX2_BUILD)
#  define AVX2(name) {kvs_repack_gemv_##name##_avx2, kvs_repack_gemm_##name##_avx2, kvs_repack_column_##name##_avx2}
#else
#  define AVX2(name) {NULL, NULL, NULL}
#endif

typedef struct {
    int32_t type;
    kvs_repack_kernels scalar, avx2;
} repack_entry;

#define ENTRY(type, name) {type, {gemv_##name, gemm_##name, column_##name}, AVX2(name)}

static const repack_entry kernels[] = {
    ENTRY(KVS_TYPE_Q4_0, q4_0),
    ENTRY(KVS_TYPE_Q4_1, q4_1),
    ENTRY(KVS_TYPE_Q8_0, q8_0),
};

const kvs_repack_kernels *kvs_repack_kernels_find(int32_t type, int32_t impl) {
    for (size_t i = 0; i < sizeof kernels / sizeof kernels[0]; i++) {
        if (kernels[i].type != type) continue;
        if (impl != KVS_IMPL_SCALAR && kvs_avx2_available() && kernels[i].avx2.gemv) return &kernels[i].avx2;
        return &kernels[i].scalar;
    }
    return NULL;
}
