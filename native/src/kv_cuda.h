/* kv_cuda.h - private: the KVSink cache's kernels on the GPU (kv_cuda.cu).
 * The cache's bookkeeping (positions, the sink table's ranks, the block
 * ring) stays on the host (kv_cache.c); its data - window rows, sink rows,
 * quantized blocks - lives in device memory in the same layouts as on the
 * host (kv_cache_internal.h, blocks.h), and these kernels append to it,
 * commit blocks into it and attend over it. The per-thread arithmetic is
 * kv_cuda_math.h; the CPU's kv_cache.c is the oracle
 * (tests/test_cuda_forward.py, on a GPU or the SIMT emulator). Pointers in
 * kvs_kv_dev are DEVICE pointers; launchers return without waiting. */
#ifndef KVS_KV_CUDA_H
#define KVS_KV_CUDA_H

#include <stdint.h>

#include "kvsink.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A cache's geometry and its device arrays, as the kernels read them
 * (passed by value to every kernel). */
typedef struct kvs_kv_dev {
    int32_t n_layer, n_kv, hd, n_rot, neox, B, G, Wcap;
    int32_t kbits, vbits;          /* 0: raw f32/f16 blocks */
    int32_t k_f32, v_f32;          /* raw blocks of f32 (else f16) */
    int32_t row_f32;               /* window and sink rows: f32 (else f16) */
    int32_t key_per_token;         /* keys in per-token groups instead of per channel */
    int32_t rot_k, rot_v;          /* quantized keys / values Hadamard-rotated */
    int32_t n_glob, n_loc, L;      /* layers in `blocks` / in `lblocks`; local slots (0: none) */
    int64_t k_bytes, v_bytes;      /* one block of one (layer, head) */
    int32_t n_rel[2];              /* distances in each kind's RoPE table */
    uint8_t *win_k, *win_v;        /* [Wcap][n_layer][n_kv][hd] */
    uint8_t *sink_k, *sink_v;      /* [S][n_layer][n_kv][hd] */
    uint8_t *blocks, *lblocks;     /* [NB][n_glob][n_kv] / [L][n_loc][n_kv] of (K, V) */
    const int32_t *window;         /* [n_layer] a local layer's window, 0 for a global one */
    const int32_t *layer_index;    /* [n_layer] index among the layers of its storage */
    const int32_t *pair_a, *pair_b;/* [n_rot / 2] the channels RoPE rotates together */
    const float *rel_cos[2], *rel_sin[2]; /* [n_rel][n_rot/2] per kind (0 global, 1 local) */
    const float *blk_cos[2], *blk_sin[2]; /* [hd][B] rotation by an offset inside a segment */
} kvs_kv_dev;

/* One segment of what the appended tokens attend over: a sink row (kind 0),
 * a committed block (1) or a run of window tokens (2), as kv_cache.c's
 * get_segment numbers them. */
typedef struct kvs_kv_seg {
    int32_t kind;
    int32_t index;   /* sink row, block slot, or first window position */
    int32_t c0;      /* cache position of its first token */
    int32_t n;       /* tokens */
    int32_t lslot;   /* a block's slot in the local ring (-1: none) */
    int32_t pad;
    uint64_t mask;   /* a block's tokens read from the sink table instead */
} kvs_kv_seg;

/* Write tokens 0..n_tokens-1 of layer il into the window at slots
 * (n_past + t) % Wcap: k and v are n_tokens x n_kv x hd pre-RoPE floats. */
kvs_status kvs_cuda_kv_store(const kvs_kv_dev *g, int32_t il, int32_t n_past, int32_t n_tokens, const float *k,
                             const float *v, void *stream);

/* Commit window positions o0..o0+B-1 into block `slot` (local slot lslot
 * for the local layers): rows brought to their block's space (RoPE by the
 * offset and the Hadamard rotation for rotated keys, the rotation for
 * rotated values) into `tile` (2 x n_layer x n_kv x B x hd floats of
 * scratch), then quantized; tokens whose `skip` bit is set stay out of the
 * per-channel key statistics (kv_cache.c's encode_block). */
kvs_status kvs_cuda_kv_encode_block(const kvs_kv_dev *g, int32_t o0, int32_t slot, int32_t lslot, uint64_t skip,
                                    float *tile, void *stream);

/* Put sink row r's exact key back into token t of block slot and quantize
 * its per-channel key groups again with `skip` (kv_cache.c's
 * requantize_with_sink); local layers are left alone when lslot < 0.
 * tile: n_layer x n_kv x hd floats of scratch. */
kvs_status kvs_cuda_kv_requantize_keys(const kvs_kv_dev *g, int32_t r, int32_t slot, int32_t lslot, int32_t t,
                                       uint64_t skip, float *tile, void *stream);

/* Attention of layer il for the n_tokens appended tokens (positions
 * n_past..) over the n_segs segments: blocks of threads take (KV head, part
 * of the segments, tile of tokens); each writes a record of hd + 2 floats
 * per query at `partial` (n_tokens x n_head x n_parts of them, at most
 * partial_records; the launcher chooses n_parts and writes it back), and
 * the records are merged into out (same layout as q: token t, head h at
 * t * q_stride + h * hd). q is pre-RoPE; scale the softmax scale. */
typedef struct kvs_kv_attend_args {
    int32_t il, n_past, n_evicted, n_tokens, n_head, n_parts, n_segs;
    int64_t q_stride, partial_records;
    float scale;
    const kvs_kv_seg *segs;
    const float *q;
    float *partial, *out;
} kvs_kv_attend_args;
kvs_status kvs_cuda_kv_attend(const kvs_kv_dev *g, kvs_kv_attend_args *a, void *stream);

#ifdef __cplusplus
}
#endif

#endif
