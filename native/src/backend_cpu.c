/* backend_cpu.c - the CPU backend of the forward pass (backend.h): matrix
 * products and attention split over the context's thread pool, AVX2 or
 * scalar kernels as the context resolved them, the KVSink cache in host
 * memory. */
#include <math.h>
#include <string.h>

#include "backend.h"
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

/* The cache append of layer il, then its attention: decoding one token
 * splits each KV head's keys into parts (merged afterwards); batches split
 * (KV head, run of tokens) over the threads. Traces take the batch path,
 * which records each key's attention mass. */
static void cpu_attention(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const kvs_hparams *hp = &ctx->model->hp;
    const int64_t kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    for (int32_t t = 0; t < n_tokens; t++) {
        kvs_kv_cache_store(ctx->kv, il, t, ctx->k + t * kv_dim, ctx->v + t * kv_dim); /* keys before RoPE: rotated when read */
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
}

static void cpu_embed(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens, float *x) {
    const kvs_model *m = ctx->model;
    const kvs_type_kernels *kernels = kvs_type_kernels_find(m->tok_embd.type);
    const uint8_t *base = m->tok_embd.data;
    for (int32_t t = 0; t < n_tokens; t++) {
        kernels->dequantize(base + (int64_t)tokens[t] * m->tok_embd.row_bytes, x + (int64_t)t * m->hp.n_embd,
                            m->hp.n_embd);
    }
    if (m->hp.embd_scale == 1.0f) return;
    for (int64_t i = 0; i < (int64_t)n_tokens * m->hp.n_embd; i++) x[i] *= m->hp.embd_scale;
}

static void cpu_rmsnorm(kvs_context *ctx, const float *x, const float *weight, int64_t n_rows, int64_t n, float *out) {
    for (int64_t r = 0; r < n_rows; r++) kvs_rmsnorm(x + r * n, weight, n, ctx->model->hp.rms_eps, out + r * n);
}

static void cpu_matmul(kvs_context *ctx, int n_w, const kvs_tensor *const *w, const float *x, int64_t n_tokens,
                       float *const *y) {
    kvs_matmul_shared(&ctx->cpu, n_w, w, x, n_tokens, y);
}

static void cpu_add_bias(kvs_context *ctx, float *y, const float *b, int64_t n_rows, int64_t n) {
    for (int64_t r = 0; b && r < n_rows; r++) kvs_add_bias(y + r * n, b, n);
}

static void cpu_glu(kvs_context *ctx, float *gate, const float *up, int64_t n, int32_t gelu) {
    if (gelu) kvs_geglu(gate, up, n, ctx->cpu.impl);
    else kvs_swiglu(gate, up, n, ctx->cpu.impl);
}

static void cpu_add(kvs_context *ctx, float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* The logits stay exact, or near it (16-bit activations) when the fast path
 * decodes: the output projection's activation error lands in the logits
 * undamped (bench/compare_logits.py). */
static void cpu_logits(kvs_context *ctx, const float *x, int64_t n_tokens, float *logits) {
    const kvs_model *m = ctx->model;
    kvs_matmul_logits(&ctx->cpu, &m->output, x, n_tokens, logits);
    if (m->hp.final_softcap > 0.0f) kvs_softcap(logits, n_tokens * m->hp.n_vocab, m->hp.final_softcap);
}

static void cpu_channel_max(kvs_context *ctx, const float *x, int32_t n_tokens, const int32_t *channels,
                            int32_t n_channels, float *top) {
    const int64_t n_embd = ctx->model->hp.n_embd;
    for (int32_t t = 0; t < n_tokens; t++) {
        top[t] = 0.0f;
        for (int32_t i = 0; i < n_channels; i++) top[t] = fmaxf(top[t], fabsf(x[t * n_embd + channels[i]]));
    }
}

static void cpu_read(kvs_context *ctx, const float *x, int64_t n, float *dst) {
    memcpy(dst, x, (size_t)n * sizeof(float));
}

const kvs_backend_ops kvs_backend_cpu = {
    "cpu",       cpu_embed, cpu_rmsnorm, cpu_matmul,      cpu_add_bias, cpu_attention,
    cpu_glu,     cpu_add,   cpu_logits,  cpu_channel_max, cpu_read,     NULL,
};
