/* kernels_kv.h - private: tile kernels of the KV cache's attention. A segment
 * of up to B keys is held channel-major (kt[d][t], row stride `stride`), its
 * values token-major (vt[t][d]). */
#ifndef KVS_KERNELS_KV_H
#define KVS_KERNELS_KV_H

#include <stdint.h>

#include "blocks.h"

/* Largest head the KV cache takes (kv_cache.c refuses larger ones). A value
 * group lies within one head, so kernels may hold a group of up to this many
 * floats on their stack. */
#define KVS_KV_MAX_HEAD_DIM 512

/* Rotate n entries of a channel pair in place: (a, b) <- (a*c - b*s, a*s + b*c),
 * with c, s per entry (RoPE by each key's offset inside its segment). */
typedef void (*kvs_rotate_pair_fn)(int32_t n, float *a, float *b, const float *c, const float *s);
/* out[t] = sum_d q[d] * kt[d][t] for t < n: the scores of one query. */
typedef void (*kvs_dot_tile_fn)(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *q, float *out);
/* out[d] += sum_t p[t] * vt[t][d] for d < hd: one query's
 * weighted values, out kept in registers across the keys. */
typedef void (*kvs_weighted_rows_fn)(int32_t n, int32_t hd, const float *p, const float *vt, float *out);
/* f16 -> f32 conversion of n values. */
typedef void (*kvs_f16_to_f32_fn)(int64_t n, const kvs_half *src, float *dst);
/* qb = scale * q rotated by RoPE with per-pair cos/sin cs[i], sn[i] (i < n_rot/2;
 * pairs (i, i + n_rot/2) when neox, else (2i, 2i+1)); dims >= n_rot are scaled only. */
typedef void (*kvs_rotate_query_fn)(int32_t n_rot, int32_t hd, int neox, const float *cs, const float *sn,
                                    const float *q, float scale, float *qb);
/* Dequantize n_ch KV groups of n values each (kv_quant.h's format; group c at
 * data + c * group_bytes) into out + c * out_stride: a key tile's channels. */
typedef void (*kvs_dequant_groups_fn)(int bits, int32_t n_ch, int32_t n, const uint8_t *data, int64_t group_bytes,
                                      float *out, int64_t out_stride);
/* The rotated key tile of a per-channel block: for k < n_pairs, channels
 * a = pair_a[k] and b = pair_b[k] (groups of n values at data + ch *
 * group_bytes) are dequantized and rotated by (cos, sin) rows a of the
 * tables (entry t: the key's offset t), into kt rows a and b (stride each). */
typedef void (*kvs_key_tile_fn)(int bits, int32_t n, const uint8_t *data, int64_t group_bytes, int32_t n_pairs,
                                const int32_t *pair_a, const int32_t *pair_b, const float *cos_rows,
                                const float *sin_rows, int64_t stride, float *kt);
/* x[i] <- exp(x[i] - max x) for i < n (-inf gives 0); *max_out = max x; returns
 * the sum of the new x. The unnormalized softmax of one query's scores. */
typedef float (*kvs_exp_shifted_fn)(int32_t n, float *x, float *max_out);
/* For query heads j < n_heads: out[j*out_stride + d] += sum_t p[j*p_stride + t] * v[t][d],
 * v being n_tok token rows of hd values quantized in groups of G channels
 * (row t, group g at data + (t * hd/G + g) * kvs_kv_group_bytes(bits, G)).
 * Each quantized value is decoded once for every head reading it. */
typedef void (*kvs_weighted_groups_fn)(int bits, int32_t n_tok, int32_t hd, int32_t G, const uint8_t *data,
                                       int32_t n_heads, const float *p, int64_t p_stride, float *out,
                                       int64_t out_stride);
/* x <- H x for the normalized Walsh-Hadamard matrix of order n (a power of
 * two): orthogonal and its own inverse, so a rotation applied before
 * quantizing is undone by applying it again. */
typedef void (*kvs_fwht_fn)(int32_t n, float *x);

typedef struct {
    kvs_rotate_pair_fn rotate_pair;
    kvs_dot_tile_fn dot_tile;
    kvs_weighted_rows_fn weighted_rows;
    kvs_f16_to_f32_fn f16_to_f32;
    kvs_rotate_query_fn rotate_query;
    kvs_dequant_groups_fn dequant_groups;
    kvs_exp_shifted_fn exp_shifted;
    kvs_weighted_groups_fn weighted_groups;
    kvs_key_tile_fn key_tile;
    kvs_fwht_fn fwht;
} kvs_attention_kernels;

/* The kernels of impl (SCALAR, or AVX2 when built). */
const kvs_attention_kernels *kvs_attention_kernels_find(int32_t impl);

#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_rotate_pair_avx2(int32_t n, float *a, float *b, const float *c, const float *s);
void kvs_dot_tile_avx2(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *q, float *out);
void kvs_weighted_rows_avx2(int32_t n, int32_t hd, const float *p, const float *vt, float *out);
void kvs_f16_to_f32_avx2(int64_t n, const kvs_half *src, float *dst);
void kvs_rotate_query_avx2(int32_t n_rot, int32_t hd, int neox, const float *cs, const float *sn, const float *q,
                           float scale, float *qb);
void kvs_dequant_groups_avx2(int bits, int32_t n_ch, int32_t n, const uint8_t *data, int64_t group_bytes, float *out,
                             int64_t out_stride);
float kvs_exp_shifted_avx2(int32_t n, float *x, float *max_out);
void kvs_key_tile_avx2(int bits, int32_t n, const uint8_t *data, int64_t group_bytes, int32_t n_pairs,
                       const int32_t *pair_a, const int32_t *pair_b, const float *cos_rows, const float *sin_rows,
                       int64_t stride, float *kt);
void kvs_weighted_groups_avx2(int bits, int32_t n_tok, int32_t hd, int32_t G, const uint8_t *data, int32_t n_heads,
                              const float *p, int64_t p_stride, float *out, int64_t out_stride);
void kvs_fwht_avx2(int32_t n, float *x);
#endif

/* The scalar kvs_fwht_fn (the AVX2 one's oracle; also used when blocks are encoded). */
void kvs_fwht(int32_t n, float *x);

/* Kept for the dequantizers: f16 -> f32 of impl. */
kvs_f16_to_f32_fn kvs_f16_to_f32_kernel(int32_t impl);

#endif
