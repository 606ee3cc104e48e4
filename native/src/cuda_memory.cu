/* cuda_memory.cu - device memory for C callers (cuda_memory.h). Copies use
 * the default stream, which the kernels' launchers also run on, so a copy
 * to the host waits for every kernel queued before it. */
#include <cuda_runtime.h>

#include "cuda_memory.h"
#include "kernels_cuda.h"
#include "status.h"

kvs_status kvs_cuda_alloc(void **ptr, size_t bytes, const char *what) {
    *ptr = NULL;
    const cudaError_t e = cudaMalloc(ptr, bytes ? bytes : 1);
    if (e == cudaSuccess) return KVS_OK;
    *ptr = NULL;
    return kvs_fail(e == cudaErrorMemoryAllocation ? KVS_ERR_OUT_OF_MEMORY : KVS_ERR_INTERNAL,
                    "CUDA cudaMalloc of %zu bytes for %s: %s", bytes, what, cudaGetErrorString(e));
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
