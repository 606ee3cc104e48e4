/* kv_cache.h - private: the KV cache interface the forward pass uses.
 * This implementation keeps plain f32 or f16 rows; the quantized KVSink cache
 * replaces it behind the same calls. */
#ifndef KVS_KV_CACHE_H
#define KVS_KV_CACHE_H

#include <stdint.h>

#include "kvsink.h"
#include "model.h"

typedef struct kvs_kv_cache kvs_kv_cache;

/* Capacity n_ctx tokens for every layer; nothing is allocated afterwards. */
kvs_status kvs_kv_cache_create(const kvs_hparams *hp, int32_t n_ctx, int32_t type_k, int32_t type_v,
                               kvs_kv_cache **out);
void kvs_kv_cache_free(kvs_kv_cache *cache);

/* Bytes held per cached token (all layers, K and V). */
int64_t kvs_kv_cache_bytes_per_token(const kvs_kv_cache *cache);

/* Store one token's K and V rows (n_head_kv * head_dim floats each, K already
 * rotated) of layer il at position pos < n_ctx. */
void kvs_kv_cache_store(kvs_kv_cache *cache, int32_t il, int32_t pos, const float *k, const float *v);

/* out (head_dim floats) = softmax(q . K[0..n_keys) * scale) . V[0..n_keys) for
 * one query head against KV head kv_head of layer il. scores (n_keys floats)
 * receives the attention probabilities. */
void kvs_kv_cache_attend(const kvs_kv_cache *cache, int32_t il, int32_t kv_head, const float *q,
                         int32_t n_keys, float scale, float *scores, float *out, int32_t impl);

#endif
