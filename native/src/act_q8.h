/* act_q8.h - private: the fast path of matrix products. Activations are
 * quantized to 8 bits in blocks of 32 (one f32 scale each) so that weight
 * blocks of the 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the
 * 32-element blocks inside the K formats' super-blocks (Q4_K, Q5_K, Q6_K)
 * are dotted with integer multiply-adds. This approximates the exact f32 path (see
 * DESIGN 9); tests hold the AVX2 kernels to their scalar twins and the
 * scalar twins to a numpy model of the same arithmetic. */
#ifndef KVS_ACT_Q8_H
#define KVS_ACT_Q8_H

#include <stdint.h>

#define QK_ACT 32

typedef struct {
    float d;              /* scale: x ~= d * q                  */
    float s;              /* d * sum(q), for formats with a min */
    int8_t qs[QK_ACT];    /* round(x / d), |q| <= 127           */
} block_q8_act;
_Static_assert(sizeof(block_q8_act) == 40, "block_q8_act size");

/* Quantize n floats (a multiple of QK_ACT) to n / QK_ACT blocks. */
typedef void (*kvs_quantize_act_fn)(const float *x, block_q8_act *y, int64_t n);
/* dot(row of n weights of some type, quantized activations). */
typedef float (*kvs_q8_dot_fn)(int64_t n, const void *row, const block_q8_act *x);
/* out[r] = dot(row r, x) for the 4 rows at rows + r * row_bytes. */
typedef void (*kvs_q8_dot4_fn)(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x,
                               float out[4]);

/* Batched products unpack four weight rows once per tile into "quads", so
 * that every token after the first pays only for the multiply-adds: per block
 * of 32, the rows' unsigned quants u and w = d*u + c (c: the min, or minus the
 * offset times d). */
typedef struct {
    uint8_t u[4][32];
    float d[4];
    float c[4];
} q8_quad;
_Static_assert(sizeof(q8_quad) == 160, "q8_quad size");

/* Unpack n elements of the 4 rows at rows + r * row_bytes into n / 32 quads. */
typedef void (*kvs_q8_unpack4_fn)(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
/* out[r] = dot(row r of the quads, x) over nb blocks. */
typedef void (*kvs_q8_quad_dot_fn)(int64_t nb, const q8_quad *w, const block_q8_act *x, float out[4]);

typedef struct {
    kvs_q8_dot_fn dot;
    kvs_q8_dot4_fn dot4;
    kvs_q8_unpack4_fn unpack4;   /* NULL for signed formats (Q8_0): no quads */
    kvs_q8_quad_dot_fn quad_dot;
} kvs_q8_kernels;

void kvs_quantize_act_scalar(const float *x, block_q8_act *y, int64_t n);

/* Massive activations. One element far above the rest of its row (a sink
 * token of SmolLM2 carries ~29,000 in one channel where the others are ~2)
 * sets the scale of its 8-bit block and rounds its 31 neighbours to zero, in
 * exactly the rows whose keys and values every later token reads. The fast
 * path takes such elements out (LLM.int8()'s decomposition): the row is
 * quantized without them and each one's product is added exactly, f32
 * activation times the dequantized weight column. An element is an outlier
 * when |x| exceeds ratio times the median of its row's block maxima (the
 * (nb / 2)-th smallest of the nb = n / 32 of them); a row gives up to
 * ACT_MAX_OUTLIERS, the first found. */
#define ACT_MAX_OUTLIERS 8

typedef struct {
    int32_t n;                          /* outliers taken out of the row */
    int32_t index[ACT_MAX_OUTLIERS];    /* their columns, increasing     */
    float value[ACT_MAX_OUTLIERS];      /* their exact values            */
} act_outliers;

/* After x (n floats) was quantized to y: find x's outliers (ratio > 0), record
 * them in out and quantize their blocks again without them. scratch holds
 * n / 32 floats. Returns out->n. Scalar for every impl: the quantizers agree
 * bit for bit, so the outliers do too. */
int kvs_split_outliers(const float *x, block_q8_act *y, int64_t n, float ratio, act_outliers *out, float *scratch);

/* out[r - r0] = w[r][j] for rows r0..r1 of a weight of a fast type in the
 * original layout (row r at data + r * row_bytes), dequantized as the exact
 * path does: the column an outlier multiplies. */
void kvs_q8_weight_column(int32_t type, const void *data, int64_t row_bytes, int64_t j, int64_t r0, int64_t r1,
                          float *out);

/* The quantizer for impl (SCALAR or AVX2 resolved; AVX2 falls back to scalar
 * when not built). Both give bit-identical blocks. */
kvs_quantize_act_fn kvs_quantize_act_kernel(int32_t impl);

/* The integer dots for a weight type with impl resolved, or NULL when the
 * type has none (the matrix product then uses the exact f32 path for it). */
const kvs_q8_kernels *kvs_q8_kernels_find(int32_t type, int32_t impl);

#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_quantize_act_avx2(const float *x, block_q8_act *y, int64_t n);
float kvs_q8_dot_q4_0_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q4_0_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
float kvs_q8_dot_q4_1_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q4_1_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
float kvs_q8_dot_q5_0_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q5_0_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
float kvs_q8_dot_q5_1_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q5_1_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
void kvs_q8_unpack4_q4_0_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
void kvs_q8_unpack4_q4_1_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
void kvs_q8_unpack4_q5_0_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
void kvs_q8_unpack4_q5_1_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
void kvs_q8_quad_dot_avx2(int64_t nb, const q8_quad *w, const block_q8_act *x, float out[4]);
float kvs_q8_dot_q8_0_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q8_0_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
float kvs_q8_dot_q4_k_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q4_k_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
void kvs_q8_unpack4_q4_k_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
float kvs_q8_dot_q5_k_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q5_k_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
void kvs_q8_unpack4_q5_k_avx2(int64_t n, const void *rows, int64_t row_bytes, q8_quad *out);
float kvs_q8_dot_q6_k_avx2(int64_t n, const void *row, const block_q8_act *x);
void kvs_q8_dot4_q6_k_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q8_act *x, float out[4]);
#endif

#endif
