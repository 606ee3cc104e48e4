/* kernels_kv.h - private: tile kernels of the KV cache's attention. A segment
 * of up to B keys is held channel-major (kt[d][t], row stride `stride`), its
 * values token-major (vt[t][d]). */
#ifndef KVS_KERNELS_KV_H
#define KVS_KERNELS_KV_H

#include <stdint.h>

#include "blocks.h"

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

typedef struct {
    kvs_rotate_pair_fn rotate_pair;
    kvs_dot_tile_fn dot_tile;
    kvs_weighted_rows_fn weighted_rows;
    kvs_f16_to_f32_fn f16_to_f32;
} kvs_attention_kernels;

/* The kernels of impl (SCALAR, or AVX2 when built). */
const kvs_attention_kernels *kvs_attention_kernels_find(int32_t impl);

#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_rotate_pair_avx2(int32_t n, float *a, float *b, const float *c, const float *s);
void kvs_dot_tile_avx2(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *q, float *out);
void kvs_weighted_rows_avx2(int32_t n, int32_t hd, const float *p, const float *vt, float *out);
void kvs_f16_to_f32_avx2(int64_t n, const kvs_half *src, float *dst);
#endif

/* Kept for the dequantizers: f16 -> f32 of impl. */
kvs_f16_to_f32_fn kvs_f16_to_f32_kernel(int32_t impl);

#endif
