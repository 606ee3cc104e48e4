/* cuda_device.cu - the CUDA device: can it run here (kvs_cuda_check, probed
 * once), CUDA errors as kvs_status, and the public test entries of the CUDA
 * kernels (kvsink.h), which upload host buffers, run a launcher of
 * kernels_cuda.h on device 0, download and free everything on every path.
 * A build without CUDA compiles cuda_absent.c instead of this file. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_memory.h"
#include "kernels_cuda.h"

extern "C" {
#include "status.h"
}

/* ---- errors ------------------------------------------------------------------ */

kvs_status kvs_cuda_fail(cudaError_t e, const char *what) {
    const kvs_status st = e == cudaErrorMemoryAllocation ? KVS_ERR_OUT_OF_MEMORY : KVS_ERR_INTERNAL;
    return kvs_fail(st, "CUDA %s: %s", what, cudaGetErrorString(e));
}

kvs_status kvs_cuda_launched(const char *kernel) {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, kernel);
}

/* ---- can CUDA run here? --------------------------------------------------------- */

static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static kvs_status probe_status = KVS_ERR_UNSUPPORTED;
static char probe_reason[512];

static __global__ void probe_kernel(void) {}

/* Why cudaGetDeviceCount failed: no driver at all, or one too old. */
static void explain_no_devices(cudaError_t e) {
    int driver = 0;
    cudaDriverGetVersion(&driver); /* 0 when no driver is installed */
    if (e == cudaErrorNoDevice) {
        snprintf(probe_reason, sizeof probe_reason, "CUDA: no CUDA device (cudaGetDeviceCount: %s)",
                 cudaGetErrorString(e));
    } else if (e == cudaErrorInsufficientDriver && driver == 0) {
        snprintf(probe_reason, sizeof probe_reason, "CUDA: no NVIDIA driver on this machine (cudaGetDeviceCount: %s)",
                 cudaGetErrorString(e));
    } else if (e == cudaErrorInsufficientDriver) {
        snprintf(probe_reason, sizeof probe_reason,
                 "CUDA: the NVIDIA driver supports CUDA %d.%d, older than this build's runtime %d.%d (update the "
                 "driver)",
                 driver / 1000, driver % 1000 / 10, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
    } else {
        snprintf(probe_reason, sizeof probe_reason, "CUDA: cannot use the GPU (cudaGetDeviceCount: %s)",
                 cudaGetErrorString(e));
    }
}

/* A kernel that does not launch on device 0: most often a build for another
 * architecture ("no kernel image is available for execution on the device"). */
static void explain_probe_failure(cudaError_t e) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
        snprintf(probe_reason, sizeof probe_reason, "CUDA: a test kernel failed on device 0: %s",
                 cudaGetErrorString(e));
    } else if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) {
        snprintf(probe_reason, sizeof probe_reason,
                 "CUDA: this build has no kernels for %s (compute capability %d.%d); rebuild with "
                 "-DCMAKE_CUDA_ARCHITECTURES=%d%d",
                 prop.name, prop.major, prop.minor, prop.major, prop.minor);
    } else {
        snprintf(probe_reason, sizeof probe_reason, "CUDA: a test kernel failed on %s: %s", prop.name,
                 cudaGetErrorString(e));
    }
}

static void probe(void) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count < 1) {
        explain_no_devices(e == cudaSuccess ? cudaErrorNoDevice : e);
        return;
    }
    e = cudaSetDevice(0);
    if (e == cudaSuccess) {
        probe_kernel<<<1, 1, 0, 0>>>();
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        explain_probe_failure(e);
        return;
    }
    probe_status = KVS_OK;
}

kvs_status kvs_cuda_check(void) {
    pthread_once(&probe_once, probe);
    if (probe_status != KVS_OK) return kvs_fail(KVS_ERR_UNSUPPORTED, "%s", probe_reason);
    return KVS_OK;
}

int32_t kvs_cuda_built(void) { return 1; }

/* ---- the test entries ------------------------------------------------------------ */

/* Device buffers of one call, freed together whatever happens. */
typedef struct dev_scope {
    void *buf[4];
    int n;
} dev_scope;

static kvs_status dev_alloc(dev_scope *s, size_t bytes, void **out) {
    kvs_status st = kvs_cuda_alloc(out, bytes, "a test entry's buffer");
    if (st == KVS_OK) s->buf[s->n++] = *out;
    return st;
}

/* A device copy of bytes at host (NULL host: nothing, *out = NULL). */
static kvs_status dev_upload(dev_scope *s, const void *host, size_t bytes, void **out) {
    *out = NULL;
    if (!host) return KVS_OK;
    kvs_status st = dev_alloc(s, bytes, out);
    return st == KVS_OK ? kvs_cuda_to_device(*out, host, bytes) : st;
}

/* After a launch with status st: wait for it, copy bytes of dev to host,
 * free every buffer. The first failure is the one reported. */
static kvs_status dev_finish(dev_scope *s, kvs_status st, void *host, const void *dev, size_t bytes) {
    if (st == KVS_OK) {
        const cudaError_t e = cudaStreamSynchronize(0);
        if (e != cudaSuccess) st = kvs_cuda_fail(e, "kernel");
    }
    if (st == KVS_OK) {
        const cudaError_t e = cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess) st = kvs_cuda_fail(e, "cudaMemcpy to the host");
    }
    for (int i = 0; i < s->n; i++) kvs_cuda_release(s->buf[i]);
    s->n = 0;
    return st;
}

/* Ready to run: CUDA usable, device 0 current for this thread. */
static kvs_status begin(void) {
    kvs_status st = kvs_cuda_check();
    if (st != KVS_OK) return st;
    const cudaError_t e = cudaSetDevice(0);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "cudaSetDevice(0)");
}

/* a * b elements of unit bytes: a buffer size, checked for overflow. */
static kvs_status size_of(const char *who, int64_t a, int64_t b, int64_t unit, size_t *out) {
    if (a <= 0 || b <= 0 || a > INT64_MAX / b || a * b > INT64_MAX / unit) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: %lld x %lld elements is not a valid buffer size", who,
                        (long long)a, (long long)b);
    }
    *out = (size_t)(a * b * unit);
    return KVS_OK;
}

/* The weight checks of the entries (the launchers repeat them on device
 * pointers): a known type and n a positive block multiple; bytes per row. */
static kvs_status weight_rows(const char *who, int32_t type, const void *rows, int64_t n, int64_t *row_bytes) {
    int64_t block_elems = 0, block_bytes = 0;
    if (kvs_type_layout(type, &block_elems, &block_bytes) != KVS_OK || !kvs_cuda_type_supported(type)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: unsupported tensor type id %d", who, (int)type);
    }
    if (n <= 0 || n % block_elems != 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: n = %lld is not a positive multiple of the %s block size %lld",
                        who, (long long)n, kvs_type_name(type), (long long)block_elems);
    }
    if (!rows) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: the %s data pointer is NULL", who, kvs_type_name(type));
    *row_bytes = n / block_elems * block_bytes;
    return KVS_OK;
}

kvs_status kvs_cuda_dequantize(int32_t type, const void *src, int64_t n, float *dst) {
    kvs_clear_error();
    int64_t row_bytes = 0;
    size_t out_bytes = 0;
    kvs_status st = weight_rows("kvs_cuda_dequantize", type, src, n, &row_bytes);
    if (st == KVS_OK && !dst) st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_cuda_dequantize: dst is NULL");
    if (st == KVS_OK) st = size_of("kvs_cuda_dequantize", n, 1, sizeof(float), &out_bytes);
    if (st == KVS_OK) st = begin();
    if (st != KVS_OK) return st;
    dev_scope s = {{NULL}, 0};
    void *d_src = NULL, *d_dst = NULL;
    st = dev_upload(&s, src, (size_t)row_bytes, &d_src);
    if (st == KVS_OK) st = dev_alloc(&s, out_bytes, &d_dst);
    if (st == KVS_OK) st = kvs_cuda_dequantize_rows(type, d_src, row_bytes, 1, n, (float *)d_dst, NULL);
    return dev_finish(&s, st, dst, d_dst, out_bytes);
}

kvs_status kvs_cuda_matmul(int32_t type, const void *rows, int64_t n_rows, int64_t n, const float *x,
                           int64_t n_tokens, float *out) {
    kvs_clear_error();
    const char *who = "kvs_cuda_matmul";
    int64_t row_bytes = 0;
    size_t w_bytes = 0, x_bytes = 0, y_bytes = 0;
    kvs_status st = weight_rows(who, type, rows, n, &row_bytes);
    if (st == KVS_OK && (!x || !out)) st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: x or out is NULL", who);
    if (st == KVS_OK) st = size_of(who, n_rows, row_bytes, 1, &w_bytes);
    if (st == KVS_OK) st = size_of(who, n_tokens, n, sizeof(float), &x_bytes);
    if (st == KVS_OK) st = size_of(who, n_tokens, n_rows, sizeof(float), &y_bytes);
    if (st == KVS_OK) st = begin();
    if (st != KVS_OK) return st;
    dev_scope s = {{NULL}, 0};
    void *d_w = NULL, *d_x = NULL, *d_y = NULL;
    st = dev_upload(&s, rows, w_bytes, &d_w);
    if (st == KVS_OK) st = dev_upload(&s, x, x_bytes, &d_x);
    if (st == KVS_OK) st = dev_alloc(&s, y_bytes, &d_y);
    if (st == KVS_OK) {
        st = kvs_cuda_matmul_f32(type, d_w, row_bytes, n_rows, n, (const float *)d_x, n_tokens, (float *)d_y, NULL);
    }
    return dev_finish(&s, st, out, d_y, y_bytes);
}

kvs_status kvs_cuda_rmsnorm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps, float *out) {
    kvs_clear_error();
    const char *who = "kvs_cuda_rmsnorm";
    size_t x_bytes = 0, w_bytes = 0;
    kvs_status st = KVS_OK;
    if (!x || !weight || !out) st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: x, weight or out is NULL", who);
    if (st == KVS_OK) st = size_of(who, n_rows, n, sizeof(float), &x_bytes);
    if (st == KVS_OK) st = size_of(who, 1, n, sizeof(float), &w_bytes);
    if (st == KVS_OK) st = begin();
    if (st != KVS_OK) return st;
    dev_scope s = {{NULL}, 0};
    void *d_x = NULL, *d_w = NULL;
    st = dev_upload(&s, x, x_bytes, &d_x);
    if (st == KVS_OK) st = dev_upload(&s, weight, w_bytes, &d_w);
    /* in place on the device: the output overwrites the uploaded x */
    if (st == KVS_OK) {
        st = kvs_cuda_rmsnorm_rows((const float *)d_x, (const float *)d_w, n_rows, n, eps, (float *)d_x, NULL);
    }
    return dev_finish(&s, st, out, d_x, x_bytes);
}

kvs_status kvs_cuda_rope(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot, int32_t neox,
                         const int32_t *positions, float freq_base, float freq_scale, const float *freq_factors) {
    kvs_clear_error();
    const char *who = "kvs_cuda_rope";
    size_t x_bytes = 0, p_bytes = 0;
    kvs_status st = KVS_OK;
    if (!x || !positions) st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: x or positions is NULL", who);
    if (st == KVS_OK && (n_rot <= 0 || n_rot % 2 != 0 || n_rot > head_dim)) {
        st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: n_rot = %d is not an even number in 2..head_dim (%d)", who,
                      (int)n_rot, (int)head_dim);
    }
    if (st == KVS_OK && (n_heads <= 0 || head_dim <= 0)) {
        st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: %d heads of %d", who, (int)n_heads, (int)head_dim);
    }
    if (st == KVS_OK) st = size_of(who, n_tokens, (int64_t)n_heads * head_dim, sizeof(float), &x_bytes);
    if (st == KVS_OK) st = size_of(who, n_tokens, 1, sizeof(int32_t), &p_bytes);
    if (st == KVS_OK) st = begin();
    if (st != KVS_OK) return st;
    dev_scope s = {{NULL}, 0};
    void *d_x = NULL, *d_pos = NULL, *d_ff = NULL;
    st = dev_upload(&s, x, x_bytes, &d_x);
    if (st == KVS_OK) st = dev_upload(&s, positions, p_bytes, &d_pos);
    if (st == KVS_OK) st = dev_upload(&s, freq_factors, (size_t)(n_rot / 2) * sizeof(float), &d_ff);
    if (st == KVS_OK) {
        st = kvs_cuda_rope_rows((float *)d_x, n_tokens, n_heads, head_dim, n_rot, neox, (const int32_t *)d_pos,
                                freq_base, freq_scale, (const float *)d_ff, NULL);
    }
    return dev_finish(&s, st, x, d_x, x_bytes);
}

kvs_status kvs_cuda_glu(int32_t gelu, float *gate, const float *up, int64_t n) {
    kvs_clear_error();
    const char *who = "kvs_cuda_glu";
    size_t bytes = 0;
    kvs_status st = KVS_OK;
    if (!gate || !up) st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: gate or up is NULL", who);
    if (st == KVS_OK && gelu != 0 && gelu != 1) {
        st = kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: gelu = %d (0: SiLU, 1: GELU)", who, (int)gelu);
    }
    if (st == KVS_OK) st = size_of(who, n, 1, sizeof(float), &bytes);
    if (st == KVS_OK) st = begin();
    if (st != KVS_OK) return st;
    dev_scope s = {{NULL}, 0};
    void *d_gate = NULL, *d_up = NULL;
    st = dev_upload(&s, gate, bytes, &d_gate);
    if (st == KVS_OK) st = dev_upload(&s, up, bytes, &d_up);
    if (st == KVS_OK) st = kvs_cuda_glu_rows(gelu, (float *)d_gate, (const float *)d_up, n, NULL);
    return dev_finish(&s, st, gate, d_gate, bytes);
}
