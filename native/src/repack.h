/* repack.h - private: weights of the fast path repacked once into groups of
 * 8 interleaved rows (llama.cpp's "repack" idea). One 32-byte load then holds
 * 4 quants of each of 8 rows, so a block of 32 activations is dotted with 8
 * rows at once: per (row, block) the nibble unpack, the integer reduction and
 * the scale conversion are shared 8 ways instead of paid per row. The packed
 * group takes exactly the bytes of its 8 original rows. n_rows % 8 leftover
 * rows stay on the original layout (act_q8.h's kernels). */
#ifndef KVS_REPACK_H
#define KVS_REPACK_H

#include <stddef.h>
#include <stdint.h>

#include "act_q8.h"
#include "blocks.h"
#include "kvsink.h"

/* Rows interleaved in one packed group. */
#define REPACK_ROWS 8

/* Block i of rows 8g..8g+7. In every format, run j of 32 bytes holds in
 * bytes 4r..4r+3 row r's original qs[4j..4j+3]: for the nibble formats that
 * is elements 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high nibbles). */
typedef struct {
    kvs_half d[REPACK_ROWS];   /* scale of each row's block; w = (u - 8) * d */
    uint8_t qs[4 * 32];        /* 4 runs of 32 bytes, as above                */
} block_q4_0x8;
_Static_assert(sizeof(block_q4_0x8) == 8 * sizeof(block_q4_0), "block_q4_0x8 size");

typedef struct {
    kvs_half d[REPACK_ROWS];   /* scale of each row's block; w = u * d + m */
    kvs_half m[REPACK_ROWS];   /* min of each row's block                   */
    uint8_t qs[4 * 32];        /* 4 runs of 32 bytes, as above              */
} block_q4_1x8;
_Static_assert(sizeof(block_q4_1x8) == 8 * sizeof(block_q4_1), "block_q4_1x8 size");

typedef struct {
    kvs_half d[REPACK_ROWS];   /* scale of each row's block; w = q * d      */
    int8_t qs[8 * 32];         /* 8 runs of 32 bytes: run j, bytes 4r..4r+3 = row r's qs[4j..4j+3] */
} block_q8_0x8;
_Static_assert(sizeof(block_q8_0x8) == 8 * sizeof(block_q8_0), "block_q8_0x8 size");

/* out[r] = dot(row r of the packed group, x) for the group's 8 rows of n
 * elements: one token's product. */
typedef void (*kvs_repack_gemv_fn)(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]);
/* y[t * y_stride + r] = dot(row r, token t) for n_tokens tokens of x (each
 * n / 32 blocks, one after another): the batched product, whose unpacked
 * quants serve several tokens from registers. */
typedef void (*kvs_repack_gemm_fn)(int64_t n, const void *group, const block_q8_act *x, int64_t n_tokens,
                                   float *y, int64_t y_stride);

/* out[r - r0] = w[r][j] for rows r0..r1 (within the full groups) of a weight
 * of n_cols columns packed by kvs_repack, dequantized as the exact path does
 * (d * q + m, no fused multiply-add): the column an outlier activation
 * multiplies (act_q8.h). */
typedef void (*kvs_repack_column_fn)(const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1,
                                     float *out);

typedef struct {
    kvs_repack_gemv_fn gemv;
    kvs_repack_gemm_fn gemm;
    kvs_repack_column_fn column;
} kvs_repack_kernels;

/* 1 when the fast path has packed kernels for this weight type. */
int kvs_repack_supported(int32_t type);

/* Bytes of the packed copy of the full groups of n_rows rows of n_cols
 * elements: 0 for an unsupported type or fewer than 8 rows. */
size_t kvs_repack_bytes(int32_t type, int64_t n_rows, int64_t n_cols);

/* Pack the n_rows / 8 full groups of rows (row r at src + r * row_bytes)
 * into dst (kvs_repack_bytes of it). KVS_ERR_UNSUPPORTED for other types. */
kvs_status kvs_repack(int32_t type, const void *src, int64_t row_bytes, int64_t n_rows, int64_t n_cols, void *dst);

/* The packed kernels for a type with impl resolved (SCALAR or AVX2; AVX2
 * falls back to scalar when not built), or NULL for an unsupported type. */
const kvs_repack_kernels *kvs_repack_kernels_find(int32_t type, int32_t impl);

#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_repack_gemv_q4_0_avx2(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]);
void kvs_repack_gemm_q4_0_avx2(int64_t n, const void *group, const block_q8_act *x, int64_t n_tokens, float *y,
                               int64_t y_stride);
void kvs_repack_gemv_q4_1_avx2(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]);
void kvs_repack_gemm_q4_1_avx2(int64_t n, const void *group, const block_q8_act *x, int64_t n_tokens, float *y,
                               int64_t y_stride);
void kvs_repack_column_q4_0_avx2(const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1, float *out);
void kvs_repack_column_q4_1_avx2(const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1, float *out);
void kvs_repack_column_q8_0_avx2(const void *packed, int64_t n_cols, int64_t j, int64_t r0, int64_t r1, float *out);
void kvs_repack_gemv_q8_0_avx2(int64_t n, const void *group, const block_q8_act *x, float out[REPACK_ROWS]);
void kvs_repack_gemm_q8_0_avx2(int64_t n, const void *group, const block_q8_act *x, int64_t n_tokens, float *y,
                               int64_t y_stride);
#endif

#endif
