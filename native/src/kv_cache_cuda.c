/* kv_cache_cuda.c - the KVSink cache in GPU memory (CUDA builds). A cache
 * made by kvs_kv_cache_create is moved to the device once, at context
 * creation: its window rows, sink rows, quantized blocks and RoPE tables
 * are copied to device memory (the host copies are freed), and the cache's
 * device ops (kv_cache_internal.h) route every move of data through the
 * kernels of kv_cuda.cu. The bookkeeping - positions, the sink table's
 * scores, the block rings, eviction, truncation - stays the host code of
 * kv_cache.c, so both caches follow the same rules by construction.
 *
 * Per forward pass the host builds the table of segments the appended
 * tokens attend over (a few bytes per block, in pinned memory) and queues
 * its copy; per layer the backend stores the batch's K/V rows and launches
 * the attention, which reads the quantized blocks in place. All of it goes
 * on the context's stream, so a step can be captured into a CUDA graph.
 * Nothing comes back to the host. */
#include <stdlib.h>
#include <string.h>

#include "cuda_memory.h"
#include "kv_cache.h"
#include "kv_cache_internal.h"
#include "kv_cuda.h"
#include "kernels_kv.h"
#include "status.h"

/* Records of partial attention kept: a decode splits its segments into at
 * most this many parts per query head (kv_cuda_math.h's kvd_parts). */
#define ATTEND_WORK 16384

typedef struct cuda_kv {
    kvs_kv_dev g;              /* geometry and device pointers, passed to every kernel */
    int32_t *window, *layer_index, *pair_a, *pair_b; /* device copies of the host tables */
    float *tile;               /* commit scratch: 2 x n_layer x n_kv x B x hd floats */
    kvs_kv_seg *segs;          /* device: the segments of the current forward pass */
    kvs_kv_seg *host_segs;     /* pinned host memory: where the table is built */
    int32_t seg_cap, n_segs;
    float *partial;            /* device: attention records */
    int64_t partial_records;
    void *stream;              /* the context's */
} cuda_kv;

/* ---- the device ops -------------------------------------------------------- */

static kvs_status device_encode_block(kvs_kv_cache *c, int32_t slot, int32_t o0, uint64_t skip) {
    cuda_kv *ck = c->dev_state;
    return kvs_cuda_kv_encode_block(&ck->g, o0, slot, c->L > 0 ? c->lslot[slot] : 0, skip, ck->tile, ck->stream);
}

static kvs_status device_requantize_keys(kvs_kv_cache *c, int32_t r, int32_t slot, int32_t t, uint64_t skip) {
    cuda_kv *ck = c->dev_state;
    const int32_t lslot = c->L > 0 && kv_block_has_local(c, slot) ? c->lslot[slot] : -1;
    return kvs_cuda_kv_requantize_keys(&ck->g, r, slot, lslot, t, skip, ck->tile, ck->stream);
}

/* The data arrays a device cache keeps in device memory, by where the
 * cache's struct points to them, with their sizes (kv_cache.c's alloc_all
 * and alloc_rope). */
typedef struct device_array {
    void **ptr;
    size_t bytes;
    int table;  /* a RoPE table: copied over; the data arrays start empty */
} device_array;

static int device_arrays(kvs_kv_cache *c, device_array out[14]) {
    const size_t row = kv_token_row_bytes(c);
    int n = 0;
    out[n++] = (device_array){(void **)&c->win_k, (size_t)c->Wcap * row, 0};
    out[n++] = (device_array){(void **)&c->win_v, (size_t)c->Wcap * row, 0};
    out[n++] = (device_array){(void **)&c->sink_k, (size_t)c->S * row + 1, 0};
    out[n++] = (device_array){(void **)&c->sink_v, (size_t)c->S * row + 1, 0};
    out[n++] = (device_array){(void **)&c->blocks, (size_t)c->NB * kv_block_bytes(c, c->n_glob) + 1, 0};
    out[n++] = (device_array){(void **)&c->lblocks, (size_t)c->L * kv_block_bytes(c, c->n_loc) + 1, 0};
    for (int kind = 0; kind < 2; kind++) {
        kv_rope *r = &c->rope[kind];
        if (!r->rel_cos) continue;
        const size_t rel = (size_t)r->n_rel * (size_t)(c->n_rot / 2) * 4 + 4, blk = (size_t)c->hd * c->B * 4;
        out[n++] = (device_array){(void **)&r->rel_cos, rel, 1};
        out[n++] = (device_array){(void **)&r->rel_sin, rel, 1};
        out[n++] = (device_array){(void **)&r->blk_cos, blk, 1};
        out[n++] = (device_array){(void **)&r->blk_sin, blk, 1};
    }
    return n;
}

static void free_own(cuda_kv *ck) {
    if (!ck) return;
    void *owned[] = {ck->window, ck->layer_index, ck->pair_a, ck->pair_b, ck->tile, ck->segs, ck->partial};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) kvs_cuda_release(owned[i]);
    kvs_cuda_release_host(ck->host_segs);
    free(ck);
}

static void device_release(kvs_kv_cache *c) {
    device_array arrays[14];
    const int n = device_arrays(c, arrays);
    for (int i = 0; i < n; i++) {
        kvs_cuda_release(*arrays[i].ptr);
        *arrays[i].ptr = NULL;
    }
    free_own(c->dev_state);
    c->dev_state = NULL;
    c->dev = NULL;
}

static kvs_status device_move(void *dst, const void *src, size_t n) { return kvs_cuda_copy(dst, src, n); }
static kvs_status device_read(void *dst, const void *src, size_t n) { return kvs_cuda_to_host(dst, src, n); }
static kvs_status device_write(void *dst, const void *src, size_t n) { return kvs_cuda_to_device(dst, src, n); }

static const kv_device_ops cuda_kv_ops = {
    device_move, device_read, device_write, device_encode_block, device_requantize_keys, device_release,
};

/* ---- moving a cache to the device ------------------------------------------ */

static kvs_status upload_copy(void **dev, const void *host, size_t bytes, const char *what) {
    kvs_status st = kvs_cuda_alloc(dev, bytes, what);
    if (st == KVS_OK && host) st = kvs_cuda_to_device(*dev, host, bytes);
    return st;
}

/* The tables kernels index that stay on the host too, and the scratch. */
static kvs_status alloc_own(kvs_kv_cache *c, cuda_kv *ck, int32_t max_tokens, int32_t n_head) {
    const size_t layers = (size_t)c->n_layer * sizeof(int32_t), pairs = (size_t)(c->n_rot / 2) * sizeof(int32_t) + 4;
    ck->seg_cap = c->S + c->NB + (c->Wcap + c->B - 1) / c->B + 1;
    const int64_t per_call = (int64_t)max_tokens * n_head;
    ck->partial_records = per_call > ATTEND_WORK ? per_call : ATTEND_WORK;
    kvs_status st = kvs_cuda_alloc_host((void **)&ck->host_segs, (size_t)ck->seg_cap * sizeof *ck->host_segs,
                                        "the KV cache's segment table");
    if (st == KVS_OK) st = upload_copy((void **)&ck->window, c->window, layers, "the KV cache's layer table");
    if (st == KVS_OK) st = upload_copy((void **)&ck->layer_index, c->layer_index, layers, "the KV cache's layer table");
    if (st == KVS_OK) st = upload_copy((void **)&ck->pair_a, c->pair_a, pairs, "the KV cache's RoPE pairs");
    if (st == KVS_OK) st = upload_copy((void **)&ck->pair_b, c->pair_b, pairs, "the KV cache's RoPE pairs");
    if (st == KVS_OK) {
        st = kvs_cuda_alloc((void **)&ck->tile, 2 * (size_t)c->n_layer * c->n_kv * c->B * c->hd * sizeof(float),
                            "the KV cache's commit scratch");
    }
    if (st == KVS_OK) {
        st = kvs_cuda_alloc((void **)&ck->segs, (size_t)ck->seg_cap * sizeof *ck->segs, "the KV cache's segment table");
    }
    if (st == KVS_OK) {
        st = kvs_cuda_alloc((void **)&ck->partial, (size_t)ck->partial_records * (size_t)(c->hd + 2) * sizeof(float),
                            "the attention's partial sums");
    }
    return st;
}

static void describe(const kvs_kv_cache *c, cuda_kv *ck) {
    kvs_kv_dev *g = &ck->g;
    *g = (kvs_kv_dev){0};
    g->n_layer = c->n_layer, g->n_kv = c->n_kv, g->hd = c->hd, g->n_rot = c->n_rot, g->neox = c->neox;
    g->B = c->B, g->G = c->G, g->Wcap = c->Wcap, g->kbits = c->kbits, g->vbits = c->vbits;
    g->k_f32 = c->p.type_k == KVS_KV_F32, g->v_f32 = c->p.type_v == KVS_KV_F32, g->row_f32 = c->row_elem == 4;
    g->key_per_token = c->p.key_per_token, g->rot_k = c->rot_k, g->rot_v = c->rot_v;
    g->n_glob = c->n_glob, g->n_loc = c->n_loc, g->L = c->L, g->k_bytes = c->k_bytes, g->v_bytes = c->v_bytes;
    g->win_k = c->win_k, g->win_v = c->win_v, g->sink_k = c->sink_k, g->sink_v = c->sink_v;
    g->blocks = c->blocks, g->lblocks = c->lblocks;
    g->window = ck->window, g->layer_index = ck->layer_index, g->pair_a = ck->pair_a, g->pair_b = ck->pair_b;
    for (int kind = 0; kind < 2; kind++) {
        const kv_rope *r = &c->rope[kind];
        g->n_rel[kind] = r->n_rel;
        g->rel_cos[kind] = r->rel_cos, g->rel_sin[kind] = r->rel_sin;
        g->blk_cos[kind] = r->blk_cos, g->blk_sin[kind] = r->blk_sin;
    }
}

kvs_status kvs_kv_cache_to_cuda(kvs_kv_cache *c, int32_t max_tokens, int32_t n_head, void *stream) {
    if (c->dev) return KVS_OK;
    cuda_kv *ck = calloc(1, sizeof *ck);
    if (!ck) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the KV cache's device state");
    ck->stream = stream;
    device_array arrays[14];
    const int n = device_arrays(c, arrays);
    void *dev[14] = {0};
    kvs_status st = alloc_own(c, ck, max_tokens, n_head);
    /* every copy is made before any host array goes: a failure leaves the cache on the host */
    for (int i = 0; st == KVS_OK && i < n; i++) {
        const int table = arrays[i].table;
        st = upload_copy(&dev[i], table ? *arrays[i].ptr : NULL, arrays[i].bytes,
                         table ? "the KV cache's RoPE tables" : "the KV cache");
    }
    if (st != KVS_OK) {
        for (int i = 0; i < n; i++) kvs_cuda_release(dev[i]);
        free_own(ck);
        return st;
    }
    for (int i = 0; i < n; i++) {
        free(*arrays[i].ptr);
        *arrays[i].ptr = dev[i];
    }
    c->dev_state = ck;
    c->dev = &cuda_kv_ops;
    describe(c, ck);
    return KVS_OK;
}

/* ---- appending and attending ----------------------------------------------- */

kvs_status kvs_kv_cache_cuda_store(kvs_kv_cache *c, int32_t il, int32_t n_tokens, const float *k, const float *v) {
    cuda_kv *ck = c->dev_state;
    return kvs_cuda_kv_store(&ck->g, il, c->n_past, n_tokens, k, v, ck->stream);
}

/* The segments the appended tokens attend over (kv_get_segment's order),
 * queued for the device (the pinned table is not touched again before the
 * step's end: the backend waits for its stream then). */
static kvs_status upload_segments(kvs_kv_cache *c, cuda_kv *ck, int32_t n_tokens) {
    const int32_t last = c->n_past + n_tokens - 1;
    kv_segment sg;
    int32_t n = 0;
    for (; n < ck->seg_cap && kv_get_segment(c, n, last, &sg); n++) {
        const int32_t lslot = sg.kind == 1 && c->L > 0 && kv_block_has_local(c, sg.index) ? c->lslot[sg.index] : -1;
        ck->host_segs[n] = (kvs_kv_seg){sg.kind, sg.index, sg.c0, sg.n, lslot, 0, sg.mask};
    }
    if (n == ck->seg_cap && kv_get_segment(c, n, last, &sg)) {
        return kvs_fail(KVS_ERR_INTERNAL, "the KV cache has more than %d segments", ck->seg_cap);
    }
    ck->n_segs = n;
    return kvs_cuda_to_device_async(ck->segs, ck->host_segs, (size_t)n * sizeof *ck->host_segs, ck->stream);
}

kvs_status kvs_kv_cache_cuda_attend(kvs_kv_cache *c, int32_t il, int32_t n_tokens, const float *q, int32_t n_head,
                                    float scale, float *out) {
    cuda_kv *ck = c->dev_state;
    if (il == 0) { /* the forward pass runs its layers in order: one table serves them all */
        kvs_status st = upload_segments(c, ck, n_tokens);
        if (st != KVS_OK) return st;
    }
    kvs_kv_attend_args a = {il, c->n_past, c->n_evicted, n_tokens, n_head, 0, ck->n_segs, (int64_t)n_head * c->hd,
                            ck->partial_records, scale, ck->segs, q, ck->partial, out};
    return kvs_cuda_kv_attend(&ck->g, &a, ck->stream);
}
