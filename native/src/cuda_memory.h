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

/* Pinned host memory: copies between it and the device may be queued
 * without waiting, and captured into a CUDA graph (a context's per-step
 * buffers: token ids, segment table, logits row, sink maxima). */
kvs_status kvs_cuda_alloc_host(void **ptr, size_t bytes, const char *what);
void kvs_cuda_release_host(void *ptr);
/* Queued on `stream` after its kernels; nothing waits (src/dst pinned). */
kvs_status kvs_cuda_to_device_async(void *dst, const void *src, size_t bytes, void *stream);
kvs_status kvs_cuda_to_host_async(void *dst, const void *src, size_t bytes, void *stream);
/* Wait for everything queued on `stream`. */
kvs_status kvs_cuda_sync(void *stream);

/* A context's stream: blocking, so the default stream's copies above stay
 * ordered with its kernels. */
kvs_status kvs_cuda_stream_create(void **stream);
void kvs_cuda_stream_free(void *stream);

/* CUDA graphs (cuda_graph.cu): the launches and copies queued on `stream`
 * between capture_begin and capture_end are recorded instead of run; the
 * record becomes (or updates, when only parameters changed) *exec, which
 * graph_launch replays on the stream. A failure ends the capture and
 * leaves *exec as it was; the caller then runs the step directly. */
typedef struct kvs_cuda_graph kvs_cuda_graph;
kvs_status kvs_cuda_capture_begin(void *stream);
kvs_status kvs_cuda_capture_end(void *stream, kvs_cuda_graph **exec);
kvs_status kvs_cuda_graph_launch(kvs_cuda_graph *exec, void *stream);
void kvs_cuda_graph_free(kvs_cuda_graph *exec);

#ifdef __cplusplus
}
#endif

#endif
