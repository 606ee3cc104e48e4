/* kv_cuda_math.h - private: the per-thread arithmetic of the KV cache's
 * CUDA kernels (kv_cuda.cu), kept apart from the launches. Without a GPU
 * the kernels run on the SIMT emulator (tests/test_cuda_simt.py), which
 * checks the GPU cache's logic (segments, masks, RoPE by distance,
 * quantization, the split softmax) against the CPU's kv_cache.c. Each function mirrors a piece of
 * kv_cache.c / kv_quant.c / kernels_kv.c, named where it is defined.
 *
 * Exactness: quantization must round as the CPU does (a level that flips
 * changes a block), so products and sums on the way to a quantized value
 * are spelled with KVD_MUL / KVD_ADD / KVD_SUB, which nvcc never fuses
 * into an FMA (the CPU rounds each one). Dot products and softmax sums are
 * free to differ in the last bits. */
#ifndef KVS_KV_CUDA_MATH_H
#define KVS_KV_CUDA_MATH_H

#include <math.h>
#include <stdint.h>

#include "kernels_kv.h"
#include "kv_cuda.h"

#define KVD_MAX_HD KVS_KV_MAX_HEAD_DIM
#define KVD_MAX_B 64 /* tokens per block at most (kv_cache.c's check_params) */

#define KVD static __device__ __forceinline__
#define KVD_HD static __host__ __device__ __forceinline__ /* launchers size grids with these */
#define KVD_MUL(a, b) __fmul_rn((a), (b))
#define KVD_ADD(a, b) __fadd_rn((a), (b))
#define KVD_SUB(a, b) __fsub_rn((a), (b))
#define KVD_INF __int_as_float(0x7f800000)
/* fp16 conversions in PTX (cuda_fp16.h needs headers the nvcc wheels lack);
 * cvt.rn rounds to nearest even, as kvs_fp32_to_fp16 does */
KVD float kvd_f16(uint16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
KVD uint16_t kvd_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

/* ---- groups (kv_quant.c) ------------------------------------------------- */

KVD int64_t kvd_group_bytes(int bits, int64_t n) { return 4 + (n * bits + 7) / 8; }

/* fp16 at any byte offset (groups are packed) */
KVD float kvd_half_at(const uint8_t *p) { return kvd_f16((uint16_t)(p[0] | (p[1] << 8))); }

/* Element i of a group of n values (kvs_kv_dequantize_group). */
KVD float kvd_group_elem(const uint8_t *group, int64_t n, int bits, int64_t i) {
    const int64_t bit = i * bits, byte = bit / 8, n_bytes = (n * bits + 7) / 8;
    unsigned v = group[4 + byte];
    if (byte + 1 < n_bytes) v |= (unsigned)group[4 + byte + 1] << 8;
    const float q = (float)((v >> (bit % 8)) & ((1u << bits) - 1));
    return KVD_ADD(KVD_MUL(q, kvd_half_at(group)), kvd_half_at(group + 2));
}

/* Bit i of a 64-bit mask; 0 past bit 63 (a shift that far is undefined). */
KVD_HD int kvd_bit(uint64_t mask, int64_t i) { return i < 64 && (mask >> i & 1); }

/* kvs_kv_quantize_group: n values `stride` apart; bit i of skip leaves value
 * i out of the min/max (it decodes as the zero point). Only per-channel key
 * groups (n = B <= 64 tokens) skip; per-token groups of up to head_dim
 * values pass 0. */
KVD void kvd_quantize_group(const float *x, int64_t stride, uint64_t skip, int64_t n, int bits, uint8_t *out) {
    float lo = KVD_INF, hi = -KVD_INF;
    for (int64_t i = 0; i < n; i++) {
        if (kvd_bit(skip, i)) continue;
        const float v = x[i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (lo > hi) lo = hi = 0.0f;
    const int levels = (1 << bits) - 1;
    const uint16_t zero_h = kvd_to_f16(lo), scale_h = kvd_to_f16(KVD_SUB(hi, lo) / (float)levels);
    const float zero = kvd_f16(zero_h), scale = kvd_f16(scale_h);
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    out[0] = (uint8_t)scale_h;
    out[1] = (uint8_t)(scale_h >> 8);
    out[2] = (uint8_t)zero_h;
    out[3] = (uint8_t)(zero_h >> 8);
    const int64_t n_bytes = (n * bits + 7) / 8;
    for (int64_t b = 0; b < n_bytes; b++) out[4 + b] = 0;
    for (int64_t i = 0; i < n; i++) {
        float q = kvd_bit(skip, i) ? 0.0f : roundf(KVD_MUL(KVD_SUB(x[i * stride], zero), inv));
        q = q < 0.0f ? 0.0f : q > (float)levels ? (float)levels : q;
        const int64_t bit = i * bits;
        const unsigned w = (unsigned)q << (bit % 8);
        out[4 + bit / 8] |= (uint8_t)w;
        if (w >> 8) out[4 + bit / 8 + 1] |= (uint8_t)(w >> 8);
    }
}

#define KVD_ITEMS(e, n, tid, nt) for (int64_t e = (tid); e < (int64_t)(n); e += (nt))

/* One butterfly stage (distance h) of the Walsh-Hadamard transform of each
 * of `rows` rows of hd floats; the stages in order, then kvd_p_scale by
 * 1/sqrt(hd), give kvs_fwht. */
KVD void kvd_p_fwht_stage(float *x, int32_t rows, int32_t hd, int32_t h, int32_t tid, int32_t nt) {
    KVD_ITEMS(e, (int64_t)rows * (hd / 2), tid, nt) {
        const int64_t r = e / (hd / 2), k = e % (hd / 2), lo = r * hd + (k / h) * 2 * h + k % h;
        const float u = x[lo], w = x[lo + h];
        x[lo] = KVD_ADD(u, w);
        x[lo + h] = KVD_SUB(u, w);
    }
}

KVD void kvd_p_scale(float *x, int64_t n, float s, int32_t tid, int32_t nt) {
    KVD_ITEMS(e, n, tid, nt) x[e] = KVD_MUL(x[e], s);
}

/* kvs_fwht: the normalized Walsh-Hadamard transform of one row, in place
 * (the stages above run by one thread). */
KVD void kvd_fwht(int32_t n, float *x) {
    for (int32_t h = 1; h < n; h *= 2) kvd_p_fwht_stage(x, 1, n, h, 0, 1);
    kvd_p_scale(x, n, 1.0f / sqrtf((float)n), 0, 1);
}

/* ---- where things are (kv_cache.c) -------------------------------------- */

KVD int kvd_trimmed(const kvs_kv_dev *g, int32_t il) { return g->L > 0 && g->window[il] > 0; }

/* The RoPE tables of layer il: 0 global, 1 local (kv_layer_rope). */
KVD int kvd_kind(const kvs_kv_dev *g, int32_t il) { return g->window[il] > 0; }

KVD int64_t kvd_row_index(const kvs_kv_dev *g, int32_t slot, int32_t il, int32_t h) {
    return (((int64_t)slot * g->n_layer + il) * g->n_kv + h) * g->hd;
}

KVD float kvd_row_elem(const kvs_kv_dev *g, const uint8_t *base, int64_t index) {
    return g->row_f32 ? ((const float *)base)[index] : kvd_f16(((const uint16_t *)base)[index]);
}

/* block_data: block slot's (layer, head) data, in the local ring at lslot
 * for a trimmed local layer. */
KVD uint8_t *kvd_block(const kvs_kv_dev *g, int32_t slot, int32_t lslot, int32_t il, int32_t h) {
    const int64_t bytes = g->k_bytes + g->v_bytes, li = g->layer_index[il];
    if (kvd_trimmed(g, il)) return g->lblocks + (((int64_t)lslot * g->n_loc + li) * g->n_kv + h) * bytes;
    return g->blocks + (((int64_t)slot * g->n_glob + li) * g->n_kv + h) * bytes;
}

KVD float kvd_raw(const uint8_t *data, int f32, int64_t i) {
    return f32 ? ((const float *)data)[i] : kvd_f16(((const uint16_t *)data)[i]);
}

/* Key element d of token i of a block as stored: raw blocks channel-major,
 * per-channel groups of B tokens, or per-token groups of G channels. */
KVD float kvd_block_key(const kvs_kv_dev *g, const uint8_t *data, int32_t i, int32_t d) {
    if (g->kbits == 0) return kvd_raw(data, g->k_f32, (int64_t)d * g->B + i);
    if (!g->key_per_token) return kvd_group_elem(data + d * kvd_group_bytes(g->kbits, g->B), g->B, g->kbits, i);
    const int64_t gb = kvd_group_bytes(g->kbits, g->G);
    return kvd_group_elem(data + ((int64_t)i * (g->hd / g->G) + d / g->G) * gb, g->G, g->kbits, d % g->G);
}

/* Value element d of token i of a block (data: its value bytes), token-major. */
KVD float kvd_block_value(const kvs_kv_dev *g, const uint8_t *data, int32_t i, int32_t d) {
    if (g->vbits == 0) return kvd_raw(data, g->v_f32, (int64_t)i * g->hd + d);
    const int64_t gb = kvd_group_bytes(g->vbits, g->G);
    return kvd_group_elem(data + ((int64_t)i * (g->hd / g->G) + d / g->G) * gb, g->G, g->vbits, d % g->G);
}

/* Token i of a segment of layer il, head h: keys (is_key) or values. */
KVD float kvd_seg_elem(const kvs_kv_dev *g, const kvs_kv_seg *sg, const uint8_t *block, int32_t il, int32_t h,
                       int is_key, int32_t i, int32_t d) {
    if (sg->kind == 1) return is_key ? kvd_block_key(g, block, i, d) : kvd_block_value(g, block + g->k_bytes, i, d);
    const int32_t slot = sg->kind == 0 ? sg->index : (sg->index + i) % g->Wcap;
    const uint8_t *base = sg->kind == 0 ? (is_key ? g->sink_k : g->sink_v) : (is_key ? g->win_k : g->win_v);
    return kvd_row_elem(g, base, kvd_row_index(g, slot, il, h) + d);
}

/* ---- appending and committing ------------------------------------------- */

/* kvs_kv_cache_store, element e (< n_kv * hd) of token t. */
KVD void kvd_store(const kvs_kv_dev *g, int32_t il, int32_t n_past, int32_t t, int64_t e, const float *k,
                   const float *v) {
    const int64_t kv_dim = (int64_t)g->n_kv * g->hd;
    const int64_t index = kvd_row_index(g, (n_past + t) % g->Wcap, il, 0) + e;
    if (g->row_f32) {
        ((float *)g->win_k)[index] = k[t * kv_dim + e];
        ((float *)g->win_v)[index] = v[t * kv_dim + e];
    } else {
        ((uint16_t *)g->win_k)[index] = kvd_to_f16(k[t * kv_dim + e]);
        ((uint16_t *)g->win_v)[index] = kvd_to_f16(v[t * kv_dim + e]);
    }
}

/* rotate_key_row: RoPE by offset t inside the block, then the rotation. */
KVD void kvd_rotate_key_row(const kvs_kv_dev *g, int kind, float *row, int32_t t) {
    const float *cs = g->blk_cos[kind], *sn = g->blk_sin[kind];
    for (int32_t k = 0; k < g->n_rot / 2; k++) {
        const int32_t a = g->pair_a[k], b = g->pair_b[k];
        const float c = cs[a * g->B + t], s = sn[a * g->B + t], x = row[a], y = row[b];
        row[a] = KVD_SUB(KVD_MUL(x, c), KVD_MUL(y, s));
        row[b] = KVD_ADD(KVD_MUL(x, s), KVD_MUL(y, c));
    }
    kvd_fwht(g->hd, row);
}

/* Tile rows of a commit: [keys, values][n_layer][n_kv][B][hd]. */
KVD float *kvd_tile_row(const kvs_kv_dev *g, float *tile, int is_key, int32_t il, int32_t h, int32_t t) {
    const int64_t lh = ((int64_t)(is_key ? 0 : g->n_layer) + il) * g->n_kv + h;
    return tile + (lh * g->B + t) * g->hd;
}

/* window_tile + rotate_tile for one token: window position o0 + t of
 * (il, h) as f32, in the space its block is quantized in. */
KVD void kvd_load_tile_row(const kvs_kv_dev *g, int32_t o0, int32_t il, int32_t h, int32_t t, int is_key, float *row) {
    const int64_t index = kvd_row_index(g, (o0 + t) % g->Wcap, il, h);
    const uint8_t *base = is_key ? g->win_k : g->win_v;
    for (int32_t d = 0; d < g->hd; d++) row[d] = kvd_row_elem(g, base, index + d);
    if (is_key && g->rot_k) kvd_rotate_key_row(g, kvd_kind(g, il), row, t);
    if (!is_key && g->rot_v) kvd_fwht(g->hd, row);
}

/* Units of one (layer, head) block that encode independently: raw rows,
 * per-channel key groups, or per-token groups. */
KVD_HD int32_t kvd_encode_units(const kvs_kv_dev *g, int is_key) {
    const int bits = is_key ? g->kbits : g->vbits;
    if (bits == 0) return g->B;
    if (is_key && !g->key_per_token) return g->hd;
    return g->B * (g->hd / g->G);
}

/* encode_block, unit u: tile holds the B rows of this (layer, head). */
KVD void kvd_encode_unit(const kvs_kv_dev *g, const float *tile, uint64_t skip, int is_key, int32_t u, uint8_t *out) {
    const int bits = is_key ? g->kbits : g->vbits;
    const int32_t hd = g->hd, B = g->B;
    if (bits == 0) { /* row u: keys channel-major, values token-major */
        for (int32_t d = 0; d < hd; d++) {
            const int64_t i = is_key ? (int64_t)d * B + u : (int64_t)u * hd + d;
            if (is_key ? g->k_f32 : g->v_f32) ((float *)out)[i] = tile[(int64_t)u * hd + d];
            else ((uint16_t *)out)[i] = kvd_to_f16(tile[(int64_t)u * hd + d]);
        }
        return;
    }
    if (is_key && !g->key_per_token) {
        kvd_quantize_group(tile + u, hd, skip, B, bits, out + u * kvd_group_bytes(bits, B));
        return;
    }
    const int32_t per_row = hd / g->G, t = u / per_row, gi = u % per_row;
    kvd_quantize_group(tile + (int64_t)t * hd + gi * g->G, 1, 0, g->G, bits, out + u * kvd_group_bytes(bits, g->G));
}

/* requantize_with_sink, channel d: per-channel key group d of a block with
 * token t's value replaced by `row` (the sink's key in the block's space). */
KVD void kvd_requantize_channel(const kvs_kv_dev *g, uint8_t *data, const float *row, int32_t t, int32_t d,
                                uint64_t skip) {
    const int64_t gb = kvd_group_bytes(g->kbits, g->B);
    float column[KVD_MAX_B];
    for (int32_t i = 0; i < g->B; i++) column[i] = kvd_group_elem(data + d * gb, g->B, g->kbits, i);
    column[t] = row[d];
    kvd_quantize_group(column, 1, skip, g->B, g->kbits, data + d * gb);
}

/* ---- attention (kvs_kv_cache_attend_part / _combine) ------------------------ */

/* Keys of a segment that query position m_orig may see (visible()). */
KVD int32_t kvd_visible(const kvs_kv_seg *sg, int32_t m_orig) {
    if (sg->kind != 2) return sg->n;
    const int32_t n = m_orig + 1 - sg->index;
    return n < 0 ? 0 : n < sg->n ? n : sg->n;
}

/* window_start: the first cache position query position m_orig sees in layer il. */
KVD int32_t kvd_hidden(const kvs_kv_dev *g, const kvs_kv_attend_args *a, int32_t m_orig) {
    const int32_t w = g->window[a->il], m = m_orig - a->n_evicted;
    return w > 0 && m >= w ? m - w + 1 : 0;
}

/* The attention runs a block of threads per (KV head, part of the segments,
 * tile of tokens): the queries of the tile (tokens x the query heads of the
 * KV head) go through the part's segments together, so each segment's keys
 * and values are decoded once into shared memory for all of them, as the
 * CPU decodes a block once per KV head. Work is split into phases: within
 * a phase every item is independent, and a barrier separates phases
 * (KVD_PHASE, defined by the includer: the phase's items, then
 * __syncthreads). */
#define KVD_MAX_QUERIES 16 /* queries per block */

KVD_HD int64_t kvd_tile_floats(int32_t hd, int32_t B, int32_t n_queries) {
    return (int64_t)B * hd + 3 * (int64_t)n_queries * hd + (int64_t)n_queries * B + 3 * (int64_t)n_queries;
}

/* Tokens per block: as many as KVD_MAX_QUERIES queries allow, fewer when
 * their shared memory would pass smem_bytes; 0 when not even one token fits. */
KVD_HD int32_t kvd_tokens_per_block(int32_t group, int32_t n_tokens, int32_t hd, int32_t B, int64_t smem_bytes) {
    int32_t tq = group < KVD_MAX_QUERIES ? KVD_MAX_QUERIES / group : 1;
    if (tq > n_tokens) tq = n_tokens;
    while (tq > 0 && kvd_tile_floats(hd, B, tq * group) * 4 > smem_bytes) tq--;
    return tq;
}

/* A block's shared memory. */
typedef struct kvd_tile {
    float *kv;            /* [hd][B] a segment's keys (channel-major), then [B][hd] its values */
    float *qb;            /* [Q][hd] queries brought to the segment's start, scaled */
    float *sc;            /* [Q][B] scores, then probabilities */
    float *acc, *acc_rot; /* [Q][hd] value sums: plain, and in rotated blocks' space */
    float *m, *l, *f;     /* [Q] running max, running sum, this segment's rescale factor */
} kvd_tile;

/* What a block works on; every thread of it computes the same. */
typedef struct kvd_job {
    int32_t h, part, t0, group, n_queries, k0, k1;
} kvd_job;

KVD kvd_tile kvd_tile_carve(float *smem, int32_t hd, int32_t B, int32_t n_queries) {
    kvd_tile t;
    const int64_t qh = (int64_t)n_queries * hd;
    t.kv = smem;
    t.qb = t.kv + (int64_t)B * hd;
    t.acc = t.qb + qh;
    t.acc_rot = t.acc + qh;
    t.sc = t.acc_rot + qh;
    t.m = t.sc + (int64_t)n_queries * B;
    t.l = t.m + n_queries;
    t.f = t.l + n_queries;
    return t;
}

KVD_HD int32_t kvd_token_tiles(int32_t n_tokens, int32_t tq) { return (n_tokens + tq - 1) / tq; }

/* Parts the segments are split into: enough for target_blocks blocks (a
 * one-token decode has one per KV head and part), at most one per segment,
 * and no more records than there is room for. */
KVD_HD int32_t kvd_parts(const kvs_kv_attend_args *a, int32_t n_kv, int32_t tq, int64_t target_blocks) {
    const int64_t blocks = (int64_t)n_kv * kvd_token_tiles(a->n_tokens, tq);
    int64_t parts = (target_blocks + blocks - 1) / blocks;
    const int64_t room = a->partial_records / ((int64_t)a->n_tokens * a->n_head);
    if (parts > a->n_segs) parts = a->n_segs;
    if (parts > room) parts = room;
    return parts < 1 ? 1 : (int32_t)parts;
}

/* Block b of the grid: tiles vary fastest, then parts, then KV heads. */
KVD kvd_job kvd_job_of(const kvs_kv_dev *g, const kvs_kv_attend_args *a, int64_t b, int32_t tq) {
    const int32_t tiles = kvd_token_tiles(a->n_tokens, tq), group = a->n_head / g->n_kv;
    kvd_job j;
    j.t0 = (int32_t)(b % tiles) * tq;
    j.part = (int32_t)(b / tiles % a->n_parts);
    j.h = (int32_t)(b / tiles / a->n_parts);
    j.group = group;
    j.n_queries = tq * group;
    j.k0 = (int32_t)((int64_t)a->n_segs * j.part / a->n_parts);
    j.k1 = (int32_t)((int64_t)a->n_segs * (j.part + 1) / a->n_parts);
    return j;
}

/* Query q of the block: its token (-1 past the batch) and query head. */
KVD int32_t kvd_query_token(const kvs_kv_attend_args *a, const kvd_job *j, int32_t q) {
    const int32_t t = j->t0 + q / j->group;
    return t < a->n_tokens ? t : -1;
}
KVD int32_t kvd_query_head(const kvd_job *j, int32_t q) { return j->h * j->group + q % j->group; }

/* A segment as a block reads it. */
typedef struct kvd_view {
    kvs_kv_seg sg;
    int32_t n;            /* keys the tile's last token sees: the most any query sees */
    const uint8_t *block; /* a block's (layer, head) bytes */
    int rotated;          /* keys stored in the query's space (rotated blocks) */
    int rot_values;       /* values stored Hadamard-rotated */
} kvd_view;

/* 0 when no query of the block sees a key of segment k (hidden grows with
 * the position, so the tile's first token sees the most of the past). */
KVD int kvd_view_of(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, int32_t k, kvd_view *v) {
    v->sg = a->segs[k];
    int32_t last = j->t0 + j->n_queries / j->group - 1;
    if (last >= a->n_tokens) last = a->n_tokens - 1;
    v->n = kvd_visible(&v->sg, a->n_past + last);
    if (v->n == 0 || v->sg.c0 + v->n <= kvd_hidden(g, a, a->n_past + j->t0)) return 0;
    v->block = v->sg.kind == 1 ? kvd_block(g, v->sg.index, v->sg.lslot, a->il, j->h) : 0;
    v->rotated = v->sg.kind == 1 && g->rot_k;
    v->rot_values = v->sg.kind == 1 && g->vbits > 0 && g->rot_v;
    return 1;
}

KVD void kvd_p_init(const kvs_kv_dev *g, const kvd_job *j, kvd_tile *t, int32_t tid, int32_t nt) {
    KVD_ITEMS(e, (int64_t)j->n_queries * g->hd, tid, nt) t->acc[e] = t->acc_rot[e] = 0.0f;
    KVD_ITEMS(q, j->n_queries, tid, nt) {
        t->m[q] = -KVD_INF;
        t->l[q] = 0.0f;
    }
}

/* The keys into kv[d * B + i]: dequantized where they lie, rotated by their
 * offset i in the segment (load_rotated_keys) unless stored rotated. */
KVD void kvd_p_keys(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, const kvd_view *v,
                    kvd_tile *t, int32_t tid, int32_t nt) {
    const int32_t n = v->n, hd = g->hd, B = g->B, half = g->n_rot / 2, kind = kvd_kind(g, a->il);
    if (v->rotated) {
        KVD_ITEMS(e, (int64_t)hd * n, tid, nt) {
            const int32_t d = (int32_t)(e / n), i = (int32_t)(e % n);
            t->kv[d * B + i] = kvd_seg_elem(g, &v->sg, v->block, a->il, j->h, 1, i, d);
        }
        return;
    }
    const float *cs = g->blk_cos[kind], *sn = g->blk_sin[kind];
    KVD_ITEMS(e, (int64_t)(half + hd - g->n_rot) * n, tid, nt) {
        const int32_t p = (int32_t)(e / n), i = (int32_t)(e % n);
        if (p >= half) {
            const int32_t d = g->n_rot + p - half;
            t->kv[d * B + i] = kvd_seg_elem(g, &v->sg, v->block, a->il, j->h, 1, i, d);
            continue;
        }
        const int32_t pa = g->pair_a[p], pb = g->pair_b[p];
        const float x = kvd_seg_elem(g, &v->sg, v->block, a->il, j->h, 1, i, pa);
        const float y = kvd_seg_elem(g, &v->sg, v->block, a->il, j->h, 1, i, pb);
        const float c = cs[pa * B + i], s = sn[pa * B + i];
        t->kv[pa * B + i] = x * c - y * s;
        t->kv[pb * B + i] = x * s + y * c;
    }
}

/* Each query rotated to the segment's start (rotate_query), times the scale. */
KVD void kvd_p_queries(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, const kvd_view *v,
                       kvd_tile *t, int32_t tid, int32_t nt) {
    const int32_t hd = g->hd, half = g->n_rot / 2, per = half + hd - g->n_rot, kind = kvd_kind(g, a->il);
    const int32_t step = g->neox ? 1 : 2, stride = g->neox ? half : 1;
    KVD_ITEMS(e, (int64_t)j->n_queries * per, tid, nt) {
        const int32_t q = (int32_t)(e / per), p = (int32_t)(e % per), tok = kvd_query_token(a, j, q);
        const int32_t vis = tok < 0 ? 0 : kvd_visible(&v->sg, a->n_past + tok);
        float *qb = t->qb + (int64_t)q * hd;
        if (vis == 0 || v->sg.c0 + vis <= kvd_hidden(g, a, a->n_past + tok)) {
            /* past the batch, or sees none of these keys (kvd_p_scores masks them all): its
             * distance may lie outside the RoPE table */
            if (p < half) qb[p * step] = qb[p * step + stride] = 0.0f;
            else qb[g->n_rot + p - half] = 0.0f;
            continue;
        }
        const float *qr = a->q + tok * a->q_stride + (int64_t)kvd_query_head(j, q) * hd;
        if (p >= half) {
            qb[g->n_rot + p - half] = a->scale * qr[g->n_rot + p - half];
            continue;
        }
        const int64_t at = (int64_t)(a->n_past + tok - a->n_evicted - v->sg.c0) * half + p;
        const float c = g->rel_cos[kind][at], s = g->rel_sin[kind][at];
        const int32_t x = p * step, y = x + stride;
        qb[x] = a->scale * (qr[x] * c - qr[y] * s);
        qb[y] = a->scale * (qr[x] * s + qr[y] * c);
    }
}

/* Scores of every query against the segment's keys; keys a query may not
 * see (later in the batch, before a local window, read from a sink row
 * instead) score -inf. */
KVD void kvd_p_scores(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, const kvd_view *v,
                      kvd_tile *t, int32_t tid, int32_t nt) {
    const int32_t n = v->n, hd = g->hd, B = g->B;
    KVD_ITEMS(e, (int64_t)j->n_queries * n, tid, nt) {
        const int32_t q = (int32_t)(e / n), i = (int32_t)(e % n), tok = kvd_query_token(a, j, q);
        const int32_t m_orig = a->n_past + tok;
        const int masked = tok < 0 || i >= kvd_visible(&v->sg, m_orig) || kvd_bit(v->sg.mask, i) ||
                           v->sg.c0 + i < kvd_hidden(g, a, m_orig);
        float s = 0.0f;
        for (int32_t d = 0; d < hd && !masked; d++) s += t->qb[(int64_t)q * hd + d] * t->kv[d * B + i];
        t->sc[(int64_t)q * B + i] = masked ? -KVD_INF : s;
    }
}

/* Per query: the segment's max joins the running one (the sums so far are
 * rescaled by f), and the scores become exp(score - max). */
KVD void kvd_p_softmax(const kvd_job *j, const kvd_view *v, int32_t B, kvd_tile *t, int32_t tid, int32_t nt) {
    KVD_ITEMS(q, j->n_queries, tid, nt) {
        float *sc = t->sc + q * B, seg_max = -KVD_INF, sum = 0.0f;
        for (int32_t i = 0; i < v->n; i++) seg_max = sc[i] > seg_max ? sc[i] : seg_max;
        const float m = seg_max > t->m[q] ? seg_max : t->m[q];
        t->f[q] = t->m[q] == -KVD_INF ? 0.0f : expf(t->m[q] - m); /* no sums yet: nothing to rescale */
        for (int32_t i = 0; i < v->n; i++) {
            sc[i] = sc[i] == -KVD_INF ? 0.0f : expf(sc[i] - m);
            sum += sc[i];
        }
        t->m[q] = m;
        t->l[q] = t->l[q] * t->f[q] + sum;
    }
}

/* The values into kv[i * hd + d] (the keys are no longer needed). */
KVD void kvd_p_values(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, const kvd_view *v,
                      kvd_tile *t, int32_t tid, int32_t nt) {
    KVD_ITEMS(e, (int64_t)v->n * g->hd, tid, nt) {
        const int32_t i = (int32_t)(e / g->hd), d = (int32_t)(e % g->hd);
        t->kv[e] = kvd_seg_elem(g, &v->sg, v->block, a->il, j->h, 0, i, d);
    }
}

/* acc = acc * f + sum of p * v; rotated blocks' values sum apart (in their
 * space, rotated back once at the end). */
KVD void kvd_p_accumulate(const kvs_kv_dev *g, const kvd_job *j, const kvd_view *v, kvd_tile *t, int32_t tid,
                          int32_t nt) {
    const int32_t hd = g->hd;
    KVD_ITEMS(e, (int64_t)j->n_queries * hd, tid, nt) {
        const int64_t q = e / hd, d = e % hd;
        const float *p = t->sc + q * g->B;
        float s = 0.0f;
        for (int32_t i = 0; i < v->n; i++) s += p[i] * t->kv[(int64_t)i * hd + d];
        float *into = v->rot_values ? t->acc_rot : t->acc, *other = v->rot_values ? t->acc : t->acc_rot;
        into[e] = into[e] * t->f[q] + s;
        other[e] *= t->f[q];
    }
}

/* The block's records: (max, sum, value sums) per query, at its part. */
KVD void kvd_p_records(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, kvd_tile *t, int32_t tid,
                       int32_t nt) {
    const int64_t rec = g->hd + 2;
    KVD_ITEMS(e, (int64_t)j->n_queries * rec, tid, nt) {
        const int32_t q = (int32_t)(e / rec), x = (int32_t)(e % rec), tok = kvd_query_token(a, j, q);
        if (tok < 0) continue;
        float *r = a->partial + (((int64_t)tok * a->n_head + kvd_query_head(j, q)) * a->n_parts + j->part) * rec;
        r[x] = x == 0 ? t->m[q] : x == 1 ? t->l[q] : t->acc[(int64_t)q * g->hd + x - 2] + t->acc_rot[(int64_t)q * g->hd + x - 2];
    }
}

#ifdef KVD_PHASE
/* One block's attention: the part's segments one after another, then the
 * records. Every thread runs this; KVD_PHASE(fn, args...) runs
 * fn(args..., tid, n_threads) for all threads, then a barrier. */
KVD void kvd_attend_block(const kvs_kv_dev *g, const kvs_kv_attend_args *a, const kvd_job *j, kvd_tile *t) {
    const int32_t hd = g->hd;
    KVD_PHASE(kvd_p_init, g, j, t);
    for (int32_t k = j->k0; k < j->k1; k++) {
        kvd_view v;
        if (!kvd_view_of(g, a, j, k, &v)) continue; /* the same answer in every thread */
        KVD_PHASE(kvd_p_keys, g, a, j, &v, t);
        KVD_PHASE(kvd_p_queries, g, a, j, &v, t);
        if (v.rotated) {
            for (int32_t h = 1; h < hd; h *= 2) KVD_PHASE(kvd_p_fwht_stage, t->qb, j->n_queries, hd, h);
            KVD_PHASE(kvd_p_scale, t->qb, (int64_t)j->n_queries * hd, 1.0f / sqrtf((float)hd));
        }
        KVD_PHASE(kvd_p_scores, g, a, j, &v, t);
        KVD_PHASE(kvd_p_softmax, j, &v, g->B, t);
        KVD_PHASE(kvd_p_values, g, a, j, &v, t);
        KVD_PHASE(kvd_p_accumulate, g, j, &v, t);
    }
    if (g->rot_v && g->vbits > 0) {
        for (int32_t h = 1; h < hd; h *= 2) KVD_PHASE(kvd_p_fwht_stage, t->acc_rot, j->n_queries, hd, h);
        KVD_PHASE(kvd_p_scale, t->acc_rot, (int64_t)j->n_queries * hd, 1.0f / sqrtf((float)hd));
    }
    KVD_PHASE(kvd_p_records, g, a, j, t);
}
#endif

/* kvs_kv_cache_attend_combine, element d of the output: n_parts records
 * (hd + 2 floats apart) merged. */
KVD float kvd_combine_elem(int32_t hd, int32_t n_parts, const float *recs, int32_t d) {
    float max_score = -KVD_INF, acc = 0.0f;
    for (int32_t p = 0; p < n_parts; p++) {
        if (recs[(int64_t)p * (hd + 2)] > max_score) max_score = recs[(int64_t)p * (hd + 2)];
    }
    double sum = 0.0;
    for (int32_t p = 0; p < n_parts; p++) {
        const float *rec = recs + (int64_t)p * (hd + 2);
        if (rec[1] == 0.0f) continue; /* a part without keys */
        const float w = expf(rec[0] - max_score);
        sum += (double)w * rec[1];
        acc += w * rec[2 + d];
    }
    return acc * (float)(1.0 / sum);
}

#endif
