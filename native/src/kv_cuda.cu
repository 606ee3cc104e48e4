/* kv_cuda.cu - the KVSink cache's kernels on the GPU (kv_cuda.h): appending
 * rows to the window, committing blocks (rows brought to their block's
 * space, then quantized a group per thread), putting a displaced sink back
 * into its block, and attention over [sink rows | blocks | window runs]
 * read in place - quantized blocks are decoded as they are read, never
 * expanded - split over the keys and merged. The arithmetic of every
 * thread is kv_cuda_math.h's; kv_cache.c is the oracle.
 *
 * Attention: a block of threads per (KV head, part of the segments, tile
 * of tokens) decodes each segment once into shared memory for all the
 * queries of the tile (kv_cuda_math.h's kvd_attend_block), then a thread
 * per output element merges the parts. The launcher picks the parts so
 * that a one-token decode still spreads over the whole GPU. */
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels_cuda.h"
#include "kv_cuda.h"

/* a phase of the block attention: every thread's items, then a barrier */
#define KVD_PHASE(fn, ...)                                                   \
    do {                                                                     \
        fn(__VA_ARGS__, (int32_t)threadIdx.x, (int32_t)blockDim.x);          \
        __syncthreads();                                                     \
    } while (0)
#include "kv_cuda_math.h"

extern "C" {
#include "status.h"
}

#define ATTEND_THREADS 128

static kvs_status check_geometry(const char *what, const kvs_kv_dev *g) {
    if (!g || !g->win_k || !g->win_v || g->hd < 2 || g->hd > KVD_MAX_HD || g->B < 8 || g->B > KVD_MAX_B ||
        g->n_layer < 1 || g->n_kv < 1 || g->Wcap < g->B) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "%s: the cache's geometry is not one kv_cache.c makes", what);
    }
    return KVS_OK;
}

/* ---- appending ---------------------------------------------------------------- */

__global__ void store_kernel(kvs_kv_dev g, int32_t il, int32_t n_past, int32_t n_tokens, const float *k,
                             const float *v) {
    const int64_t kv_dim = (int64_t)g.n_kv * g.hd;
    FOR_EACH(i, n_tokens * kv_dim) kvd_store(&g, il, n_past, (int32_t)(i / kv_dim), i % kv_dim, k, v);
}

kvs_status kvs_cuda_kv_store(const kvs_kv_dev *g, int32_t il, int32_t n_past, int32_t n_tokens, const float *k,
                             const float *v, void *stream) {
    kvs_status st = check_geometry("kv_store", g);
    if (st != KVS_OK) return st;
    if (il < 0 || il >= g->n_layer || n_tokens < 1 || n_past < 0 || !k || !v) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv_store: layer %d, %d tokens at %d", il, n_tokens, n_past);
    }
    const int64_t n = (int64_t)n_tokens * g->n_kv * g->hd;
    store_kernel<<<grid_for(n, THREADS), THREADS, 0, (cudaStream_t)stream>>>(*g, il, n_past, n_tokens, k, v);
    return kvs_cuda_launched("kv_store");
}

/* ---- committing a block ------------------------------------------------------ */

__global__ void tile_kernel(kvs_kv_dev g, int32_t o0, float *tile) {
    const int64_t per_kind = (int64_t)g.n_layer * g.n_kv * g.B;
    FOR_EACH(i, 2 * per_kind) {
        const int is_key = i < per_kind;
        const int64_t j = i % per_kind;
        const int32_t t = (int32_t)(j % g.B), h = (int32_t)(j / g.B % g.n_kv), il = (int32_t)(j / g.B / g.n_kv);
        kvd_load_tile_row(&g, o0, il, h, t, is_key, kvd_tile_row(&g, tile, is_key, il, h, t));
    }
}

__global__ void encode_kernel(kvs_kv_dev g, int32_t slot, int32_t lslot, uint64_t skip, const float *tile) {
    const int32_t ku = kvd_encode_units(&g, 1), vu = kvd_encode_units(&g, 0);
    FOR_EACH(i, (int64_t)g.n_layer * g.n_kv * (ku + vu)) {
        const int32_t u = (int32_t)(i % (ku + vu)), h = (int32_t)(i / (ku + vu) % g.n_kv);
        const int32_t il = (int32_t)(i / (ku + vu) / g.n_kv), is_key = u < ku;
        uint8_t *data = kvd_block(&g, slot, lslot, il, h) + (is_key ? 0 : g.k_bytes);
        kvd_encode_unit(&g, kvd_tile_row(&g, (float *)tile, is_key, il, h, 0), skip, is_key, is_key ? u : u - ku, data);
    }
}

kvs_status kvs_cuda_kv_encode_block(const kvs_kv_dev *g, int32_t o0, int32_t slot, int32_t lslot, uint64_t skip,
                                    float *tile, void *stream) {
    kvs_status st = check_geometry("kv_encode_block", g);
    if (st != KVS_OK) return st;
    if (o0 < 0 || slot < 0 || (g->L > 0 && (lslot < 0 || lslot >= g->L)) || !tile) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv_encode_block: block %d (local %d) at %d", slot, lslot, o0);
    }
    const int64_t rows = 2 * (int64_t)g->n_layer * g->n_kv * g->B;
    tile_kernel<<<grid_for(rows, THREADS), THREADS, 0, (cudaStream_t)stream>>>(*g, o0, tile);
    if ((st = kvs_cuda_launched("kv_tile")) != KVS_OK) return st;
    const int64_t units = (int64_t)g->n_layer * g->n_kv * (kvd_encode_units(g, 1) + kvd_encode_units(g, 0));
    encode_kernel<<<grid_for(units, THREADS), THREADS, 0, (cudaStream_t)stream>>>(*g, slot, lslot, skip, tile);
    return kvs_cuda_launched("kv_encode");
}

/* ---- a displaced sink back into its block --------------------------------- */

__global__ void sink_row_kernel(kvs_kv_dev g, int32_t r, int32_t t, float *tile) {
    FOR_EACH(i, (int64_t)g.n_layer * g.n_kv) {
        const int32_t il = (int32_t)(i / g.n_kv), h = (int32_t)(i % g.n_kv);
        float *row = tile + i * g.hd;
        const int64_t index = kvd_row_index(&g, r, il, h);
        for (int32_t d = 0; d < g.hd; d++) row[d] = kvd_row_elem(&g, g.sink_k, index + d);
        if (g.rot_k) kvd_rotate_key_row(&g, kvd_kind(&g, il), row, t);
    }
}

__global__ void requantize_kernel(kvs_kv_dev g, int32_t slot, int32_t lslot, int32_t t, uint64_t skip,
                                  const float *tile) {
    FOR_EACH(i, (int64_t)g.n_layer * g.n_kv * g.hd) {
        const int32_t d = (int32_t)(i % g.hd), h = (int32_t)(i / g.hd % g.n_kv), il = (int32_t)(i / g.hd / g.n_kv);
        if (kvd_trimmed(&g, il) && lslot < 0) continue; /* beyond every window */
        kvd_requantize_channel(&g, kvd_block(&g, slot, lslot, il, h), tile + (i / g.hd) * g.hd, t, d, skip);
    }
}

kvs_status kvs_cuda_kv_requantize_keys(const kvs_kv_dev *g, int32_t r, int32_t slot, int32_t lslot, int32_t t,
                                       uint64_t skip, float *tile, void *stream) {
    kvs_status st = check_geometry("kv_requantize_keys", g);
    if (st != KVS_OK) return st;
    if (g->kbits == 0 || g->key_per_token || r < 0 || slot < 0 || t < 0 || t >= g->B || !tile) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv_requantize_keys: sink row %d, block %d, token %d", r, slot, t);
    }
    const int64_t rows = (int64_t)g->n_layer * g->n_kv;
    sink_row_kernel<<<grid_for(rows, THREADS), THREADS, 0, (cudaStream_t)stream>>>(*g, r, t, tile);
    if ((st = kvs_cuda_launched("kv_sink_row")) != KVS_OK) return st;
    requantize_kernel<<<grid_for(rows * g->hd, THREADS), THREADS, 0, (cudaStream_t)stream>>>(*g, slot, lslot, t, skip,
                                                                                           tile);
    return kvs_cuda_launched("kv_requantize");
}

/* ---- attention ---------------------------------------------------------------- */

/* kvd_attend_block's phases, a barrier after each */
__global__ void attend_kernel(kvs_kv_dev g, kvs_kv_attend_args a, int32_t tq) {
    extern __shared__ float smem[];
    const kvd_job j = kvd_job_of(&g, &a, blockIdx.x, tq);
    kvd_tile t = kvd_tile_carve(smem, g.hd, g.B, j.n_queries);
    kvd_attend_block(&g, &a, &j, &t);
}

__global__ void combine_kernel(kvs_kv_dev g, kvs_kv_attend_args a) {
    const int64_t rec = g.hd + 2;
    FOR_EACH(i, (int64_t)a.n_tokens * a.n_head * g.hd) {
        const int32_t d = (int32_t)(i % g.hd), hq = (int32_t)(i / g.hd % a.n_head);
        const int32_t t = (int32_t)(i / g.hd / a.n_head);
        const int64_t head = (int64_t)t * a.n_head + hq;
        a.out[t * a.q_stride + (int64_t)hq * g.hd + d] = kvd_combine_elem(g.hd, a.n_parts, a.partial + head * a.n_parts * rec, d);
    }
}

/* Shared memory a block may use once opted in (H100/H200: 227 KiB), and
 * the blocks a launch aims for: 4 per multiprocessor. */
static kvs_status device_limits(int64_t *smem_bytes, int64_t *target_blocks) {
    static int64_t smem = 0, sms = 0;
    if (smem == 0) {
        int device = 0, value = 0, count = 0;
        cudaError_t e = cudaGetDevice(&device);
        if (e == cudaSuccess) e = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (e == cudaSuccess) e = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
        if (e != cudaSuccess) return kvs_cuda_fail(e, "the GPU's limits");
        smem = value, sms = count;
    }
    *smem_bytes = smem;
    *target_blocks = 4 * sms;
    return KVS_OK;
}

kvs_status kvs_cuda_kv_attend(const kvs_kv_dev *g, kvs_kv_attend_args *a, void *stream) {
    kvs_status st = check_geometry("kv_attend", g);
    if (st != KVS_OK) return st;
    if (!a || a->il < 0 || a->il >= g->n_layer || a->n_tokens < 1 || a->n_head < g->n_kv || a->n_head % g->n_kv ||
        a->n_segs < 1 || a->partial_records < (int64_t)a->n_tokens * a->n_head || !a->segs || !a->q ||
        !a->partial || !a->out) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kv_attend: arguments out of range");
    }
    int64_t smem_limit = 0, target_blocks = 0;
    if ((st = device_limits(&smem_limit, &target_blocks)) != KVS_OK) return st;
    const int32_t group = a->n_head / g->n_kv, tq = kvd_tokens_per_block(group, a->n_tokens, g->hd, g->B, smem_limit);
    if (tq == 0) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "kv_attend: %d query heads per KV head of %d dims over blocks of %d "
                        "need more shared memory than this GPU's %lld bytes", group, g->hd, g->B, (long long)smem_limit);
    }
    const size_t bytes = (size_t)kvd_tile_floats(g->hd, g->B, tq * group) * sizeof(float);
    static size_t opted_in = 48 * 1024; /* what a block may use without asking; raised once per size */
    if (bytes > opted_in) {
        const cudaError_t e = cudaFuncSetAttribute(attend_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
        if (e != cudaSuccess) return kvs_cuda_fail(e, "kv_attend's shared memory");
        opted_in = bytes;
    }
    a->n_parts = kvd_parts(a, g->n_kv, tq, target_blocks);
    const int64_t blocks = (int64_t)g->n_kv * a->n_parts * kvd_token_tiles(a->n_tokens, tq);
    attend_kernel<<<(unsigned)blocks, ATTEND_THREADS, bytes, (cudaStream_t)stream>>>(*g, *a, tq);
    if ((st = kvs_cuda_launched("kv_attend")) != KVS_OK) return st;
    const int64_t outs = (int64_t)a->n_tokens * a->n_head * g->hd;
    combine_kernel<<<grid_for(outs, THREADS), THREADS, 0, (cudaStream_t)stream>>>(*g, *a);
    return kvs_cuda_launched("kv_combine");
}
