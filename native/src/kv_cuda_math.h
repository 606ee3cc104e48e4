/* kv_cuda_math.h - private: the per-thread arithmetic of the KV cache's
 * CUDA kernels (kv_cuda.cu), written once for nvcc and for a C compiler:
 * tests/cuda_host_emulation.c runs these same functions on the host, so
 * the GPU cache's logic (segments, masks, RoPE by distance, quantization,
 * the split softmax) is checked against the CPU's kv_cache.c on machines
 * without a GPU. Each function mirrors a piece of kv_cache.c / kv_quant.c /
 * kernels_kv.c, named where it is defined.
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

#include "kv_cuda.h"

#define KVD_MAX_HD 512 /* KVS_KV_MAX_HEAD_DIM */
#define KVD_MAX_B 64   /* tokens per block at most (kv_cache.c's check_params) */

#if defined(__CUDACC__)
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
#else
#include "formats.h"
#define KVD static inline
#define KVD_HD static inline
#define KVD_MUL(a, b) ((a) * (b))
#define KVD_ADD(a, b) ((a) + (b))
#define KVD_SUB(a, b) ((a) - (b))
#define KVD_INF INFINITY
KVD float kvd_f16(uint16_t h) { return kvs_fp16_to_fp32(h); }
KVD uint16_t kvd_to_f16(float f) { return kvs_fp32_to_fp16(f); }
#endif

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

/* kvs_kv_quantize_group: n values `stride` apart; bit i of skip leaves value
 * i out of the min/max (it decodes as the zero point). */
KVD void kvd_quantize_group(const float *x, int64_t stride, uint64_t skip, int64_t n, int bits, uint8_t *out) {
    float lo = KVD_INF, hi = -KVD_INF;
    for (int64_t i = 0; i < n; i++) {
        if (skip >> i & 1) continue;
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
        float q = (skip >> i & 1) ? 0.0f : roundf(KVD_MUL(KVD_SUB(x[i * stride], zero), inv));
        q = q < 0.0f ? 0.0f : q > (float)levels ? (float)levels : q;
        const int64_t bit = i * bits;
        const unsigned w = (unsigned)q << (bit % 8);
        out[4 + bit / 8] |= (uint8_t)w;
        if (w >> 8) out[4 + bit / 8 + 1] |= (uint8_t)(w >> 8);
    }
}

/* kvs_fwht: the normalized Walsh-Hadamard transform, in place. */
KVD void kvd_fwht(int32_t n, float *x) {
    for (int32_t h = 1; h < n; h *= 2) {
        for (int32_t i = 0; i < n; i += 2 * h) {
            for (int32_t j = i; j < i + h; j++) {
                const float a = x[j], b = x[j + h];
                x[j] = KVD_ADD(a, b);
                x[j + h] = KVD_SUB(a, b);
            }
        }
    }
    const float norm = 1.0f / sqrtf((float)n);
    for (int32_t i = 0; i < n; i++) x[i] = KVD_MUL(x[i], norm);
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

/* rotate_query (+ the rotation for rotated key blocks): q brought to a
 * segment dist positions before it, times the softmax scale. */
KVD void kvd_rotate_query(const kvs_kv_dev *g, int kind, int32_t dist, const float *q, float scale, int rotated,
                          float *qb) {
    const int32_t half = g->n_rot / 2, step = g->neox ? 1 : 2, stride = g->neox ? half : 1;
    const float *cs = g->rel_cos[kind] + (int64_t)dist * half, *sn = g->rel_sin[kind] + (int64_t)dist * half;
    for (int32_t d = g->n_rot; d < g->hd; d++) qb[d] = scale * q[d];
    for (int32_t i = 0; i < half; i++) {
        const int32_t a = i * step, b = a + stride;
        qb[a] = scale * (q[a] * cs[i] - q[b] * sn[i]);
        qb[b] = scale * (q[a] * sn[i] + q[b] * cs[i]);
    }
    if (rotated) kvd_fwht(g->hd, qb);
}

/* Score of key i of a segment: rotated blocks hold keys in the query's
 * space already; everything else is rotated by the key's offset i. */
KVD float kvd_score(const kvs_kv_dev *g, const kvs_kv_seg *sg, const uint8_t *block, int32_t il, int32_t h, int kind,
                    int rotated, const float *qb, int32_t i) {
    float s = 0.0f;
    if (rotated) {
        for (int32_t d = 0; d < g->hd; d++) s += qb[d] * kvd_seg_elem(g, sg, block, il, h, 1, i, d);
        return s;
    }
    const float *cs = g->blk_cos[kind], *sn = g->blk_sin[kind];
    for (int32_t k = 0; k < g->n_rot / 2; k++) {
        const int32_t a = g->pair_a[k], b = g->pair_b[k];
        const float x = kvd_seg_elem(g, sg, block, il, h, 1, i, a), y = kvd_seg_elem(g, sg, block, il, h, 1, i, b);
        const float c = cs[a * g->B + i], sa = sn[a * g->B + i];
        s += qb[a] * (x * c - y * sa) + qb[b] * (x * sa + y * c);
    }
    for (int32_t d = g->n_rot; d < g->hd; d++) s += qb[d] * kvd_seg_elem(g, sg, block, il, h, 1, i, d);
    return s;
}

/* Scratch of one query's part: the rotated query, the value sums (plain
 * and, for rotated value blocks, in their space), a segment's scores. */
typedef struct kvd_scratch {
    float qb[KVD_MAX_HD], acc[KVD_MAX_HD], acc_rot[KVD_MAX_HD], scores[KVD_MAX_B];
} kvd_scratch;

/* Part `part` of query head hq of appended token t: segments k0..k1-1 of
 * the args' table, as a record (max score, sum of exp(score - max), the
 * exp-weighted value sum) at rec (hd + 2 floats; sum 0 when no key). The
 * softmax runs online, a segment at a time. */
KVD void kvd_attend_part(const kvs_kv_dev *g, const kvs_kv_attend_args *a, int32_t t, int32_t hq, int32_t part,
                         kvd_scratch *s, float *rec) {
    const int32_t hd = g->hd, il = a->il, h = hq / (a->n_head / g->n_kv), kind = kvd_kind(g, il);
    const int32_t m_orig = a->n_past + t, m = m_orig - a->n_evicted, w = g->window[il];
    const int32_t hidden = w > 0 && m >= w ? m - w + 1 : 0; /* window_start */
    const int32_t k0 = (int32_t)((int64_t)a->n_segs * part / a->n_parts);
    const int32_t k1 = (int32_t)((int64_t)a->n_segs * (part + 1) / a->n_parts);
    const float *q = a->q + t * a->q_stride + (int64_t)hq * hd;
    float max_score = -KVD_INF, sum = 0.0f;
    for (int32_t d = 0; d < hd; d++) s->acc[d] = s->acc_rot[d] = 0.0f;
    for (int32_t k = k0; k < k1; k++) {
        const kvs_kv_seg sg = a->segs[k];
        const int32_t n = kvd_visible(&sg, m_orig);
        if (n == 0 || sg.c0 + n <= hidden) continue; /* a local layer's window has left it */
        const uint8_t *block = sg.kind == 1 ? kvd_block(g, sg.index, sg.lslot, il, h) : 0;
        const int rotated = sg.kind == 1 && g->rot_k, rot_values = sg.kind == 1 && g->vbits > 0 && g->rot_v;
        kvd_rotate_query(g, kind, m - sg.c0, q, a->scale, rotated, s->qb);
        float seg_max = -KVD_INF;
        for (int32_t i = 0; i < n; i++) {
            const int masked = (sg.mask >> i & 1) || sg.c0 + i < hidden;
            s->scores[i] = masked ? -KVD_INF : kvd_score(g, &sg, block, il, h, kind, rotated, s->qb, i);
            seg_max = s->scores[i] > seg_max ? s->scores[i] : seg_max;
        }
        if (seg_max == -KVD_INF) continue;
        if (seg_max > max_score) {
            const float f = max_score == -KVD_INF ? 0.0f : expf(max_score - seg_max);
            sum *= f;
            for (int32_t d = 0; d < hd; d++) {
                s->acc[d] *= f;
                s->acc_rot[d] *= f;
            }
            max_score = seg_max;
        }
        float *acc = rot_values ? s->acc_rot : s->acc;
        for (int32_t i = 0; i < n; i++) {
            if (s->scores[i] == -KVD_INF) continue;
            const float p = expf(s->scores[i] - max_score);
            sum += p;
            for (int32_t d = 0; d < hd; d++) acc[d] += p * kvd_seg_elem(g, &sg, block, il, h, 0, i, d);
        }
    }
    if (g->rot_v && g->vbits > 0) kvd_fwht(hd, s->acc_rot); /* rotated value sums back, once */
    rec[0] = max_score;
    rec[1] = sum;
    for (int32_t d = 0; d < hd; d++) rec[2 + d] = s->acc[d] + s->acc_rot[d];
}

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
