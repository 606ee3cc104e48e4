/* kv_cache.c - the KVSink KV cache (see kv_cache.h for the design). */
#include "kv_cache.h"
#include "kv_cache_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "formats.h"
#include "kernels_kv.h"
#include "kv_quant.h"
#include "status.h"

/* ---- creation ----------------------------------------------------------- */

static kvs_status check_params(const kvs_hparams *hp, const kvs_kv_params *p) {
    if (kvs_kv_bits(p->type_k) < 0 || kvs_kv_bits(p->type_v) < 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "unknown KV cache type (type_k %d, type_v %d)", p->type_k, p->type_v);
    }
    if (p->block < 8 || p->block > 64 || p->block % 8 != 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv_block must be a multiple of 8 in 8..64, got %d", p->block);
    }
    if (p->recent < 0 || p->recent > KV_MAX_TOKENS) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv_recent must be in 0..%d, got %d", KV_MAX_TOKENS, p->recent);
    }
    if (p->ubatch < 1 || p->ubatch > KV_MAX_TOKENS) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "ubatch must be in 1..%d, got %d", KV_MAX_TOKENS, p->ubatch);
    }
    if (p->sink_capacity < 0 || p->sink_capacity > 1 << 16) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "sink capacity must be in 0..65536, got %d", p->sink_capacity);
    }
    if (p->group < 1) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv group must be positive, got %d", p->group);
    if (p->rotate && (hp->head_dim & (hp->head_dim - 1))) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kv_rotate needs a power-of-two head_dim, got %d", hp->head_dim);
    }
    if (hp->head_dim > KVS_KV_MAX_HEAD_DIM) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "head_dim %d is larger than the KV cache supports (%d)",
                        hp->head_dim, KVS_KV_MAX_HEAD_DIM);
    }
    return KVS_OK;
}

/* Bytes of one block of one (layer, head) for keys (is_key) or values. */
static int64_t block_bytes(const kvs_kv_cache *c, int32_t type, int bits, int is_key) {
    if (bits == 0) return (int64_t)c->B * c->hd * (type == KVS_KV_F32 ? 4 : 2);
    if (is_key && !c->p.key_per_token) return (int64_t)c->hd * kvs_kv_group_bytes(bits, c->B);
    return (int64_t)c->B * (c->hd / c->G) * kvs_kv_group_bytes(bits, c->G);
}

/* The frequencies of one kind of layer. */
typedef struct rope_freqs {
    double base, scale;
    const float *factors; /* Llama 3.1 frequency factors, or NULL */
} rope_freqs;

static double theta_of(const kvs_kv_cache *c, const rope_freqs *f, int32_t i) {
    double theta = pow(f->base, -2.0 * i / c->n_rot) * f->scale;
    return f->factors ? theta / f->factors[i] : theta;
}

/* Pair of dimension d (< n_rot): its partner and whether d is the first of the pair. */
static void rope_pair(const kvs_kv_cache *c, int32_t d, int32_t *i, int32_t *partner, int *first) {
    const int32_t half = c->n_rot / 2;
    if (c->neox) {
        *first = d < half;
        *i = *first ? d : d - half;
        *partner = *first ? d + half : d - half;
    } else {
        *first = d % 2 == 0;
        *i = d / 2;
        *partner = *first ? d + 1 : d - 1;
    }
}

static void fill_rope_table(const kvs_kv_cache *c, const rope_freqs *f, kv_rope *r) {
    const int32_t half = c->n_rot / 2;
    for (int32_t dist = 0; dist < r->n_rel; dist++) {
        for (int32_t i = 0; i < half; i++) {
            const double a = dist * theta_of(c, f, i);
            r->rel_cos[(int64_t)dist * half + i] = (float)cos(a);
            r->rel_sin[(int64_t)dist * half + i] = (float)sin(a);
        }
    }
    for (int32_t d = 0; d < c->hd; d++) {
        for (int32_t t = 0; t < c->B; t++) {
            float cs = 1.0f, sn = 0.0f;
            if (d < c->n_rot) {
                int32_t i, partner;
                int first;
                rope_pair(c, d, &i, &partner, &first);
                cs = (float)cos(t * theta_of(c, f, i));
                sn = (float)sin(t * theta_of(c, f, i));
            }
            r->blk_cos[d * c->B + t] = cs;
            r->blk_sin[d * c->B + t] = sn;
        }
    }
}

/* Global layers rotate with the model's base, scaling and factors; local
 * ones with their own base (gemma3: 10000, unscaled, no factors; the other
 * architectures: the global base, scaling and factors). */
static void fill_rope_tables(kvs_kv_cache *c, const kvs_hparams *hp, const float *factors) {
    for (int32_t d = 0, k = 0; d < c->n_rot; d++) {
        int32_t i, partner;
        int first;
        rope_pair(c, d, &i, &partner, &first);
        if (first) {
            c->pair_a[k] = d;
            c->pair_b[k++] = partner;
        }
    }
    const rope_freqs global = {hp->rope_freq_base, hp->rope_freq_scale, factors};
    const rope_freqs local = {hp->rope_freq_base_swa, hp->rope_freq_scale_swa, hp->rope_factors_swa ? factors : NULL};
    fill_rope_table(c, &global, &c->rope[0]);
    if (c->rope[1].rel_cos) fill_rope_table(c, &local, &c->rope[1]);
}

/* A local layer's query sees keys at most n_swa - 1 positions back, but is
 * rotated to the start of a segment it partly sees: up to B - 1 further. */
static int32_t local_distances(const kvs_kv_cache *c, const kvs_hparams *hp) {
    return (int64_t)hp->n_swa + c->B < c->P ? hp->n_swa + c->B : c->P;
}

/* Bytes of one kind's RoPE tables holding n_rel distances. */
static size_t rope_bytes(const kvs_kv_cache *c, int32_t n_rel) {
    return 2 * ((size_t)n_rel * (size_t)(c->n_rot / 2) + (size_t)c->hd * c->B) * 4;
}

static kvs_status alloc_rope(kvs_kv_cache *c, kv_rope *r, int32_t n_rel) {
    const size_t half = (size_t)(c->n_rot / 2), blk = (size_t)c->hd * c->B * 4;
    r->n_rel = n_rel;
    r->rel_cos = calloc(1, (size_t)n_rel * half * 4 + 4);
    r->rel_sin = calloc(1, (size_t)n_rel * half * 4 + 4);
    r->blk_cos = calloc(1, blk);
    r->blk_sin = calloc(1, blk);
    if (r->rel_cos && r->rel_sin && r->blk_cos && r->blk_sin) return KVS_OK;
    return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of RoPE tables for the KV cache",
                    (double)rope_bytes(c, n_rel) / (1 << 20));
}

static void free_rope(kv_rope *r) {
    free(r->rel_cos);
    free(r->rel_sin);
    free(r->blk_cos);
    free(r->blk_sin);
}

/* Tokens a context may go back (kvs_kv_cache_truncate: a regenerated reply,
 * a rewound benchmark) and still find its local layers' blocks: llama.cpp's
 * sliding-window caches keep their window plus a batch of 512 likewise. */
#define LOCAL_REWIND 512

/* Blocks a local layer's window can reach: queries from n_past on see keys
 * from n_past - n_swa + 1, which start at most ceil((n_swa - 1) / B) blocks
 * before the window; one more slot for the block being committed, one for a
 * partial block, and LOCAL_REWIND tokens for going back. */
static int32_t local_ring_slots(const kvs_kv_cache *c, const kvs_hparams *hp) {
    return (int32_t)(((int64_t)hp->n_swa - 1 + LOCAL_REWIND + c->B - 1) / c->B + 2);
}

/* Which layers are local, where their blocks live, and the RoPE tables of
 * each kind present. */
static kvs_status alloc_layer_kinds(kvs_kv_cache *c, const kvs_hparams *hp) {
    c->window = calloc((size_t)c->n_layer, sizeof *c->window);
    c->layer_index = calloc((size_t)c->n_layer, sizeof *c->layer_index);
    if (!c->window || !c->layer_index) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the KV cache's layer table");
    int32_t n_local = 0;
    for (int32_t il = 0; il < c->n_layer; il++) {
        c->window[il] = kvs_layer_is_swa(hp, il) ? hp->n_swa : 0;
        n_local += c->window[il] > 0;
    }
    c->n_swa = n_local > 0 ? hp->n_swa : 0;
    /* a local ring as large as the block ring would save nothing */
    c->L = n_local > 0 && !c->p.swa_full && local_ring_slots(c, hp) < c->NB ? local_ring_slots(c, hp) : 0;
    for (int32_t il = 0; il < c->n_layer; il++) {
        c->layer_index[il] = kv_layer_trimmed(c, il) ? c->n_loc++ : c->n_glob++;
    }
    kvs_status st = alloc_rope(c, &c->rope[0], c->P);
    if (st == KVS_OK && n_local > 0) st = alloc_rope(c, &c->rope[1], local_distances(c, hp));
    return st;
}

static kvs_status alloc_all(kvs_kv_cache *c) {
    const size_t row = kv_token_row_bytes(c);
    const size_t half = (size_t)(c->n_rot / 2);
    struct { void **ptr; size_t n; } bufs[] = {
        {(void **)&c->win_k, c->Wcap * row}, {(void **)&c->win_v, c->Wcap * row},
        {(void **)&c->win_score, (size_t)c->Wcap * 4}, {(void **)&c->sink_k, (size_t)c->S * row + 1},
        {(void **)&c->sink_v, (size_t)c->S * row + 1}, {(void **)&c->sink_pos, (size_t)c->S * 4 + 4},
        {(void **)&c->sink_score, (size_t)c->S * 4 + 4}, {(void **)&c->commit_tile, (size_t)c->B * c->hd * 4},
        {(void **)&c->blocks, (size_t)c->NB * kv_block_bytes(c, c->n_glob) + 1},
        {(void **)&c->lblocks, (size_t)c->L * kv_block_bytes(c, c->n_loc) + 1},
        {(void **)&c->lslot, (size_t)c->NB * 4}, {(void **)&c->lowner, (size_t)c->L * 4 + 4},
        {(void **)&c->block_start, (size_t)c->NB * 4}, {(void **)&c->block_mask, (size_t)c->NB * 8},
        {(void **)&c->pair_a, half * 4 + 4}, {(void **)&c->pair_b, half * 4 + 4},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i].ptr = calloc(1, bufs[i].n);
        if (!*bufs[i].ptr) {
            return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB for the KV cache",
                            (double)bufs[i].n / (1 << 20));
        }
    }
    for (int32_t i = 0; i < c->NB; i++) c->lslot[i] = -1;
    for (int32_t i = 0; i < c->L; i++) c->lowner[i] = -1;
    return KVS_OK;
}

kvs_status kvs_kv_cache_create(const kvs_hparams *hp, const float *rope_freqs, int32_t n_ctx,
                               const kvs_kv_params *params, kvs_kv_cache **out) {
    *out = NULL;
    kvs_status st = check_params(hp, params);
    if (st != KVS_OK) return st;
    if (n_ctx < 1 || n_ctx > KV_MAX_TOKENS) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_ctx must be in 1..%d tokens, got %d", KV_MAX_TOKENS, n_ctx);
    }
    kvs_kv_cache *c = calloc(1, sizeof *c);
    if (!c) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the KV cache");
    c->p = *params;
    c->n_layer = hp->n_layer;
    c->n_kv = hp->n_head_kv;
    c->hd = hp->head_dim;
    c->n_rot = hp->n_rot;
    c->neox = hp->rope_neox;
    c->kbits = kvs_kv_bits(params->type_k);
    c->vbits = kvs_kv_bits(params->type_v);
    c->rot_k = (params->rotate & KVS_KV_ROTATE_K) && c->kbits > 0;
    c->rot_v = (params->rotate & KVS_KV_ROTATE_V) && c->vbits > 0;
    c->B = params->block;
    /* groups must tile a head: fall back to the whole head when they do not */
    c->G = c->hd % params->group == 0 ? params->group : c->hd;
    c->Wcap = params->recent + c->B + params->ubatch;
    c->S = params->sink_capacity;
    c->n_ctx = n_ctx;
    c->NB = (n_ctx + c->B - 1) / c->B;
    c->P = c->S + c->NB * c->B + c->Wcap + 1;
    c->row_elem = (params->type_k == KVS_KV_F32 || params->type_v == KVS_KV_F32) ? 4 : 2;
    c->k_bytes = block_bytes(c, params->type_k, c->kbits, 1);
    c->v_bytes = block_bytes(c, params->type_v, c->vbits, 0);
    if ((st = alloc_layer_kinds(c, hp)) != KVS_OK || (st = alloc_all(c)) != KVS_OK) {
        kvs_kv_cache_free(c);
        return st;
    }
    fill_rope_tables(c, hp, rope_freqs);
    *out = c;
    return KVS_OK;
}

void kvs_kv_cache_free(kvs_kv_cache *c) {
    if (!c) return;
    if (c->dev) c->dev->release(c); /* device arrays; their pointers come back NULL */
    void *bufs[] = {c->win_k, c->win_v, c->win_score, c->sink_k, c->sink_v, c->sink_pos, c->sink_score,
                    c->commit_tile, c->blocks, c->block_start, c->block_mask, c->window, c->pair_a, c->pair_b,
                    c->layer_index, c->lblocks, c->lslot, c->lowner};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free_rope(&c->rope[0]);
    free_rope(&c->rope[1]);
    free(c);
}

double kvs_kv_cache_bytes_per_token(const kvs_kv_cache *c) {
    return (double)(c->k_bytes + c->v_bytes) * c->n_layer * c->n_kv / c->B;
}

void kvs_kv_cache_memory(const kvs_kv_cache *c, kvs_kv_memory *out) {
    int32_t n_local = 0;
    for (int32_t il = 0; il < c->n_layer; il++) n_local += c->window[il] > 0;
    const double per_layer = (double)(c->k_bytes + c->v_bytes) * c->n_kv / c->B;
    const size_t row = kv_token_row_bytes(c);
    size_t rope = 0;
    for (int kind = 0; kind < 2; kind++) {
        if (c->rope[kind].rel_cos) rope += rope_bytes(c, c->rope[kind].n_rel);
    }
    out->n_global_layers = c->n_layer - n_local;
    out->n_local_layers = n_local;
    out->local_window = c->n_swa;
    out->local_block_tokens = c->L > 0 ? c->L * c->B : 0;
    out->global_bytes_per_token = per_layer * (c->n_layer - n_local);
    out->local_bytes_per_token = per_layer * n_local;
    out->allocated_bytes = (int64_t)(c->NB * kv_block_bytes(c, c->n_glob) + c->L * kv_block_bytes(c, c->n_loc) +
                                     (size_t)(2 * c->Wcap + 2 * c->S) * row + rope);
}


int32_t kvs_kv_cache_n_past(const kvs_kv_cache *c) { return c->n_past; }
int32_t kvs_kv_cache_n_sinks(const kvs_kv_cache *c) { return c->n_sinks; }
int32_t kvs_kv_cache_n_evicted(const kvs_kv_cache *c) { return c->n_evicted; }
int32_t kvs_kv_cache_n_dropped(const kvs_kv_cache *c) { return c->n_dropped; }

int32_t kvs_kv_cache_sink_positions(const kvs_kv_cache *c, int32_t *positions, int32_t capacity) {
    for (int32_t i = 0; i < c->n_sinks && i < capacity; i++) positions[i] = c->sink_pos[i];
    return c->n_sinks;
}

/* ---- rows --------------------------------------------------------------- */

static size_t row_index(const kvs_kv_cache *c, int32_t slot, int32_t il, int32_t h) {
    return (((size_t)slot * c->n_layer + il) * c->n_kv + h) * c->hd;
}

static void put_row(const kvs_kv_cache *c, uint8_t *base, size_t index, const float *src) {
    if (c->row_elem == 4) {
        memcpy((float *)base + index, src, (size_t)c->hd * sizeof(float));
        return;
    }
    kvs_half *dst = (kvs_half *)base + index;
    for (int32_t d = 0; d < c->hd; d++) dst[d] = kvs_fp32_to_fp16(src[d]);
}

static void get_row(const kvs_kv_cache *c, const uint8_t *base, size_t index, float *dst, int32_t impl) {
    if (c->row_elem == 4) memcpy(dst, (const float *)base + index, (size_t)c->hd * sizeof(float));
    else kvs_f16_to_f32_kernel(impl)(c->hd, (const kvs_half *)base + index, dst);
}

/* ---- data on the host or a device -------------------------------------- */

/* A device op's failure is kept until the cache is cleared. */
static void device_did(kvs_kv_cache *c, kvs_status st) {
    if (st != KVS_OK && c->dev_status == KVS_OK) c->dev_status = st;
}

/* dst = src (n bytes) inside the cache's memory; the ranges do not overlap. */
static void move_data(kvs_kv_cache *c, void *dst, const void *src, size_t n) {
    if (c->dev) device_did(c, c->dev->move(dst, src, n));
    else memcpy(dst, src, n);
}

kvs_status kv_data_read(const kvs_kv_cache *c, void *host_dst, const void *src, size_t n) {
    if (c->dev) return c->dev->read(host_dst, src, n);
    memcpy(host_dst, src, n);
    return KVS_OK;
}

kvs_status kv_data_write(kvs_kv_cache *c, void *dst, const void *host_src, size_t n) {
    if (c->dev) return c->dev->write(dst, host_src, n);
    memcpy(dst, host_src, n);
    return KVS_OK;
}

/* ---- appending ---------------------------------------------------------- */

kvs_status kvs_kv_cache_begin(kvs_kv_cache *c, int32_t n) {
    if (n < 1 || n > c->p.ubatch) {
        return kvs_fail(KVS_ERR_INTERNAL, "append of %d tokens exceeds the cache's ubatch %d", n, c->p.ubatch);
    }
    if (c->dev_status != KVS_OK) {
        return kvs_fail(c->dev_status, "the KV cache's device failed earlier (the error then said why); "
                        "reset the context to use it again");
    }
    if (!c->p.ring && (int64_t)c->n_past + n > c->n_ctx) {
        return kvs_fail(KVS_ERR_CONTEXT_FULL, "%d tokens do not fit: %d of n_ctx %d are in use",
                        n, c->n_past, c->n_ctx);
    }
    c->n_new = n;
    for (int32_t t = 0; t < n; t++) c->win_score[(c->n_past + t) % c->Wcap] = 0.0f;
    return KVS_OK;
}

/* Host caches only: a device's backend writes its window itself (kv_cache_cuda.c). */
void kvs_kv_cache_store(kvs_kv_cache *c, int32_t il, int32_t t, const float *k, const float *v) {
    const int32_t slot = (c->n_past + t) % c->Wcap;
    for (int32_t h = 0; h < c->n_kv; h++) {
        put_row(c, c->win_k, row_index(c, slot, il, h), k + (int64_t)h * c->hd);
        put_row(c, c->win_v, row_index(c, slot, il, h), v + (int64_t)h * c->hd);
    }
}

void kvs_kv_cache_mark_sink(kvs_kv_cache *c, int32_t t, float score) {
    float *s = &c->win_score[(c->n_past + t) % c->Wcap];
    if (score > *s) *s = score;
}

/* Quantize (or copy) the B tokens of a window block for one (layer, head). */
static void encode_block(const kvs_kv_cache *c, const float *tile, const uint8_t *skip, int32_t type,
                         int bits, int is_key, uint8_t *out) {
    const int32_t B = c->B, hd = c->hd, G = c->G;
    if (bits == 0) {
        /* keys channel-major, as attention reads them; values token-major */
        for (int32_t t = 0; t < B; t++) {
            for (int32_t d = 0; d < hd; d++) {
                const int64_t i = is_key ? (int64_t)d * B + t : (int64_t)t * hd + d;
                if (type == KVS_KV_F32) ((float *)out)[i] = tile[(int64_t)t * hd + d];
                else ((kvs_half *)out)[i] = kvs_fp32_to_fp16(tile[(int64_t)t * hd + d]);
            }
        }
        return;
    }
    if (is_key && !c->p.key_per_token) {
        /* KIVI: one group per channel across the block's tokens */
        const int64_t gb = kvs_kv_group_bytes(bits, B);
        for (int32_t d = 0; d < hd; d++) kvs_kv_quantize_group(tile + d, hd, skip, B, bits, out + d * gb);
        return;
    }
    const int64_t gb = kvs_kv_group_bytes(bits, G);
    for (int32_t t = 0; t < B; t++) {
        for (int32_t g = 0; g < hd / G; g++) {
            kvs_kv_quantize_group(tile + (int64_t)t * hd + g * G, 1, NULL, G, bits,
                                  out + ((int64_t)t * (hd / G) + g) * gb);
        }
    }
}

/* Block slot's (layer, head) data: in the block ring, or for a trimmed
 * local layer in the local ring (callers read only blocks that still have
 * their local data there: those a local window can reach). */
static uint8_t *block_data(const kvs_kv_cache *c, int32_t slot, int32_t il, int32_t h) {
    const size_t bytes = (size_t)(c->k_bytes + c->v_bytes), li = (size_t)c->layer_index[il];
    if (kv_layer_trimmed(c, il)) return c->lblocks + (((size_t)c->lslot[slot] * c->n_loc + li) * c->n_kv + h) * bytes;
    return c->blocks + (((size_t)slot * c->n_glob + li) * c->n_kv + h) * bytes;
}

/* Give block slot the next local slot (the oldest local data goes). */
static void take_local_slot(kvs_kv_cache *c, int32_t slot) {
    if (c->L == 0) return;
    c->lslot[slot] = c->lnext;
    c->lowner[c->lnext] = slot;
    c->lnext = (c->lnext + 1) % c->L;
}

static void evict_oldest(kvs_kv_cache *c) {
    const int32_t slot = c->first_block;
    c->n_evicted += c->B - __builtin_popcountll(c->block_mask[slot]);
    c->frontier = c->block_start[slot] + c->B;
    c->first_block = (c->first_block + 1) % c->NB;
    c->n_blocks--;
}

/* Window tokens o0..o0+B-1 of one (layer, head) as f32 rows. */
static void window_tile(const kvs_kv_cache *c, const uint8_t *base, int32_t o0, int32_t il, int32_t h, float *tile) {
    for (int32_t t = 0; t < c->B; t++) {
        get_row(c, base, row_index(c, (o0 + t) % c->Wcap, il, h), tile + (int64_t)t * c->hd, KVS_IMPL_SCALAR);
    }
}

/* A key row as rotated blocks store it: RoPE by its offset t in the block,
 * then the Hadamard rotation (attention rotates the query to match). */
static void rotate_key_row(const kvs_kv_cache *c, const kv_rope *r, float *row, int32_t t) {
    for (int32_t k = 0; k < c->n_rot / 2; k++) {
        const int32_t a = c->pair_a[k], b = c->pair_b[k];
        const float cs = r->blk_cos[a * c->B + t], sn = r->blk_sin[a * c->B + t], x = row[a], y = row[b];
        row[a] = x * cs - y * sn;
        row[b] = x * sn + y * cs;
    }
    kvs_fwht(c->hd, row);
}

/* Rows of one (layer, head) tile brought into the space their block is quantized in. */
static void rotate_tile(const kvs_kv_cache *c, int32_t il, float *tile, int is_key) {
    if (is_key ? !c->rot_k : !c->rot_v) return;
    for (int32_t t = 0; t < c->B; t++) {
        if (is_key) rotate_key_row(c, kv_layer_rope(c, il), tile + (int64_t)t * c->hd, t);
        else kvs_fwht(c->hd, tile + (int64_t)t * c->hd);
    }
}

/* The sink row that a stronger sink displaces: the lowest score, the newest
 * on ties; pinned rows (+inf) never go. -1 when every row is pinned. */
static int32_t weakest_sink(const kvs_kv_cache *c) {
    int32_t r = -1;
    for (int32_t i = 0; i < c->n_sinks; i++) {
        if (c->sink_score[i] < INFINITY && (r < 0 || c->sink_score[i] <= c->sink_score[r])) r = i;
    }
    return r;
}

static void remove_sink_row(kvs_kv_cache *c, int32_t r) {
    const size_t row = kv_token_row_bytes(c), after = (size_t)(c->n_sinks - r - 1);
    for (int32_t i = r; i < c->n_sinks - 1; i++) { /* row by row: the moves do not overlap */
        move_data(c, c->sink_k + i * row, c->sink_k + (i + 1) * row, row);
        move_data(c, c->sink_v + i * row, c->sink_v + (i + 1) * row, row);
    }
    memmove(c->sink_pos + r, c->sink_pos + r + 1, after * sizeof *c->sink_pos);
    memmove(c->sink_score + r, c->sink_score + r + 1, after * sizeof *c->sink_score);
    c->n_sinks--;
}

/* Slot of the kept block holding position pos, or -1. */
static int32_t block_of(const kvs_kv_cache *c, int32_t pos) {
    for (int32_t k = 0; k < c->n_blocks; k++) {
        const int32_t slot = (c->first_block + k) % c->NB;
        if (pos >= c->block_start[slot] && pos < c->block_start[slot] + c->B) return slot;
    }
    return -1;
}

/* Put the exact row of sink r back into its committed block. Values and
 * per-token keys already hold its quantized row (their groups span one token);
 * per-channel keys are quantized again with it in the statistics. */
static void requantize_with_sink(kvs_kv_cache *c, int32_t r, int32_t slot) {
    const int32_t t = c->sink_pos[r] - c->block_start[slot], B = c->B, hd = c->hd;
    c->block_mask[slot] &= ~(1ull << t);
    if (c->kbits == 0 || c->p.key_per_token) return;
    if (c->dev) {
        device_did(c, c->dev->requantize_keys(c, r, slot, t, c->block_mask[slot]));
        return;
    }
    uint8_t skip[64];
    for (int32_t i = 0; i < B; i++) skip[i] = c->block_mask[slot] >> i & 1;
    const int64_t gb = kvs_kv_group_bytes(c->kbits, B);
    float *tile = c->commit_tile, column[64];
    for (int32_t il = 0; il < c->n_layer; il++) {
        if (kv_layer_trimmed(c, il) && !kv_block_has_local(c, slot)) continue; /* beyond every window */
        for (int32_t h = 0; h < c->n_kv; h++) {
            uint8_t *data = block_data(c, slot, il, h);
            for (int32_t d = 0; d < hd; d++) {
                kvs_kv_dequantize_group(data + d * gb, B, c->kbits, column);
                for (int32_t i = 0; i < B; i++) tile[(int64_t)i * hd + d] = column[i];
            }
            get_row(c, c->sink_k, row_index(c, r, il, h), tile + (int64_t)t * hd, KVS_IMPL_SCALAR);
            if (c->rot_k) rotate_key_row(c, kv_layer_rope(c, il), tile + (int64_t)t * hd, t);
            encode_block(c, tile, skip, c->p.type_k, c->kbits, 1, data);
        }
    }
}

/* Sink row r gives way to a stronger sink: its token is quantized in its
 * block after all (dropped from the table, counted), or forgotten when its
 * block was evicted. Tokens of the block being committed (from o0 on) are
 * simply left in its statistics. */
static void demote_sink(kvs_kv_cache *c, int32_t r, int32_t o0, uint8_t *skip, uint64_t *mask) {
    const int32_t pos = c->sink_pos[r];
    if (pos >= o0) {
        skip[pos - o0] = 0;
        *mask &= ~(1ull << (pos - o0));
    } else {
        const int32_t slot = block_of(c, pos);
        if (slot >= 0) requantize_with_sink(c, r, slot);
        else c->n_evicted++; /* keeps frontier == sinks before it + evicted tokens */
    }
    remove_sink_row(c, r);
    c->n_dropped++;
}

/* Copy window token o0 + t into the sink table (newest position: appended). */
static void append_sink(kvs_kv_cache *c, int32_t o0, int32_t t, float score) {
    const size_t row = kv_token_row_bytes(c);
    const int32_t ws = (o0 + t) % c->Wcap;
    move_data(c, c->sink_k + c->n_sinks * row, c->win_k + (size_t)ws * row, row);
    move_data(c, c->sink_v + c->n_sinks * row, c->win_v + (size_t)ws * row, row);
    c->sink_pos[c->n_sinks] = o0 + t;
    c->sink_score[c->n_sinks++] = score;
}

/* Move the window's oldest B tokens into a block; sinks go to the sink table.
 * When the table is full, a sink with a higher score than its weakest row
 * takes that row's place; otherwise it is quantized with its block. */
static void commit_block(kvs_kv_cache *c) {
    if (c->n_blocks == c->NB) evict_oldest(c);
    const int32_t slot = (c->first_block + c->n_blocks) % c->NB, o0 = c->win_start;
    uint8_t skip[64] = {0};
    uint64_t mask = 0;
    for (int32_t t = 0; t < c->B; t++) {
        const float score = c->win_score[(o0 + t) % c->Wcap];
        if (!(score > 0.0f)) continue;
        if (c->n_sinks == c->S) {
            const int32_t r = weakest_sink(c);
            if (r < 0 || c->sink_score[r] >= score) {
                c->n_dropped++;
                continue;
            }
            demote_sink(c, r, o0, skip, &mask);
        }
        append_sink(c, o0, t, score);
        skip[t] = 1;
        mask |= 1ull << t;
    }
    take_local_slot(c, slot);
    float *tile = c->commit_tile;
    if (c->dev) device_did(c, c->dev->encode_block(c, slot, o0, mask)); /* skip[t] == mask bit t */
    for (int32_t il = 0; il < c->n_layer && !c->dev; il++) {
        for (int32_t h = 0; h < c->n_kv; h++) {
            uint8_t *dst = block_data(c, slot, il, h);
            window_tile(c, c->win_k, o0, il, h, tile);
            rotate_tile(c, il, tile, 1);
            encode_block(c, tile, skip, c->p.type_k, c->kbits, 1, dst);
            window_tile(c, c->win_v, o0, il, h, tile);
            rotate_tile(c, il, tile, 0);
            encode_block(c, tile, skip, c->p.type_v, c->vbits, 0, dst + c->k_bytes);
        }
    }
    c->block_start[slot] = o0;
    c->block_mask[slot] = mask;
    c->n_blocks++;
    c->win_start += c->B;
}

kvs_status kvs_kv_cache_commit(kvs_kv_cache *c) {
    c->n_past += c->n_new;
    c->n_new = 0;
    while (c->n_past - c->win_start >= c->p.recent + c->B) commit_block(c);
    return c->dev_status;
}

/* Whether the local layers still hold every kept block that a query at
 * position n_past (or later) reaches through its window. */
static int local_blocks_reach(const kvs_kv_cache *c, int32_t n_past) {
    for (int32_t k = c->n_blocks - 1; k >= 0 && c->L > 0; k--) {
        const int32_t slot = (c->first_block + k) % c->NB;
        if (c->block_start[slot] + c->B <= n_past - c->n_swa + 1) break; /* older ones are out of reach too */
        if (!kv_block_has_local(c, slot)) return 0;
    }
    return 1;
}

static void clear(kvs_kv_cache *c) {
    c->n_blocks = c->first_block = c->n_evicted = c->frontier = c->win_start = c->n_sinks = 0;
    for (int32_t i = 0; i < c->L; i++) c->lowner[i] = -1;
    c->lnext = 0;
    c->dev_status = KVS_OK; /* nothing left that a failed device op wrote */
}

kvs_status kvs_kv_cache_truncate(kvs_kv_cache *c, int32_t n_past, int32_t *kept) {
    if (n_past < 0 || n_past > c->n_past) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_past %d is outside [0, %d] (tokens in the cache)", n_past, c->n_past);
    }
    if (n_past < c->win_start) {
        /* quantized blocks cannot be cut: keep the blocks wholly before n_past,
         * or nothing when none is left (evicted tokens cannot come back) */
        while (c->n_blocks > 0 && c->block_start[(c->first_block + c->n_blocks - 1) % c->NB] + c->B > n_past) {
            c->n_blocks--;
        }
        n_past = c->n_blocks > 0 ? c->block_start[(c->first_block + c->n_blocks - 1) % c->NB] + c->B : 0;
        c->win_start = n_past;
        while (c->n_sinks > 0 && c->sink_pos[c->n_sinks - 1] >= n_past) c->n_sinks--;
    }
    /* local layers that already let blocks go cannot see further back again */
    if (!local_blocks_reach(c, n_past)) n_past = 0;
    if (n_past == 0) clear(c);
    if (c->L > 0 && c->n_blocks > 0) {
        /* the next block reuses the local slots of the blocks just dropped */
        const int32_t newest = (c->first_block + c->n_blocks - 1) % c->NB;
        if (kv_block_has_local(c, newest)) c->lnext = (c->lslot[newest] + 1) % c->L;
    }
    c->n_past = n_past;
    *kept = n_past;
    return KVS_OK;
}

/* ---- attention ----------------------------------------------------------
 * All queries of a KV head (its query heads, a range of the appended tokens)
 * go together, so each block is dequantized once per pass, not per query. */

typedef kv_segment segment;

/* Cache position of sink row k: rows before the frontier come first, the
 * others sit at their position less the evicted tokens before them. */
static int32_t sink_c0(const kvs_kv_cache *c, int32_t k) {
    return c->sink_pos[k] < c->frontier ? k : c->sink_pos[k] - c->n_evicted;
}

int kv_get_segment(const kvs_kv_cache *c, int32_t k, int32_t last, segment *sg) {
    if (k < c->n_sinks) {
        *sg = (segment){0, k, sink_c0(c, k), 1, 0};
        return 1;
    }
    k -= c->n_sinks;
    if (k < c->n_blocks) {
        const int32_t slot = (c->first_block + k) % c->NB;
        *sg = (segment){1, slot, c->block_start[slot] - c->n_evicted, c->B, c->block_mask[slot]};
        return 1;
    }
    k -= c->n_blocks;
    const int32_t o0 = c->win_start + k * c->B;
    if (o0 > last) return 0;
    const int32_t n = last + 1 - o0 < c->B ? last + 1 - o0 : c->B;
    *sg = (segment){2, o0, o0 - c->n_evicted, n, 0};
    return 1;
}

typedef struct attend_scratch {
    float *scores;  /* [n_queries][P] probabilities by cache position */
    float *kt;      /* [hd][B] key tile, channel-major */
    float *vt;      /* [B][hd] value tile, token-major; also key staging */
    float *qb;      /* [hd] query rotated to a segment's start */
    float *seg;     /* [B] scores of one segment */
    float *rot;     /* [n_heads][hd] value sums of rotated blocks, rotated back at the end */
} attend_scratch;

int64_t kvs_kv_cache_scratch_floats(const kvs_kv_cache *c, int32_t max_queries) {
    return (int64_t)max_queries * (c->P + c->hd) + 2 * (int64_t)c->hd * c->B + 2 * c->hd + c->B;
}

/* q rotated to a segment whose first key is `dist` positions before the
 * query, times the softmax scale; for a block of Hadamard-rotated keys, also
 * rotated by H, as its keys are (H is orthogonal: the dot is unchanged). */
static void rotate_query(const kvs_kv_cache *c, const kvs_attention_kernels *kk, const kv_rope *r, const segment *sg,
                         const float *q, int32_t dist, float scale, float *qb) {
    const int64_t at = (int64_t)dist * (c->n_rot / 2);
    kk->rotate_query(c->n_rot, c->hd, c->neox, r->rel_cos + at, r->rel_sin + at, q, scale, qb);
    if (sg->kind == 1 && c->rot_k) kk->fwht(c->hd, qb);
}

/* Sink-table or window rows of a segment into vt, token-major. */
static void load_row_segment(const kvs_kv_cache *c, int32_t il, int32_t h, const segment *sg, int keys,
                             attend_scratch *s, int32_t impl) {
    const uint8_t *base = sg->kind == 0 ? (keys ? c->sink_k : c->sink_v) : (keys ? c->win_k : c->win_v);
    for (int32_t t = 0; t < sg->n; t++) {
        const int32_t slot = sg->kind == 0 ? sg->index : (sg->index + t) % c->Wcap;
        get_row(c, base, row_index(c, slot, il, h), s->vt + (int64_t)t * c->hd, impl);
    }
}

static void transpose_to_kt(const kvs_kv_cache *c, int32_t n, attend_scratch *s) {
    for (int32_t t = 0; t < n; t++)
        for (int32_t d = 0; d < c->hd; d++) s->kt[d * c->B + t] = s->vt[(int64_t)t * c->hd + d];
}

/* A raw (f32/f16) block of B x hd values into dst, in its stored order. */
static void load_raw_block(const kvs_kv_cache *c, const uint8_t *data, int32_t type, float *dst, int32_t impl) {
    if (type == KVS_KV_F32) memcpy(dst, data, (size_t)c->B * c->hd * sizeof(float));
    else kvs_f16_to_f32_kernel(impl)((int64_t)c->B * c->hd, (const kvs_half *)data, dst);
}

static void load_groups(const kvs_kv_cache *c, const uint8_t *data, int bits, attend_scratch *s, int32_t impl) {
    const int64_t gb = kvs_kv_group_bytes(bits, c->G);
    for (int32_t t = 0; t < c->B; t++) {
        for (int32_t g = 0; g < c->hd / c->G; g++) {
            kvs_kv_dequantize_group_impl(data + ((int64_t)t * (c->hd / c->G) + g) * gb, c->G, bits,
                                         s->vt + (int64_t)t * c->hd + g * c->G, impl);
        }
    }
}

/* Key tile (channel-major, stride B) of a segment that is not a per-channel
 * quantized block (load_rotated_keys decodes those itself). */
static void load_keys(const kvs_kv_cache *c, int32_t il, int32_t h, const segment *sg, attend_scratch *s, int32_t impl) {
    if (sg->kind != 1) {
        load_row_segment(c, il, h, sg, 1, s, impl);
        transpose_to_kt(c, sg->n, s);
        return;
    }
    const uint8_t *data = block_data(c, sg->index, il, h);
    if (c->kbits == 0) {
        load_raw_block(c, data, c->p.type_k, s->kt, impl); /* stored channel-major */
    } else {
        load_groups(c, data, c->kbits, s, impl);
        transpose_to_kt(c, c->B, s);
    }
}

/* Value rows (token-major) of a segment. */
static void load_values(const kvs_kv_cache *c, int32_t il, int32_t h, const segment *sg, attend_scratch *s, int32_t impl) {
    if (sg->kind != 1) {
        load_row_segment(c, il, h, sg, 0, s, impl);
        return;
    }
    const uint8_t *data = block_data(c, sg->index, il, h) + c->k_bytes;
    if (c->vbits == 0) load_raw_block(c, data, c->p.type_v, s->vt, impl);
    else load_groups(c, data, c->vbits, s, impl);
    if (c->rot_v) {
        const kvs_fwht_fn fwht = kvs_attention_kernels_find(impl)->fwht;
        for (int32_t t = 0; t < c->B; t++) fwht(c->hd, s->vt + (int64_t)t * c->hd);
    }
}

/* Keys of a segment that query position m_orig may see (causal inside the window). */
static int32_t visible(const segment *sg, int32_t m_orig) {
    if (sg->kind != 2) return sg->n;
    const int32_t n = m_orig + 1 - sg->index;
    return n < 0 ? 0 : n < sg->n ? n : sg->n;
}

/* First cache position a query at position m_orig sees in layer il: the
 * start of a local layer's sliding window (llama.cpp masks key p for query m
 * when m - p >= n_swa), 0 in a global layer. Distances are cache positions,
 * as RoPE's are. */
static int32_t window_start(const kvs_kv_cache *c, int32_t il, int32_t m_orig) {
    const int32_t w = c->window[il], m = m_orig - c->n_evicted;
    return w > 0 && m >= w ? m - w + 1 : 0;
}

/* visible(), or 0 when every key it counts lies before the layer's window;
 * keys before the window inside a segment partly in it are masked by the
 * caller (their scores set to -inf). */
static int32_t visible_in_layer(const kvs_kv_cache *c, int32_t il, const segment *sg, int32_t m_orig) {
    const int32_t n = visible(sg, m_orig);
    return sg->c0 + n > window_start(c, il, m_orig) ? n : 0;
}

/* Whether no query of the job (its first sees the earliest window) sees the segment. */
static int before_windows(const kvs_kv_cache *c, const kvs_attend_job *job, const segment *sg) {
    return sg->c0 + sg->n <= window_start(c, job->il, c->n_past + job->t0);
}

static void softmax_in_place(const kvs_attention_kernels *kk, float *p, int32_t n) {
    float max_score;
    const float inv_sum = 1.0f / kk->exp_shifted(n, p, &max_score);
    for (int32_t j = 0; j < n; j++) p[j] *= inv_sum;
}

static attend_scratch split_scratch(const kvs_kv_cache *c, const kvs_attend_job *job, float *scratch) {
    attend_scratch s;
    const int32_t n_q = (job->t1 - job->t0) * job->n_heads, hd = c->hd;
    s.scores = scratch;
    s.kt = scratch + (int64_t)n_q * c->P;
    s.vt = s.kt + (int64_t)hd * c->B;
    s.qb = s.vt + (int64_t)hd * c->B;
    s.seg = s.qb + hd;
    s.rot = s.seg + c->B;
    return s;
}

/* The key tile of a segment, rotated by each key's offset inside it: once
 * per segment for all the queries reading it (each query is rotated to the
 * segment's start). Per-channel blocks are dequantized and rotated in one
 * pass; other segments are loaded, then rotated pair by pair. */
static void load_rotated_keys(const kvs_kv_cache *c, int32_t il, int32_t h, const segment *sg, attend_scratch *s,
                              const kvs_attention_kernels *kk, int32_t impl) {
    const int32_t half = c->n_rot / 2;
    const kv_rope *r = kv_layer_rope(c, il);
    if (sg->kind == 1 && c->rot_k) { /* stored rotated: rotate_query brings the query to them */
        if (c->p.key_per_token) load_keys(c, il, h, sg, s, impl);
        else kk->dequant_groups(c->kbits, c->hd, c->B, block_data(c, sg->index, il, h), kvs_kv_group_bytes(c->kbits, c->B),
                                s->kt, c->B);
        return;
    }
    if (sg->kind == 1 && c->kbits > 0 && !c->p.key_per_token) {
        const uint8_t *data = block_data(c, sg->index, il, h);
        const int64_t gb = kvs_kv_group_bytes(c->kbits, c->B);
        kk->key_tile(c->kbits, c->B, data, gb, half, c->pair_a, c->pair_b, r->blk_cos, r->blk_sin, c->B, s->kt);
        kk->dequant_groups(c->kbits, c->hd - c->n_rot, c->B, data + c->n_rot * gb, gb, s->kt + (int64_t)c->n_rot * c->B, c->B);
        return;
    }
    load_keys(c, il, h, sg, s, impl);
    for (int32_t k = 0; k < half; k++) {
        const int64_t a = (int64_t)c->pair_a[k] * c->B, b = (int64_t)c->pair_b[k] * c->B;
        kk->rotate_pair(sg->n, s->kt + a, s->kt + b, r->blk_cos + a, r->blk_sin + a);
    }
}

/* Scaled scores of the job's queries against segments k0..k1-1, written at
 * their cache positions in s->scores (a sink's position is written by its
 * sink segment, masked out of its block). Positions before a local layer's
 * window may be left unwritten: the caller masks them. */
static void score_segments(const kvs_kv_cache *c, const kvs_attend_job *job, attend_scratch *s, int32_t k0,
                           int32_t k1, int32_t impl) {
    const int32_t last = c->n_past + job->t1 - 1, hd = c->hd;
    const kvs_attention_kernels *kk = kvs_attention_kernels_find(impl);
    const kv_rope *r = kv_layer_rope(c, job->il);
    segment sg;
    for (int32_t k = k0; k < k1 && kv_get_segment(c, k, last, &sg); k++) {
        if (before_windows(c, job, &sg)) continue;
        load_rotated_keys(c, job->il, job->kv_head, &sg, s, kk, impl);
        for (int32_t t = job->t0; t < job->t1; t++) {
            const int32_t m_orig = c->n_past + t, n = visible_in_layer(c, job->il, &sg, m_orig);
            for (int32_t j = 0; j < job->n_heads && n > 0; j++) {
                const float *q = job->q + t * job->q_stride + (int64_t)(job->h0 + j) * hd;
                float *scores = s->scores + (int64_t)((t - job->t0) * job->n_heads + j) * c->P;
                rotate_query(c, kk, r, &sg, q, m_orig - c->n_evicted - sg.c0, job->scale, s->qb);
                if (!sg.mask) { /* the usual case: no sink in the segment */
                    kk->dot_tile(n, hd, c->B, s->kt, s->qb, scores + sg.c0);
                    continue;
                }
                kk->dot_tile(n, hd, c->B, s->kt, s->qb, s->seg);
                for (int32_t i = 0; i < n; i++) {
                    if (!(sg.mask >> i & 1)) scores[sg.c0 + i] = s->seg[i];
                }
            }
        }
    }
}

/* The segments a one-token query of layer il sees, as the decode split
 * numbers them: sink rows from sink0 on, then the segments from seg1 on
 * (blocks, then window runs); a local layer leaves out the sink rows and
 * blocks before its window. */
typedef struct decode_segments {
    int32_t sink0, seg1, n;
} decode_segments;

static decode_segments decode_segments_of(const kvs_kv_cache *c, int32_t il) {
    const int32_t m = c->n_past, hidden = window_start(c, il, m);
    const int32_t window = m < c->win_start ? 0 : (m - c->win_start) / c->B + 1;
    /* sink rows' cache positions increase: the first one not hidden */
    int32_t lo = 0, hi = c->n_sinks;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo) / 2;
        if (sink_c0(c, mid) < hidden) lo = mid + 1;
        else hi = mid;
    }
    /* blocks run contiguously from the frontier's cache position */
    const int32_t hidden_blocks = (hidden - (c->frontier - c->n_evicted)) / c->B;
    decode_segments d = {lo, c->n_sinks + (hidden_blocks < 0 ? 0 : hidden_blocks < c->n_blocks ? hidden_blocks : c->n_blocks), 0};
    d.n = (c->n_sinks - d.sink0) + (c->n_sinks + c->n_blocks + window - d.seg1);
    return d;
}

/* Segment k of the segments decode_segments_of counts. */
static int get_decode_segment(const kvs_kv_cache *c, const decode_segments *d, int32_t k, segment *sg) {
    const int32_t n_sink = c->n_sinks - d->sink0;
    return kv_get_segment(c, k < n_sink ? d->sink0 + k : d->seg1 + k - n_sink, c->n_past, sg);
}

int32_t kvs_kv_cache_n_segments(const kvs_kv_cache *c, int32_t il) {
    return decode_segments_of(c, il).n;
}

/* Scores of the one-token job's heads against segments k0..k1-1, packed: head
 * j's scores start at s->scores + j*P, segment after segment (masked sink
 * positions of a block get -inf, their sink segment holds the score; so do
 * keys before a local layer's window). Returns the number of keys. */
static int32_t score_part(const kvs_kv_cache *c, const kvs_attend_job *job, attend_scratch *s, int32_t k0,
                          int32_t k1, const kvs_attention_kernels *kk, int32_t impl) {
    const int32_t m = c->n_past + job->t0, hd = c->hd;
    const int32_t hidden = window_start(c, job->il, m); /* cache positions before it are masked */
    const kv_rope *r = kv_layer_rope(c, job->il);
    const decode_segments d = decode_segments_of(c, job->il);
    int32_t off = 0;
    segment sg;
    for (int32_t k = k0; k < k1 && get_decode_segment(c, &d, k, &sg); k++) {
        const int32_t n = visible_in_layer(c, job->il, &sg, m);
        if (n == 0) continue;
        load_rotated_keys(c, job->il, job->kv_head, &sg, s, kk, impl);
        for (int32_t j = 0; j < job->n_heads; j++) {
            float *scores = s->scores + (int64_t)j * c->P + off;
            rotate_query(c, kk, r, &sg, job->q + job->t0 * job->q_stride + (int64_t)(job->h0 + j) * hd,
                         m - c->n_evicted - sg.c0, job->scale, s->qb);
            kk->dot_tile(n, hd, c->B, s->kt, s->qb, scores);
            for (uint64_t mask = sg.mask; mask; mask &= mask - 1) {
                const int32_t i = __builtin_ctzll(mask);
                if (i < n) scores[i] = -INFINITY;
            }
            for (int32_t i = 0; i < hidden - sg.c0 && i < n; i++) scores[i] = -INFINITY;
        }
        off += n;
    }
    return off;
}

void kvs_kv_cache_attend_part(const kvs_kv_cache *c, const kvs_attend_job *job, int32_t k0, int32_t k1,
                              float *scratch, float *partial, int32_t impl) {
    attend_scratch s = split_scratch(c, job, scratch);
    const int32_t hd = c->hd, m = c->n_past + job->t0;
    const int64_t rec = hd + 2;
    const kvs_attention_kernels *kk = kvs_attention_kernels_find(impl);
    const int32_t n_keys = score_part(c, job, &s, k0, k1, kk, impl);
    for (int32_t j = 0; j < job->n_heads; j++) {
        float *part = partial + j * rec;
        part[1] = kk->exp_shifted(n_keys, s.scores + (int64_t)j * c->P, &part[0]);
        memset(part + 2, 0, (size_t)hd * sizeof(float));
    }
    /* the value sums: blocks of per-token groups decode each value once for
     * all heads; sink rows and the window go through f32 rows */
    const decode_segments d = decode_segments_of(c, job->il);
    segment sg;
    int32_t off = 0;
    if (c->rot_v) memset(s.rot, 0, (size_t)job->n_heads * hd * sizeof(float));
    for (int32_t k = k0; k < k1 && get_decode_segment(c, &d, k, &sg); k++) {
        const int32_t n = visible_in_layer(c, job->il, &sg, m); /* as score_part counted */
        if (n == 0) continue;
        if (sg.kind == 1 && c->vbits > 0) {
            /* rotated blocks sum in their own space, rotated back once below */
            kk->weighted_groups(c->vbits, n, hd, c->G, block_data(c, sg.index, job->il, job->kv_head) + c->k_bytes,
                                job->n_heads, s.scores + off, c->P, c->rot_v ? s.rot : partial + 2, c->rot_v ? hd : rec);
        } else {
            load_values(c, job->il, job->kv_head, &sg, &s, impl);
            for (int32_t j = 0; j < job->n_heads; j++) {
                kk->weighted_rows(n, hd, s.scores + (int64_t)j * c->P + off, s.vt, partial + j * rec + 2);
            }
        }
        off += n;
    }
    for (int32_t j = 0; j < job->n_heads && c->rot_v; j++) {
        float *acc = s.rot + (int64_t)j * hd, *out = partial + j * rec + 2;
        kk->fwht(hd, acc);
        for (int32_t d = 0; d < hd; d++) out[d] += acc[d];
    }
}

void kvs_kv_cache_attend_combine(int32_t hd, int32_t n_parts, int64_t part_stride, const float *partial, float *out) {
    float max_score = -INFINITY;
    for (int32_t p = 0; p < n_parts; p++) {
        if (partial[p * part_stride] > max_score) max_score = partial[p * part_stride];
    }
    double sum = 0.0;
    for (int32_t d = 0; d < hd; d++) out[d] = 0.0f;
    for (int32_t p = 0; p < n_parts; p++) {
        const float *part = partial + p * part_stride;
        if (part[1] == 0.0f) continue; /* a part without keys */
        const float w = expf(part[0] - max_score);
        sum += (double)w * part[1];
        for (int32_t d = 0; d < hd; d++) out[d] += w * part[2 + d];
    }
    const float inv = (float)(1.0 / sum);
    for (int32_t d = 0; d < hd; d++) out[d] *= inv;
}

void kvs_kv_cache_attend(const kvs_kv_cache *c, const kvs_attend_job *job, float *scratch, int32_t impl) {
    attend_scratch s = split_scratch(c, job, scratch);
    const int32_t hd = c->hd;
    const int32_t last = c->n_past + job->t1 - 1;
    const kvs_attention_kernels *kk = kvs_attention_kernels_find(impl);
    segment sg;
    score_segments(c, job, &s, 0, INT32_MAX, impl);
    for (int32_t t = job->t0; t < job->t1; t++) {
        const int32_t n_keys = c->n_past + t - c->n_evicted + 1, hidden = window_start(c, job->il, c->n_past + t);
        for (int32_t j = 0; j < job->n_heads; j++) {
            float *scores = s.scores + (int64_t)((t - job->t0) * job->n_heads + j) * c->P;
            for (int32_t i = 0; i < hidden; i++) scores[i] = -INFINITY; /* before a local layer's window */
            softmax_in_place(kk, scores, n_keys);
            if (job->mass) for (int32_t i = 0; i < n_keys; i++) job->mass[i] += scores[i];
            memset(job->out + t * job->q_stride + (int64_t)(job->h0 + j) * hd, 0, (size_t)hd * sizeof(float));
        }
    }
    for (int32_t k = 0; kv_get_segment(c, k, last, &sg); k++) {
        if (before_windows(c, job, &sg)) continue;
        load_values(c, job->il, job->kv_head, &sg, &s, impl);
        for (int32_t t = job->t0; t < job->t1; t++) {
            const int32_t n = visible_in_layer(c, job->il, &sg, c->n_past + t);
            for (int32_t j = 0; j < job->n_heads && n > 0; j++) {
                const float *p = s.scores + (int64_t)((t - job->t0) * job->n_heads + j) * c->P + sg.c0;
                float *out = job->out + t * job->q_stride + (int64_t)(job->h0 + j) * hd;
                if (sg.mask) { /* sink positions hold their sink row's probability */
                    for (int32_t i = 0; i < n; i++) s.seg[i] = sg.mask >> i & 1 ? 0.0f : p[i];
                    p = s.seg;
                }
                kk->weighted_rows(n, hd, p, s.vt, out);
            }
        }
    }
}
