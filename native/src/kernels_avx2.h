/* kernels_avx2.h - private: AVX2+FMA+F16C twins of the scalar dot kernels in
 * formats.c (same signatures, same results up to float rounding). Only call
 * them after kvs_avx2_available() said yes. */
#ifndef KVS_KERNELS_AVX2_H
#define KVS_KERNELS_AVX2_H

#include <stdint.h>

/* k-quant scale unpacking, defined in formats.c so both paths share one copy. */
/* Q3_K: 16 signed scales (already minus 32) from the 12 packed bytes. */
void kvs_unpack_q3_k_scales(const uint8_t packed[12], int8_t out[16]);
/* Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins from the 12 packed bytes. */
void kvs_unpack_k4_scales(const uint8_t packed[12], uint8_t sc[8], uint8_t mn[8]);

#if defined(KVS_HAVE_AVX2_BUILD)
float kvs_dot_f32_avx2(int64_t n, const float *a, const float *b);
void kvs_swiglu_avx2(float *gate, const float *up, int64_t n);
void kvs_geglu_avx2(float *gate, const float *up, int64_t n);
void kvs_dot_f32_4x2_avx2(int64_t n, const float *w, const float *x, float *out);

float kvs_vec_dot_f32_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_f16_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_bf16_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q4_0_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q4_1_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q5_0_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q5_1_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q8_0_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q2_k_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q3_k_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q4_k_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q5_k_avx2(int64_t n, const void *row, const float *x);
float kvs_vec_dot_q6_k_avx2(int64_t n, const void *row, const float *x);
#endif

#endif
