/* ops.c - CPU operations of the forward pass. Matrix products are split by
 * output rows across the thread pool; the rest is cheap and runs inline. */
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_avx2.h"
#include "repack.h"
#include "status.h"
#include "types.h"

/* Tokens of a batch taken against packed groups at a time: their quantized
 * activations (64 x 40 bytes per block of 32 inputs) stay in L2. */
#define PACKED_TOKEN_CHUNK 64

typedef struct matmul_job {
    kvs_cpu *cpu;
    int n_w;
    const kvs_tensor *const *w;  /* weights sharing the input x          */
    float *const *y;             /* y[i]: n_tokens x w[i]->ne[1] outputs  */
    const float *x;              /* n_tokens x n_in                       */
    const block_q8_act *xq;      /* x quantized, when any weight uses it  */
    const act_outliers *outliers; /* per token, when any token has some   */
    int64_t n_tokens, n_in;
} matmul_job;

/* The integer dots for w on the fast path, else NULL (exact f32 path). */
static const kvs_q8_kernels *fast_dot(const kvs_cpu *cpu, const kvs_tensor *w) {
    return cpu->matmul == KVS_MATMUL_Q8 ? kvs_q8_kernels_find(w->type, cpu->impl) : NULL;
}

/* y[r] for rows r0..r1 of w against one token's quantized activations. */
static void q8_rows(const kvs_q8_kernels *k, const kvs_tensor *w, const block_q8_act *xq, float *y,
                    int64_t r0, int64_t r1) {
    const uint8_t *base = w->data;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) k->dot4(w->ne[0], base + r * w->row_bytes, w->row_bytes, xq, y + r);
    for (; r < r1; r++) y[r] = k->dot(w->ne[0], base + r * w->row_bytes, xq);
}

/* The packed kernels for w on the fast path, else NULL (original layout). */
static const kvs_repack_kernels *packed_dot(const kvs_cpu *cpu, const kvs_tensor *w) {
    return cpu->matmul == KVS_MATMUL_Q8 && w->packed ? kvs_repack_kernels_find(w->type, cpu->impl) : NULL;
}

/* Rows r0.. (r0 a multiple of 8) up to r1 that lie in full packed groups. */
static int64_t packed_end(const kvs_tensor *w, int64_t r1) {
    const int64_t full = w->ne[1] / REPACK_ROWS * REPACK_ROWS;
    return r1 < full ? r1 : full;
}

static const uint8_t *packed_group(const kvs_tensor *w, int64_t row) {
    return (const uint8_t *)w->packed + row / REPACK_ROWS * REPACK_ROWS * w->row_bytes;
}

/* One token: the quantized dot kernel reads each weight row once; packed
 * groups give 8 rows per call, leftover rows take the original layout. */
static void matmul_one_token(const matmul_job *job, const kvs_tensor *w, float *y, int64_t r0, int64_t r1) {
    const uint8_t *base = w->data;
    const kvs_repack_kernels *packed = packed_dot(job->cpu, w);
    const kvs_q8_kernels *q8 = fast_dot(job->cpu, w);
    if (packed) {
        const int64_t end = packed_end(w, r1);
        for (; r0 < end; r0 += REPACK_ROWS) packed->gemv(w->ne[0], packed_group(w, r0), job->xq, y + r0);
    }
    if (q8) {
        q8_rows(q8, w, job->xq, y, r0, r1);
        return;
    }
    kvs_vec_dot_fn dot = kvs_vec_dot_kernel(w->type, job->cpu->impl);
    for (int64_t r = r0; r < r1; r++) y[r] = dot(w->ne[0], base + r * w->row_bytes, job->x);
}

/* Many tokens, fast path: MATMUL_ROWS rows are unpacked into quads once (in
 * the thread's row scratch) and stay in L1 while every token's quantized
 * activations stream past them. Signed formats (no quads) take the per-token
 * four-row kernel. */
static void matmul_many_tokens_q8(const matmul_job *job, int thread, const kvs_q8_kernels *k, const kvs_tensor *w,
                                  float *y, int64_t r0, int64_t r1) {
    const int64_t n_in = w->ne[0], n_out = w->ne[1], nb = n_in / QK_ACT;
    q8_quad *quads = (q8_quad *)(job->cpu->row_scratch + (int64_t)thread * job->cpu->row_scratch_len * MATMUL_ROWS);
    const uint8_t *base = w->data;
    for (int64_t tile = r0; tile < r1; tile += MATMUL_ROWS) {
        const int64_t tile_end = r1 - tile < MATMUL_ROWS ? r1 : tile + MATMUL_ROWS;
        int64_t n_quads = 0;
        if (k->unpack4) {
            for (; tile + 4 * (n_quads + 1) <= tile_end; n_quads++) {
                k->unpack4(n_in, base + (tile + 4 * n_quads) * w->row_bytes, w->row_bytes, quads + n_quads * nb);
            }
        }
        for (int64_t t = 0; t < job->n_tokens; t++) {
            const block_q8_act *xq = job->xq + t * nb;
            float *yt = y + t * n_out;
            for (int64_t g = 0; g < n_quads; g++) k->quad_dot(nb, quads + g * nb, xq, yt + tile + 4 * g);
            q8_rows(k, w, xq, yt, tile + 4 * n_quads, tile_end);
        }
    }
}

/* Many tokens, packed rows: a chunk of tokens' activations stays in L2 while
 * the thread's groups pass by; each group's kernel unpacks a block once for
 * several tokens. The original rows are never read (their pages may be
 * dropped). */
static void matmul_many_tokens_packed(const matmul_job *job, const kvs_repack_kernels *k, const kvs_tensor *w,
                                      float *y, int64_t r0, int64_t r1) {
    const int64_t n_in = w->ne[0], n_out = w->ne[1], nb = n_in / QK_ACT;
    for (int64_t t = 0; t < job->n_tokens; t += PACKED_TOKEN_CHUNK) {
        const int64_t n_t = job->n_tokens - t < PACKED_TOKEN_CHUNK ? job->n_tokens - t : PACKED_TOKEN_CHUNK;
        for (int64_t r = r0; r < r1; r += REPACK_ROWS) {
            k->gemm(n_in, packed_group(w, r), job->xq + t * nb, n_t, y + t * n_out + r, n_out);
        }
    }
}

/* Many tokens, exact path: dequantize MATMUL_ROWS weight rows at a time, then
 * take every token against all of them, so each token's activations are read
 * once per row tile (from L1) instead of once per row. */
static void matmul_many_tokens(const matmul_job *job, int thread, const kvs_tensor *w, float *y, int64_t r0, int64_t r1) {
    const kvs_type_kernels *kernels = kvs_type_kernels_find(w->type);
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    float *rows = job->cpu->row_scratch + (int64_t)thread * job->cpu->row_scratch_len * MATMUL_ROWS;
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
                        y[t * n_out + tile + r + k] = out[2 * k];
                        y[(t + 1) * n_out + tile + r + k] = out[2 * k + 1];
                    }
                }
            }
            for (int64_t tt = t; tt < t + 2 && tt < job->n_tokens; tt++) {
                for (int64_t rr = r; rr < n_rows; rr++) {
                    y[tt * n_out + tile + rr] = kvs_dot_f32(n_in, rows + rr * n_in, job->x + tt * n_in, job->cpu->impl);
                }
            }
        }
    }
}

/* Many tokens: packed groups, then the leftover rows on the original layout. */
static void matmul_many_tokens_fast(const matmul_job *job, int thread, const kvs_q8_kernels *q8, const kvs_tensor *w,
                                    float *y, int64_t r0, int64_t r1) {
    const kvs_repack_kernels *packed = packed_dot(job->cpu, w);
    if (packed) {
        const int64_t end = packed_end(w, r1);
        if (r0 < end) matmul_many_tokens_packed(job, packed, w, y, r0, end);
        r0 = r0 > end ? r0 : end;
    }
    if (r0 < r1) matmul_many_tokens_q8(job, thread, q8, w, y, r0, r1);
}

/* Units of rows the threads split: 8 rows, so a packed group never straddles
 * two threads (the last unit of a weight may be shorter). */
static int64_t row_units(const kvs_tensor *w) { return (w->ne[1] + REPACK_ROWS - 1) / REPACK_ROWS; }

/* Columns of a weight a thread keeps dequantized while it adds the outlier
 * terms: outliers recur in a few channels, so a batch reuses them. */
#define OUTLIER_COLUMNS 8
_Static_assert(OUTLIER_COLUMNS <= MATMUL_ROWS, "the columns live in a thread's row scratch");

/* out[r - r0] = w[r][j], read from the packed groups where the fast path
 * reads them (the original rows' pages may be dropped), else the original rows. */
static void weight_column(const kvs_cpu *cpu, const kvs_tensor *w, int64_t j, int64_t r0, int64_t r1, float *out) {
    const kvs_repack_kernels *packed = packed_dot(cpu, w);
    const int64_t split = packed ? (packed_end(w, r1) > r0 ? packed_end(w, r1) : r0) : r0;
    if (r0 < split) packed->column(w->packed, w->ne[0], j, r0, split, out);
    if (split < r1) kvs_q8_weight_column(w->type, w->data, w->row_bytes, j, split, r1, out + (split - r0));
}

/* The exact terms of the massive activations taken out of the tokens' rows
 * (act_q8.h): y[t][r] += x[t][j] * w[r][j] for rows r0..r1. */
static void add_outlier_terms(const matmul_job *job, int thread, const kvs_tensor *w, float *y, int64_t r0,
                              int64_t r1) {
    const int64_t n = r1 - r0;
    /* the thread's row scratch holds MATMUL_ROWS rows of at least n floats */
    float *columns = job->cpu->row_scratch + (int64_t)thread * job->cpu->row_scratch_len * MATMUL_ROWS;
    int64_t cached[OUTLIER_COLUMNS];
    for (int i = 0; i < OUTLIER_COLUMNS; i++) cached[i] = -1;
    for (int64_t t = 0; t < job->n_tokens; t++) {
        const act_outliers *o = &job->outliers[t];
        float *yt = y + t * w->ne[1] + r0;
        for (int32_t k = 0; k < o->n; k++) {
            const int slot = o->index[k] % OUTLIER_COLUMNS;
            float *column = columns + slot * n;
            if (cached[slot] != o->index[k]) {
                weight_column(job->cpu, w, o->index[k], r0, r1, column);
                cached[slot] = o->index[k];
            }
            const float v = o->value[k];
            for (int64_t r = 0; r < n; r++) yt[r] += v * column[r];
        }
    }
}

/* Threads split the rows of all the job's weights taken end to end. */
static void matmul_task(void *arg, int part, int n_parts, int thread) {
    const matmul_job *job = arg;
    int64_t n_units = 0;
    for (int i = 0; i < job->n_w; i++) n_units += row_units(job->w[i]);
    int64_t u0, u1;
    kvs_split_range(n_units, part, n_parts, &u0, &u1);
    for (int64_t i = 0, first = 0; i < job->n_w; first += row_units(job->w[i]), i++) {
        const kvs_tensor *w = job->w[i];
        const int64_t b = (u0 > first ? u0 - first : 0) * REPACK_ROWS;
        const int64_t e = (u1 - first) * REPACK_ROWS < w->ne[1] ? (u1 - first) * REPACK_ROWS : w->ne[1];
        if (b >= e) continue;
        const kvs_q8_kernels *q8 = fast_dot(job->cpu, w);
        if (job->n_tokens == 1) matmul_one_token(job, w, job->y[i], b, e);
        else if (q8) matmul_many_tokens_fast(job, thread, q8, w, job->y[i], b, e);
        else matmul_many_tokens(job, thread, w, job->y[i], b, e);
        if (q8 && job->outliers) add_outlier_terms(job, thread, w, job->y[i], b, e);
    }
}

static void quantize_task(void *arg, int part, int n_parts, int thread) {
    const matmul_job *job = arg;
    int64_t t0, t1;
    kvs_split_range(job->n_tokens, part, n_parts, &t0, &t1);
    kvs_quantize_act_fn quantize = kvs_quantize_act_kernel(job->cpu->impl);
    const int64_t nb = job->n_in / QK_ACT;
    kvs_cpu *cpu = job->cpu;
    quantize(job->x + t0 * job->n_in, cpu->act_scratch + t0 * nb, (t1 - t0) * job->n_in);
    if (!(cpu->outlier_ratio > 0.0f)) return;
    float *scratch = cpu->block_scratch + (int64_t)thread * (cpu->row_scratch_len / QK_ACT + 1);
    for (int64_t t = t0; t < t1; t++) {
        kvs_split_outliers(job->x + t * job->n_in, cpu->act_scratch + t * nb, job->n_in, cpu->outlier_ratio,
                           &cpu->outliers[t], scratch);
    }
}

/* Point the job at the tokens' outliers when there are any, and count them. */
static void collect_outliers(matmul_job *job) {
    kvs_cpu *cpu = job->cpu;
    if (!(cpu->outlier_ratio > 0.0f)) return;
    int64_t rows = 0, total = 0;
    for (int64_t t = 0; t < job->n_tokens; t++) {
        rows += cpu->outliers[t].n > 0;
        total += cpu->outliers[t].n;
    }
    cpu->n_outlier_rows += rows;
    cpu->n_outliers += total;
    if (total) job->outliers = cpu->outliers;
}

void kvs_matmul_shared(kvs_cpu *cpu, int n_w, const kvs_tensor *const *w, const float *x, int64_t n_tokens,
                       float *const *y) {
    matmul_job job = {cpu, n_w, w, y, x, NULL, NULL, n_tokens, w[0]->ne[0]};
    int any_fast = 0;
    for (int i = 0; i < n_w; i++) any_fast |= fast_dot(cpu, w[i]) != NULL;
    if (any_fast) {
        job.xq = cpu->act_scratch;
        if (n_tokens == 1) quantize_task(&job, 0, 1, 0);
        else kvs_threadpool_run(cpu->pool, quantize_task, &job);
        collect_outliers(&job);
    }
    kvs_threadpool_run(cpu->pool, matmul_task, &job);
}

typedef struct logits_job {
    const kvs_q16_kernels *k;
    const kvs_tensor *w;
    const block_q16_act *xq;
    float *y;
} logits_job;

/* y[r] for rows r0..r1 of w against 16-bit activations, four rows at a time. */
static void q16_rows(const kvs_q16_kernels *k, const kvs_tensor *w, const block_q16_act *xq, float *y, int64_t r0,
                     int64_t r1) {
    const uint8_t *base = w->data;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) k->dot4(w->ne[0], base + r * w->row_bytes, w->row_bytes, xq, y + r);
    for (; r < r1; r++) y[r] = k->dot(w->ne[0], base + r * w->row_bytes, xq);
}

static void logits_task(void *arg, int part, int n_parts, int thread) {
    (void)thread;
    const logits_job *job = arg;
    int64_t u0, u1; /* units of four rows */
    kvs_split_range((job->w->ne[1] + 3) / 4, part, n_parts, &u0, &u1);
    const int64_t r1 = 4 * u1 < job->w->ne[1] ? 4 * u1 : job->w->ne[1];
    if (4 * u0 < r1) q16_rows(job->k, job->w, job->xq, job->y, 4 * u0, r1);
}

void kvs_matmul_logits(kvs_cpu *cpu, const kvs_tensor *w, const float *x, int64_t n_tokens, float *y) {
    const kvs_q16_kernels *k = kvs_q16_kernels_find(w->type, cpu->impl);
    if (cpu->matmul != KVS_MATMUL_Q8 || n_tokens != 1 || !k || w->ne[0] % QK_ACT16) {
        kvs_cpu exact = *cpu;
        exact.matmul = KVS_MATMUL_F32;
        kvs_matmul(&exact, w, x, n_tokens, y);
        return;
    }
    kvs_quantize_act16_kernel(cpu->impl)(x, cpu->act16_scratch, w->ne[0]);
    logits_job job = {k, w, cpu->act16_scratch, y};
    kvs_threadpool_run(cpu->pool, logits_task, &job);
}

void kvs_matmul(kvs_cpu *cpu, const kvs_tensor *w, const float *x, int64_t n_tokens, float *y) {
    kvs_matmul_shared(cpu, 1, &w, x, n_tokens, &y);
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

void kvs_swiglu(float *gate, const float *up, int64_t n, int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) {
        kvs_swiglu_avx2(gate, up, n);
        return;
    }
#endif
    (void)impl;
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void kvs_geglu(float *gate, const float *up, int64_t n, int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) {
        kvs_geglu_avx2(gate, up, n);
        return;
    }
#endif
    (void)impl;
    /* GELU's tanh form, as Gemma was trained with (gelu_pytorch_tanh) */
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        gate[i] = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g))) * up[i];
    }
}

void kvs_softcap(float *x, int64_t n, float cap) {
    const float inv = 1.0f / cap;
    for (int64_t i = 0; i < n; i++) x[i] = cap * tanhf(x[i] * inv);
}

void kvs_add_bias(float *y, const float *b, int64_t n) {
    if (!b) return;
    for (int64_t i = 0; i < n; i++) y[i] += b[i];
}

/* ---- the fast path's product for tests (kvsink.h) --------------------------- */

/* The test entries' common checks: buffers, sizes (n a multiple of the
 * 32-value activation blocks and of the weight blocks), and impl resolved. */
static kvs_status check_product_args(const char *who, const kvs_type_layout_info *info, const void *rows,
                                     int64_t n_rows, int64_t n, const float *x, int64_t n_tokens, const float *out,
                                     int32_t *impl) {
    if (!rows || !x || !out || n_rows < 1 || n_tokens < 1 || n < QK_ACT || n % QK_ACT || n % info->block_elems) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: NULL buffer or bad sizes (n %lld, rows %lld, tokens %lld)", who,
                        (long long)n, (long long)n_rows, (long long)n_tokens);
    }
    if (*impl == KVS_IMPL_AVX2 && !kvs_avx2_available()) return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: no AVX2", who);
    if (*impl == KVS_IMPL_AUTO) *impl = kvs_avx2_available() ? KVS_IMPL_AVX2 : KVS_IMPL_SCALAR;
    return KVS_OK;
}

kvs_status kvs_matmul_q8(int32_t type, int32_t impl, float outlier_ratio, const void *rows, int64_t n_rows, int64_t n,
                         const float *x, int64_t n_tokens, float *out) {
    const kvs_type_layout_info *info = kvs_type_layout_find(type);
    if (!info) return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_matmul_q8: unsupported tensor type id %d", (int)type);
    kvs_status st = check_product_args("kvs_matmul_q8", info, rows, n_rows, n, x, n_tokens, out, &impl);
    if (st != KVS_OK) return st;
    if (!kvs_q8_kernels_find(type, impl)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_matmul_q8: %s has no integer dot", info->name);
    }
    if (!(outlier_ratio >= 0.0f)) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_matmul_q8: outlier_ratio < 0");
    kvs_tensor w = {rows, type, {n, n_rows, 1, 1}, n / info->block_elems * info->block_bytes, NULL};
    kvs_cpu cpu = {.impl = impl, .matmul = KVS_MATMUL_Q8, .row_scratch_len = n, .outlier_ratio = outlier_ratio};
    /* packed like a model's layer weights, so tests cover that path too */
    const size_t packed_bytes = kvs_repack_bytes(type, n_rows, n);
    void *packed = packed_bytes ? malloc(packed_bytes) : NULL;
    cpu.row_scratch_len = n > n_rows ? n : n_rows; /* quads of a row, or the outliers' columns */
    cpu.row_scratch = malloc((size_t)(MATMUL_ROWS * cpu.row_scratch_len) * sizeof(float));
    cpu.act_scratch = malloc((size_t)(n_tokens * (n / QK_ACT)) * sizeof(block_q8_act));
    cpu.outliers = malloc((size_t)n_tokens * sizeof(act_outliers));
    cpu.block_scratch = malloc((size_t)(n / QK_ACT + 1) * sizeof(float));
    st = cpu.row_scratch && cpu.act_scratch && cpu.outliers && cpu.block_scratch && (packed || !packed_bytes)
             ? kvs_threadpool_create(1, &cpu.pool)
             : kvs_fail(KVS_ERR_OUT_OF_MEMORY, "kvs_matmul_q8: no memory");
    if (st == KVS_OK && packed) st = kvs_repack(type, rows, w.row_bytes, n_rows, n, packed);
    w.packed = packed;
    if (st == KVS_OK) kvs_matmul(&cpu, &w, x, n_tokens, out);
    kvs_threadpool_free(cpu.pool);
    free(packed);
    free(cpu.row_scratch);
    free(cpu.act_scratch);
    free(cpu.outliers);
    free(cpu.block_scratch);
    return st;
}

kvs_status kvs_matmul_q16(int32_t type, int32_t impl, const void *rows, int64_t n_rows, int64_t n, const float *x,
                          int64_t n_tokens, float *out) {
    const kvs_type_layout_info *info = kvs_type_layout_find(type);
    if (!info || !kvs_q16_kernels_find(type, KVS_IMPL_SCALAR)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kvs_matmul_q16: tensor type id %d has no 16-bit dot", (int)type);
    }
    kvs_status st = check_product_args("kvs_matmul_q16", info, rows, n_rows, n, x, n_tokens, out, &impl);
    if (st != KVS_OK) return st;
    const kvs_q16_kernels *k = kvs_q16_kernels_find(type, impl);
    block_q16_act *xq = malloc((size_t)(n / QK_ACT16) * sizeof(block_q16_act));
    if (!xq) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "kvs_matmul_q16: no memory");
    kvs_tensor w = {rows, type, {n, n_rows, 1, 1}, n / QK8_0 * (int64_t)sizeof(block_q8_0), NULL};
    for (int64_t t = 0; t < n_tokens; t++) {
        kvs_quantize_act16_kernel(impl)(x + t * n, xq, n);
        q16_rows(k, &w, xq, out + t * n_rows, 0, n_rows);
    }
    free(xq);
    return KVS_OK;
}
