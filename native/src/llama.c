/* llama.c - the forward pass of llama-family models (llama, qwen2, qwen3,
 * phi3, gemma3), top to bottom: embeddings, then per layer RMSNorm ->
 * attention -> residual -> RMSNorm -> SwiGLU FFN -> residual, then the final
 * norm and the logits. Gemma 3 adds steps that are no-ops elsewhere: scaled
 * embeddings, per-head RMSNorm of q and k (qwen3 too), a norm of each block's
 * output before its residual ("sandwich" norms), GeGLU, sliding-window layers
 * (kv_cache.c; llama and phi3 files may window every layer) and an optional
 * logit soft-cap. phi3's fused q|k|v and gate|up weights arrive here as
 * separate matrices (views of their rows, model.c). */
#include <math.h>
#include <string.h>
#include <time.h>

#include "context.h"

typedef struct attention_job {
    kvs_context *ctx;
    int32_t il;
    int32_t n_tokens;
    int32_t n_parts, n_segments; /* decode split over the keys */
} attention_job;

/* Tasks are (KV head, run of ATTN_TOKENS tokens): the query heads sharing a
 * KV head read each dequantized block together. Interleaved over threads,
 * since later tokens see more keys. */
static void attention_task(void *arg, int part, int n_parts, int thread) {
    const attention_job *job = arg;
    kvs_context *ctx = job->ctx;
    const kvs_hparams *hp = &ctx->model->hp;
    const int32_t group = hp->n_head / hp->n_head_kv;
    const int32_t n_runs = (job->n_tokens + ATTN_TOKENS - 1) / ATTN_TOKENS;
    float *scratch = ctx->scores + (int64_t)thread * ctx->scratch_len;
    for (int32_t task = part; task < n_runs * hp->n_head_kv; task += n_parts) {
        const int32_t kv_head = task % hp->n_head_kv, run = task / hp->n_head_kv;
        const int32_t t1 = (run + 1) * ATTN_TOKENS < job->n_tokens ? (run + 1) * ATTN_TOKENS : job->n_tokens;
        kvs_attend_job aj = {job->il, kv_head, run * ATTN_TOKENS, t1, kv_head * group, group,
                             ctx->q, (int64_t)hp->n_head * hp->head_dim, hp->attn_scale,
                             ctx->att, ctx->trace_mass ? ctx->trace_mass + (int64_t)thread * ctx->scratch_len : NULL};
        kvs_kv_cache_attend(ctx->kv, &aj, scratch, ctx->cpu.impl);
    }
}

/* Decoding one token: tasks are (KV head, part of the keys), so that a model
 * with fewer KV heads than threads keeps every thread busy; the parts are
 * merged afterwards (attention_combine). */
static void attention_split_task(void *arg, int part, int n_parts, int thread) {
    const attention_job *job = arg;
    kvs_context *ctx = job->ctx;
    const kvs_hparams *hp = &ctx->model->hp;
    const int32_t group = hp->n_head / hp->n_head_kv;
    float *scratch = ctx->scores + (int64_t)thread * ctx->scratch_len;
    for (int32_t task = part; task < job->n_parts * hp->n_head_kv; task += n_parts) {
        const int32_t kv_head = task % hp->n_head_kv, keys = task / hp->n_head_kv;
        const int32_t k0 = (int32_t)((int64_t)job->n_segments * keys / job->n_parts);
        const int32_t k1 = (int32_t)((int64_t)job->n_segments * (keys + 1) / job->n_parts);
        kvs_attend_job aj = {job->il, kv_head, 0, 1, kv_head * group, group,
                             ctx->q, (int64_t)hp->n_head * hp->head_dim, hp->attn_scale,
                             ctx->att, NULL};
        float *partial = ctx->attn_partial + ((int64_t)kv_head * job->n_parts + keys) * group * (hp->head_dim + 2);
        kvs_kv_cache_attend_part(ctx->kv, &aj, k0, k1, scratch, partial, ctx->cpu.impl);
    }
}

static void attention_combine(kvs_context *ctx, const attention_job *job) {
    const kvs_hparams *hp = &ctx->model->hp;
    const int32_t group = hp->n_head / hp->n_head_kv;
    const int64_t rec = hp->head_dim + 2;
    for (int32_t kv_head = 0; kv_head < hp->n_head_kv; kv_head++) {
        for (int32_t j = 0; j < group; j++) {
            const float *first = ctx->attn_partial + ((int64_t)kv_head * job->n_parts * group + j) * rec;
            kvs_kv_cache_attend_combine(hp->head_dim, job->n_parts, group * rec, first,
                                        ctx->att + (int64_t)(kv_head * group + j) * hp->head_dim);
        }
    }
}

/* Add the per-thread attention mass of layer il to the caller's trace. */
static void collect_attention_mass(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const int32_t n_keys = kvs_kv_cache_n_past(ctx->kv) + n_tokens;
    float *dst = ctx->trace->attn_mass + (int64_t)il * (ctx->trace_past0 + ctx->trace_total);
    for (int32_t t = 0; t < ctx->params.n_threads; t++) {
        const float *src = ctx->trace_mass + (int64_t)t * ctx->scratch_len;
        for (int32_t j = 0; j < n_keys; j++) dst[j] += src[j];
    }
}

static void embed_tokens(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens) {
    const kvs_model *m = ctx->model;
    const kvs_type_kernels *kernels = kvs_type_kernels_find(m->tok_embd.type);
    const uint8_t *base = m->tok_embd.data;
    for (int32_t t = 0; t < n_tokens; t++) {
        kernels->dequantize(base + (int64_t)tokens[t] * m->tok_embd.row_bytes,
                            ctx->x + (int64_t)t * m->hp.n_embd, m->hp.n_embd);
    }
    if (m->hp.embd_scale == 1.0f) return;
    for (int64_t i = 0; i < (int64_t)n_tokens * m->hp.n_embd; i++) ctx->x[i] *= m->hp.embd_scale;
}

/* RMSNorm of each of n_heads heads in place (gemma3's and qwen3's QK-norm), or nothing. */
static void norm_heads(float *x, int32_t n_heads, const float *weight, const kvs_hparams *hp) {
    if (!weight) return;
    for (int32_t h = 0; h < n_heads; h++) {
        float *head = x + (int64_t)h * hp->head_dim;
        kvs_rmsnorm(head, weight, hp->head_dim, hp->rms_eps, head);
    }
}

/* A block's output (in xb) joins the residual stream, through its own norm
 * first when the model has one (gemma3's post-attention / post-FFN norms). */
static void add_residual(kvs_context *ctx, const float *post_norm, int32_t n_tokens) {
    const kvs_hparams *hp = &ctx->model->hp;
    const int64_t n_embd = hp->n_embd;
    for (int32_t t = 0; post_norm && t < n_tokens; t++) {
        kvs_rmsnorm(ctx->xb + t * n_embd, post_norm, n_embd, hp->rms_eps, ctx->xb + t * n_embd);
    }
    for (int64_t i = 0; i < (int64_t)n_tokens * n_embd; i++) ctx->x[i] += ctx->xb[i];
}

static void attention_block(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const kvs_model *m = ctx->model;
    const kvs_hparams *hp = &m->hp;
    const kvs_layer *l = &m->layers[il];
    const int64_t n_embd = hp->n_embd;
    const int64_t q_dim = (int64_t)hp->n_head * hp->head_dim, kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    for (int32_t t = 0; t < n_tokens; t++) {
        kvs_rmsnorm(ctx->x + t * n_embd, l->attn_norm, n_embd, hp->rms_eps, ctx->xb + t * n_embd);
    }
    const kvs_tensor *qkv[3] = {&l->wq, &l->wk, &l->wv};
    float *qkv_out[3] = {ctx->q, ctx->k, ctx->v};
    kvs_matmul_shared(&ctx->cpu, 3, qkv, ctx->xb, n_tokens, qkv_out);
    for (int32_t t = 0; t < n_tokens; t++) {
        float *q = ctx->q + t * q_dim, *k = ctx->k + t * kv_dim, *v = ctx->v + t * kv_dim;
        kvs_add_bias(q, l->bq, q_dim);
        kvs_add_bias(k, l->bk, kv_dim);
        kvs_add_bias(v, l->bv, kv_dim);
        norm_heads(q, hp->n_head, l->q_norm, hp);
        norm_heads(k, hp->n_head_kv, l->k_norm, hp);
        kvs_kv_cache_store(ctx->kv, il, t, k, v); /* keys before RoPE: rotated when read */
    }
    attention_job job = {ctx, il, n_tokens, 1, 0};
    if (n_tokens == 1 && !ctx->trace_mass) {
        /* parts follow the keys alone, never the thread count, so that a
         * token decodes bit for bit alike on any number of threads */
        job.n_segments = kvs_kv_cache_n_segments(ctx->kv, il);
        job.n_parts = job.n_segments < ATTN_MAX_PARTS ? job.n_segments : ATTN_MAX_PARTS;
        kvs_threadpool_run(ctx->cpu.pool, attention_split_task, &job);
        attention_combine(ctx, &job);
    } else {
        if (ctx->trace_mass) {
            memset(ctx->trace_mass, 0, (size_t)ctx->params.n_threads * (size_t)ctx->scratch_len * sizeof(float));
        }
        kvs_threadpool_run(ctx->cpu.pool, attention_task, &job);
        if (ctx->trace_mass) collect_attention_mass(ctx, il, n_tokens);
    }
    /* the output projection lands in xb, then joins the residual stream */
    kvs_matmul(&ctx->cpu, &l->wo, ctx->att, n_tokens, ctx->xb);
    add_residual(ctx, l->attn_post_norm, n_tokens);
}

static void ffn_block(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const kvs_hparams *hp = &ctx->model->hp;
    const kvs_layer *l = &ctx->model->layers[il];
    const int64_t n_embd = hp->n_embd;
    for (int32_t t = 0; t < n_tokens; t++) {
        kvs_rmsnorm(ctx->x + t * n_embd, l->ffn_norm, n_embd, hp->rms_eps, ctx->xb + t * n_embd);
    }
    const kvs_tensor *gate_up[2] = {&l->w_gate, &l->w_up};
    float *gate_up_out[2] = {ctx->hb, ctx->hb2};
    kvs_matmul_shared(&ctx->cpu, 2, gate_up, ctx->xb, n_tokens, gate_up_out);
    if (hp->ffn_gelu) kvs_geglu(ctx->hb, ctx->hb2, (int64_t)n_tokens * hp->n_ff, ctx->cpu.impl);
    else kvs_swiglu(ctx->hb, ctx->hb2, (int64_t)n_tokens * hp->n_ff, ctx->cpu.impl);
    kvs_matmul(&ctx->cpu, &l->w_down, ctx->hb, n_tokens, ctx->xb);
    add_residual(ctx, l->ffn_post_norm, n_tokens);
}

static void output_logits(kvs_context *ctx, int32_t n_tokens, int32_t logits_all, float *logits) {
    const kvs_model *m = ctx->model;
    const int64_t n_embd = m->hp.n_embd;
    const int32_t first = logits_all ? 0 : n_tokens - 1;
    for (int32_t t = first; t < n_tokens; t++) {
        kvs_rmsnorm(ctx->x + t * n_embd, m->output_norm, n_embd, m->hp.rms_eps, ctx->xb + (t - first) * n_embd);
    }
    /* the logits stay exact, or near it (16-bit activations) when the fast
     * path decodes: the output projection's activation error lands in the
     * logits undamped (bench/compare_logits.py) */
    kvs_matmul_logits(&ctx->cpu, &m->output, ctx->xb, n_tokens - first, logits);
    if (m->hp.final_softcap > 0.0f) kvs_softcap(logits, (int64_t)(n_tokens - first) * m->hp.n_vocab, m->hp.final_softcap);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* KVSink's predictor: after the profile's layer, a token whose residual stream
 * exceeds the threshold in an outlier channel is a sink (massive activation);
 * its score, max |x[c]| / threshold, ranks it when sink rows run short. */
static void predict_sinks(kvs_context *ctx, int32_t n_tokens) {
    const kvs_sink_profile *p = &ctx->model->profile;
    const double t0 = now_seconds();
    const float inv = 1.0f / p->threshold;
    for (int32_t t = 0; t < n_tokens; t++) {
        const float *x = ctx->x + (int64_t)t * ctx->model->hp.n_embd;
        float top = 0.0f;
        for (int32_t i = 0; i < p->n_channels; i++) top = fmaxf(top, fabsf(x[p->channels[i]]));
        if (top * inv > 1.0f) kvs_kv_cache_mark_sink(ctx->kv, t, top * inv);
    }
    ctx->t_predict += now_seconds() - t0;
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
    memcpy(dst, ctx->x, (size_t)n_tokens * (size_t)n_embd * sizeof(float));
}

void kvs_llama_forward(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                       int32_t logits_all, float *logits) {
    embed_tokens(ctx, tokens, n_tokens);
    if (ctx->sink_policy == KVS_SINKS_PFN) mark_first_tokens(ctx, n_tokens, ctx->sink_pfn);
    if (ctx->sink_policy == KVS_SINKS_KVSINK) mark_first_tokens(ctx, n_tokens, 1);
    for (int32_t il = 0; il < ctx->model->hp.n_layer; il++) {
        attention_block(ctx, il, n_tokens);
        ffn_block(ctx, il, n_tokens);
        if (ctx->sink_policy == KVS_SINKS_KVSINK && il == ctx->model->profile.layer) predict_sinks(ctx, n_tokens);
        if (ctx->trace && ctx->trace->hidden) trace_hidden(ctx, il, n_tokens);
    }
    if (logits) output_logits(ctx, n_tokens, logits_all, logits);
}
