/* context.h - private: a context is a KV cache plus the scratch of one
 * forward pass; many contexts can share one model. */
#ifndef KVS_CONTEXT_H
#define KVS_CONTEXT_H

#include <stdatomic.h>

#include "backend.h"
#include "kv_cache.h"
#include "model.h"
#include "ops.h"

struct kvs_context {
    kvs_model *model;
    kvs_context_params params;
    const kvs_backend_ops *backend; /* chosen once, at creation */
    void *backend_state;            /* the backend's own (CUDA: device buffers), or NULL */
    kvs_status op_status;           /* the first failure of a backend op in this forward pass */
    kvs_cpu cpu;
    kvs_kv_cache *kv;
    int32_t ubatch;         /* tokens per forward pass: a block for quantized caches */
    int32_t sink_policy;    /* resolved: kvsink without a profile becomes pfn */
    int32_t sink_pfn;
    double t_eval, t_predict; /* seconds in eval and in the sink predictor */
    int64_t graph_steps;      /* steps replayed from a CUDA graph */
    _Atomic int32_t cancel;   /* kvs_context_set_cancel: set from any thread */
    /* scratch for up to n_batch tokens */
    float *x;       /* [n_batch][n_embd] residual stream  */
    float *xb;      /* [n_batch][n_embd] normalized input */
    float *q;       /* [n_batch][n_head * head_dim]       */
    float *k;       /* [n_batch][n_head_kv * head_dim]    */
    float *v;       /* [n_batch][n_head_kv * head_dim]    */
    float *att;     /* [n_batch][n_head * head_dim]       */
    float *hb;      /* [n_batch][n_ff] gate, then SwiGLU  */
    float *hb2;     /* [n_batch][n_ff] up                 */
    float *scores;  /* [n_threads][scratch_len] attention scratch (kvs_kv_cache_scratch_floats) */
    float *attn_partial; /* [n_head_kv][ATTN_MAX_PARTS][group][head_dim + 2] decode split records */
    float *sink_top;     /* [n_batch] host: the sink predictor's per-token channel maxima */
    int64_t scratch_len;
    const kvs_eval_trace *trace; /* set only during kvs_context_eval_trace */
    float *trace_mass;           /* [n_threads][scratch_len] per-thread attention mass, while tracing */
    int32_t trace_start, trace_total, trace_past0; /* this forward's tokens within the traced call */
};

/* Tokens per attention task (with the query heads of one KV head). */
#define ATTN_TOKENS 16
/* Most parts the keys of one KV head are split into when decoding. */
#define ATTN_MAX_PARTS 32

/* The llama-family forward pass over at most ubatch tokens appended to the
 * cache at positions n_past.. (llama.c); the cache's append is begun.
 * Returns the first failure of the backend's ops (never fails on the CPU). */
kvs_status kvs_llama_forward(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                             int32_t logits_all, float *logits);
/* Its ops alone, queued on the backend (whose step may record them into a
 * graph): results - logits, the predictor's maxima - are ready once the
 * backend's step has waited for them. */
kvs_status kvs_llama_pass(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                          int32_t logits_all, float *logits);

#endif
