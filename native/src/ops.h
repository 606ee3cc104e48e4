/* ops.h - private: CPU operations of the forward pass (threaded matrix
 * products, RMSNorm, RoPE, SwiGLU, GeGLU). */
#ifndef KVS_OPS_H
#define KVS_OPS_H

#include <stdint.h>

#include "act_q16.h"
#include "act_q8.h"
#include "formats.h"
#include "model.h"
#include "threadpool.h"

/* Weight rows dequantized together by a batched matrix product. */
#define MATMUL_ROWS 16

/* What every op needs from the context: threads, kernels, per-thread scratch. */
typedef struct kvs_cpu {
    kvs_threadpool *pool;
    int32_t impl;          /* kvs_impl resolved: SCALAR or AVX2 */
    int32_t matmul;        /* kvs_matmul_mode: exact f32 or 8-bit activations */
    float *row_scratch;    /* n_threads x MATMUL_ROWS x row_scratch_len floats: dequantized rows
                              (exact path) or q8_quads (fast path; they take less room) */
    int64_t row_scratch_len;
    block_q8_act *act_scratch;   /* n_batch x row_scratch_len / 32 quantized activation blocks */
    block_q16_act *act16_scratch; /* one token's input of the logits, 16-bit (n_embd / 32 blocks) */
    float outlier_ratio;   /* fast path: massive activations taken out above this (act_q8.h); 0 = none */
    act_outliers *outliers;  /* n_batch of them: each token's outliers in the current product */
    float *block_scratch;    /* n_threads x (row_scratch_len / 32 + 1) floats for the median */
    int64_t n_outlier_rows, n_outliers; /* counted over the context's products */
} kvs_cpu;

/* y[t, r] = dot(row r of w, x[t]) for n_tokens rows of x (w->ne[0] floats each). */
void kvs_matmul(kvs_cpu *cpu, const kvs_tensor *w, const float *x, int64_t n_tokens, float *y);

/* n_w products of one input (Q/K/V, gate/up): x is quantized once and the
 * rows of all weights are split over the threads in one dispatch. The
 * weights share w[i]->ne[0]. */
void kvs_matmul_shared(kvs_cpu *cpu, int n_w, const kvs_tensor *const *w, const float *x, int64_t n_tokens,
                       float *const *y);

/* The logits: y = w x for n_tokens rows of x. Exact, except that the fast
 * path decodes one token with 16-bit activations when w's type has such
 * dots (Q8_0): near exact (act_q16.h) at about the cost of the 8-bit dots. */
void kvs_matmul_logits(kvs_cpu *cpu, const kvs_tensor *w, const float *x, int64_t n_tokens, float *y);

/* out = x / rms(x) * weight, for one row of n. */
void kvs_rmsnorm(const float *x, const float *weight, int64_t n, float eps, float *out);

/* Rotate n_heads heads of head_dim floats in place for position pos. */
void kvs_rope(float *x, int32_t n_heads, const kvs_hparams *hp, const float *freq_factors, int32_t pos);

/* gate = silu(gate) * up, elementwise (SwiGLU), with impl's kernel. */
void kvs_swiglu(float *gate, const float *up, int64_t n, int32_t impl);

/* gate = gelu_tanh(gate) * up, elementwise (GeGLU), with impl's kernel. */
void kvs_geglu(float *gate, const float *up, int64_t n, int32_t impl);

/* x = cap * tanh(x / cap) (Gemma's logit soft-capping), cap > 0. */
void kvs_softcap(float *x, int64_t n, float cap);

/* y += b (n floats), no-op when b is NULL. */
void kvs_add_bias(float *y, const float *b, int64_t n);

#endif
