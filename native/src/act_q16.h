/* act_q16.h - private: activations quantized to 16 bits in blocks of 32 for
 * the logits. The output projection is the largest product of a small model
 * (SmolLM2: 49152 x 576) and its activation error lands in the logits
 * undamped, so the fast path keeps it near exact: a 16-bit activation is
 * within 1/65534 of its block's largest, while int8 weights are multiplied
 * with madd (s16 x s16 -> s32) at about the cost of the 8-bit dots. */
#ifndef KVS_ACT_Q16_H
#define KVS_ACT_Q16_H

#include <stdint.h>

#define QK_ACT16 32

typedef struct {
    float d;                /* scale: x ~= d * q          */
    int16_t qs[QK_ACT16];   /* round(x / d), |q| <= 32767 */
} block_q16_act;
_Static_assert(sizeof(block_q16_act) == 68, "block_q16_act size");

/* Quantize n floats (a multiple of 32) to n / 32 blocks. */
typedef void (*kvs_quantize_act16_fn)(const float *x, block_q16_act *y, int64_t n);
/* dot(row of n weights, activations); the four-row form shares the activation loads. */
typedef float (*kvs_q16_dot_fn)(int64_t n, const void *row, const block_q16_act *x);
typedef void (*kvs_q16_dot4_fn)(int64_t n, const void *rows, int64_t row_bytes, const block_q16_act *x,
                                float out[4]);

typedef struct {
    kvs_q16_dot_fn dot;
    kvs_q16_dot4_fn dot4;
} kvs_q16_kernels;

/* The 16-bit dots for a weight type (Q8_0) with impl resolved, or NULL. */
const kvs_q16_kernels *kvs_q16_kernels_find(int32_t type, int32_t impl);
/* The quantizer of impl; scalar and AVX2 give identical blocks. */
kvs_quantize_act16_fn kvs_quantize_act16_kernel(int32_t impl);

void kvs_quantize_act16_scalar(const float *x, block_q16_act *y, int64_t n);
#if defined(KVS_HAVE_AVX2_BUILD)
void kvs_quantize_act16_avx2(const float *x, block_q16_act *y, int64_t n);
float kvs_q16_dot_q8_0_avx2(int64_t n, const void *row, const block_q16_act *x);
void kvs_q16_dot4_q8_0_avx2(int64_t n, const void *rows, int64_t row_bytes, const block_q16_act *x, float out[4]);
#endif

#endif
