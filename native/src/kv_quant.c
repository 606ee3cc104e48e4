/* kv_quant.c - scalar quantize/dequantize of KV cache groups. */
#include "kv_quant.h"

#include <math.h>
#include <string.h>

#include "formats.h"
#include "kernels_kv.h"
#include "status.h"

kvs_status kvs_kv_roundtrip(int32_t kv_type, int32_t impl, const float *x, int64_t n, float *y) {
    const int bits = kvs_kv_bits(kv_type);
    if (bits <= 0) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv type %d is not an integer KV type", (int)kv_type);
    if (!x || !y || n < 1 || n > 4096) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "need 1..4096 values and buffers");
    uint8_t buf[4 + 4096];
    if (impl == KVS_IMPL_AVX2 && !kvs_avx2_available()) return kvs_fail(KVS_ERR_UNSUPPORTED, "this CPU (or build) has no AVX2");
    kvs_kv_quantize_group(x, 1, NULL, n, bits, buf);
    kvs_kv_dequantize_group_impl(buf, n, bits, y, impl == KVS_IMPL_AUTO && kvs_avx2_available() ? KVS_IMPL_AVX2 : impl);
    return KVS_OK;
}

kvs_status kvs_hadamard(int32_t impl, int64_t n, float *x) {
    if (!x || n < 1 || n > 4096 || (n & (n - 1))) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_hadamard needs a buffer of a power of two up to 4096 values, got %lld",
                        (long long)n);
    }
    if (impl == KVS_IMPL_AVX2 && !kvs_avx2_available()) return kvs_fail(KVS_ERR_UNSUPPORTED, "this CPU (or build) has no AVX2");
    if (impl == KVS_IMPL_AUTO) impl = kvs_avx2_available() ? KVS_IMPL_AVX2 : KVS_IMPL_SCALAR;
    kvs_attention_kernels_find(impl)->fwht((int32_t)n, x);
    return KVS_OK;
}

void kvs_kv_dequantize_group_impl(const uint8_t *in, int64_t n, int bits, float *y, int32_t impl) {
#if defined(KVS_HAVE_AVX2_BUILD)
    if (impl == KVS_IMPL_AVX2 && kvs_kv_dequantize_group_avx2(in, n, bits, y)) return;
#endif
    (void)impl;
    kvs_kv_dequantize_group(in, n, bits, y);
}

int kvs_kv_bits(int32_t type) {
    switch (type) {
    case KVS_KV_F32: case KVS_KV_F16: return 0;
    case KVS_KV_Q8: return 8;
    case KVS_KV_Q4: return 4;
    case KVS_KV_Q3: return 3;
    case KVS_KV_Q2: return 2;
    default: return -1;
    }
}

static void put_bits(uint8_t *packed, int64_t i, int bits, unsigned q) {
    const int64_t bit = i * bits;
    unsigned v = (unsigned)packed[bit / 8] | ((unsigned)packed[bit / 8 + 1] << 8);
    v |= q << (bit % 8);
    packed[bit / 8] = (uint8_t)v;
    packed[bit / 8 + 1] = (uint8_t)(v >> 8);
}

static unsigned get_bits(const uint8_t *packed, int64_t i, int bits, int64_t n_bytes) {
    const int64_t bit = i * bits, byte = bit / 8;
    unsigned v = packed[byte];
    if (byte + 1 < n_bytes) v |= (unsigned)packed[byte + 1] << 8;
    return (v >> (bit % 8)) & ((1u << bits) - 1);
}

void kvs_kv_quantize_group(const float *x, int64_t stride, const uint8_t *skip, int64_t n, int bits,
                           uint8_t *out) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (skip && skip[i]) continue;
        const float v = x[i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (lo > hi) lo = hi = 0.0f; /* every entry skipped */
    const int levels = (1 << bits) - 1;
    /* quantize with the fp16-rounded scale and zero the reader will see */
    const kvs_half zero_h = kvs_fp32_to_fp16(lo);
    const kvs_half scale_h = kvs_fp32_to_fp16((hi - lo) / (float)levels);
    const float zero = kvs_fp16_to_fp32(zero_h), scale = kvs_fp16_to_fp32(scale_h);
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    memcpy(out, &scale_h, 2);
    memcpy(out + 2, &zero_h, 2);
    uint8_t *packed = out + 4;
    /* one spare byte lets put_bits write 16 bits; the group owns it or the next group overwrites */
    memset(packed, 0, (size_t)((n * bits + 7) / 8));
    for (int64_t i = 0; i < n; i++) {
        float q = (skip && skip[i]) ? 0.0f : roundf((x[i * stride] - zero) * inv);
        q = q < 0.0f ? 0.0f : q > (float)levels ? (float)levels : q;
        const int64_t bit = i * bits;
        if (bit / 8 + 1 < (n * bits + 7) / 8) put_bits(packed, i, bits, (unsigned)q);
        else packed[bit / 8] |= (uint8_t)((unsigned)q << (bit % 8));
    }
}

void kvs_kv_dequantize_group(const uint8_t *in, int64_t n, int bits, float *y) {
    kvs_half scale_h, zero_h;
    memcpy(&scale_h, in, 2);
    memcpy(&zero_h, in + 2, 2);
    const float scale = kvs_fp16_to_fp32(scale_h), zero = kvs_fp16_to_fp32(zero_h);
    const int64_t n_bytes = (n * bits + 7) / 8;
    for (int64_t i = 0; i < n; i++) y[i] = (float)get_bits(in + 4, i, bits, n_bytes) * scale + zero;
}
