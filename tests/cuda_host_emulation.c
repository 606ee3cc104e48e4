/* cuda_host_emulation.c - a test-only stand-in for the CUDA side of a
 * KVSINK_CUDA build (kernels_cuda.cu, kv_cuda.cu, cuda_memory.cu,
 * cuda_device.cu) that runs on the host: "device" memory is malloc'd,
 * copies are memcpy, and each weight-kernel launcher calls the CPU kernel
 * it is the twin of. Linked with the C core and the *_cuda.c glue
 * (tests/test_cuda_glue.py builds it), it lets the CUDA backend's glue -
 * the weight upload and lookup, the KV cache moved to the device, its
 * segment tables and commits, the logits in chunks, the sink predictor's
 * copy - run and be compared with the CPU on a machine without a GPU. The
 * KV cache's launchers run kv_cuda_math.h, the very per-thread code of
 * kv_cuda.cu's kernels, over the same index spaces; the weight kernels
 * themselves are test_cuda.py's (on a GPU).
 * "Device" allocations are registered, and every pointer a launcher or a
 * copy gets must lie on the side it claims: a host pointer handed to a
 * kernel (which a real GPU would fault on) fails the call here. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_memory.h"
#include "formats.h"
#include "kernels_cuda.h"
#include "kv_cuda.h"

/* kv_cuda.cu's block attention: a phase runs for each of the block's
 * threads in turn, which is what the barrier after it guarantees on a GPU */
#define EMULATED_THREADS 128
#define KVD_PHASE(fn, ...)                                                             \
    do {                                                                               \
        for (int32_t tid_ = 0; tid_ < EMULATED_THREADS; tid_++) fn(__VA_ARGS__, tid_, EMULATED_THREADS); \
    } while (0)
#define EMULATED_SHARED_MEMORY (227 * 1024) /* an H200's block, opted in */
/* Few blocks, so that a block goes through many segments (its running
 * softmax rescales) and a decode still merges several parts. */
#define EMULATED_TARGET_BLOCKS 5
#include "kv_cuda_math.h"
#include "ops.h"
#include "status.h"

/* ---- cuda_device.cu's public entries --------------------------------------- */

int32_t kvs_cuda_built(void) { return 1; }
kvs_status kvs_cuda_check(void) { return KVS_OK; }

#define EMULATED kvs_fail(KVS_ERR_UNSUPPORTED, "the host emulation of CUDA has no test entries (test_cuda.py)")

kvs_status kvs_cuda_dequantize(int32_t type, const void *src, int64_t n, float *dst) { return EMULATED; }
kvs_status kvs_cuda_matmul(int32_t type, const void *rows, int64_t n_rows, int64_t n, const float *x,
                           int64_t n_tokens, float *out) {
    return EMULATED;
}
kvs_status kvs_cuda_rmsnorm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps, float *out) {
    return EMULATED;
}
kvs_status kvs_cuda_rope(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot, int32_t neox,
                         const int32_t *positions, float freq_base, float freq_scale, const float *freq_factors) {
    return EMULATED;
}
kvs_status kvs_cuda_glu(int32_t gelu, float *gate, const float *up, int64_t n) { return EMULATED; }

/* ---- "device" memory ---------------------------------------------------------- */

#define MAX_ALLOCATIONS 8192

static struct { const uint8_t *base; size_t bytes; } allocations[MAX_ALLOCATIONS];
static int n_allocations;
static pthread_mutex_t allocations_lock = PTHREAD_MUTEX_INITIALIZER;

/* Whether [p, p + bytes) lies inside one "device" allocation. */
static int on_device(const void *p, size_t bytes) {
    pthread_mutex_lock(&allocations_lock);
    int found = 0;
    for (int i = 0; i < n_allocations && !found; i++) {
        const uint8_t *b = allocations[i].base;
        found = (const uint8_t *)p >= b && (const uint8_t *)p + bytes <= b + allocations[i].bytes;
    }
    pthread_mutex_unlock(&allocations_lock);
    return found;
}

#define DEVICE(p, bytes)                                                                                 \
    do {                                                                                                 \
        if (!on_device((p), (size_t)(bytes)))                                                            \
            return kvs_fail(KVS_ERR_INTERNAL, "%s: %s (%zu bytes) is not device memory", __func__, #p,  \
                            (size_t)(bytes));                                                            \
    } while (0)

kvs_status kvs_cuda_alloc(void **ptr, size_t bytes, const char *what) {
    *ptr = malloc(bytes ? bytes : 1);
    if (!*ptr) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "emulated cudaMalloc of %zu bytes for %s", bytes, what);
    pthread_mutex_lock(&allocations_lock);
    const int room = n_allocations < MAX_ALLOCATIONS;
    if (room) {
        allocations[n_allocations].base = *ptr;
        allocations[n_allocations++].bytes = bytes;
    }
    pthread_mutex_unlock(&allocations_lock);
    if (room) return KVS_OK;
    free(*ptr);
    *ptr = NULL;
    return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "the emulation keeps at most %d allocations", MAX_ALLOCATIONS);
}

void kvs_cuda_release(void *ptr) {
    if (!ptr) return;
    pthread_mutex_lock(&allocations_lock);
    for (int i = 0; i < n_allocations; i++) {
        if (allocations[i].base == ptr) {
            allocations[i] = allocations[--n_allocations];
            break;
        }
    }
    pthread_mutex_unlock(&allocations_lock);
    free(ptr);
}

kvs_status kvs_cuda_to_device(void *dst, const void *src, size_t bytes) {
    DEVICE(dst, bytes);
    if (on_device(src, 1)) return kvs_fail(KVS_ERR_INTERNAL, "kvs_cuda_to_device: the source is device memory");
    memcpy(dst, src, bytes);
    return KVS_OK;
}

kvs_status kvs_cuda_to_host(void *dst, const void *src, size_t bytes) {
    DEVICE(src, bytes);
    if (on_device(dst, 1)) return kvs_fail(KVS_ERR_INTERNAL, "kvs_cuda_to_host: the destination is device memory");
    memcpy(dst, src, bytes);
    return KVS_OK;
}

kvs_status kvs_cuda_copy(void *dst, const void *src, size_t bytes) {
    DEVICE(dst, bytes);
    DEVICE(src, bytes);
    memcpy(dst, src, bytes);
    return KVS_OK;
}

/* Pinned host memory is host memory; streams are one; copies run at once. */
kvs_status kvs_cuda_alloc_host(void **ptr, size_t bytes, const char *what) {
    *ptr = malloc(bytes ? bytes : 1);
    return *ptr ? KVS_OK : kvs_fail(KVS_ERR_OUT_OF_MEMORY, "emulated cudaMallocHost of %zu bytes for %s", bytes, what);
}
void kvs_cuda_release_host(void *ptr) { free(ptr); }
kvs_status kvs_cuda_to_device_async(void *dst, const void *src, size_t bytes, void *stream) {
    return kvs_cuda_to_device(dst, src, bytes);
}
kvs_status kvs_cuda_to_host_async(void *dst, const void *src, size_t bytes, void *stream) {
    return kvs_cuda_to_host(dst, src, bytes);
}
kvs_status kvs_cuda_sync(void *stream) { return KVS_OK; }
kvs_status kvs_cuda_stream_create(void **stream) {
    *stream = NULL;
    return KVS_OK;
}
void kvs_cuda_stream_free(void *stream) {}

/* Launches here run as they are called: nothing can be recorded, so the
 * backend's fallback (a step run launch by launch) is what runs. */
kvs_status kvs_cuda_capture_begin(void *stream) {
    return kvs_fail(KVS_ERR_UNSUPPORTED, "the host emulation cannot record graphs");
}
kvs_status kvs_cuda_capture_end(void *stream, kvs_cuda_graph **exec) {
    return kvs_fail(KVS_ERR_UNSUPPORTED, "the host emulation cannot record graphs");
}
kvs_status kvs_cuda_graph_launch(kvs_cuda_graph *exec, void *stream) {
    return kvs_fail(KVS_ERR_UNSUPPORTED, "the host emulation cannot record graphs");
}
void kvs_cuda_graph_free(kvs_cuda_graph *exec) {}

/* ---- kernels_cuda.cu's launchers: the CPU twins --------------------------- */

int kvs_cuda_type_supported(int32_t type) { return kvs_type_kernels_find(type) != NULL; }

kvs_status kvs_cuda_dequantize_rows(int32_t type, const void *src, int64_t row_bytes, int64_t n_rows, int64_t n,
                                    float *dst, void *stream) {
    DEVICE(src, row_bytes * n_rows);
    DEVICE(dst, n_rows * n * sizeof(float));
    for (int64_t r = 0; r < n_rows; r++) {
        kvs_type_kernels_find(type)->dequantize((const uint8_t *)src + r * row_bytes, dst + r * n, n);
    }
    return KVS_OK;
}

kvs_status kvs_cuda_get_rows(int32_t type, const void *src, int64_t row_bytes, int64_t n, const int32_t *ids,
                             int64_t n_ids, float *dst, void *stream) {
    DEVICE(ids, n_ids * sizeof(int32_t));
    DEVICE(dst, n_ids * n * sizeof(float));
    for (int64_t i = 0; i < n_ids; i++) {
        DEVICE((const uint8_t *)src + ids[i] * row_bytes, row_bytes);
        kvs_type_kernels_find(type)->dequantize((const uint8_t *)src + ids[i] * row_bytes, dst + i * n, n);
    }
    return KVS_OK;
}

kvs_status kvs_cuda_matmul_f32(int32_t type, const void *w, int64_t row_bytes, int64_t n_rows, int64_t n,
                               const float *x, int64_t n_tokens, float *y, void *stream) {
    DEVICE(w, row_bytes * n_rows);
    DEVICE(x, n_tokens * n * sizeof(float));
    DEVICE(y, n_tokens * n_rows * sizeof(float));
    const kvs_vec_dot_fn dot = kvs_vec_dot_kernel(type, KVS_IMPL_AUTO);
    for (int64_t t = 0; t < n_tokens; t++) {
        for (int64_t r = 0; r < n_rows; r++) y[t * n_rows + r] = dot(n, (const uint8_t *)w + r * row_bytes, x + t * n);
    }
    return KVS_OK;
}

kvs_status kvs_cuda_rmsnorm_rows(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                                 float *out, void *stream) {
    DEVICE(x, n_rows * n * sizeof(float));
    DEVICE(weight, n * sizeof(float));
    DEVICE(out, n_rows * n * sizeof(float));
    for (int64_t r = 0; r < n_rows; r++) kvs_rmsnorm(x + r * n, weight, n, eps, out + r * n);
    return KVS_OK;
}

kvs_status kvs_cuda_rope_rows(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot,
                              int32_t neox, const int32_t *positions, float freq_base, float freq_scale,
                              const float *freq_factors, void *stream) {
    return kvs_fail(KVS_ERR_UNSUPPORTED, "the CUDA backend does not rotate on the device yet");
}

kvs_status kvs_cuda_glu_rows(int32_t gelu, float *gate, const float *up, int64_t n, void *stream) {
    DEVICE(gate, n * sizeof(float));
    DEVICE(up, n * sizeof(float));
    if (gelu) kvs_geglu(gate, up, n, KVS_IMPL_SCALAR);
    else kvs_swiglu(gate, up, n, KVS_IMPL_SCALAR);
    return KVS_OK;
}

kvs_status kvs_cuda_add(float *x, const float *y, int64_t n, void *stream) {
    DEVICE(x, n * sizeof(float));
    DEVICE(y, n * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
    return KVS_OK;
}

kvs_status kvs_cuda_add_bias_rows(float *y, const float *b, int64_t n_rows, int64_t n, void *stream) {
    DEVICE(y, n_rows * n * sizeof(float));
    DEVICE(b, n * sizeof(float));
    for (int64_t r = 0; r < n_rows; r++) kvs_add_bias(y + r * n, b, n);
    return KVS_OK;
}

kvs_status kvs_cuda_scale(float *x, float s, int64_t n, void *stream) {
    DEVICE(x, n * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] *= s;
    return KVS_OK;
}

kvs_status kvs_cuda_softcap(float *x, float cap, int64_t n, void *stream) {
    DEVICE(x, n * sizeof(float));
    kvs_softcap(x, n, cap);
    return KVS_OK;
}

kvs_status kvs_cuda_channel_max(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *channels,
                                int32_t n_channels, float *top, void *stream) {
    DEVICE(x, n_tokens * n_embd * sizeof(float));
    DEVICE(channels, n_channels * sizeof(int32_t));
    DEVICE(top, n_tokens * sizeof(float));
    for (int64_t t = 0; t < n_tokens; t++) {
        top[t] = 0.0f;
        for (int32_t i = 0; i < n_channels; i++) top[t] = fmaxf(top[t], fabsf(x[t * n_embd + channels[i]]));
    }
    return KVS_OK;
}

/* ---- kv_cuda.cu's launchers: kv_cuda_math.h over the kernels' index spaces -- */

static kvs_status check_cache(const kvs_kv_dev *g) {
    DEVICE(g->win_k, 1);
    DEVICE(g->win_v, 1);
    DEVICE(g->sink_k, 1);
    DEVICE(g->sink_v, 1);
    DEVICE(g->blocks, 1);
    DEVICE(g->lblocks, 1);
    DEVICE(g->window, g->n_layer * sizeof(int32_t));
    DEVICE(g->layer_index, g->n_layer * sizeof(int32_t));
    DEVICE(g->pair_a, 4);
    DEVICE(g->pair_b, 4);
    DEVICE(g->rel_cos[0], 4);
    DEVICE(g->blk_sin[0], 4);
    return KVS_OK;
}

kvs_status kvs_cuda_kv_store(const kvs_kv_dev *g, int32_t il, int32_t n_past, int32_t n_tokens, const float *k,
                             const float *v, void *stream) {
    kvs_status st = check_cache(g);
    if (st != KVS_OK) return st;
    const int64_t kv_dim = (int64_t)g->n_kv * g->hd;
    DEVICE(k, n_tokens * kv_dim * sizeof(float));
    DEVICE(v, n_tokens * kv_dim * sizeof(float));
    for (int64_t i = 0; i < n_tokens * kv_dim; i++) kvd_store(g, il, n_past, (int32_t)(i / kv_dim), i % kv_dim, k, v);
    return KVS_OK;
}

kvs_status kvs_cuda_kv_encode_block(const kvs_kv_dev *g, int32_t o0, int32_t slot, int32_t lslot, uint64_t skip,
                                    float *tile, void *stream) {
    kvs_status st = check_cache(g);
    if (st != KVS_OK) return st;
    const int64_t per_kind = (int64_t)g->n_layer * g->n_kv * g->B;
    DEVICE(tile, 2 * per_kind * g->hd * sizeof(float));
    for (int64_t i = 0; i < 2 * per_kind; i++) {
        const int is_key = i < per_kind;
        const int64_t j = i % per_kind;
        const int32_t t = (int32_t)(j % g->B), h = (int32_t)(j / g->B % g->n_kv), il = (int32_t)(j / g->B / g->n_kv);
        kvd_load_tile_row(g, o0, il, h, t, is_key, kvd_tile_row(g, tile, is_key, il, h, t));
    }
    const int32_t ku = kvd_encode_units(g, 1), vu = kvd_encode_units(g, 0);
    for (int64_t i = 0; i < (int64_t)g->n_layer * g->n_kv * (ku + vu); i++) {
        const int32_t u = (int32_t)(i % (ku + vu)), h = (int32_t)(i / (ku + vu) % g->n_kv);
        const int32_t il = (int32_t)(i / (ku + vu) / g->n_kv), is_key = u < ku;
        uint8_t *data = kvd_block(g, slot, lslot, il, h) + (is_key ? 0 : g->k_bytes);
        DEVICE(data, is_key ? g->k_bytes : g->v_bytes);
        kvd_encode_unit(g, kvd_tile_row(g, tile, is_key, il, h, 0), skip, is_key, is_key ? u : u - ku, data);
    }
    return KVS_OK;
}

kvs_status kvs_cuda_kv_requantize_keys(const kvs_kv_dev *g, int32_t r, int32_t slot, int32_t lslot, int32_t t,
                                       uint64_t skip, float *tile, void *stream) {
    kvs_status st = check_cache(g);
    if (st != KVS_OK) return st;
    const int64_t rows = (int64_t)g->n_layer * g->n_kv;
    DEVICE(tile, rows * g->hd * sizeof(float));
    for (int64_t i = 0; i < rows; i++) {
        const int32_t il = (int32_t)(i / g->n_kv), h = (int32_t)(i % g->n_kv);
        float *row = tile + i * g->hd;
        const int64_t index = kvd_row_index(g, r, il, h);
        for (int32_t d = 0; d < g->hd; d++) row[d] = kvd_row_elem(g, g->sink_k, index + d);
        if (g->rot_k) kvd_rotate_key_row(g, kvd_kind(g, il), row, t);
    }
    for (int64_t i = 0; i < rows * g->hd; i++) {
        const int32_t d = (int32_t)(i % g->hd), h = (int32_t)(i / g->hd % g->n_kv), il = (int32_t)(i / g->hd / g->n_kv);
        if (kvd_trimmed(g, il) && lslot < 0) continue;
        uint8_t *data = kvd_block(g, slot, lslot, il, h);
        DEVICE(data, g->k_bytes);
        kvd_requantize_channel(g, data, tile + (i / g->hd) * g->hd, t, d, skip);
    }
    return KVS_OK;
}

kvs_status kvs_cuda_kv_attend(const kvs_kv_dev *g, kvs_kv_attend_args *a, void *stream) {
    kvs_status st = check_cache(g);
    if (st != KVS_OK) return st;
    const int32_t group = a->n_head / g->n_kv;
    const int32_t tq = kvd_tokens_per_block(group, a->n_tokens, g->hd, g->B, EMULATED_SHARED_MEMORY);
    if (tq == 0) return kvs_fail(KVS_ERR_UNSUPPORTED, "kv_attend: the tile does not fit shared memory");
    a->n_parts = kvd_parts(a, g->n_kv, tq, EMULATED_TARGET_BLOCKS);
    const int64_t rec = g->hd + 2, n = (int64_t)a->n_tokens * a->n_head * a->n_parts;
    DEVICE(a->segs, a->n_segs * sizeof(kvs_kv_seg));
    DEVICE(a->q, ((a->n_tokens - 1) * a->q_stride + (int64_t)a->n_head * g->hd) * sizeof(float));
    DEVICE(a->out, ((a->n_tokens - 1) * a->q_stride + (int64_t)a->n_head * g->hd) * sizeof(float));
    DEVICE(a->partial, n * rec * sizeof(float));
    float *smem = malloc((size_t)kvd_tile_floats(g->hd, g->B, tq * group) * sizeof(float));
    if (!smem) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "emulated shared memory");
    const int64_t blocks = (int64_t)g->n_kv * a->n_parts * kvd_token_tiles(a->n_tokens, tq);
    for (int64_t b = 0; b < blocks; b++) {
        const kvd_job j = kvd_job_of(g, a, b, tq);
        kvd_tile t = kvd_tile_carve(smem, g->hd, g->B, j.n_queries);
        kvd_attend_block(g, a, &j, &t);
    }
    free(smem);
    for (int64_t i = 0; i < (int64_t)a->n_tokens * a->n_head * g->hd; i++) {
        const int32_t d = (int32_t)(i % g->hd), hq = (int32_t)(i / g->hd % a->n_head), t = (int32_t)(i / g->hd / a->n_head);
        const int64_t head = (int64_t)t * a->n_head + hq;
        a->out[t * a->q_stride + (int64_t)hq * g->hd + d] = kvd_combine_elem(g->hd, a->n_parts, a->partial + head * a->n_parts * rec, d);
    }
    return KVS_OK;
}
