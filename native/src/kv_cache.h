/* kv_cache.h - private: the KVSink KV cache.
 *
 * Per layer and KV head, tokens live in three places:
 *   - an fp16 (f32 for exact caches) window of the newest tokens; when it holds
 *     recent + block tokens, its oldest block of B tokens is committed;
 *   - quantized blocks of B tokens (keys per channel across the block, KIVI;
 *     values per token in groups of channels), kept in a ring: when every slot
 *     is used the oldest block is evicted (StreamingLLM);
 *   - a table of exact sink rows: a committed token predicted to be an
 *     attention sink is copied here and masked out of its block.
 * Keys are stored before RoPE and rotated when read, at their position in the
 * cache, so evicting blocks keeps positions consistent without re-rotating.
 */
#ifndef KVS_KV_CACHE_H
#define KVS_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "kvsink.h"
#include "model.h"

typedef struct kvs_kv_cache kvs_kv_cache;

typedef struct kvs_kv_params {
    int32_t type_k, type_v;  /* KVS_KV_* */
    int32_t block;           /* tokens per quantized block (B), multiple of 8, <= 64 */
    int32_t recent;          /* newest tokens always kept in the window */
    int32_t ubatch;          /* most tokens appended between two commits */
    int32_t sink_capacity;   /* rows in the sink table; when full, a stronger sink displaces the weakest */
    int32_t key_per_token;   /* 1: keys in per-token groups instead of per channel */
    int32_t group;           /* channels per value (and per-token key) group */
    int32_t ring;            /* 1: evict the oldest blocks when full; 0: refuse */
    int32_t rotate;          /* KVS_KV_ROTATE_* bits: Hadamard-rotate quantized keys / values */
    int32_t swa_full;        /* 1: sliding-window layers keep every block, as global ones do;
                                0: only the blocks their window can still reach */
} kvs_kv_params;

kvs_status kvs_kv_cache_create(const kvs_hparams *hp, const float *rope_freqs, int32_t n_ctx,
                               const kvs_kv_params *params, kvs_kv_cache **out);
void kvs_kv_cache_free(kvs_kv_cache *cache);

/* KV bytes per token once quantized (blocks, scales included), all layers. */
double kvs_kv_cache_bytes_per_token(const kvs_kv_cache *cache);
/* Where the cache's memory goes, by kind of layer (kvs_kv_memory in kvsink.h). */
void kvs_kv_cache_memory(const kvs_kv_cache *cache, kvs_kv_memory *out);
/* Floats of per-thread scratch kvs_kv_cache_attend needs for max_queries queries. */
int64_t kvs_kv_cache_scratch_floats(const kvs_kv_cache *cache, int32_t max_queries);

int32_t kvs_kv_cache_n_past(const kvs_kv_cache *cache);
int32_t kvs_kv_cache_n_sinks(const kvs_kv_cache *cache);
int32_t kvs_kv_cache_n_evicted(const kvs_kv_cache *cache);
/* Predicted sinks that found no row (or lost theirs to a stronger one) and were quantized. */
int32_t kvs_kv_cache_n_dropped(const kvs_kv_cache *cache);
/* Positions of the sink rows, increasing; writes at most capacity, returns their number. */
int32_t kvs_kv_cache_sink_positions(const kvs_kv_cache *cache, int32_t *positions, int32_t capacity);

/* Start appending n tokens (<= ubatch) at positions n_past..; CONTEXT_FULL
 * when a non-ring cache has no room. */
kvs_status kvs_kv_cache_begin(kvs_kv_cache *cache, int32_t n);
/* Store token t (0 <= t < n) of layer il: pre-RoPE K and V, n_head_kv * head_dim each. */
void kvs_kv_cache_store(kvs_kv_cache *cache, int32_t il, int32_t t, const float *k, const float *v);
/* Mark token t of the tokens being appended as an attention sink with the
 * predictor's score (> 0; INFINITY pins it: it is never displaced). */
void kvs_kv_cache_mark_sink(kvs_kv_cache *cache, int32_t t, float score);
/* Attention for the query heads h0..h0+n_heads-1 (all sharing KV head
 * kv_head) of the appended tokens t0..t1-1 in layer il, causal. */
typedef struct kvs_attend_job {
    int32_t il, kv_head;
    int32_t t0, t1;         /* tokens of the append in progress */
    int32_t h0, n_heads;    /* query heads */
    const float *q;         /* pre-RoPE queries: token t, head h at q + t*q_stride + h*head_dim */
    int64_t q_stride;
    float scale;
    float *out;             /* same layout as q */
    float *mass;            /* NULL, or += attention probability per cache position */
} kvs_attend_job;

void kvs_kv_cache_attend(const kvs_kv_cache *cache, const kvs_attend_job *job, float *scratch, int32_t impl);

/* Decoding one token, attention splits over the keys (n_head_kv is often
 * smaller than the thread count): the segments [sink rows | blocks | window
 * runs] that layer il's query can see (a local layer's window leaves out
 * older ones) are numbered 0..kvs_kv_cache_n_segments()-1; a part takes
 * segments k0..k1-1 of a one-token job and writes, per query head j, at partial + j*(hd+2):
 * the max score, the sum of exp(score - max) and the sum of exp(score - max)*v
 * (sum 0 when it had no keys). kvs_kv_cache_attend_combine merges n_parts
 * such records of one head (part_stride floats apart) into the output row. */
int32_t kvs_kv_cache_n_segments(const kvs_kv_cache *cache, int32_t il);
void kvs_kv_cache_attend_part(const kvs_kv_cache *cache, const kvs_attend_job *job, int32_t k0, int32_t k1,
                              float *scratch, float *partial, int32_t impl);
void kvs_kv_cache_attend_combine(int32_t hd, int32_t n_parts, int64_t part_stride, const float *partial, float *out);
/* Finish the append: quantize blocks that left the recent window, evict if
 * needed. Fails only for a cache on a device whose ops failed (the cache
 * then refuses appends until it is cleared by truncating to 0). */
kvs_status kvs_kv_cache_commit(kvs_kv_cache *cache);
/* Forget tokens from position n_past on; positions inside committed blocks
 * round down to the block start, and when local layers no longer hold the
 * blocks their window would reach from there, nothing is kept. *kept
 * receives the new n_past. */
kvs_status kvs_kv_cache_truncate(kvs_kv_cache *cache, int32_t n_past, int32_t *kept);

/* Saving and restoring the cache as it is (kv_state.c). Bytes the state of
 * the cache takes now; write it (size >= that); replace the cache with a
 * saved state, validated first (a refused state leaves the cache as it was). */
size_t kvs_kv_cache_state_size(const kvs_kv_cache *cache);
kvs_status kvs_kv_cache_save_state(const kvs_kv_cache *cache, void *buf, size_t size, size_t *written);
kvs_status kvs_kv_cache_load_state(kvs_kv_cache *cache, const void *buf, size_t size);

#if defined(KVS_HAVE_CUDA)
/* The cache in GPU memory (kv_cache_cuda.c): move a new cache's data to the
 * device (at most max_tokens appended at once, n_head query heads); then
 * the CUDA backend stores each layer's K/V rows (device pointers, the
 * append begun) and attends there, q and out laid out as the context's. */
kvs_status kvs_kv_cache_to_cuda(kvs_kv_cache *cache, int32_t max_tokens, int32_t n_head, void *stream);
kvs_status kvs_kv_cache_cuda_store(kvs_kv_cache *cache, int32_t il, int32_t n_tokens, const float *k, const float *v);
/* Layer 0 first: it builds the table of segments every layer of the pass reads. */
kvs_status kvs_kv_cache_cuda_attend(kvs_kv_cache *cache, int32_t il, int32_t n_tokens, const float *q, int32_t n_head,
                                    float scale, float *out);
#endif

#endif
