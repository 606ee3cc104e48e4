/* cuda_memory.h - private: device memory for C callers (cuda_memory.cu), so
 * that the CUDA backend's glue (backend_cuda.c) stays plain C. Each call
 * returns a kvs_status with the CUDA runtime's reason; nothing aborts. */
#ifndef KVS_CUDA_MEMORY_H
#define KVS_CUDA_MEMORY_H

#include <stddef.h>

#include "kvsink.h"

#ifdef __cplusplus
extern "C" {
#endif

/* *ptr = bytes of device memory (what names it in the error). */
kvs_status kvs_cuda_alloc(void **ptr, size_t bytes, const char *what);
/* Free device memory from kvs_cuda_alloc (NULL: nothing). */
void kvs_cuda_release(void *ptr);
kvs_status kvs_cuda_to_device(void *dst, const void *src, size_t bytes);
/* Device-to-device, queued after the kernels before it (the ranges do not overlap). */
kvs_status kvs_cuda_copy(void *dst, const void *src, size_t bytes);
/* Waits for the work queued before it, so dst is ready on return. */
kvs_status kvs_cuda_to_host(void *dst, const void *src, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif
