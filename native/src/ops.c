/* ops.c - CPU operations of the forward pass. Matrix products are split by
 * output rows across the thread pool; the rest is cheap and runs inline. */
#include "ops.h"

#include <math.h>
#include <string.h>

typedef struct matmul_job {
    kvs_cpu *cpu;
    const kvs_tensor *w;
    const float *x;
    int64_t n_tokens;
    float *y;
} matmul_job;

/* One token: the quantized dot kernel reads each weight row once. */
static void matmul_one_token(const matmul_job *job, int64_t r0, int64_t r1) {
    const kvs_tensor *w = job->w;
    kvs_vec_dot_fn dot = kvs_vec_dot_kernel(w->type, job->cpu->impl);
    const uint8_t *base = w->data;
    for (int64_t r = r0; r < r1; r++) {
        job->y[r] = dot(w->ne[0], base + r * w->row_bytes, job->x);
    }
}

/* Many tokens: dequantize MATMUL_ROWS weight rows at a time, then take every
 * token against all of them, so each token's activations are read once per
 * row tile (from L1) instead of once per row. */
static void matmul_many_tokens(const matmul_job *job, int ith, int64_t r0, int64_t r1) {
    const kvs_tensor *w = job->w;
    const kvs_type_kernels *kernels = kvs_type_kernels_find(w->type);
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    float *rows = job->cpu->row_scratch + (int64_t)ith * job->cpu->row_scratch_len * MATMUL_ROWS;
    const uint8_t *base = w->data;
    for (int64_t tile = r0; tile < r1; tile += MATMUL_ROWS) {
        const int64_t n_rows = r1 - tile < MATMUL_ROWS ? r1 - tile : MATMUL_ROWS;
        for (int64_t r = 0; r < n_rows; r++) kernels->dequantize(base + (tile + r) * w->row_bytes, rows + r * n_in, n_in);
        for (int64_t t = 0; t < job->n_tokens; t += 2) {
            int64_t r = 0;
            if (t + 1 < job->n_tokens) {
                for (; r + 4 <= n_rows; r += 4) {
                    float out[8];
                    kvs_dot_f32_4x2(n_in, rows + r * n_in, job->x + t * n_in, out, job->cpu->impl);
                    for (int k = 0; k < 4; k++) {
                        job->y[t * n_out + tile + r + k] = out[2 * k];
                        job->y[(t + 1) * n_out + tile + r + k] = out[2 * k + 1];
                    }
                }
            }
            for (int64_t tt = t; tt < t + 2 && tt < job->n_tokens; tt++) {
                for (int64_t rr = r; rr < n_rows; rr++) {
                    job->y[tt * n_out + tile + rr] = kvs_dot_f32(n_in, rows + rr * n_in, job->x + tt * n_in, job->cpu->impl);
                }
            }
        }
    }
}

static void matmul_task(void *arg, int ith, int nth) {
    const matmul_job *job = arg;
    int64_t r0, r1;
    kvs_split_range(job->w->ne[1], ith, nth, &r0, &r1);
    if (job->n_tokens == 1) matmul_one_token(job, r0, r1);
    else matmul_many_tokens(job, ith, r0, r1);
}

void kvs_matmul(kvs_cpu *cpu, const kvs_tensor *w, const float *x, int64_t n_tokens, float *y) {
    matmul_job job = {cpu, w, x, n_tokens, y};
    kvs_threadpool_run(cpu->pool, matmul_task, &job);
}

void kvs_rmsnorm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)x[i] * x[i];
    const float scale = (float)(1.0 / sqrt(sum / (double)n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

void kvs_rope(float *x, int32_t n_heads, const kvs_hparams *hp, const float *freq_factors, int32_t pos) {
    const int32_t half = hp->n_rot / 2;
    /* llama rotates adjacent pairs (its converter permutes Q/K rows to match);
     * NeoX-style models rotate element i with element i + n_rot/2. */
    const int32_t pair_stride = hp->rope_neox ? half : 1;
    const int32_t elem_stride = hp->rope_neox ? 1 : 2;
    for (int32_t i = 0; i < half; i++) {
        double freq = pow((double)hp->rope_freq_base, -2.0 * i / hp->n_rot);
        if (freq_factors) freq /= freq_factors[i];
        const double theta = (double)pos * hp->rope_freq_scale * freq;
        const float c = (float)cos(theta), s = (float)sin(theta);
        for (int32_t h = 0; h < n_heads; h++) {
            float *v = x + (int64_t)h * hp->head_dim + (int64_t)i * elem_stride;
            const float a = v[0], b = v[pair_stride];
            v[0] = a * c - b * s;
            v[pair_stride] = a * s + b * c;
        }
    }
}

void kvs_swiglu(float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void kvs_add_bias(float *y, const float *b, int64_t n) {
    if (!b) return;
    for (int64_t i = 0; i < n; i++) y[i] += b[i];
}
