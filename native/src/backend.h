/* backend.h - private: the operations of the forward pass as a small table
 * chosen once per context (calm's and ggml's seam). llama.c is one readable
 * forward pass over this table; each backend owns the memory its buffers
 * live in (the context's x, xb, q, ... are host memory for the CPU backend,
 * device memory for a GPU one) and moves data to the host only where an op
 * says "host". Ops do not return a status: a backend that can fail (a GPU
 * launch) records its first failure with kvs_fail and sets ctx->op_status,
 * which the forward pass returns after the layer it happened in. Ops may
 * only queue work: results meant for the host (logits, the predictor's
 * maxima) are there once the step is over. */
#ifndef KVS_BACKEND_H
#define KVS_BACKEND_H

#include <stdint.h>

#include "model.h"

typedef struct kvs_context kvs_context;

typedef struct kvs_backend_ops {
    const char *name;
    /* x[t] = the embedding row of tokens[t] (host ids), times the model's
     * embedding scale */
    void (*embed)(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens, float *x);
    /* out[r] = RMSNorm(x[r]) * weight for n_rows rows of n (in place allowed) */
    void (*rmsnorm)(kvs_context *ctx, const float *x, const float *weight, int64_t n_rows, int64_t n, float *out);
    /* y[i][t] = w[i] x[t] for n_w weights sharing the input (Q/K/V, gate/up) */
    void (*matmul)(kvs_context *ctx, int n_w, const kvs_tensor *const *w, const float *x, int64_t n_tokens,
                   float *const *y);
    /* y[r] += b for n_rows rows of n; nothing when b is NULL */
    void (*add_bias)(kvs_context *ctx, float *y, const float *b, int64_t n_rows, int64_t n);
    /* layer il: append ctx->k/ctx->v of n_tokens to the cache, then attend
     * with ctx->q over everything the layer sees into ctx->att */
    void (*attention)(kvs_context *ctx, int32_t il, int32_t n_tokens);
    /* gate = act(gate) * up for n elements: SiLU, or tanh-GELU when gelu */
    void (*glu)(kvs_context *ctx, float *gate, const float *up, int64_t n, int32_t gelu);
    /* x += y for n elements */
    void (*add)(kvs_context *ctx, float *x, const float *y, int64_t n);
    /* host logits (n_tokens x n_vocab) = output projection of x's n_tokens
     * rows, soft-capped when the model caps them */
    void (*logits)(kvs_context *ctx, const float *x, int64_t n_tokens, float *logits);
    /* host top[t] = max over the channels of |x[t][c]| (the sink predictor's input) */
    void (*channel_max)(kvs_context *ctx, const float *x, int32_t n_tokens, const int32_t *channels,
                        int32_t n_channels, float *top);
    /* host dst = the first n floats of x (traces for calibration) */
    void (*read)(kvs_context *ctx, const float *x, int64_t n, float *dst);
    /* run kvs_llama_pass for one step and wait for its results: a GPU
     * backend may capture and replay it; NULL: call it directly */
    kvs_status (*step)(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens, int32_t logits_all, float *logits);
} kvs_backend_ops;

/* The CPU backend (backend_cpu.c): threaded AVX2 / scalar kernels, the
 * KVSink cache in host memory. */
extern const kvs_backend_ops kvs_backend_cpu;

#if defined(KVS_HAVE_CUDA)
/* The CUDA backend (backend_cuda.c), in builds with KVSINK_CUDA=ON. */
extern const kvs_backend_ops kvs_backend_cuda;
/* Upload the model's weights (once per model) and move the context's
 * buffers to the device; fails with the reason where CUDA cannot run. */
kvs_status kvs_cuda_backend_init(kvs_context *ctx);
/* Give the context its host buffers back and free its device memory. */
void kvs_cuda_backend_free(kvs_context *ctx);
/* The model's device weights (model.c frees them with the model). */
void kvs_cuda_weights_free(kvs_cuda_weights *w);
#endif

#endif
