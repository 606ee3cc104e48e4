/* llama.c - the forward pass of llama-family models (llama, qwen2, qwen3,
 * phi3, gemma3), top to bottom: embeddings, then per layer RMSNorm ->
 * attention -> residual -> RMSNorm -> SwiGLU FFN -> residual, then the final
 * norm and the logits. Gemma 3 adds steps that are no-ops elsewhere: scaled
 * embeddings, per-head RMSNorm of q and k (qwen3 too), a norm of each block's
 * output before its residual ("sandwich" norms), GeGLU, sliding-window layers
 * (kv_cache.c; llama and phi3 files may window every layer) and an optional
 * logit soft-cap. phi3's fused q|k|v and gate|up weights arrive here as
 * separate matrices (views of their rows, model.c). Every step is an op of
 * the context's backend (backend.h): the same pass runs on the CPU or a GPU. */
#include <math.h>
#include <time.h>

#include "backend.h"
#include "context.h"

/* A block's output (in xb) joins the residual stream, through its own norm
 * first when the model has one (gemma3's post-attention / post-FFN norms). */
static void add_residual(kvs_context *ctx, const float *post_norm, int32_t n_tokens) {
    const kvs_backend_ops *be = ctx->backend;
    const int64_t n_embd = ctx->model->hp.n_embd;
    if (post_norm) be->rmsnorm(ctx, ctx->xb, post_norm, n_tokens, n_embd, ctx->xb);
    be->add(ctx, ctx->x, ctx->xb, (int64_t)n_tokens * n_embd);
}

static void attention_block(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const kvs_backend_ops *be = ctx->backend;
    const kvs_hparams *hp = &ctx->model->hp;
    const kvs_layer *l = &ctx->model->layers[il];
    const int64_t q_dim = (int64_t)hp->n_head * hp->head_dim, kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    be->rmsnorm(ctx, ctx->x, l->attn_norm, n_tokens, hp->n_embd, ctx->xb);
    const kvs_tensor *qkv[3] = {&l->wq, &l->wk, &l->wv};
    float *qkv_out[3] = {ctx->q, ctx->k, ctx->v};
    be->matmul(ctx, 3, qkv, ctx->xb, n_tokens, qkv_out);
    be->add_bias(ctx, ctx->q, l->bq, n_tokens, q_dim);
    be->add_bias(ctx, ctx->k, l->bk, n_tokens, kv_dim);
    be->add_bias(ctx, ctx->v, l->bv, n_tokens, kv_dim);
    /* gemma3's and qwen3's QK-norm: RMSNorm of each head */
    if (l->q_norm) be->rmsnorm(ctx, ctx->q, l->q_norm, (int64_t)n_tokens * hp->n_head, hp->head_dim, ctx->q);
    if (l->k_norm) be->rmsnorm(ctx, ctx->k, l->k_norm, (int64_t)n_tokens * hp->n_head_kv, hp->head_dim, ctx->k);
    be->attention(ctx, il, n_tokens);
    /* the output projection lands in xb, then joins the residual stream */
    const kvs_tensor *wo = &l->wo;
    be->matmul(ctx, 1, &wo, ctx->att, n_tokens, &ctx->xb);
    add_residual(ctx, l->attn_post_norm, n_tokens);
}

static void ffn_block(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const kvs_backend_ops *be = ctx->backend;
    const kvs_hparams *hp = &ctx->model->hp;
    const kvs_layer *l = &ctx->model->layers[il];
    be->rmsnorm(ctx, ctx->x, l->ffn_norm, n_tokens, hp->n_embd, ctx->xb);
    const kvs_tensor *gate_up[2] = {&l->w_gate, &l->w_up};
    float *gate_up_out[2] = {ctx->hb, ctx->hb2};
    be->matmul(ctx, 2, gate_up, ctx->xb, n_tokens, gate_up_out);
    be->glu(ctx, ctx->hb, ctx->hb2, (int64_t)n_tokens * hp->n_ff, hp->ffn_gelu);
    const kvs_tensor *down = &l->w_down;
    be->matmul(ctx, 1, &down, ctx->hb, n_tokens, &ctx->xb);
    add_residual(ctx, l->ffn_post_norm, n_tokens);
}

static void output_logits(kvs_context *ctx, int32_t n_tokens, int32_t logits_all, float *logits) {
    const kvs_model *m = ctx->model;
    const int64_t n_embd = m->hp.n_embd;
    const int32_t first = logits_all ? 0 : n_tokens - 1;
    ctx->backend->rmsnorm(ctx, ctx->x + first * n_embd, m->output_norm, n_tokens - first, n_embd, ctx->xb);
    ctx->backend->logits(ctx, ctx->xb, n_tokens - first, logits);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* KVSink's predictor: after the profile's layer, a token whose residual stream
 * exceeds the threshold in an outlier channel is a sink (massive activation);
 * its score, max |x[c]| / threshold, ranks it when sink rows run short. The
 * per-token maxima come to the host (ctx->sink_top) - the cache's
 * bookkeeping lives there whatever the backend - and are read once the step
 * is over (a GPU's step may run as a graph after the pass was recorded). */
static void predict_sinks(kvs_context *ctx, int32_t n_tokens) {
    const kvs_sink_profile *p = &ctx->model->profile;
    const double t0 = now_seconds();
    ctx->backend->channel_max(ctx, ctx->x, n_tokens, p->channels, p->n_channels, ctx->sink_top);
    ctx->t_predict += now_seconds() - t0;
}

static void mark_predicted_sinks(kvs_context *ctx, int32_t n_tokens) {
    const float inv = 1.0f / ctx->model->profile.threshold;
    for (int32_t t = 0; t < n_tokens; t++) {
        if (ctx->sink_top[t] * inv > 1.0f) kvs_kv_cache_mark_sink(ctx->kv, t, ctx->sink_top[t] * inv);
    }
}

/* The first n positions are sinks, pinned: PFN's rule, and position 0 under
 * kvsink (the one sink every model has, whatever the predictor says). */
static void mark_first_tokens(kvs_context *ctx, int32_t n_tokens, int32_t n) {
    const int32_t n_past = kvs_kv_cache_n_past(ctx->kv);
    for (int32_t t = 0; t < n_tokens && n_past + t < n; t++) kvs_kv_cache_mark_sink(ctx->kv, t, INFINITY);
}

static void trace_hidden(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const int64_t n_embd = ctx->model->hp.n_embd;
    float *dst = ctx->trace->hidden + ((int64_t)il * ctx->trace_total + ctx->trace_start) * n_embd;
    ctx->backend->read(ctx, ctx->x, (int64_t)n_tokens * n_embd, dst);
}

kvs_status kvs_llama_pass(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                          int32_t logits_all, float *logits) {
    ctx->op_status = KVS_OK;
    ctx->backend->embed(ctx, tokens, n_tokens, ctx->x);
    if (ctx->sink_policy == KVS_SINKS_PFN) mark_first_tokens(ctx, n_tokens, ctx->sink_pfn);
    if (ctx->sink_policy == KVS_SINKS_KVSINK) mark_first_tokens(ctx, n_tokens, 1);
    for (int32_t il = 0; il < ctx->model->hp.n_layer && ctx->op_status == KVS_OK; il++) {
        attention_block(ctx, il, n_tokens);
        ffn_block(ctx, il, n_tokens);
        if (ctx->sink_policy == KVS_SINKS_KVSINK && il == ctx->model->profile.layer) predict_sinks(ctx, n_tokens);
        if (ctx->trace && ctx->trace->hidden) trace_hidden(ctx, il, n_tokens);
    }
    if (logits && ctx->op_status == KVS_OK) output_logits(ctx, n_tokens, logits_all, logits);
    return ctx->op_status;
}

kvs_status kvs_llama_forward(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                             int32_t logits_all, float *logits) {
    const kvs_backend_ops *be = ctx->backend;
    const kvs_status st = be->step ? be->step(ctx, tokens, n_tokens, logits_all, logits)
                                   : kvs_llama_pass(ctx, tokens, n_tokens, logits_all, logits);
    if (st == KVS_OK && ctx->sink_policy == KVS_SINKS_KVSINK) mark_predicted_sinks(ctx, n_tokens);
    return st;
}
