/* kv_cache.c - plain KV cache of f32 or f16 rows: layer-major, one row per
 * token holding all KV heads, so storing a token is one contiguous write. */
#include "kv_cache.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "formats.h"
#include "kernels_kv.h"
#include "status.h"

struct kvs_kv_cache {
    int32_t n_layer, n_ctx, n_head_kv, head_dim;
    int64_t row_len;              /* n_head_kv * head_dim elements */
    int32_t type_k, type_v;       /* KVS_TYPE_F32 or KVS_TYPE_F16 */
    size_t k_elem, v_elem;        /* bytes per element */
    uint8_t *k;                   /* [n_layer][n_ctx][row_len] */
    uint8_t *v;                   /* [n_layer][n_ctx][row_len] */
};

static size_t elem_size(int32_t type) {
    return type == KVS_TYPE_F32 ? 4 : type == KVS_TYPE_F16 ? 2 : 0;
}

kvs_status kvs_kv_cache_create(const kvs_hparams *hp, int32_t n_ctx, int32_t type_k, int32_t type_v,
                               kvs_kv_cache **out) {
    *out = NULL;
    if (!elem_size(type_k) || !elem_size(type_v)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "KV cache types must be F32 or F16 (got type ids %d, %d)",
                        (int)type_k, (int)type_v);
    }
    kvs_kv_cache *c = calloc(1, sizeof *c);
    if (!c) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the KV cache");
    c->n_layer = hp->n_layer;
    c->n_ctx = n_ctx;
    c->n_head_kv = hp->n_head_kv;
    c->head_dim = hp->head_dim;
    c->row_len = (int64_t)hp->n_head_kv * hp->head_dim;
    c->type_k = type_k;
    c->type_v = type_v;
    c->k_elem = elem_size(type_k);
    c->v_elem = elem_size(type_v);
    const size_t n = (size_t)c->n_layer * (size_t)n_ctx * (size_t)c->row_len;
    c->k = malloc(n * c->k_elem);
    c->v = malloc(n * c->v_elem);
    if (!c->k || !c->v) {
        const double mib = (double)n * (double)(c->k_elem + c->v_elem) / (1 << 20);
        kvs_kv_cache_free(c);
        return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of KV cache for n_ctx %d", mib, n_ctx);
    }
    *out = c;
    return KVS_OK;
}

void kvs_kv_cache_free(kvs_kv_cache *cache) {
    if (!cache) return;
    free(cache->k);
    free(cache->v);
    free(cache);
}

int64_t kvs_kv_cache_bytes_per_token(const kvs_kv_cache *cache) {
    return (int64_t)cache->n_layer * cache->row_len * (int64_t)(cache->k_elem + cache->v_elem);
}

static size_t row_index(const kvs_kv_cache *c, int32_t il, int32_t pos) {
    return ((size_t)il * (size_t)c->n_ctx + (size_t)pos) * (size_t)c->row_len;
}

static void store_row(void *dst, int32_t type, const float *src, int64_t n) {
    if (type == KVS_TYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof *src);
        return;
    }
    kvs_half *h = dst;
    for (int64_t i = 0; i < n; i++) h[i] = kvs_fp32_to_fp16(src[i]);
}

void kvs_kv_cache_store(kvs_kv_cache *cache, int32_t il, int32_t pos, const float *k, const float *v) {
    const size_t row = row_index(cache, il, pos);
    store_row(cache->k + row * cache->k_elem, cache->type_k, k, cache->row_len);
    store_row(cache->v + row * cache->v_elem, cache->type_v, v, cache->row_len);
}

void kvs_kv_cache_attend(const kvs_kv_cache *cache, int32_t il, int32_t kv_head, const float *q,
                         int32_t n_keys, float scale, float *scores, float *out, int32_t impl) {
    const int32_t hd = cache->head_dim;
    const size_t first = row_index(cache, il, 0) + (size_t)kv_head * hd;
    const uint8_t *k = cache->k + first * cache->k_elem;
    const uint8_t *v = cache->v + first * cache->v_elem;
    const size_t k_stride = (size_t)cache->row_len * cache->k_elem;
    const size_t v_stride = (size_t)cache->row_len * cache->v_elem;
    const kvs_vec_dot_fn dot = kvs_vec_dot_kernel(cache->type_k, impl);
    const kvs_axpy_fn axpy = kvs_axpy_kernel(cache->type_v, impl);
    float max_score = -INFINITY;
    for (int32_t j = 0; j < n_keys; j++) {
        scores[j] = dot(hd, k + (size_t)j * k_stride, q) * scale;
        if (scores[j] > max_score) max_score = scores[j];
    }
    double sum = 0.0;
    for (int32_t j = 0; j < n_keys; j++) {
        scores[j] = expf(scores[j] - max_score);
        sum += scores[j];
    }
    const float inv_sum = (float)(1.0 / sum);
    memset(out, 0, (size_t)hd * sizeof *out);
    for (int32_t j = 0; j < n_keys; j++) {
        scores[j] *= inv_sum;
        axpy(hd, scores[j], v + (size_t)j * v_stride, out);
    }
}
