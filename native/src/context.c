/* context.c - public context API: creation with validated parameters,
 * evaluation of token batches with every input checked first. */
#include "context.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "status.h"

kvs_context_params kvs_context_default_params(void) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    kvs_context_params params;
    memset(&params, 0, sizeof params);
    params.n_ctx = 512;
    params.n_batch = 512;
    params.n_threads = cpus > 0 ? (int32_t)(cpus < 16 ? cpus : 16) : 1;
    params.impl = KVS_IMPL_AUTO;
    /* the smallest cache whose KL from our f16 cache stays below llama.cpp's
     * own f16 rounding noise (KL 0.0028 from exact) at n_ctx 512 and 2048
     * (README: "Defaults"); KVS_KV_F32 is the exact reference */
    params.type_k = KVS_KV_Q8;
    params.type_v = KVS_KV_Q8;
    params.kv_block = 0;    /* per type: see resolve_kv_layout */
    params.kv_recent = 32;
    params.kv_group = 0;
    params.kv_key_per_token = 0;
    params.sink_policy = KVS_SINKS_KVSINK;
    params.sink_pfn = 1;
    params.sink_capacity = 0;
    params.kv_ring = 0;
    /* the fast path: closer to exact than llama.cpp's own products on every
     * measured figure (README); KVS_MATMUL_F32 is the reference */
    params.matmul = KVS_MATMUL_Q8;
    params.kv_rotate = -1;
    /* 4x the median block maximum: an element that would cost its 31
     * neighbours 2 of their 8 bits is taken out (measured against 6, 8, 12
     * and none on 40 chunks and 60 greedy chat answers: README) */
    params.act_outlier_ratio = 4.0f;
    return params;
}

static int is_low_bit(int32_t type) { return type == KVS_KV_Q4 || type == KVS_KV_Q3 || type == KVS_KV_Q2; }

/* The measured defaults (README, bench/kv_quality.py): q4 in blocks of 64
 * tokens with 64-channel value groups (4.5 bits, llama.cpp q4_0's size, and
 * less KL than 32/32 once rotated); other types 32/32. q4/q3/q2 blocks are
 * Hadamard-rotated when the head allows it (a power of two): there rotation
 * wins; at q8 it changes nothing measurable and is left off. */
static void resolve_kv_layout(const kvs_model *m, kvs_context_params *p) {
    const int q4 = p->type_k == KVS_KV_Q4 || p->type_v == KVS_KV_Q4;
    const int32_t hd = m->hp.head_dim;
    if (p->kv_block == 0) p->kv_block = q4 ? 64 : 32;
    if (p->kv_group == 0) p->kv_group = q4 && hd % 64 == 0 ? 64 : 32;
    if (p->kv_rotate < 0) {
        const int pow2 = hd > 0 && (hd & (hd - 1)) == 0;
        p->kv_rotate = pow2 ? (is_low_bit(p->type_k) ? KVS_KV_ROTATE_K : 0) | (is_low_bit(p->type_v) ? KVS_KV_ROTATE_V : 0)
                            : 0;
    }
}

static kvs_status resolve_params(const kvs_model *m, kvs_context_params *p) {
    if (p->n_ctx == 0) p->n_ctx = m->hp.n_ctx_train;
    if (p->n_ctx < 1) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_ctx must be positive, got %d", p->n_ctx);
    if (p->n_batch < 1) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_batch must be positive, got %d", p->n_batch);
    if (p->n_batch > p->n_ctx) p->n_batch = p->n_ctx;
    if (p->n_threads < 1 || p->n_threads > 1024) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_threads must be in 1..1024, got %d", p->n_threads);
    }
    switch (p->impl) {
    case KVS_IMPL_AUTO: p->impl = kvs_avx2_available() ? KVS_IMPL_AVX2 : KVS_IMPL_SCALAR; break;
    case KVS_IMPL_SCALAR: break;
    case KVS_IMPL_AVX2:
        if (!kvs_avx2_available()) return kvs_fail(KVS_ERR_UNSUPPORTED, "this CPU (or build) has no AVX2/FMA/F16C");
        break;
    default: return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "unknown kernel implementation %d", p->impl);
    }
    if (p->sink_policy < KVS_SINKS_NONE || p->sink_policy > KVS_SINKS_KVSINK) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "unknown sink policy %d", p->sink_policy);
    }
    if (p->matmul != KVS_MATMUL_F32 && p->matmul != KVS_MATMUL_Q8) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "unknown matmul mode %d", p->matmul);
    }
    if (!(p->act_outlier_ratio >= 0.0f) || isinf(p->act_outlier_ratio)) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "act_outlier_ratio must be finite and >= 0, got %g",
                        (double)p->act_outlier_ratio);
    }
    resolve_kv_layout(m, p);
    if (p->kv_rotate & ~(KVS_KV_ROTATE_K | KVS_KV_ROTATE_V)) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "unknown kv_rotate bits %d", p->kv_rotate);
    }
    if (p->sink_pfn < 0) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "sink_pfn must be >= 0, got %d", p->sink_pfn);
    if (p->sink_capacity < 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "sink_capacity must be >= 0, got %d", p->sink_capacity);
    }
    /* sinks come at a rate per token (SmolLM2: ~1.6% of English text), so the
     * table scales with the context; pfn:N always finds its N rows */
    if (p->sink_capacity == 0) {
        const int32_t scaled = p->n_ctx / 32 < (1 << 16) ? p->n_ctx / 32 : (1 << 16); /* the table's limit */
        p->sink_capacity = scaled > 64 ? scaled : 64;
    }
    if (p->sink_policy == KVS_SINKS_PFN && p->sink_capacity < p->sink_pfn) p->sink_capacity = p->sink_pfn;
    return KVS_OK;
}

/* The backend of a context: the CPU's, or CUDA's where it can run. */
static kvs_status choose_backend(kvs_context *ctx) {
    switch (ctx->params.device) {
    case KVS_DEVICE_CPU: ctx->backend = &kvs_backend_cpu; return KVS_OK;
    case KVS_DEVICE_CUDA: {
        /* built without CUDA, no driver, no device: the check says which */
        kvs_status st = kvs_cuda_check();
#if defined(KVS_HAVE_CUDA)
        if (st == KVS_OK) ctx->backend = &kvs_backend_cuda;
#endif
        ctx->params.matmul = KVS_MATMUL_F32; /* the GPU's products: f32 activations */
        return st;
    }
    default: return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "unknown device %d", ctx->params.device);
    }
}

static int is_float_type(int32_t type) { return type == KVS_KV_F32 || type == KVS_KV_F16; }

static kvs_status create_cache(kvs_context *ctx) {
    const kvs_context_params *p = &ctx->params;
    /* a quantized cache runs the forward a block at a time, so a token's
     * attention sees its predecessors quantized as decoding would */
    ctx->ubatch = is_float_type(p->type_k) && is_float_type(p->type_v) ? p->n_batch
                  : (p->kv_block < p->n_batch ? p->kv_block : p->n_batch);
    kvs_kv_params kp = {p->type_k, p->type_v, p->kv_block, p->kv_recent, ctx->ubatch,
                        p->sink_capacity, p->kv_key_per_token, p->kv_group, p->kv_ring, p->kv_rotate,
                        p->swa_full};
    ctx->sink_policy = p->sink_policy;
    ctx->sink_pfn = p->sink_pfn;
    if (p->sink_policy == KVS_SINKS_KVSINK && !ctx->model->profile.present) {
        ctx->sink_policy = KVS_SINKS_PFN; /* no profile: keep position 0 exact, the one sink every model has */
        ctx->sink_pfn = 1;
    }
    kvs_status st = kvs_kv_cache_create(&ctx->model->hp, ctx->model->rope_freqs, p->n_ctx, &kp, &ctx->kv);
    const int32_t group = ctx->model->hp.n_head / ctx->model->hp.n_head_kv;
    if (st == KVS_OK) ctx->scratch_len = kvs_kv_cache_scratch_floats(ctx->kv, ATTN_TOKENS * group);
    return st;
}

/* One allocation per scratch buffer; sizes in floats. */
static kvs_status alloc_scratch(kvs_context *ctx) {
    const kvs_hparams *hp = &ctx->model->hp;
    const int64_t nb = ctx->params.n_batch;
    const int64_t q_dim = (int64_t)hp->n_head * hp->head_dim, kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    int64_t row = hp->n_embd > hp->n_ff ? hp->n_embd : hp->n_ff;
    if (q_dim > row) row = q_dim;
    ctx->cpu.row_scratch_len = row;
    struct { float **ptr; int64_t n; } bufs[] = {
        {&ctx->x, nb * hp->n_embd}, {&ctx->xb, nb * hp->n_embd}, {&ctx->q, nb * q_dim},
        {&ctx->k, nb * kv_dim},     {&ctx->v, nb * kv_dim},      {&ctx->att, nb * q_dim},
        {&ctx->hb, nb * hp->n_ff},  {&ctx->hb2, nb * hp->n_ff},
        /* the CPU attention's scratch (it grows with n_ctx); a GPU context attends on the device */
        {&ctx->scores, ctx->backend == &kvs_backend_cpu ? (int64_t)ctx->params.n_threads * ctx->scratch_len : 1},
        {&ctx->attn_partial, (int64_t)hp->n_head * ATTN_MAX_PARTS * (hp->head_dim + 2)},
        {&ctx->cpu.row_scratch, (int64_t)ctx->params.n_threads * MATMUL_ROWS * row},
        {&ctx->sink_top, nb},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i].ptr = malloc((size_t)bufs[i].n * sizeof(float));
        if (!*bufs[i].ptr) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %lld floats of scratch", (long long)bufs[i].n);
    }
    ctx->cpu.act_scratch = malloc((size_t)(nb * (row / QK_ACT + 1)) * sizeof(block_q8_act));
    ctx->cpu.act16_scratch = malloc((size_t)(hp->n_embd / QK_ACT16 + 1) * sizeof(block_q16_act));
    ctx->cpu.outliers = malloc((size_t)nb * sizeof(act_outliers));
    ctx->cpu.block_scratch = malloc((size_t)ctx->params.n_threads * (size_t)(row / QK_ACT + 1) * sizeof(float));
    if (!ctx->cpu.act_scratch || !ctx->cpu.act16_scratch || !ctx->cpu.outliers || !ctx->cpu.block_scratch) {
        return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the activation scratch");
    }
    return KVS_OK;
}

kvs_status kvs_context_create(kvs_model *model, const kvs_context_params *params, kvs_context **out) {
    if (!out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "out must not be NULL");
    *out = NULL;
    if (!model) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "model must not be NULL");
    kvs_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate a context");
    ctx->model = model;
    ctx->params = params ? *params : kvs_context_default_params();
    kvs_status st = resolve_params(model, &ctx->params);
    if (st == KVS_OK) st = choose_backend(ctx);
    if (st == KVS_OK) st = kvs_threadpool_create(ctx->params.n_threads, &ctx->cpu.pool);
    if (st == KVS_OK) st = create_cache(ctx);
    if (st == KVS_OK) st = alloc_scratch(ctx);
#if defined(KVS_HAVE_CUDA)
    if (st == KVS_OK && ctx->backend == &kvs_backend_cuda) st = kvs_cuda_backend_init(ctx);
#endif
    /* the fast path's one-token products read weights packed 8 rows at a time */
    if (st == KVS_OK && ctx->backend == &kvs_backend_cpu && ctx->params.matmul == KVS_MATMUL_Q8) {
        st = kvs_model_pack_weights(model);
    }
    if (st != KVS_OK) {
        kvs_context_free(ctx);
        return st;
    }
    ctx->cpu.impl = ctx->params.impl;
    ctx->cpu.matmul = ctx->params.matmul;
    ctx->cpu.outlier_ratio = ctx->params.act_outlier_ratio;
    *out = ctx;
    return KVS_OK;
}

void kvs_context_free(kvs_context *ctx) {
    if (!ctx) return;
#if defined(KVS_HAVE_CUDA)
    kvs_cuda_backend_free(ctx); /* the host buffers come back before they are freed */
#endif
    kvs_threadpool_free(ctx->cpu.pool);
    kvs_kv_cache_free(ctx->kv);
    float *bufs[] = {ctx->x, ctx->xb, ctx->q, ctx->k, ctx->v, ctx->att, ctx->hb, ctx->hb2,
                     ctx->scores, ctx->attn_partial, ctx->cpu.row_scratch, ctx->sink_top};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(ctx->cpu.act_scratch);
    free(ctx->cpu.act16_scratch);
    free(ctx->cpu.outliers);
    free(ctx->cpu.block_scratch);
    free(ctx);
}

kvs_context_params kvs_context_get_params(const kvs_context *ctx) {
    if (!ctx) return kvs_context_default_params();
    kvs_context_params p = ctx->params;
    p.sink_policy = ctx->sink_policy;
    p.sink_pfn = ctx->sink_pfn;
    return p;
}

int32_t kvs_context_n_ctx(const kvs_context *ctx) { return ctx ? ctx->params.n_ctx : 0; }
int32_t kvs_context_n_batch(const kvs_context *ctx) { return ctx ? ctx->params.n_batch : 0; }
int32_t kvs_context_n_past(const kvs_context *ctx) { return ctx ? kvs_kv_cache_n_past(ctx->kv) : 0; }
int32_t kvs_context_n_sinks(const kvs_context *ctx) { return ctx ? kvs_kv_cache_n_sinks(ctx->kv) : 0; }
int32_t kvs_context_n_evicted(const kvs_context *ctx) { return ctx ? kvs_kv_cache_n_evicted(ctx->kv) : 0; }
int32_t kvs_context_n_sinks_dropped(const kvs_context *ctx) { return ctx ? kvs_kv_cache_n_dropped(ctx->kv) : 0; }
int32_t kvs_context_sink_capacity(const kvs_context *ctx) { return ctx ? ctx->params.sink_capacity : 0; }

void kvs_context_activation_outliers(const kvs_context *ctx, int64_t *rows, int64_t *activations) {
    if (rows) *rows = ctx ? ctx->cpu.n_outlier_rows : 0;
    if (activations) *activations = ctx ? ctx->cpu.n_outliers : 0;
}
int32_t kvs_context_sink_positions(const kvs_context *ctx, int32_t *positions, int32_t capacity) {
    if (!ctx) return 0;
    return kvs_kv_cache_sink_positions(ctx->kv, positions, positions ? capacity : 0);
}
double kvs_context_kv_bytes_per_token(const kvs_context *ctx) {
    return ctx ? kvs_kv_cache_bytes_per_token(ctx->kv) : 0.0;
}
void kvs_context_kv_memory(const kvs_context *ctx, kvs_kv_memory *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (ctx) kvs_kv_cache_memory(ctx->kv, out);
}

void kvs_context_timings(const kvs_context *ctx, double *eval_seconds, double *sink_predict_seconds) {
    if (eval_seconds) *eval_seconds = ctx ? ctx->t_eval : 0.0;
    if (sink_predict_seconds) *sink_predict_seconds = ctx ? ctx->t_predict : 0.0;
}

int64_t kvs_context_graph_steps(const kvs_context *ctx) { return ctx ? ctx->graph_steps : 0; }

kvs_status kvs_context_set_n_past(kvs_context *ctx, int32_t n_past) {
    if (!ctx) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "ctx must not be NULL");
    int32_t kept;
    return kvs_kv_cache_truncate(ctx->kv, n_past, &kept);
}

void kvs_context_set_cancel(kvs_context *ctx, int32_t cancel) {
    if (ctx) atomic_store_explicit(&ctx->cancel, cancel != 0, memory_order_relaxed);
}

size_t kvs_context_state_size(const kvs_context *ctx) { return ctx ? kvs_kv_cache_state_size(ctx->kv) : 0; }

kvs_status kvs_context_save_state(const kvs_context *ctx, void *buf, size_t size, size_t *written) {
    if (!ctx || !buf || !written) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "ctx, buf and written must not be NULL");
    return kvs_kv_cache_save_state(ctx->kv, buf, size, written);
}

kvs_status kvs_context_load_state(kvs_context *ctx, const void *buf, size_t size) {
    if (!ctx || (!buf && size)) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "ctx and buf must not be NULL");
    return kvs_kv_cache_load_state(ctx->kv, buf ? buf : "", size);
}

static kvs_status check_tokens(const kvs_context *ctx, const int32_t *tokens, int32_t n_tokens) {
    if (!tokens) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "tokens must not be NULL");
    if (n_tokens < 1 || n_tokens > ctx->params.n_batch) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_tokens must be in 1..n_batch (%d), got %d",
                        ctx->params.n_batch, n_tokens);
    }
    const int32_t n_past = kvs_kv_cache_n_past(ctx->kv);
    if (!ctx->params.kv_ring && (int64_t)n_past + n_tokens > ctx->params.n_ctx) {
        return kvs_fail(KVS_ERR_CONTEXT_FULL, "%d tokens do not fit: %d of n_ctx %d are in use",
                        n_tokens, n_past, ctx->params.n_ctx);
    }

    const int32_t n_vocab = ctx->model->hp.n_vocab;
    for (int32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "token id %d at index %d is out of range [0, %d)",
                            tokens[i], i, n_vocab);
        }
    }
    return KVS_OK;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

kvs_status kvs_context_eval(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                            int32_t logits_all, float *logits) {
    return kvs_context_eval_trace(ctx, tokens, n_tokens, logits_all, logits, NULL);
}

kvs_status kvs_context_eval_trace(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                                  int32_t logits_all, float *logits, const kvs_eval_trace *trace) {
    if (!ctx) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "ctx must not be NULL");
    kvs_status st = check_tokens(ctx, tokens, n_tokens);
    if (st != KVS_OK) return st;
    if (trace && (ctx->params.kv_ring || kvs_kv_cache_n_evicted(ctx->kv) > 0)) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "tracing needs a cache without eviction (kv_ring 0)");
    }
    if (trace && trace->attn_mass && ctx->backend != &kvs_backend_cpu) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "attention traces (sink calibration) run on the CPU; this context runs on %s",
                        ctx->backend->name);
    }
    if (trace && trace->attn_mass) {
        /* calibration only: decoding never takes this path, so it may allocate */
        ctx->trace_mass = malloc((size_t)ctx->params.n_threads * (size_t)ctx->scratch_len * sizeof(float));
        if (!ctx->trace_mass) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the attention trace");
    }
    ctx->trace = trace;
    ctx->trace_total = n_tokens;
    ctx->trace_past0 = kvs_kv_cache_n_past(ctx->kv);
    if (trace && trace->attn_mass) {
        memset(trace->attn_mass, 0, (size_t)ctx->model->hp.n_layer * (size_t)(ctx->trace_past0 + n_tokens) * sizeof(float));
    }
    const double t0 = now_seconds();
    for (int32_t start = 0; start < n_tokens && st == KVS_OK; start += ctx->ubatch) {
        const int32_t n = n_tokens - start < ctx->ubatch ? n_tokens - start : ctx->ubatch;
        const int last = start + n == n_tokens;
        float *out = !logits ? NULL : logits_all ? logits + (int64_t)start * ctx->model->hp.n_vocab
                                                 : (last ? logits : NULL);
        if (atomic_load_explicit(&ctx->cancel, memory_order_relaxed)) {
            st = kvs_fail(KVS_ERR_CANCELLED, "evaluation cancelled after %d of %d tokens", start, n_tokens);
            break;
        }
        st = kvs_kv_cache_begin(ctx->kv, n);
        if (st != KVS_OK) break;
        ctx->trace_start = start;
        st = kvs_llama_forward(ctx, tokens + start, n, logits_all, out);
        const kvs_status committed = kvs_kv_cache_commit(ctx->kv);
        if (st == KVS_OK) st = committed;
    }
    ctx->t_eval += now_seconds() - t0;
    ctx->trace = NULL;
    free(ctx->trace_mass);
    ctx->trace_mass = NULL;
    return st;
}
