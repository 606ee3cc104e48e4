/* context.h - private: a context is a KV cache plus the scratch of one
 * forward pass; many contexts can share one model. */
#ifndef KVS_CONTEXT_H
#define KVS_CONTEXT_H

#include "kv_cache.h"
#include "model.h"
#include "ops.h"

struct kvs_context {
    kvs_model *model;
    kvs_context_params params;
    kvs_cpu cpu;
    kvs_kv_cache *kv;
    int32_t n_past;
    /* scratch for up to n_batch tokens */
    float *x;       /* [n_batch][n_embd] residual stream  */
    float *xb;      /* [n_batch][n_embd] normalized input */
    float *q;       /* [n_batch][n_head * head_dim]       */
    float *k;       /* [n_batch][n_head_kv * head_dim]    */
    float *v;       /* [n_batch][n_head_kv * head_dim]    */
    float *att;     /* [n_batch][n_head * head_dim]       */
    float *hb;      /* [n_batch][n_ff] gate, then SwiGLU  */
    float *hb2;     /* [n_batch][n_ff] up                 */
    float *scores;  /* [n_threads][n_ctx] attention weights */
    const kvs_eval_trace *trace; /* set only during kvs_context_eval_trace */
    float *trace_mass;           /* [n_threads][n_ctx] per-thread attention mass, while tracing */
};

/* The llama-family forward pass over tokens at positions n_past.. (llama.c). */
void kvs_llama_forward(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                       int32_t logits_all, float *logits);

#endif
