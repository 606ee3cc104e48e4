/* kernels_cuda.h - private: launchers of the CUDA kernels (kernels_cuda.cu),
 * each the twin of a CPU scalar kernel (formats.c, ops.c) that is its test
 * oracle. Pointers are DEVICE pointers; stream is a cudaStream_t (NULL: the
 * default stream). A launcher checks its arguments, enqueues the kernel and
 * returns without waiting: KVS_OK means "launched", and a failure of the
 * kernel itself shows at the next synchronization. Nothing aborts. */
#ifndef KVS_KERNELS_CUDA_H
#define KVS_KERNELS_CUDA_H

#include <stdint.h>

#include "kvsink.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The weight types with CUDA kernels: every type of types.c. */
int kvs_cuda_type_supported(int32_t type);

/* dst[r * n + i] = element i of row r (n_rows rows of n elements of type,
 * row_bytes apart), as kvs_dequantize: bit for bit. */
kvs_status kvs_cuda_dequantize_rows(int32_t type, const void *src, int64_t row_bytes, int64_t n_rows, int64_t n,
                                    float *dst, void *stream);

/* dst[i * n + j] = element j of row ids[i] (the embedding lookup). The ids
 * live on the device, so they cannot be checked here: the caller checks
 * them against the row count (the vocabulary) before uploading. */
kvs_status kvs_cuda_get_rows(int32_t type, const void *src, int64_t row_bytes, int64_t n, const int32_t *ids,
                             int64_t n_ids, float *dst, void *stream);

/* y[t * n_rows + r] = dot(row r of w, x[t]) for n_tokens rows x[t] of n
 * floats: f32 activations, weights dequantized exactly, f32 accumulation. */
kvs_status kvs_cuda_matmul_f32(int32_t type, const void *w, int64_t row_bytes, int64_t n_rows, int64_t n,
                               const float *x, int64_t n_tokens, float *y, void *stream);

/* out[r] = x[r] / rms(x[r]) * weight for n_rows rows of n (out == x allowed). */
kvs_status kvs_cuda_rmsnorm_rows(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                                 float *out, void *stream);

/* RoPE of x (n_tokens x n_heads x head_dim floats) in place, token t at
 * positions[t] (device), as kvs_rope; freq_factors: n_rot / 2 floats or NULL. */
kvs_status kvs_cuda_rope_rows(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot,
                              int32_t neox, const int32_t *positions, float freq_base, float freq_scale,
                              const float *freq_factors, void *stream);

/* gate = SiLU(gate) * up (gelu 0) or tanh-GELU(gate) * up (gelu 1), n elements. */
kvs_status kvs_cuda_glu_rows(int32_t gelu, float *gate, const float *up, int64_t n, void *stream);

/* x += y (n floats). */
kvs_status kvs_cuda_add(float *x, const float *y, int64_t n, void *stream);
/* y[r] += b for n_rows rows of n floats. */
kvs_status kvs_cuda_add_bias_rows(float *y, const float *b, int64_t n_rows, int64_t n, void *stream);
/* x *= s (n floats). */
kvs_status kvs_cuda_scale(float *x, float s, int64_t n, void *stream);
/* x = cap * tanh(x / cap) as kvs_softcap (n floats), cap > 0. */
kvs_status kvs_cuda_softcap(float *x, float cap, int64_t n, void *stream);
/* top[t] = max over channels[0..n_channels) of |x[t * n_embd + c]| for
 * n_tokens rows: the sink predictor's input (channels on the device, checked
 * against n_embd by the caller: the model's profile). */
kvs_status kvs_cuda_channel_max(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *channels,
                                int32_t n_channels, float *top, void *stream);

#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
#include <cuda_runtime.h>

/* Record a CUDA error as a kvs_status: OUT_OF_MEMORY for a failed
 * allocation, INTERNAL otherwise, with "CUDA <what>: <the runtime's reason>". */
kvs_status kvs_cuda_fail(cudaError_t e, const char *what);

/* KVS_OK, or kvs_cuda_fail of the error the last launch left (cudaGetLastError). */
kvs_status kvs_cuda_launched(const char *kernel);

/* Launch shapes the kernel files share: 1-D grids with grid-stride loops. */
#define THREADS 256          /* threads per block of the element-wise and row kernels */
#define MAX_BLOCKS (1 << 20) /* grid cap: grid-stride loops do the rest; fills any GPU many times */

/* Blocks of a 1-D grid over `items` work items of `per_block` each. */
static inline unsigned grid_for(int64_t items, int64_t per_block) {
    int64_t blocks = (items + per_block - 1) / per_block;
    if (blocks < 1) blocks = 1;
    return (unsigned)(blocks < MAX_BLOCKS ? blocks : MAX_BLOCKS);
}

/* Item i of n, stepping over the whole grid. */
#define FOR_EACH(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)
#endif

#endif
