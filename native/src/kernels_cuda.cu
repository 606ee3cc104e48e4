/* kernels_cuda.cu - the CUDA kernels of the forward pass and their
 * launchers (kernels_cuda.h). Each kernel is the twin of a CPU scalar kernel,
 * its test oracle: dequantization of every weight type (formats.c, bit for
 * bit), the f32 matrix product (formats.c's dot_blocks), RMSNorm, RoPE,
 * SwiGLU/GeGLU and soft-capping (ops.c).
 *
 * Exactness: nvcc fuses a * b + c into one FMA by default, which rounds
 * once where the CPU (formats.c builds with fp-contract off) rounds twice.
 * Wherever a result must equal the CPU's bit for bit (dequantized weights,
 * the RMSNorm scaling, the RoPE rotation) the arithmetic is spelled with
 * __fmul_rn / __fadd_rn / __fsub_rn, which nvcc never fuses. Sums of
 * products (dots) use fmaf freely: the oracle there is a float64 dot.
 *
 * Indexing: element and byte offsets are int64_t (a 262144 x 640 embedding
 * has 1.7e8 elements, and byte offsets of big weights pass 2^31); grids are
 * 1-D with grid-stride loops, so no size runs into a grid limit. */
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "blocks.h"

#include "kernels_cuda.h"

extern "C" {
#include "status.h"
#include "types.h"
}


/* ---- one chunk of a row: elements 8c .. 8c+7 -------------------------------
 * The unit of work of every weight kernel is a chunk of 8 elements: blocks
 * of 32 have 4 chunks, k-quant super-blocks 32, so a warp reading 32 chunks
 * spreads over consecutive bytes. Float rows (block size 1) may end inside
 * their last chunk: elements past n read as 0 and are never stored. */

/* fp16 bits to f32: the conversion __half2float makes, exact for every
 * finite half. Spelled in PTX because cuda_fp16.h needs CCCL's headers,
 * which PyPI's nvcc wheels do not bring. */
__device__ __forceinline__ float fp16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

/* fp16 at any byte offset: blocks are packed (Q5_0 is 22 bytes, Q6_K 210), so
 * assemble the bits bytewise instead of loading through a 2-byte pointer. */
__device__ __forceinline__ float half_at(const uint8_t *p) {
    return fp16_to_f32((unsigned short)(p[0] | (p[1] << 8)));
}

template <int T> __device__ __forceinline__ void deq8(const uint8_t *row, int64_t c, int64_t n, float v[8]);

/* F32/F16/BF16 rows are aligned to their element (the launchers check), so
 * these read whole elements. */
template <> __device__ __forceinline__ void deq8<KVS_TYPE_F32>(const uint8_t *row, int64_t c, int64_t n, float v[8]) {
    const float *w = reinterpret_cast<const float *>(row);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = 8 * c + i < n ? w[8 * c + i] : 0.0f;
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_F16>(const uint8_t *row, int64_t c, int64_t n, float v[8]) {
    const unsigned short *w = reinterpret_cast<const unsigned short *>(row);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = 8 * c + i < n ? fp16_to_f32(w[8 * c + i]) : 0.0f;
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_BF16>(const uint8_t *row, int64_t c, int64_t n, float v[8]) {
    const uint16_t *w = reinterpret_cast<const uint16_t *>(row);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = 8 * c + i < n ? __uint_as_float((uint32_t)w[8 * c + i] << 16) : 0.0f;
}

/* Q4_0/Q4_1/Q5_x: chunks 0,1 are the low nibbles of qs[0..15], chunks 2,3 the high ones. */
template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q4_0>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 2) * (int64_t)sizeof(block_q4_0);
    const int j = (int)(c & 3), shift = 4 * (j >> 1);
    const uint8_t *qs = b + offsetof(block_q4_0, qs) + 8 * (j & 1);
    const float d = half_at(b + offsetof(block_q4_0, d));
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __fmul_rn((float)(((qs[i] >> shift) & 0x0f) - 8), d);
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q4_1>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 2) * (int64_t)sizeof(block_q4_1);
    const int j = (int)(c & 3), shift = 4 * (j >> 1);
    const uint8_t *qs = b + offsetof(block_q4_1, qs) + 8 * (j & 1);
    const float d = half_at(b + offsetof(block_q4_1, d)), m = half_at(b + offsetof(block_q4_1, m));
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __fadd_rn(__fmul_rn(d, (float)((qs[i] >> shift) & 0x0f)), m);
}

/* The 5th bit of element e is bit e of the 32-bit qh, so chunk j's are byte j. */
template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q5_0>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 2) * (int64_t)sizeof(block_q5_0);
    const int j = (int)(c & 3), shift = 4 * (j >> 1);
    const uint8_t *qs = b + offsetof(block_q5_0, qs) + 8 * (j & 1);
    const int qh = b[offsetof(block_q5_0, qh) + j];
    const float d = half_at(b + offsetof(block_q5_0, d));
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int q = ((qs[i] >> shift) & 0x0f) | (((qh >> i) & 1) << 4);
        v[i] = __fmul_rn((float)(q - 16), d);
    }
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q5_1>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 2) * (int64_t)sizeof(block_q5_1);
    const int j = (int)(c & 3), shift = 4 * (j >> 1);
    const uint8_t *qs = b + offsetof(block_q5_1, qs) + 8 * (j & 1);
    const int qh = b[offsetof(block_q5_1, qh) + j];
    const float d = half_at(b + offsetof(block_q5_1, d)), m = half_at(b + offsetof(block_q5_1, m));
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int q = ((qs[i] >> shift) & 0x0f) | (((qh >> i) & 1) << 4);
        v[i] = __fadd_rn(__fmul_rn(d, (float)q), m);
    }
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q8_0>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 2) * (int64_t)sizeof(block_q8_0);
    const int8_t *qs = reinterpret_cast<const int8_t *>(b + offsetof(block_q8_0, qs)) + 8 * (c & 3);
    const float d = half_at(b + offsetof(block_q8_0, d));
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __fmul_rn((float)qs[i], d);
}

/* Q2_K/Q3_K: element e = 8j + i of a super-block is bits 2 * ((e % 128) / 32)
 * of quant byte (e / 128) * 32 + e % 32, so a chunk shares byte run and shift. */
template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q2_K>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 5) * (int64_t)sizeof(block_q2_K);
    const int j = (int)(c & 31), shift = 2 * ((j >> 2) & 3);
    const uint8_t *q = b + offsetof(block_q2_K, qs) + 32 * (j >> 4) + 8 * (j & 3);
    const int sc = b[offsetof(block_q2_K, scales) + (j >> 1)];
    const float d = half_at(b + offsetof(block_q2_K, d)), dmin = half_at(b + offsetof(block_q2_K, dmin));
    const float dl = __fmul_rn(d, (float)(sc & 0x0f)), ml = __fmul_rn(dmin, (float)(sc >> 4));
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __fsub_rn(__fmul_rn(dl, (float)((q[i] >> shift) & 3)), ml);
}

/* Scale s (of 16) of Q3_K, as kvs_unpack_q3_k_scales. */
__device__ __forceinline__ int q3_k_scale(const uint8_t *p, int s) {
    const int lo = s < 8 ? (p[s] & 0x0f) : (p[s - 8] >> 4);
    const int hi = (p[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q3_K>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 5) * (int64_t)sizeof(block_q3_K);
    const int j = (int)(c & 31), shift = 2 * ((j >> 2) & 3), hbit = j >> 2;
    const uint8_t *q = b + offsetof(block_q3_K, qs) + 32 * (j >> 4) + 8 * (j & 3);
    const uint8_t *hm = b + offsetof(block_q3_K, hmask) + 8 * (j & 3);
    const float d = half_at(b + offsetof(block_q3_K, d));
    const float dl = __fmul_rn(d, (float)q3_k_scale(b + offsetof(block_q3_K, scales), j >> 1));
#pragma unroll
    for (int i = 0; i < 8; i++) {
        /* a clear high bit means "subtract 4" */
        const int qv = ((q[i] >> shift) & 3) - (((hm[i] >> hbit) & 1) ? 0 : 4);
        v[i] = __fmul_rn(dl, (float)qv);
    }
}

/* 6-bit scale and min of sub-block s (of 8) of Q4_K/Q5_K, as kvs_unpack_k4_scales. */
__device__ __forceinline__ void k4_scale_min(const uint8_t *p, int s, int *sc, int *mn) {
    if (s < 4) {
        *sc = p[s] & 63;
        *mn = p[s + 4] & 63;
    } else {
        *sc = (p[s + 4] & 0x0f) | ((p[s - 4] >> 6) << 4);
        *mn = (p[s + 4] >> 4) | ((p[s] >> 6) << 4);
    }
}

/* Q4_K/Q5_K: sub-block s of 32 elements is the low (s even) or high (s odd)
 * nibbles of qs[32 * (s / 2) ..]; Q5_K's 5th bit of element 32s + l is bit s of qh[l]. */
template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q4_K>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 5) * (int64_t)sizeof(block_q4_K);
    const int j = (int)(c & 31), s = j >> 2, shift = 4 * (s & 1);
    const uint8_t *q = b + offsetof(block_q4_K, qs) + 32 * (s >> 1) + 8 * (j & 3);
    int sc, mn;
    k4_scale_min(b + offsetof(block_q4_K, scales), s, &sc, &mn);
    const float d = half_at(b + offsetof(block_q4_K, d)), dmin = half_at(b + offsetof(block_q4_K, dmin));
    const float d1 = __fmul_rn(d, (float)sc), m1 = __fmul_rn(dmin, (float)mn);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __fsub_rn(__fmul_rn(d1, (float)((q[i] >> shift) & 0x0f)), m1);
}

template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q5_K>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 5) * (int64_t)sizeof(block_q5_K);
    const int j = (int)(c & 31), s = j >> 2, shift = 4 * (s & 1);
    const uint8_t *q = b + offsetof(block_q5_K, qs) + 32 * (s >> 1) + 8 * (j & 3);
    const uint8_t *qh = b + offsetof(block_q5_K, qh) + 8 * (j & 3);
    int sc, mn;
    k4_scale_min(b + offsetof(block_q5_K, scales), s, &sc, &mn);
    const float d = half_at(b + offsetof(block_q5_K, d)), dmin = half_at(b + offsetof(block_q5_K, dmin));
    const float d1 = __fmul_rn(d, (float)sc), m1 = __fmul_rn(dmin, (float)mn);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int qv = ((q[i] >> shift) & 0x0f) | (((qh[i] >> s) & 1) << 4);
        v[i] = __fsub_rn(__fmul_rn(d1, (float)qv), m1);
    }
}

/* Q6_K: half h (128 elements) has ql[64h..], qh[32h..], scales[8h..]; its
 * quarter g takes the low (g < 2) or high nibbles of ql[64h + 32 (g & 1) + l]
 * and bits 2g of qh[32h + l]; l / 16 picks one of two scales. */
template <> __device__ __forceinline__ void deq8<KVS_TYPE_Q6_K>(const uint8_t *row, int64_t c, int64_t, float v[8]) {
    const uint8_t *b = row + (c >> 5) * (int64_t)sizeof(block_q6_K);
    const int j = (int)(c & 31), h = j >> 4, g = (j >> 2) & 3, l0 = 8 * (j & 3);
    const uint8_t *ql = b + offsetof(block_q6_K, ql) + 64 * h + 32 * (g & 1) + l0;
    const uint8_t *qh = b + offsetof(block_q6_K, qh) + 32 * h + l0;
    const int sc = (int8_t)b[offsetof(block_q6_K, scales) + 8 * h + (l0 >> 4) + 2 * g];
    /* (d * sc) * q, left to right as the CPU's d * (float)sc * (float)q */
    const float ds = __fmul_rn(half_at(b + offsetof(block_q6_K, d)), (float)sc);
    const int lshift = 4 * (g >> 1), hshift = 2 * g;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int qv = (((ql[i] >> lshift) & 0x0f) | (((qh[i] >> hshift) & 3) << 4)) - 32;
        v[i] = __fmul_rn(ds, (float)qv);
    }
}

/* ---- type dispatch ---------------------------------------------------------- */

template <int T> struct type_tag { static constexpr int value = T; };

/* Call f(type_tag<type>()) and return true, or false for a type without kernels. */
template <typename F> static bool with_type(int32_t type, F f) {
    switch (type) {
#define KVS_CUDA_CASE(T) \
    case T: f(type_tag<T>()); return true;
    KVS_CUDA_CASE(KVS_TYPE_F32)
    KVS_CUDA_CASE(KVS_TYPE_F16)
    KVS_CUDA_CASE(KVS_TYPE_BF16)
    KVS_CUDA_CASE(KVS_TYPE_Q4_0)
    KVS_CUDA_CASE(KVS_TYPE_Q4_1)
    KVS_CUDA_CASE(KVS_TYPE_Q5_0)
    KVS_CUDA_CASE(KVS_TYPE_Q5_1)
    KVS_CUDA_CASE(KVS_TYPE_Q8_0)
    KVS_CUDA_CASE(KVS_TYPE_Q2_K)
    KVS_CUDA_CASE(KVS_TYPE_Q3_K)
    KVS_CUDA_CASE(KVS_TYPE_Q4_K)
    KVS_CUDA_CASE(KVS_TYPE_Q5_K)
    KVS_CUDA_CASE(KVS_TYPE_Q6_K)
#undef KVS_CUDA_CASE
    default: return false;
    }
}

int kvs_cuda_type_supported(int32_t type) {
    return with_type(type, [](auto) {}) ? 1 : 0;
}

/* ---- dequantization and row lookup ------------------------------------------ */

/* Thread k: chunk k % cpr of output row k / cpr, read from row ids[r] (or r). */
template <int T>
__global__ void __launch_bounds__(THREADS) dequantize_kernel(const uint8_t *src, int64_t row_bytes, const int32_t *ids,
                                                             int64_t n_rows, int64_t n, float *dst) {
    const int64_t cpr = (n + 7) / 8, total = n_rows * cpr;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = k / cpr, c = k - r * cpr;
        const int64_t src_row = ids ? (int64_t)ids[r] : r;
        float v[8];
        deq8<T>(src + src_row * row_bytes, c, n, v);
        float *out = dst + r * n + 8 * c;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (8 * c + i < n) out[i] = v[i];
        }
    }
}

/* The checks every weight launcher shares: a type with kernels, n a
 * positive multiple of its block, rows long and aligned enough. */
static kvs_status check_weights(const char *who, int32_t type, const void *w, int64_t row_bytes, int64_t n_rows,
                                int64_t n) {
    const kvs_type_layout_info *info = kvs_type_layout_find(type);
    if (!info) return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: unsupported tensor type id %d", who, (int)type);
    if (!kvs_cuda_type_supported(type)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "%s: tensor type %s has no CUDA kernels", who, info->name);
    }
    if (n <= 0 || n % info->block_elems != 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: n = %lld is not a positive multiple of the %s block size %lld",
                        who, (long long)n, info->name, (long long)info->block_elems);
    }
    if (n_rows <= 0) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: %lld rows", who, (long long)n_rows);
    if (!w) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: the %s weights pointer is NULL", who, info->name);
    const int64_t need = n / info->block_elems * info->block_bytes;
    if (row_bytes < need) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: row_bytes = %lld but a row of %lld %s elements takes %lld", who,
                        (long long)row_bytes, (long long)n, info->name, (long long)need);
    }
    /* float rows are read a whole element at a time; blocks are read bytewise */
    const int64_t align = info->block_elems == 1 ? info->block_bytes : 1;
    if ((uintptr_t)w % (uintptr_t)align != 0 || row_bytes % align != 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: %s rows must start on %lld-byte boundaries", who, info->name,
                        (long long)align);
    }
    return KVS_OK;
}

static kvs_status launch_dequantize(const char *who, int32_t type, const void *src, int64_t row_bytes,
                                    const int32_t *ids, int64_t n_rows, int64_t n, float *dst, void *stream) {
    kvs_status st = check_weights(who, type, src, row_bytes, n_rows, n);
    if (st != KVS_OK) return st;
    if (!dst) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: dst is NULL", who);
    const unsigned grid = grid_for(n_rows * ((n + 7) / 8), THREADS);
    cudaStream_t s = (cudaStream_t)stream;
    with_type(type, [&](auto tag) {
        dequantize_kernel<decltype(tag)::value>
            <<<grid, THREADS, 0, s>>>((const uint8_t *)src, row_bytes, ids, n_rows, n, dst);
    });
    return kvs_cuda_launched(who);
}

kvs_status kvs_cuda_dequantize_rows(int32_t type, const void *src, int64_t row_bytes, int64_t n_rows, int64_t n,
                                    float *dst, void *stream) {
    return launch_dequantize("dequantize", type, src, row_bytes, NULL, n_rows, n, dst, stream);
}

kvs_status kvs_cuda_get_rows(int32_t type, const void *src, int64_t row_bytes, int64_t n, const int32_t *ids,
                             int64_t n_ids, float *dst, void *stream) {
    if (!ids) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "get_rows: ids is NULL");
    return launch_dequantize("get_rows", type, src, row_bytes, ids, n_ids, n, dst, stream);
}

/* ---- matrix products ---------------------------------------------------------- */

#define MV_WARPS 4      /* rows (one per warp) per block of the few-token product */
#define MV_MAX_TOKENS 8 /* tokens it takes at once (decode; logits in chunks of 8 rows) */

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Up to MV_MAX_TOKENS tokens (decode, logits rows): a warp per output row,
 * lane l takes chunks l, l + 32, ... of the row, dequantized in registers
 * once for every token, then the warp sums its lanes per token. A token's
 * result does not depend on how many others share the launch. The row and
 * token loops are uniform across a warp, so the full-mask shuffles are safe. */
template <int T>
__global__ void __launch_bounds__(MV_WARPS * 32) matvec_kernel(const uint8_t *w, int64_t row_bytes, int64_t n_rows,
                                                               int64_t n, const float *x, int n_tokens, float *y) {
    const int lane = threadIdx.x & 31;
    const int64_t cpr = (n + 7) / 8, warps = (int64_t)gridDim.x * MV_WARPS;
    for (int64_t r = (int64_t)blockIdx.x * MV_WARPS + (threadIdx.x >> 5); r < n_rows; r += warps) {
        const uint8_t *row = w + r * row_bytes;
        float acc[MV_MAX_TOKENS] = {};
        for (int64_t c = lane; c < cpr; c += 32) {
            float v[8];
            deq8<T>(row, c, n, v);
#pragma unroll
            for (int t = 0; t < MV_MAX_TOKENS; t++) {
                if (t >= n_tokens) break;
                const float *xt = x + (int64_t)t * n;
                float part = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int64_t e = 8 * c + i;
                    part = fmaf(v[i], e < n ? xt[e] : 0.0f, part);
                }
                acc[t] += part; /* a partial per chunk: shorter f32 rounding chains than one running sum */
            }
        }
#pragma unroll
        for (int t = 0; t < MV_MAX_TOKENS; t++) {
            if (t >= n_tokens) break;
            const float sum = warp_sum(acc[t]);
            if (lane == 0) y[(int64_t)t * n_rows + r] = sum;
        }
    }
}

/* More tokens: a block computes a 64-row x 64-token tile of y; per step
 * it dequantizes 64 rows x 32 elements of w (each weight once per tile, not
 * once per token) and loads 64 tokens x 32 elements of x into shared
 * memory, both transposed to [k][row or token]; thread (tx, ty) owns rows
 * tx + 16 i and tokens ty + 16 j (i, j < 4). */
#define MM_ROWS 64
#define MM_TOKS 64
#define MM_K 32
#define MM_THREADS 256

template <int T>
__global__ void __launch_bounds__(MM_THREADS) matmul_tiled_kernel(const uint8_t *w, int64_t row_bytes, int64_t n_rows,
                                                                  int64_t n, const float *x, int64_t n_tokens,
                                                                  float *y) {
    /* +1 column: the transposed stores below hit 32 different banks */
    __shared__ float ws[MM_K][MM_ROWS + 1];
    __shared__ float xs[MM_K][MM_TOKS + 1];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int64_t cpr = (n + 7) / 8, row_tiles = (n_rows + MM_ROWS - 1) / MM_ROWS;
    const int64_t n_tiles = row_tiles * ((n_tokens + MM_TOKS - 1) / MM_TOKS);
    for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const int64_t r0 = (tile % row_tiles) * MM_ROWS, t0 = (tile / row_tiles) * MM_TOKS;
        float acc[4][4] = {};
        for (int64_t k0 = 0; k0 < n; k0 += MM_K) {
            {   /* weights: thread -> row tid / 4, chunk tid % 4 of this k step */
                const int lr = tid >> 2, lc = tid & 3;
                const int64_t r = r0 + lr, c = k0 / 8 + lc;
                float v[8] = {};
                if (r < n_rows && c < cpr) deq8<T>(w + r * row_bytes, c, n, v);
#pragma unroll
                for (int i = 0; i < 8; i++) ws[8 * lc + i][lr] = v[i];
            }
#pragma unroll
            for (int m = 0; m < MM_TOKS * MM_K / MM_THREADS; m++) {
                /* a warp reads 32 consecutive floats of one token (coalesced) */
                const int idx = tid + MM_THREADS * m, lt = idx / MM_K, lk = idx % MM_K;
                const int64_t t = t0 + lt, k = k0 + lk;
                xs[lk][lt] = t < n_tokens && k < n ? x[t * n + k] : 0.0f;
            }
            __syncthreads();
            float part[4][4] = {};
#pragma unroll
            for (int k = 0; k < MM_K; k++) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; i++) a[i] = ws[k][tx + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; j++) b[j] = xs[k][ty + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) part[i][j] = fmaf(a[i], b[j], part[i][j]);
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += part[i][j]; /* a partial per k step, as matvec */
            __syncthreads(); /* the tiles are overwritten next step */
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t t = t0 + ty + 16 * j;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int64_t r = r0 + tx + 16 * i;
                if (t < n_tokens && r < n_rows) y[t * n_rows + r] = acc[i][j];
            }
        }
    }
}

kvs_status kvs_cuda_matmul_f32(int32_t type, const void *w, int64_t row_bytes, int64_t n_rows, int64_t n,
                               const float *x, int64_t n_tokens, float *y, void *stream) {
    kvs_status st = check_weights("matmul", type, w, row_bytes, n_rows, n);
    if (st != KVS_OK) return st;
    if (n_tokens <= 0) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "matmul: %lld tokens", (long long)n_tokens);
    if (!x || !y) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "matmul: x or y is NULL");
    cudaStream_t s = (cudaStream_t)stream;
    const uint8_t *wb = (const uint8_t *)w;
    if (n_tokens <= MV_MAX_TOKENS) {
        const unsigned grid = grid_for(n_rows, MV_WARPS);
        with_type(type, [&](auto tag) {
            matvec_kernel<decltype(tag)::value>
                <<<grid, MV_WARPS * 32, 0, s>>>(wb, row_bytes, n_rows, n, x, (int)n_tokens, y);
        });
    } else {
        const int64_t tiles = ((n_rows + MM_ROWS - 1) / MM_ROWS) * ((n_tokens + MM_TOKS - 1) / MM_TOKS);
        const unsigned grid = grid_for(tiles, 1);
        with_type(type, [&](auto tag) {
            matmul_tiled_kernel<decltype(tag)::value>
                <<<grid, MM_THREADS, 0, s>>>(wb, row_bytes, n_rows, n, x, n_tokens, y);
        });
    }
    return kvs_cuda_launched("matmul");
}

/* ---- RMSNorm --------------------------------------------------------------------- */

/* Sum of a double over the block (THREADS threads); every thread gets it. */
__device__ double block_sum(double v, double *scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < THREADS / 32; w++) total += scratch[w];
    __syncthreads(); /* scratch is reused by the next call */
    return total;
}

/* A block per row: the sum of squares in double as the CPU's (the order
 * differs, the float scale almost never), then out = x * scale * weight
 * rounded twice as the CPU does. out == x is fine: a thread writes only the
 * elements it read, after the block has summed them all. */
__global__ void __launch_bounds__(THREADS) rmsnorm_kernel(const float *x, const float *weight, int64_t n_rows,
                                                          int64_t n, float eps, float *out) {
    __shared__ double scratch[THREADS / 32];
    for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        double sum = 0.0;
        for (int64_t i = threadIdx.x; i < n; i += THREADS) sum += (double)xr[i] * xr[i];
        sum = block_sum(sum, scratch);
        const float scale = (float)(1.0 / sqrt(sum / (double)n + eps));
        for (int64_t i = threadIdx.x; i < n; i += THREADS) o[i] = __fmul_rn(__fmul_rn(xr[i], scale), weight[i]);
    }
}

kvs_status kvs_cuda_rmsnorm_rows(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                                 float *out, void *stream) {
    if (!x || !weight || !out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "rmsnorm: x, weight or out is NULL");
    if (n_rows <= 0 || n <= 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "rmsnorm: %lld rows of %lld", (long long)n_rows, (long long)n);
    }
    rmsnorm_kernel<<<grid_for(n_rows, 1), THREADS, 0, (cudaStream_t)stream>>>(x, weight, n_rows, n, eps, out);
    return kvs_cuda_launched("rmsnorm");
}

/* ---- RoPE -------------------------------------------------------------------------- */

#define ROPE_MAX_ROT 4096 /* n_rot / 2 cos/sin pairs in shared memory: 16 KiB at most */

/* A block per token: first the n_rot / 2 angles, in double exactly as
 * kvs_rope computes them, into a shared cos/sin table; then every (head,
 * pair) rotation, with the CPU's two-rounding products. */
__global__ void __launch_bounds__(THREADS) rope_kernel(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim,
                                                       int32_t n_rot, int32_t neox, const int32_t *positions,
                                                       float freq_base, float freq_scale, const float *freq_factors) {
    __shared__ float cos_t[ROPE_MAX_ROT / 2], sin_t[ROPE_MAX_ROT / 2];
    const int32_t half = n_rot / 2;
    /* llama: adjacent pairs (2i, 2i+1); NeoX: (i, i + n_rot/2) */
    const int32_t pair_stride = neox ? half : 1, elem_stride = neox ? 1 : 2;
    for (int64_t t = blockIdx.x; t < n_tokens; t += gridDim.x) {
        for (int32_t i = threadIdx.x; i < half; i += THREADS) {
            double freq = pow((double)freq_base, -2.0 * i / n_rot);
            if (freq_factors) freq /= freq_factors[i];
            const double theta = (double)positions[t] * freq_scale * freq;
            cos_t[i] = (float)cos(theta);
            sin_t[i] = (float)sin(theta);
        }
        __syncthreads();
        float *xt = x + t * n_heads * (int64_t)head_dim;
        for (int64_t k = threadIdx.x; k < (int64_t)n_heads * half; k += THREADS) {
            const int32_t h = (int32_t)(k / half), i = (int32_t)(k % half);
            float *v = xt + (int64_t)h * head_dim + (int64_t)i * elem_stride;
            const float a = v[0], b = v[pair_stride], c = cos_t[i], s = sin_t[i];
            v[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
            v[pair_stride] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
        }
        __syncthreads(); /* the table is refilled for the next token */
    }
}

kvs_status kvs_cuda_rope_rows(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot,
                              int32_t neox, const int32_t *positions, float freq_base, float freq_scale,
                              const float *freq_factors, void *stream) {
    if (!x || !positions) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "rope: x or positions is NULL");
    if (n_tokens <= 0 || n_heads <= 0 || head_dim <= 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "rope: %lld tokens of %d heads of %d", (long long)n_tokens,
                        (int)n_heads, (int)head_dim);
    }
    if (n_rot <= 0 || n_rot % 2 != 0 || n_rot > head_dim || n_rot > ROPE_MAX_ROT) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "rope: n_rot = %d is not an even number in 2..min(head_dim %d, %d)",
                        (int)n_rot, (int)head_dim, ROPE_MAX_ROT);
    }
    if (!(freq_base > 0.0f)) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "rope: freq_base = %g", (double)freq_base);
    rope_kernel<<<grid_for(n_tokens, 1), THREADS, 0, (cudaStream_t)stream>>>(
        x, n_tokens, n_heads, head_dim, n_rot, neox, positions, freq_base, freq_scale, freq_factors);
    return kvs_cuda_launched("rope");
}

/* ---- element-wise ------------------------------------------------------------------- */

/* The formulas of ops.c's scalar kvs_swiglu / kvs_geglu (gelu_pytorch_tanh). */
__global__ void glu_kernel(int32_t gelu, float *gate, const float *up, int64_t n) {
    FOR_EACH(i, n) {
        const float g = gate[i];
        if (gelu) gate[i] = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g))) * up[i];
        else gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void add_kernel(float *x, const float *y, int64_t n) {
    FOR_EACH(i, n) x[i] += y[i];
}

__global__ void add_bias_kernel(float *y, const float *b, int64_t n_rows, int64_t n) {
    FOR_EACH(i, n_rows * n) y[i] += b[i % n];
}

__global__ void scale_kernel(float *x, float s, int64_t n) {
    FOR_EACH(i, n) x[i] *= s;
}

/* kvs_softcap multiplies by the float 1 / cap; so does this (inv from the host). */
__global__ void softcap_kernel(float *x, float cap, float inv, int64_t n) {
    FOR_EACH(i, n) x[i] = __fmul_rn(cap, tanhf(__fmul_rn(x[i], inv)));
}

static kvs_status check_elems(const char *who, const void *a, const void *b, int64_t n) {
    if (!a || !b) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: NULL buffer", who);
    if (n <= 0) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: n = %lld", who, (long long)n);
    return KVS_OK;
}

kvs_status kvs_cuda_glu_rows(int32_t gelu, float *gate, const float *up, int64_t n, void *stream) {
    kvs_status st = check_elems("glu", gate, up, n);
    if (st != KVS_OK) return st;
    if (gelu != 0 && gelu != 1) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "glu: gelu = %d (0 or 1)", (int)gelu);
    glu_kernel<<<grid_for(n, THREADS), THREADS, 0, (cudaStream_t)stream>>>(gelu, gate, up, n);
    return kvs_cuda_launched("glu");
}

kvs_status kvs_cuda_add(float *x, const float *y, int64_t n, void *stream) {
    kvs_status st = check_elems("add", x, y, n);
    if (st != KVS_OK) return st;
    add_kernel<<<grid_for(n, THREADS), THREADS, 0, (cudaStream_t)stream>>>(x, y, n);
    return kvs_cuda_launched("add");
}

kvs_status kvs_cuda_add_bias_rows(float *y, const float *b, int64_t n_rows, int64_t n, void *stream) {
    kvs_status st = check_elems("add_bias", y, b, n);
    if (st != KVS_OK) return st;
    if (n_rows <= 0) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "add_bias: %lld rows", (long long)n_rows);
    add_bias_kernel<<<grid_for(n_rows * n, THREADS), THREADS, 0, (cudaStream_t)stream>>>(y, b, n_rows, n);
    return kvs_cuda_launched("add_bias");
}

kvs_status kvs_cuda_scale(float *x, float s, int64_t n, void *stream) {
    kvs_status st = check_elems("scale", x, x, n);
    if (st != KVS_OK) return st;
    scale_kernel<<<grid_for(n, THREADS), THREADS, 0, (cudaStream_t)stream>>>(x, s, n);
    return kvs_cuda_launched("scale");
}

kvs_status kvs_cuda_softcap(float *x, float cap, int64_t n, void *stream) {
    kvs_status st = check_elems("softcap", x, x, n);
    if (st != KVS_OK) return st;
    if (!(cap > 0.0f)) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "softcap: cap = %g (must be > 0)", (double)cap);
    softcap_kernel<<<grid_for(n, THREADS), THREADS, 0, (cudaStream_t)stream>>>(x, cap, 1.0f / cap, n);
    return kvs_cuda_launched("softcap");
}

/* ---- the sink predictor's input ---------------------------------------------------- */

/* top[t] = max over the profile's channels of |x[t][c]| (backend_cpu.c's
 * cpu_channel_max): a thread per token, a handful of channels each. */
__global__ void channel_max_kernel(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *channels,
                                   int32_t n_channels, float *top) {
    FOR_EACH(t, n_tokens) {
        float m = 0.0f;
        for (int32_t i = 0; i < n_channels; i++) m = fmaxf(m, fabsf(x[t * n_embd + channels[i]]));
        top[t] = m;
    }
}

kvs_status kvs_cuda_channel_max(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *channels,
                                int32_t n_channels, float *top, void *stream) {
    kvs_status st = check_elems("channel_max", x, top, n_tokens);
    if (st != KVS_OK) return st;
    if (!channels || n_channels <= 0 || n_embd <= 0) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "channel_max: %d channels of %lld", (int)n_channels,
                        (long long)n_embd);
    }
    channel_max_kernel<<<grid_for(n_tokens, THREADS), THREADS, 0, (cudaStream_t)stream>>>(x, n_tokens, n_embd, channels,
                                                                                          n_channels, top);
    return kvs_cuda_launched("channel_max");
}
