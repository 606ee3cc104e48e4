/* kv_quant.h - private: the KV cache's integer formats. Asymmetric min/max
 * quantization of a group of values with an fp16 scale and zero point
 * (x ~ q * scale + zero), q packed LSB-first in `bits` bits. */
#ifndef KVS_KV_QUANT_H
#define KVS_KV_QUANT_H

#include <stdint.h>

#include "blocks.h"
#include "kvsink.h" /* kvs_kv_type */

/* Bits per value of a quantized type, 0 for F32/F16, -1 for unknown. */
int kvs_kv_bits(int32_t type);

/* Bytes of one quantized group of n values: fp16 scale, fp16 zero, packed quants. */
static inline int64_t kvs_kv_group_bytes(int bits, int64_t n) { return 4 + (n * bits + 7) / 8; }

/* Quantize n values read with `stride` floats between them, skipping entries
 * whose skip[i] is non-zero (they stay out of the min/max and decode as zero
 * point); skip may be NULL. Writes kvs_kv_group_bytes(bits, n) bytes. */
void kvs_kv_quantize_group(const float *x, int64_t stride, const uint8_t *skip, int64_t n, int bits,
                           uint8_t *out);

/* Dequantize a group of n values into y (contiguous). Scalar reference. */
void kvs_kv_dequantize_group(const uint8_t *in, int64_t n, int bits, float *y);

#if defined(KVS_HAVE_AVX2_BUILD)
/* The AVX2 twin; returns 0 (and does nothing) for shapes it does not cover. */
int kvs_kv_dequantize_group_avx2(const uint8_t *in, int64_t n, int bits, float *y);
#endif

/* The twin chosen by impl (kvs_impl), falling back to the scalar code. */
void kvs_kv_dequantize_group_impl(const uint8_t *in, int64_t n, int bits, float *y, int32_t impl);

#endif
