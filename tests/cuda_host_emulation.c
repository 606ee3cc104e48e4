/* cuda_host_emulation.c - a test-only stand-in for the CUDA side of a
 * KVSINK_CUDA build (kernels_cuda.cu, cuda_memory.cu, cuda_device.cu) that
 * runs on the host: "device" memory is malloc'd, copies are memcpy, and each
 * launcher calls the CPU kernel it is the twin of. Linked with the C core
 * and backend_cuda.c (tests/test_cuda_glue.py builds it), it lets the CUDA
 * backend's glue - the weight upload and lookup, the buffers moved to the
 * device and back for the CPU attention, the logits in chunks, the sink
 * predictor's copy - run and be compared with the CPU on a machine without
 * a GPU. It says nothing about the CUDA kernels themselves (test_cuda.py).
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
