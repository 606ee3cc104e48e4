/* act_q16.c - scalar reference of the 16-bit activations for the logits. */
#include "act_q16.h"

#include <math.h>
#include <string.h>

#include "blocks.h"
#include "formats.h"
#include "kvsink.h"

void kvs_quantize_act16_scalar(const float *x, block_q16_act *y, int64_t n) {
    for (int64_t i = 0; i < n / QK_ACT16; i++, x += QK_ACT16, y++) {
        float amax = 0.0f;
        for (int j = 0; j < QK_ACT16; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
        /* lrintf rounds half to even, as the AVX2 conversion does */
        for (int j = 0; j < QK_ACT16; j++) y->qs[j] = (int16_t)lrintf(x[j] * id);
        y->d = amax / 32767.0f;
    }
}

static float q16_dot_q8_0(int64_t n, const void *row, const block_q16_act *x) {
    const block_q8_0 *b = row;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_ACT16; i++) {
        int32_t dot = 0; /* at most 32 * 127 * 32767: fits */
        for (int j = 0; j < QK_ACT16; j++) dot += (int32_t)b[i].qs[j] * x[i].qs[j];
        sum += kvs_fp16_to_fp32(b[i].d) * x[i].d * (float)dot;
    }
    return sum;
}

static void q16_dot4_q8_0(int64_t n, const void *rows, int64_t row_bytes, const block_q16_act *x, float out[4]) {
    for (int r = 0; r < 4; r++) out[r] = q16_dot_q8_0(n, (const uint8_t *)rows + r * row_bytes, x);
}

static const kvs_q16_kernels scalar_q8_0 = {q16_dot_q8_0, q16_dot4_q8_0};
#if defined(KVS_HAVE_AVX2_BUILD)
static const kvs_q16_kernels avx2_q8_0 = {kvs_q16_dot_q8_0_avx2, kvs_q16_dot4_q8_0_avx2};
#endif

const kvs_q16_kernels *kvs_q16_kernels_find(int32_t type, int32_t impl) {
    if (type != KVS_TYPE_Q8_0) return NULL;
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) return &avx2_q8_0;
#endif
    return impl == KVS_IMPL_AVX2 ? NULL : &scalar_q8_0;
}

kvs_quantize_act16_fn kvs_quantize_act16_kernel(int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl != KVS_IMPL_SCALAR && kvs_avx2_available()) return kvs_quantize_act16_avx2;
#endif
    (void)impl;
    return kvs_quantize_act16_scalar;
}
