/* cuda_absent.c - the CUDA entry points of a library built without the CUDA
 * backend (KVSINK_CUDA=OFF, the default): each says so, so that asking for
 * a GPU fails with the reason instead of a missing symbol. */
#include "kvsink.h"
#include "status.h"

#define NO_CUDA "this kvsink_cpp library was built without CUDA (rebuild with CMAKE_ARGS=\"-DKVSINK_CUDA=ON\", README)"

int32_t kvs_cuda_built(void) { return 0; }

kvs_status kvs_cuda_check(void) { return kvs_fail(KVS_ERR_UNSUPPORTED, NO_CUDA); }

kvs_status kvs_cuda_dequantize(int32_t type, const void *src, int64_t n, float *dst) {
    return kvs_cuda_check();
}

kvs_status kvs_cuda_matmul(int32_t type, const void *rows, int64_t n_rows, int64_t n, const float *x,
                           int64_t n_tokens, float *out) {
    return kvs_cuda_check();
}

kvs_status kvs_cuda_rmsnorm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps, float *out) {
    return kvs_cuda_check();
}

kvs_status kvs_cuda_rope(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot, int32_t neox,
                         const int32_t *positions, float freq_base, float freq_scale, const float *freq_factors) {
    return kvs_cuda_check();
}

kvs_status kvs_cuda_glu(int32_t gelu, float *gate, const float *up, int64_t n) { return kvs_cuda_check(); }
