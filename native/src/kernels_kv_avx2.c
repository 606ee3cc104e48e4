/* kernels_kv_avx2.c - AVX2/FMA/F16C twins of kernels_kv.c. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels_kv.h"
#include "kv_quant.h"
#include "simd_avx2.h"

void kvs_rotate_pair_avx2(int32_t n, float *a, float *b, const float *c, const float *s) {
    int32_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 x = _mm256_loadu_ps(a + t), y = _mm256_loadu_ps(b + t);
        const __m256 cv = _mm256_loadu_ps(c + t), sv = _mm256_loadu_ps(s + t);
        _mm256_storeu_ps(a + t, _mm256_fmsub_ps(x, cv, _mm256_mul_ps(y, sv)));
        _mm256_storeu_ps(b + t, _mm256_fmadd_ps(x, sv, _mm256_mul_ps(y, cv)));
    }
    for (; t < n; t++) {
        const float x = a[t], y = b[t];
        a[t] = x * c[t] - y * s[t];
        b[t] = x * s[t] + y * c[t];
    }
}

/* Eight keys at a time; four groups (a 32-key block) share each broadcast of
 * q[d], and even and odd d go to separate accumulators so that eight
 * independent FMA chains hide the FMA latency. */
void kvs_dot_tile_avx2(int32_t n, int32_t hd, int32_t stride, const float *kt, const float *q, float *out) {
    int32_t t0 = 0;
    for (; t0 + 32 <= n; t0 += 32) {
        /* named accumulators: an array of them ends up on the stack at -O2 */
        __m256 e0 = _mm256_setzero_ps(), e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
        int32_t d = 0;
        for (; d + 2 <= hd; d += 2) {
            const float *even = kt + (int64_t)d * stride + t0, *odd = even + stride;
            const __m256 qe = _mm256_set1_ps(q[d]), qo = _mm256_set1_ps(q[d + 1]);
            e0 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(even), e0);
            e1 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(even + 8), e1);
            e2 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(even + 16), e2);
            e3 = _mm256_fmadd_ps(qe, _mm256_loadu_ps(even + 24), e3);
            o0 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(odd), o0);
            o1 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(odd + 8), o1);
            o2 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(odd + 16), o2);
            o3 = _mm256_fmadd_ps(qo, _mm256_loadu_ps(odd + 24), o3);
        }
        if (d < hd) {
            const float *row = kt + (int64_t)d * stride + t0;
            const __m256 qd = _mm256_set1_ps(q[d]);
            e0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row), e0);
            e1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 8), e1);
            e2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 16), e2);
            e3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(row + 24), e3);
        }
        _mm256_storeu_ps(out + t0, _mm256_add_ps(e0, o0));
        _mm256_storeu_ps(out + t0 + 8, _mm256_add_ps(e1, o1));
        _mm256_storeu_ps(out + t0 + 16, _mm256_add_ps(e2, o2));
        _mm256_storeu_ps(out + t0 + 24, _mm256_add_ps(e3, o3));
    }
    for (; t0 + 8 <= n; t0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int32_t d = 0; d < hd; d++) {
            acc = _mm256_fmadd_ps(_mm256_set1_ps(q[d]), _mm256_loadu_ps(kt + (int64_t)d * stride + t0), acc);
        }
        _mm256_storeu_ps(out + t0, acc);
    }
    for (int32_t t = t0; t < n; t++) {
        float acc = 0.0f;
        for (int32_t d = 0; d < hd; d++) acc += q[d] * kt[(int64_t)d * stride + t];
        out[t] = acc;
    }
}

/* 8 * w channels of out (w a constant where inlined) kept in registers while
 * the n rows stream past: w = 8 gives eight FMA chains, hiding their latency. */
static inline __attribute__((always_inline)) void weighted_chunk(int32_t n, int32_t hd, const float *p,
                                                                  const float *vt, float *out, const int w) {
    __m256 acc[8];
    for (int k = 0; k < w; k++) acc[k] = _mm256_loadu_ps(out + 8 * k);
    for (int32_t t = 0; t < n; t++) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const float *row = vt + (int64_t)t * hd;
        for (int k = 0; k < w; k++) acc[k] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(row + 8 * k), acc[k]);
    }
    for (int k = 0; k < w; k++) _mm256_storeu_ps(out + 8 * k, acc[k]);
}

void kvs_weighted_rows_avx2(int32_t n, int32_t hd, const float *p, const float *vt, float *out) {
    int32_t d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) weighted_chunk(n, hd, p, vt + d0, out + d0, 8);
    for (; d0 + 32 <= hd; d0 += 32) weighted_chunk(n, hd, p, vt + d0, out + d0, 4);
    for (; d0 + 8 <= hd; d0 += 8) weighted_chunk(n, hd, p, vt + d0, out + d0, 1);
    for (; d0 < hd; d0++) {
        for (int32_t t = 0; t < n; t++) out[d0] += p[t] * vt[(int64_t)t * hd + d0];
    }
}

void kvs_f16_to_f32_avx2(int64_t n, const kvs_half *src, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}

void kvs_rotate_query_avx2(int32_t n_rot, int32_t hd, int neox, const float *cs, const float *sn, const float *q,
                           float scale, float *qb) {
    const int32_t half = n_rot / 2;
    const __m256 sc = _mm256_set1_ps(scale);
    if (neox && half % 8 == 0) {
        for (int32_t i = 0; i < half; i += 8) {
            const __m256 a = _mm256_loadu_ps(q + i), b = _mm256_loadu_ps(q + half + i);
            const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(sn + i);
            _mm256_storeu_ps(qb + i, _mm256_mul_ps(sc, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s))));
            _mm256_storeu_ps(qb + half + i, _mm256_mul_ps(sc, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c))));
        }
    } else if (!neox && n_rot % 8 == 0) {
        /* adjacent pairs: cos/sin duplicated per pair, the partner by a swap;
         * fmaddsub subtracts in the even lanes and adds in the odd ones */
        const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (int32_t d = 0; d < n_rot; d += 8) {
            const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs + d / 2)), dup);
            const __m256 s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sn + d / 2)), dup);
            const __m256 x = _mm256_loadu_ps(q + d), swapped = _mm256_permute_ps(x, 0xB1);
            _mm256_storeu_ps(qb + d, _mm256_mul_ps(sc, _mm256_fmaddsub_ps(x, c, _mm256_mul_ps(swapped, s))));
        }
    } else {
        const int32_t step = neox ? 1 : 2, stride = neox ? half : 1;
        for (int32_t i = 0; i < half; i++) {
            const int32_t a = i * step, b = a + stride;
            qb[a] = scale * (q[a] * cs[i] - q[b] * sn[i]);
            qb[b] = scale * (q[a] * sn[i] + q[b] * cs[i]);
        }
    }
    for (int32_t d = n_rot; d < hd; d++) qb[d] = scale * q[d];
}

/* Quantized values idx16*16 .. idx16*16+15 of a packed group (2, 4 or 8 bits,
 * LSB first) as two vectors of floats (the integers, not yet scaled). */
static inline void unpack16(int bits, const uint8_t *packed, int32_t idx16, __m256 *lo, __m256 *hi) {
    const uint8_t *p = packed + idx16 * 2 * bits;
    __m128i e;
    if (bits == 8) {
        e = _mm_loadu_si128((const __m128i *)p);
    } else if (bits == 4) {
        const __m128i v = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0x0f);
        e = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
    } else {
        int32_t w;
        memcpy(&w, p, sizeof w);
        const __m128i v = _mm_cvtsi32_si128(w), m = _mm_set1_epi8(3);
        const __m128i a0 = _mm_and_si128(v, m), a1 = _mm_and_si128(_mm_srli_epi16(v, 2), m);
        const __m128i a2 = _mm_and_si128(_mm_srli_epi16(v, 4), m), a3 = _mm_and_si128(_mm_srli_epi16(v, 6), m);
        e = _mm_unpacklo_epi16(_mm_unpacklo_epi8(a0, a1), _mm_unpacklo_epi8(a2, a3));
    }
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(e));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(e, 8)));
}

static inline int unpack16_covers(int bits, int32_t n) { return (bits == 2 || bits == 4 || bits == 8) && n % 16 == 0; }

void kvs_dequant_groups_avx2(int bits, int32_t n_ch, int32_t n, const uint8_t *data, int64_t group_bytes, float *out,
                             int64_t out_stride) {
    for (int32_t c = 0; c < n_ch; c++) {
        const uint8_t *g = data + c * group_bytes;
        float *y = out + c * out_stride;
        if (!unpack16_covers(bits, n)) {
            kvs_kv_dequantize_group_impl(g, n, bits, y, KVS_IMPL_AVX2);
            continue;
        }
        const __m256 scale = _mm256_set1_ps(half_at((const kvs_half *)g)), zero = _mm256_set1_ps(half_at((const kvs_half *)(g + 2)));
        for (int32_t i = 0; i < n / 16; i++) {
            __m256 lo, hi;
            unpack16(bits, g + 4, i, &lo, &hi);
            _mm256_storeu_ps(y + 16 * i, _mm256_fmadd_ps(lo, scale, zero));
            _mm256_storeu_ps(y + 16 * i + 8, _mm256_fmadd_ps(hi, scale, zero));
        }
    }
}

void kvs_key_tile_avx2(int bits, int32_t n, const uint8_t *data, int64_t group_bytes, int32_t n_pairs,
                       const int32_t *pair_a, const int32_t *pair_b, const float *cos_rows, const float *sin_rows,
                       int64_t stride, float *kt) {
    for (int32_t k = 0; k < n_pairs; k++) {
        const int64_t a = pair_a[k], b = pair_b[k];
        const uint8_t *ga = data + a * group_bytes, *gb = data + b * group_bytes;
        float *ka = kt + a * stride, *kb = kt + b * stride;
        const float *cs = cos_rows + a * stride, *sn = sin_rows + a * stride;
        if (!unpack16_covers(bits, n)) {
            kvs_kv_dequantize_group_impl(ga, n, bits, ka, KVS_IMPL_AVX2);
            kvs_kv_dequantize_group_impl(gb, n, bits, kb, KVS_IMPL_AVX2);
            kvs_rotate_pair_avx2(n, ka, kb, cs, sn);
            continue;
        }
        const __m256 sa = _mm256_set1_ps(half_at((const kvs_half *)ga)), za = _mm256_set1_ps(half_at((const kvs_half *)(ga + 2)));
        const __m256 sb = _mm256_set1_ps(half_at((const kvs_half *)gb)), zb = _mm256_set1_ps(half_at((const kvs_half *)(gb + 2)));
        for (int32_t i = 0; i < n / 16; i++) {
            __m256 x[2], y[2];
            unpack16(bits, ga + 4, i, &x[0], &x[1]);
            unpack16(bits, gb + 4, i, &y[0], &y[1]);
            for (int h = 0; h < 2; h++) {
                const int32_t t = 16 * i + 8 * h;
                const __m256 va = _mm256_fmadd_ps(x[h], sa, za), vb = _mm256_fmadd_ps(y[h], sb, zb);
                const __m256 c = _mm256_loadu_ps(cs + t), s = _mm256_loadu_ps(sn + t);
                _mm256_storeu_ps(ka + t, _mm256_fmsub_ps(va, c, _mm256_mul_ps(vb, s)));
                _mm256_storeu_ps(kb + t, _mm256_fmadd_ps(va, s, _mm256_mul_ps(vb, c)));
            }
        }
    }
}

float kvs_exp_shifted_avx2(int32_t n, float *x, float *max_out) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
    float max_x = hmax(vmax);
    for (; i < n; i++) max_x = x[i] > max_x ? x[i] : max_x;
    *max_out = max_x;
    if (max_x == -INFINITY) { /* nothing visible: all weights 0 */
        memset(x, 0, (size_t)n * sizeof(float));
        return 0.0f;
    }
    const __m256 shift = _mm256_set1_ps(max_x);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; i < n; i++) {
        x[i] = expf(x[i] - max_x);
        sum += x[i];
    }
    return sum;
}

/* nh (<= 4, a constant where inlined) heads over 16 channels of a group:
 * each token's quants are decoded once, scaled per head by p*scale, and the
 * zero points summed aside. */
static inline __attribute__((always_inline)) void weighted_slice(int bits, int32_t n_tok, int64_t row_bytes,
                                                                  const uint8_t *group0, int32_t idx16, const int nh,
                                                                  const float *p, int64_t p_stride, float *out,
                                                                  int64_t out_stride) {
    __m256 acc[4][2];
    float zsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < nh; j++) {
        acc[j][0] = _mm256_loadu_ps(out + j * out_stride);
        acc[j][1] = _mm256_loadu_ps(out + j * out_stride + 8);
    }
    for (int32_t t = 0; t < n_tok; t++) {
        const uint8_t *g = group0 + t * row_bytes;
        const float scale = half_at((const kvs_half *)g), zero = half_at((const kvs_half *)(g + 2));
        __m256 lo, hi;
        unpack16(bits, g + 4, idx16, &lo, &hi);
        for (int j = 0; j < nh; j++) {
            const float w = p[j * p_stride + t];
            const __m256 ws = _mm256_set1_ps(w * scale);
            acc[j][0] = _mm256_fmadd_ps(ws, lo, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(ws, hi, acc[j][1]);
            zsum[j] += w * zero;
        }
    }
    for (int j = 0; j < nh; j++) {
        const __m256 z = _mm256_set1_ps(zsum[j]);
        _mm256_storeu_ps(out + j * out_stride, _mm256_add_ps(acc[j][0], z));
        _mm256_storeu_ps(out + j * out_stride + 8, _mm256_add_ps(acc[j][1], z));
    }
}

/* One copy per head count, so that the loops over heads unroll. */
#define WEIGHTED_SLICE_N(NH)                                                                                  \
    static void weighted_slice_##NH(int bits, int32_t n_tok, int64_t row_bytes, const uint8_t *group0,       \
                                    int32_t idx16, const float *p, int64_t p_stride, float *out,             \
                                    int64_t out_stride) {                                                    \
        weighted_slice(bits, n_tok, row_bytes, group0, idx16, NH, p, p_stride, out, out_stride);             \
    }
WEIGHTED_SLICE_N(1)
WEIGHTED_SLICE_N(2)
WEIGHTED_SLICE_N(3)
WEIGHTED_SLICE_N(4)

typedef void (*weighted_slice_fn)(int bits, int32_t n_tok, int64_t row_bytes, const uint8_t *group0, int32_t idx16,
                                  const float *p, int64_t p_stride, float *out, int64_t out_stride);
static const weighted_slice_fn weighted_slices[5] = {NULL, weighted_slice_1, weighted_slice_2, weighted_slice_3,
                                                     weighted_slice_4};

void kvs_weighted_groups_avx2(int bits, int32_t n_tok, int32_t hd, int32_t G, const uint8_t *data, int32_t n_heads,
                              const float *p, int64_t p_stride, float *out, int64_t out_stride) {
    const int64_t gb = kvs_kv_group_bytes(bits, G), row_bytes = (hd / G) * gb;
    if (!unpack16_covers(bits, G)) {
        float row[KVS_KV_MAX_HEAD_DIM]; /* one group: G <= head_dim */
        for (int32_t t = 0; t < n_tok; t++) {
            for (int32_t g = 0; g < hd / G; g++) {
                kvs_kv_dequantize_group_impl(data + t * row_bytes + g * gb, G, bits, row, KVS_IMPL_AVX2);
                for (int32_t j = 0; j < n_heads; j++) {
                    kvs_weighted_rows_avx2(1, G, p + j * p_stride + t, row, out + j * out_stride + g * G);
                }
            }
        }
        return;
    }
    for (int32_t g = 0; g < hd / G; g++) {
        for (int32_t i = 0; i < G / 16; i++) {
            for (int32_t j0 = 0; j0 < n_heads; j0 += 4) {
                const int32_t nh = n_heads - j0 < 4 ? n_heads - j0 : 4;
                weighted_slices[nh](bits, n_tok, row_bytes, data + g * gb, i, p + j0 * p_stride, p_stride,
                                    out + j0 * out_stride + g * G + 16 * i, out_stride);
            }
        }
    }
}

/* Butterflies of distance 1, 2 and 4 inside a vector: x + partner in the
 * first half of each pair of runs, partner - x in the second (x * -1 is
 * exact, so each lane rounds as the scalar a + b or a - b does). */
static inline __m256 fwht8(__m256 x) {
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    x = _mm256_fmadd_ps(x, s1, _mm256_permute_ps(x, 0xB1));
    x = _mm256_fmadd_ps(x, s2, _mm256_permute_ps(x, 0x4E));
    return _mm256_fmadd_ps(x, s4, _mm256_permute2f128_ps(x, x, 1));
}

void kvs_fwht_avx2(int32_t n, float *x) {
    if (n < 8) {
        kvs_fwht(n, x);
        return;
    }
    for (int32_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, fwht8(_mm256_loadu_ps(x + i)));
    for (int32_t h = 8; h < n; h *= 2) {
        for (int32_t i = 0; i < n; i += 2 * h) {
            for (int32_t j = i; j < i + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
                _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
            }
        }
    }
    const __m256 norm = _mm256_set1_ps(1.0f / sqrtf((float)n));
    for (int32_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), norm));
}
