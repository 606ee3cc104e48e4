/* backend_cuda.c - the CUDA backend (backend.h). The model's weights are
 * uploaded to the GPU once (shared by its contexts) and every op of the
 * forward pass runs there with f32 activations (kernels_cuda.cu: the CPU
 * exact path's arithmetic). The context's KVSink cache lives in GPU memory
 * (kv_cache_cuda.c: window and sink rows, quantized blocks; the
 * bookkeeping on the host), so attention appends and reads there too. What
 * comes back to the host: the logits rows asked for and, with a sink
 * profile, one channel maximum per token for the predictor.
 *
 * Everything a context does goes on its own stream; a one-token step (decode)
 * is captured into a CUDA graph and replayed (cuda_graph.cu), its per-step
 * copies through pinned buffers. Where capture fails, the context turns
 * graphs off and runs the step launch by launch; KVSINK_CUDA_GRAPHS=0 turns
 * them off from the start.
 * Compiled only with KVSINK_CUDA=ON; run on the SIMT emulator in CI
 * (tests/test_cuda_simt.py), not yet on a GPU (README). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "context.h"
#include "cuda_memory.h"
#include "kernels_cuda.h"
#include "kv_cache.h"
#include "status.h"

/* Logit rows computed at a time (a row of Gemma 3 is 1 MiB of floats). */
#define LOGIT_ROWS 8

/* ---- the model's weights on the device ----------------------------------- */

typedef struct device_copy {
    const void *host;
    void *dev;
} device_copy;

struct kvs_cuda_weights {
    int32_t n, cap;
    int32_t sorted;       /* copies ordered by host address: every op looks its weights up */
    device_copy *copies;
};

static pthread_mutex_t upload_lock = PTHREAD_MUTEX_INITIALIZER;

static int by_host(const void *a, const void *b) {
    const uintptr_t x = (uintptr_t)((const device_copy *)a)->host, y = (uintptr_t)((const device_copy *)b)->host;
    return (x > y) - (x < y);
}

/* The device copy of the host weight at `host` (NULL for NULL). Weights are
 * found by address: the ops receive the model's own pointers. Once the
 * upload is done the list is sorted and searched by halves. */
static const void *device_of(const kvs_cuda_weights *w, const void *host) {
    if (!host) return NULL;
    if (w->sorted) {
        const device_copy key = {host, NULL};
        const device_copy *hit = bsearch(&key, w->copies, (size_t)w->n, sizeof key, by_host);
        return hit ? hit->dev : NULL;
    }
    for (int32_t i = 0; i < w->n; i++) {
        if (w->copies[i].host == host) return w->copies[i].dev;
    }
    return NULL;
}

static kvs_status upload(kvs_cuda_weights *w, const void *host, size_t bytes) {
    if (!host || device_of(w, host)) return KVS_OK; /* absent, or shared (a tied output) */
    if (w->n == w->cap) {
        const int32_t cap = w->cap ? 2 * w->cap : 64;
        device_copy *grown = realloc(w->copies, (size_t)cap * sizeof *grown);
        if (!grown) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot list the device copies of the weights");
        w->copies = grown;
        w->cap = cap;
    }
    void *dev;
    kvs_status st = kvs_cuda_alloc(&dev, bytes, "the weights");
    if (st == KVS_OK) st = kvs_cuda_to_device(dev, host, bytes);
    if (st != KVS_OK) {
        kvs_cuda_release(dev);
        return st;
    }
    w->copies[w->n++] = (device_copy){host, dev};
    return KVS_OK;
}

static size_t tensor_bytes(const kvs_tensor *t) { return (size_t)(t->row_bytes * t->ne[1] * t->ne[2] * t->ne[3]); }

static kvs_status upload_layer(kvs_cuda_weights *w, const kvs_hparams *hp, const kvs_layer *l) {
    const size_t embd = (size_t)hp->n_embd * sizeof(float), head = (size_t)hp->head_dim * sizeof(float);
    const size_t q = (size_t)hp->n_head * head, kv = (size_t)hp->n_head_kv * head;
    const kvs_tensor *mats[] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
    const struct { const float *p; size_t bytes; } vecs[] = {
        {l->attn_norm, embd}, {l->ffn_norm, embd}, {l->attn_post_norm, embd}, {l->ffn_post_norm, embd},
        {l->q_norm, head},    {l->k_norm, head},   {l->bq, q},                {l->bk, kv}, {l->bv, kv},
    };
    kvs_status st = KVS_OK;
    for (size_t i = 0; st == KVS_OK && i < sizeof mats / sizeof mats[0]; i++) st = upload(w, mats[i]->data, tensor_bytes(mats[i]));
    for (size_t i = 0; st == KVS_OK && i < sizeof vecs / sizeof vecs[0]; i++) st = upload(w, vecs[i].p, vecs[i].bytes);
    return st;
}

void kvs_cuda_weights_free(kvs_cuda_weights *w) {
    if (!w) return;
    for (int32_t i = 0; i < w->n; i++) kvs_cuda_release(w->copies[i].dev);
    free(w->copies);
    free(w);
}

/* Upload every weight of the forward pass once per model. */
static kvs_status upload_model(kvs_model *m) {
    pthread_mutex_lock(&upload_lock);
    kvs_status st = KVS_OK;
    if (!m->cuda) {
        kvs_cuda_weights *w = calloc(1, sizeof *w);
        st = w ? KVS_OK : kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the device weights' list");
        for (int32_t il = 0; st == KVS_OK && il < m->hp.n_layer; il++) st = upload_layer(w, &m->hp, &m->layers[il]);
        if (st == KVS_OK) st = upload(w, m->tok_embd.data, tensor_bytes(&m->tok_embd));
        if (st == KVS_OK) st = upload(w, m->output.data, tensor_bytes(&m->output));
        if (st == KVS_OK) st = upload(w, m->output_norm, (size_t)m->hp.n_embd * sizeof(float));
        if (st == KVS_OK) {
            qsort(w->copies, (size_t)w->n, sizeof *w->copies, by_host);
            w->sorted = 1;
            m->cuda = w;
        }
        else kvs_cuda_weights_free(w);
    }
    pthread_mutex_unlock(&upload_lock);
    return st;
}

/* ---- a context's device buffers ------------------------------------------ */

/* The forward pass's buffers (ctx->x, ...) point into device memory while
 * the context lives; the host buffers alloc_scratch made are kept here and
 * given back at the end (context.c frees them). */
typedef struct cuda_context {
    float *host[8];     /* x, xb, q, k, v, att, hb, hb2 as allocated on the host */
    float *dev[8];
    int32_t *ids;       /* n_batch token ids */
    float *logits;      /* LOGIT_ROWS x n_vocab */
    int32_t *channels;  /* the sink profile's channels, or NULL without a profile */
    float *top;         /* n_batch channel maxima */
    void *stream;       /* every launch and copy of the context */
    /* pinned: the per-step copies queue without waiting (and a graph can hold them) */
    int32_t *ids_pinned;   /* n_batch */
    float *top_pinned;     /* n_batch: ctx->sink_top while the context lives */
    float *sink_top_host;  /* ctx->sink_top as context.c allocated it */
    float *logits_pinned;  /* one row: a captured step's logits */
    float *logits_dst;     /* where that row goes after the replay (NULL: nowhere) */
    int capturing;         /* the ops are being recorded into a graph */
    int graphs;            /* decode steps run as graphs */
    kvs_cuda_graph *graph;
} cuda_context;

static float **scratch_slot(kvs_context *ctx, int i) {
    float **slots[8] = {&ctx->x, &ctx->xb, &ctx->q, &ctx->k, &ctx->v, &ctx->att, &ctx->hb, &ctx->hb2};
    return slots[i];
}

static int64_t scratch_floats(const kvs_context *ctx, int i) {
    const kvs_hparams *hp = &ctx->model->hp;
    const int64_t q = (int64_t)hp->n_head * hp->head_dim, kv = (int64_t)hp->n_head_kv * hp->head_dim;
    const int64_t per_token[8] = {hp->n_embd, hp->n_embd, q, kv, kv, q, hp->n_ff, hp->n_ff};
    return per_token[i] * ctx->params.n_batch;
}

void kvs_cuda_backend_free(kvs_context *ctx) {
    cuda_context *cc = ctx->backend_state;
    if (!cc) return;
    for (int i = 0; i < 8; i++) {
        kvs_cuda_release(cc->dev[i]);
        if (cc->host[i]) *scratch_slot(ctx, i) = cc->host[i];
    }
    kvs_cuda_release(cc->ids);
    kvs_cuda_release(cc->logits);
    kvs_cuda_release(cc->channels);
    kvs_cuda_release(cc->top);
    if (cc->sink_top_host) ctx->sink_top = cc->sink_top_host;
    kvs_cuda_release_host(cc->ids_pinned);
    kvs_cuda_release_host(cc->top_pinned);
    kvs_cuda_release_host(cc->logits_pinned);
    kvs_cuda_graph_free(cc->graph);
    kvs_cuda_stream_free(cc->stream);
    free(cc);
    ctx->backend_state = NULL;
}

/* The profile is set before contexts are created (kvsink.h), so its
 * channels are copied once per context. */
static kvs_status upload_profile(kvs_context *ctx, cuda_context *cc) {
    const kvs_sink_profile *p = &ctx->model->profile;
    if (!p->present || p->n_channels <= 0) return KVS_OK;
    const size_t bytes = (size_t)p->n_channels * sizeof(int32_t);
    kvs_status st = kvs_cuda_alloc((void **)&cc->channels, bytes, "the sink profile's channels");
    if (st == KVS_OK) st = kvs_cuda_to_device(cc->channels, p->channels, bytes);
    if (st == KVS_OK) st = kvs_cuda_alloc((void **)&cc->top, (size_t)ctx->params.n_batch * sizeof(float), "sink scores");
    return st;
}

/* The stream and the pinned buffers of the per-step copies. */
static kvs_status alloc_step_buffers(kvs_context *ctx, cuda_context *cc) {
    const size_t nb = (size_t)ctx->params.n_batch;
    kvs_status st = kvs_cuda_stream_create(&cc->stream);
    if (st == KVS_OK) st = kvs_cuda_alloc_host((void **)&cc->ids_pinned, nb * sizeof(int32_t), "token ids");
    if (st == KVS_OK) st = kvs_cuda_alloc_host((void **)&cc->top_pinned, nb * sizeof(float), "sink scores");
    if (st == KVS_OK) {
        st = kvs_cuda_alloc_host((void **)&cc->logits_pinned, (size_t)ctx->model->hp.n_vocab * sizeof(float), "logits");
    }
    if (st != KVS_OK) return st;
    cc->sink_top_host = ctx->sink_top;
    ctx->sink_top = cc->top_pinned;
    const char *env = getenv("KVSINK_CUDA_GRAPHS");
    cc->graphs = !(env && strcmp(env, "0") == 0);
    return KVS_OK;
}

kvs_status kvs_cuda_backend_init(kvs_context *ctx) {
    kvs_status st = kvs_cuda_check();
    if (st == KVS_OK) st = upload_model(ctx->model);
    cuda_context *cc = st == KVS_OK ? calloc(1, sizeof *cc) : NULL;
    if (st == KVS_OK && !cc) st = kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the CUDA context");
    if (st != KVS_OK) return st;
    ctx->backend_state = cc;
    for (int i = 0; st == KVS_OK && i < 8; i++) {
        st = kvs_cuda_alloc((void **)&cc->dev[i], (size_t)scratch_floats(ctx, i) * sizeof(float), "the activations");
        if (st == KVS_OK) {
            cc->host[i] = *scratch_slot(ctx, i);
            *scratch_slot(ctx, i) = cc->dev[i];
        }
    }
    if (st == KVS_OK) st = kvs_cuda_alloc((void **)&cc->ids, (size_t)ctx->params.n_batch * sizeof(int32_t), "token ids");
    if (st == KVS_OK) {
        st = kvs_cuda_alloc((void **)&cc->logits, (size_t)LOGIT_ROWS * (size_t)ctx->model->hp.n_vocab * sizeof(float),
                            "the logits");
    }
    if (st == KVS_OK) st = upload_profile(ctx, cc);
    if (st == KVS_OK) st = alloc_step_buffers(ctx, cc);
    if (st == KVS_OK) st = kvs_kv_cache_to_cuda(ctx->kv, ctx->ubatch, ctx->model->hp.n_head, cc->stream);
    if (st != KVS_OK) kvs_cuda_backend_free(ctx);
    return st;
}

/* ---- the ops ---------------------------------------------------------------- */

/* Ops do nothing once one failed (ctx->op_status holds the first reason). */
static int failed(kvs_context *ctx, kvs_status st) {
    if (st != KVS_OK && ctx->op_status == KVS_OK) ctx->op_status = st;
    return ctx->op_status != KVS_OK;
}

static const void *weight(kvs_context *ctx, const void *host) { return device_of(ctx->model->cuda, host); }

static void cuda_embed(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens, float *x) {
    const cuda_context *cc = ctx->backend_state;
    const kvs_model *m = ctx->model;
    /* the ids were checked against the vocabulary (context.c) before the forward pass */
    const size_t bytes = (size_t)n_tokens * sizeof(int32_t);
    memcpy(cc->ids_pinned, tokens, bytes);
    if (failed(ctx, kvs_cuda_to_device_async(cc->ids, cc->ids_pinned, bytes, cc->stream))) return;
    if (failed(ctx, kvs_cuda_get_rows(m->tok_embd.type, weight(ctx, m->tok_embd.data), m->tok_embd.row_bytes,
                                      m->hp.n_embd, cc->ids, n_tokens, x, cc->stream))) return;
    if (m->hp.embd_scale != 1.0f) {
        failed(ctx, kvs_cuda_scale(x, m->hp.embd_scale, (int64_t)n_tokens * m->hp.n_embd, cc->stream));
    }
}

static void *stream_of(kvs_context *ctx) { return ((cuda_context *)ctx->backend_state)->stream; }

static void cuda_rmsnorm(kvs_context *ctx, const float *x, const float *w, int64_t n_rows, int64_t n, float *out) {
    if (ctx->op_status != KVS_OK) return;
    failed(ctx, kvs_cuda_rmsnorm_rows(x, weight(ctx, w), n_rows, n, ctx->model->hp.rms_eps, out, stream_of(ctx)));
}

static void cuda_matmul(kvs_context *ctx, int n_w, const kvs_tensor *const *w, const float *x, int64_t n_tokens,
                        float *const *y) {
    for (int i = 0; i < n_w && ctx->op_status == KVS_OK; i++) {
        failed(ctx, kvs_cuda_matmul_f32(w[i]->type, weight(ctx, w[i]->data), w[i]->row_bytes, w[i]->ne[1],
                                        w[i]->ne[0], x, n_tokens, y[i], stream_of(ctx)));
    }
}

static void cuda_add_bias(kvs_context *ctx, float *y, const float *b, int64_t n_rows, int64_t n) {
    if (!b || ctx->op_status != KVS_OK) return;
    failed(ctx, kvs_cuda_add_bias_rows(y, weight(ctx, b), n_rows, n, stream_of(ctx)));
}

/* The batch's K/V rows into the device cache's window, then attention over
 * everything the layer sees (keys rotated as they are read). */
static void cuda_attention(kvs_context *ctx, int32_t il, int32_t n_tokens) {
    const kvs_hparams *hp = &ctx->model->hp;
    if (ctx->op_status != KVS_OK) return;
    if (failed(ctx, kvs_kv_cache_cuda_store(ctx->kv, il, n_tokens, ctx->k, ctx->v))) return;
    failed(ctx, kvs_kv_cache_cuda_attend(ctx->kv, il, n_tokens, ctx->q, hp->n_head, hp->attn_scale, ctx->att));
}

static void cuda_glu(kvs_context *ctx, float *gate, const float *up, int64_t n, int32_t gelu) {
    if (ctx->op_status != KVS_OK) return;
    failed(ctx, kvs_cuda_glu_rows(gelu, gate, up, n, stream_of(ctx)));
}

static void cuda_add(kvs_context *ctx, float *x, const float *y, int64_t n) {
    if (ctx->op_status != KVS_OK) return;
    failed(ctx, kvs_cuda_add(x, y, n, stream_of(ctx)));
}

/* LOGIT_ROWS rows at a time through the device buffer, then to the host;
 * a captured step's one row goes to the pinned row, copied out after the
 * replay (cuda_step). */
static void cuda_logits(kvs_context *ctx, const float *x, int64_t n_tokens, float *logits) {
    cuda_context *cc = ctx->backend_state;
    const kvs_model *m = ctx->model;
    const int64_t n_vocab = m->hp.n_vocab, n_embd = m->hp.n_embd;
    for (int64_t t = 0; t < n_tokens && ctx->op_status == KVS_OK; t += LOGIT_ROWS) {
        const int64_t rows = n_tokens - t < LOGIT_ROWS ? n_tokens - t : LOGIT_ROWS;
        if (failed(ctx, kvs_cuda_matmul_f32(m->output.type, weight(ctx, m->output.data), m->output.row_bytes, n_vocab,
                                            n_embd, x + t * n_embd, rows, cc->logits, cc->stream))) return;
        if (m->hp.final_softcap > 0.0f &&
            failed(ctx, kvs_cuda_softcap(cc->logits, m->hp.final_softcap, rows * n_vocab, cc->stream))) return;
        const size_t bytes = (size_t)(rows * n_vocab) * sizeof(float);
        if (cc->capturing && n_tokens == 1) {
            cc->logits_dst = logits;
            failed(ctx, kvs_cuda_to_host_async(cc->logits_pinned, cc->logits, bytes, cc->stream));
        } else {
            failed(ctx, kvs_cuda_to_host(logits + t * n_vocab, cc->logits, bytes));
        }
    }
}

/* The predictor's maxima, taken on the device and queued for the pinned
 * ctx->sink_top, read after the step (llama.c). `channels` is the model's
 * profile (llama.c passes nothing else), whose device copy was made at
 * creation. */
static void cuda_channel_max(kvs_context *ctx, const float *x, int32_t n_tokens, const int32_t *channels,
                             int32_t n_channels, float *top) {
    const cuda_context *cc = ctx->backend_state;
    if (ctx->op_status != KVS_OK) return;
    if (failed(ctx, kvs_cuda_channel_max(x, n_tokens, ctx->model->hp.n_embd, cc->channels, n_channels, cc->top,
                                         cc->stream))) return;
    failed(ctx, kvs_cuda_to_host_async(top, cc->top, (size_t)n_tokens * sizeof(float), cc->stream));
}

static void cuda_read(kvs_context *ctx, const float *x, int64_t n, float *dst) {
    if (ctx->op_status != KVS_OK) return;
    failed(ctx, kvs_cuda_to_host(dst, x, (size_t)n * sizeof(float)));
}

/* ---- a step: one token as a graph, anything else launch by launch -------- */

/* The step captured and replayed; KVS_ERR_UNSUPPORTED when it could not be
 * captured (nothing ran: the caller runs it directly). */
static kvs_status graph_step(kvs_context *ctx, cuda_context *cc, const int32_t *tokens, int32_t logits_all,
                             float *logits) {
    if (kvs_cuda_capture_begin(cc->stream) != KVS_OK) return KVS_ERR_UNSUPPORTED;
    cc->capturing = 1;
    cc->logits_dst = NULL;
    const kvs_status recorded = kvs_llama_pass(ctx, tokens, 1, logits_all, logits);
    cc->capturing = 0;
    const kvs_status captured = kvs_cuda_capture_end(cc->stream, &cc->graph);
    /* a failed op here may be the capture's doing: the direct run tells */
    if (recorded != KVS_OK || captured != KVS_OK) return KVS_ERR_UNSUPPORTED;
    if (kvs_cuda_graph_launch(cc->graph, cc->stream) != KVS_OK) return KVS_ERR_UNSUPPORTED;
    kvs_status st = kvs_cuda_sync(cc->stream);
    if (st == KVS_OK && cc->logits_dst) {
        memcpy(cc->logits_dst, cc->logits_pinned, (size_t)ctx->model->hp.n_vocab * sizeof(float));
    }
    if (st == KVS_OK) ctx->graph_steps++;
    return st;
}

static kvs_status cuda_step(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens, int32_t logits_all,
                            float *logits) {
    cuda_context *cc = ctx->backend_state;
    if (n_tokens == 1 && cc->graphs && !ctx->trace) {
        const kvs_status st = graph_step(ctx, cc, tokens, logits_all, logits);
        if (st != KVS_ERR_UNSUPPORTED) return st;
        cc->graphs = 0; /* for good: kv_cache_stats() shows how many steps were graphs */
    }
    kvs_status st = kvs_llama_pass(ctx, tokens, n_tokens, logits_all, logits);
    const kvs_status synced = kvs_cuda_sync(cc->stream); /* the pinned buffers are read and reused next */
    return st != KVS_OK ? st : synced;
}

const kvs_backend_ops kvs_backend_cuda = {
    "cuda",   cuda_embed, cuda_rmsnorm, cuda_matmul,      cuda_add_bias, cuda_attention,
    cuda_glu, cuda_add,   cuda_logits,  cuda_channel_max, cuda_read,     cuda_step,
};
