/* kv_cache_internal.h - private to kv_cache.c and kv_state.c: the cache's
 * fields, shared by the code that runs it and the code that saves and
 * restores it. */
#ifndef KVS_KV_CACHE_INTERNAL_H
#define KVS_KV_CACHE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kv_cache.h"

/* Positions and counts are int32 inside the cache: what they are computed
 * from (n_ctx, possibly the file's training context; kv_recent; the batch)
 * stays below this, so that window + blocks + sinks cannot overflow. */
#define KV_MAX_TOKENS (1 << 26)

/* RoPE tables of one kind of layer: global layers, or the local
 * (sliding-window) layers of models that rotate those with another base. */
/* A cache whose rows and blocks live in device memory (kv_cache_cuda.c):
 * there the data pointers of the struct (win_k .. lblocks, the RoPE tables)
 * are device pointers, which host code never touches; the bookkeeping is
 * the same host code, and every move of data goes through these ops. A
 * failing op is kept in dev_status: the cache refuses appends until it is
 * cleared. */
typedef struct kv_device_ops {
    /* device-to-device copy of n bytes (the ranges do not overlap) */
    kvs_status (*move)(void *dst, const void *src, size_t n);
    kvs_status (*read)(void *host_dst, const void *src, size_t n);
    kvs_status (*write)(void *dst, const void *host_src, size_t n);
    /* encode_block of window positions o0.. into block slot for every
     * (layer, head); bit t of skip: token t is a sink row */
    kvs_status (*encode_block)(kvs_kv_cache *c, int32_t slot, int32_t o0, uint64_t skip);
    /* requantize_with_sink's per-channel keys: sink row r into token t of block slot */
    kvs_status (*requantize_keys)(kvs_kv_cache *c, int32_t r, int32_t slot, int32_t t, uint64_t skip);
    /* free the device arrays (kvs_kv_cache_free) */
    void (*release)(kvs_kv_cache *c);
} kv_device_ops;

typedef struct kv_rope {
    float *rel_cos, *rel_sin;      /* [n_rel][n_rot/2]: rotation by a distance */
    float *blk_cos, *blk_sin;      /* [hd][B]: rotation by an offset inside a segment, per dim */
    int32_t n_rel;                 /* distances held: every one a query can be from a key it sees */
} kv_rope;

struct kvs_kv_cache {
    kvs_kv_params p;
    int32_t n_layer, n_kv, hd, n_rot, neox;
    int32_t kbits, vbits, B, G, Wcap, S, NB, P;
    int32_t rot_k, rot_v;          /* quantized keys / values of blocks are Hadamard-rotated */
    int32_t n_ctx;
    size_t row_elem;               /* window and sink rows: 4 (f32) or 2 (f16) */
    int64_t k_bytes, v_bytes;      /* one block of one (layer, head) */
    uint8_t *win_k, *win_v;        /* [Wcap][n_layer][n_kv][hd] */
    float *win_score;              /* [Wcap] sink score of window tokens (0: not a sink) */
    uint8_t *sink_k, *sink_v;      /* [S][n_layer][n_kv][hd] */
    int32_t *sink_pos;             /* [S] positions, increasing */
    float *sink_score;             /* [S] the predictor's score of each row (+inf: pinned) */
    int32_t n_sinks;
    int32_t n_dropped;             /* predicted sinks quantized (or forgotten) for want of a row */
    float *commit_tile;            /* [B][hd] one (layer, head) of a block being encoded */
    uint8_t *blocks;               /* [NB][n_glob][n_kv] of (K bytes, V bytes) */
    int32_t *block_start;          /* [NB] position of each block's first token */
    uint64_t *block_mask;          /* [NB] bit t set: token t is read from the sink table */
    int32_t first_block, n_blocks; /* ring of kept blocks */
    int32_t n_past, n_new;         /* tokens appended; tokens of the append in progress */
    int32_t win_start;             /* first position held in the window */
    int32_t n_evicted;             /* non-sink tokens dropped by eviction */
    int32_t frontier;              /* tokens before it are evicted or in the sink table */
    kv_rope rope[2];               /* [0] global layers, [1] local ones (allocated when there are any) */
    int32_t *window;               /* [n_layer] positions a local layer's query sees (its own
                                      included), 0 for a global layer */
    int32_t *pair_a, *pair_b;      /* [n_rot/2] the channels RoPE rotates together */
    /* Local layers keep only the blocks their window can still reach (unless
     * kv params ask for swa_full): their block data lives in a ring of L
     * slots of its own, reused as blocks are committed. */
    int32_t n_swa;                 /* the local layers' window (0: none) */
    int32_t L;                     /* slots of the local ring; 0: every layer in `blocks` */
    int32_t n_glob, n_loc;         /* layers stored in `blocks` / in `lblocks` */
    int32_t *layer_index;          /* [n_layer] index of the layer among those of its storage */
    uint8_t *lblocks;              /* [L][n_loc][n_kv] of (K bytes, V bytes) */
    int32_t *lslot;                /* [NB] local slot each block's local data took (-1: none) */
    int32_t *lowner;               /* [L] block slot whose data each local slot holds (-1: none) */
    int32_t lnext;                 /* local slot the next committed block takes */
    const kv_device_ops *dev;      /* NULL: the data lives in host memory */
    void *dev_state;               /* the device's own (kv_cache_cuda.c) */
    kvs_status dev_status;         /* the first failure of a device op since the cache was cleared */
};

/* Segments of what the appended tokens attend over, in order: sink rows,
 * kept blocks, window runs of at most B tokens up to position `last`. */
typedef struct kv_segment {
    int kind;          /* 0 sink row, 1 block, 2 window run */
    int32_t index;     /* sink row, block slot, or first window position */
    int32_t c0;        /* cache position of the first token */
    int32_t n;         /* tokens */
    uint64_t mask;     /* tokens read from the sink table instead */
} kv_segment;

/* Segment k of [sink rows | blocks | window up to position last]; 0 past the end. */
int kv_get_segment(const kvs_kv_cache *c, int32_t k, int32_t last, kv_segment *sg);

/* Copy n bytes of cache data between places of the cache's own memory, or
 * between it and the host (kv_state.c); 0 on success. */
kvs_status kv_data_read(const kvs_kv_cache *c, void *host_dst, const void *src, size_t n);
kvs_status kv_data_write(kvs_kv_cache *c, void *dst, const void *host_src, size_t n);

/* Whether layer il keeps its blocks in the local ring. */
static inline int kv_layer_trimmed(const kvs_kv_cache *c, int32_t il) {
    return c->L > 0 && c->window[il] > 0;
}

/* Whether block slot's local data is still in the local ring. */
static inline int kv_block_has_local(const kvs_kv_cache *c, int32_t slot) {
    return c->L == 0 || (c->lslot[slot] >= 0 && c->lowner[c->lslot[slot]] == slot);
}

/* Bytes of one block of every (layer, head) of one storage kind. */
static inline size_t kv_block_bytes(const kvs_kv_cache *c, int32_t n_layers) {
    return (size_t)n_layers * c->n_kv * (size_t)(c->k_bytes + c->v_bytes);
}

/* The RoPE tables of layer il. */
static inline const kv_rope *kv_layer_rope(const kvs_kv_cache *c, int32_t il) {
    return &c->rope[c->window[il] > 0];
}

/* Bytes of one window or sink row: every layer and KV head of one token. */
static inline size_t kv_token_row_bytes(const kvs_kv_cache *c) {
    return (size_t)c->n_layer * c->n_kv * c->hd * c->row_elem;
}

#endif
