/* cuda_memory.cu - device memory, pinned host memory, streams and copies
 * for C callers (cuda_memory.h). The plain copies use the default stream; a
 * context's stream is a blocking one, so they stay ordered with the
 * context's kernels (a copy to the host waits for every kernel queued
 * before it). The _async copies go on a given stream and wait for nothing. */
#include <cuda_runtime.h>

#include "cuda_memory.h"
#include "kernels_cuda.h"
#include "status.h"

/* An allocation's outcome: *ptr stays NULL on failure. */
static kvs_status allocated(cudaError_t e, void **ptr, const char *call, size_t bytes, const char *what) {
    if (e == cudaSuccess) return KVS_OK;
    *ptr = NULL;
    return kvs_fail(e == cudaErrorMemoryAllocation ? KVS_ERR_OUT_OF_MEMORY : KVS_ERR_INTERNAL,
                    "CUDA %s of %zu bytes for %s: %s", call, bytes, what, cudaGetErrorString(e));
}

kvs_status kvs_cuda_alloc(void **ptr, size_t bytes, const char *what) {
    *ptr = NULL;
    return allocated(cudaMalloc(ptr, bytes ? bytes : 1), ptr, "cudaMalloc", bytes, what);
}

void kvs_cuda_release(void *ptr) {
    if (ptr) cudaFree(ptr);
}

kvs_status kvs_cuda_to_device(void *dst, const void *src, size_t bytes) {
    const cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "copy to the device");
}

kvs_status kvs_cuda_to_host(void *dst, const void *src, size_t bytes) {
    const cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "copy to the host");
}

kvs_status kvs_cuda_copy(void *dst, const void *src, size_t bytes) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "copy on the device");
}

kvs_status kvs_cuda_alloc_host(void **ptr, size_t bytes, const char *what) {
    *ptr = NULL;
    return allocated(cudaMallocHost(ptr, bytes ? bytes : 1), ptr, "cudaMallocHost", bytes, what);
}

void kvs_cuda_release_host(void *ptr) {
    if (ptr) cudaFreeHost(ptr);
}

kvs_status kvs_cuda_to_device_async(void *dst, const void *src, size_t bytes, void *stream) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "copy to the device");
}

kvs_status kvs_cuda_to_host_async(void *dst, const void *src, size_t bytes, void *stream) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "copy to the host");
}

kvs_status kvs_cuda_sync(void *stream) {
    const cudaError_t e = cudaStreamSynchronize((cudaStream_t)stream);
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "kernels");
}

kvs_status kvs_cuda_stream_create(void **stream) {
    cudaStream_t s = NULL;
    const cudaError_t e = cudaStreamCreate(&s);
    *stream = s;
    return e == cudaSuccess ? KVS_OK : kvs_cuda_fail(e, "cudaStreamCreate");
}

void kvs_cuda_stream_free(void *stream) {
    if (stream) cudaStreamDestroy((cudaStream_t)stream);
}
