/*
 * kvsink.h - the one public header of the kvsink_cpp C core.
 *
 * Conventions:
 *   - every object is an opaque handle with a create/free pair;
 *   - every call that can fail returns kvs_status; on failure kvs_last_error()
 *     gives the concrete reason (thread-local, valid until the next failing call
 *     on the same thread);
 *   - nothing a file or a caller can trigger aborts or exits the process;
 *   - enum values are never renumbered (the Python binding mirrors them);
 *   - threads: a model is read-only once loaded (its sink profile is set
 *     before contexts are created), so contexts of one model may run on
 *     different threads at the same time; one context is used by one thread
 *     at a time (calls on it must be serialised by the caller). Models and
 *     contexts are freed when no call on them is running.
 */
#ifndef KVSINK_H
#define KVSINK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define KVS_API __declspec(dllexport)
#else
#  define KVS_API __attribute__((visibility("default")))
#endif

#define KVS_ABI_VERSION 7

/* ---- status and errors ------------------------------------------------- */

typedef enum kvs_status {
    KVS_OK = 0,
    KVS_ERR_INVALID_ARGUMENT = 1, /* a caller passed something unusable        */
    KVS_ERR_IO = 2,               /* open/stat/mmap failed                      */
    KVS_ERR_FORMAT = 3,           /* the file is malformed                      */
    KVS_ERR_UNSUPPORTED = 4,      /* valid, but not something we implement      */
    KVS_ERR_OUT_OF_MEMORY = 5,
    KVS_ERR_CONTEXT_FULL = 6,     /* more tokens than the context can hold      */
    KVS_ERR_INTERNAL = 7,
    KVS_ERR_CANCELLED = 8         /* kvs_context_set_cancel stopped an evaluation */
} kvs_status;

/* The reason for the last failure on this thread ("" when none). */
KVS_API const char *kvs_last_error(void);
/* A fixed name for a status ("format error", ...). */
KVS_API const char *kvs_status_string(kvs_status status);
/* KVS_ABI_VERSION of the built library: the binding refuses a mismatch. */
KVS_API int32_t kvs_abi_version(void);

/* ---- CPU features and tensor formats ----------------------------------- */

/* GGML tensor type ids, as stored in GGUF files. */
typedef enum kvs_type {
    KVS_TYPE_F32 = 0,
    KVS_TYPE_F16 = 1,
    KVS_TYPE_Q4_0 = 2,
    KVS_TYPE_Q4_1 = 3,
    KVS_TYPE_Q5_0 = 6,
    KVS_TYPE_Q5_1 = 7,
    KVS_TYPE_Q8_0 = 8,
    KVS_TYPE_Q2_K = 10,
    KVS_TYPE_Q3_K = 11,
    KVS_TYPE_Q4_K = 12,
    KVS_TYPE_Q5_K = 13,
    KVS_TYPE_Q6_K = 14,
    KVS_TYPE_BF16 = 30
} kvs_type;

/* Kernel implementations, for tests and benchmarks. */
typedef enum kvs_impl {
    KVS_IMPL_AUTO = 0,   /* the best this CPU supports */
    KVS_IMPL_SCALAR = 1, /* plain C reference          */
    KVS_IMPL_AVX2 = 2    /* AVX2 + FMA + F16C          */
} kvs_impl;

/* 1 when the CPU (and this build) can run the AVX2 kernels. */
KVS_API int32_t kvs_cpu_has_avx2(void);

/* Layout of one tensor type: elements per block and bytes per block.
 * Fails with KVS_ERR_UNSUPPORTED for a type id we do not implement. */
KVS_API kvs_status kvs_type_layout(int32_t type, int64_t *block_elems, int64_t *block_bytes);
/* Name of a type id ("Q4_K"), or NULL if unknown. */
KVS_API const char *kvs_type_name(int32_t type);

/* Dequantize n elements (a multiple of the block size) of `type` to f32. */
KVS_API kvs_status kvs_dequantize(int32_t type, const void *src, int64_t n, float *dst);
/* out = dot(row of n elements of `type`, x) with the chosen implementation.
 * KVS_ERR_UNSUPPORTED when impl is AVX2 and the CPU lacks it. */
KVS_API kvs_status kvs_vec_dot(int32_t type, int32_t impl, const void *row,
                               const float *x, int64_t n, float *out);

/* How matrix products treat their input activations. */
typedef enum kvs_matmul_mode {
    KVS_MATMUL_F32 = 0, /* exact: f32 activations against dequantized weights (the reference) */
    KVS_MATMUL_Q8 = 1   /* fast: activations quantized to 8 bits in blocks of 32, integer dots
                           for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights (other types stay exact;
                           the output projection that makes the logits is exact in
                           batches and takes 16-bit activations for one Q8_0 token) */
} kvs_matmul_mode;

/* The fast path's activation quantizer: n (a multiple of 32) floats to int8
 * q[n] and one scale per 32 in d[n / 32] (x ~= d * q). */
KVS_API kvs_status kvs_quantize_activations(int32_t impl, const float *x, int64_t n, int8_t *q, float *d);
/* The fast path's matrix product, as the forward pass runs it (one thread):
 * out[t * n_rows + r] = dot(row r, token t of x) for n_rows consecutive rows
 * of n elements of `type` and n_tokens rows of n floats in x (quantized as
 * above; with outlier_ratio > 0, elements above outlier_ratio times their
 * row's median block maximum are taken out and multiplied exactly, as
 * kvs_context_params.act_outlier_ratio does). KVS_ERR_UNSUPPORTED for a type
 * without an integer dot. */
KVS_API kvs_status kvs_matmul_q8(int32_t type, int32_t impl, float outlier_ratio, const void *rows, int64_t n_rows, int64_t n,
                                 const float *x, int64_t n_tokens, float *out);
/* The fast path's logits product (one thread, token by token): x quantized
 * to 16 bits per 32 (one scale each), int8 weights widened to 16 bits; the
 * same layout of arguments as kvs_matmul_q8. KVS_ERR_UNSUPPORTED for types
 * other than Q8_0. */
KVS_API kvs_status kvs_matmul_q16(int32_t type, int32_t impl, const void *rows, int64_t n_rows, int64_t n,
                                  const float *x, int64_t n_tokens, float *out);

/* ---- CUDA ---------------------------------------------------------------- */

/* 1 when this library was built with the CUDA backend (KVSINK_CUDA=ON). */
KVS_API int32_t kvs_cuda_built(void);
/* KVS_OK when the CUDA backend can run here; otherwise KVS_ERR_UNSUPPORTED
 * and kvs_last_error() says which: built without CUDA, no driver, a driver
 * older than the runtime, no device, or no kernel image for the device. */
KVS_API kvs_status kvs_cuda_check(void);

/* Test entries of the CUDA kernels, each the twin of a CPU scalar kernel:
 * host buffers in and out (the call uploads, runs on device 0, downloads
 * and waits). KVS_ERR_UNSUPPORTED (with kvs_cuda_check's reason) where
 * CUDA cannot run. */
/* dst = the n elements of type at src, as kvs_dequantize. */
KVS_API kvs_status kvs_cuda_dequantize(int32_t type, const void *src, int64_t n, float *dst);
/* out[t * n_rows + r] = dot(row r, x[t]) with f32 activations and f32
 * accumulation (the CPU exact path's product). Rows lie one after another. */
KVS_API kvs_status kvs_cuda_matmul(int32_t type, const void *rows, int64_t n_rows, int64_t n, const float *x,
                                   int64_t n_tokens, float *out);
/* out = each row of n (of n_rows) / rms(row) * weight, as the CPU RMSNorm. */
KVS_API kvs_status kvs_cuda_rmsnorm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                                    float *out);
/* x: n_tokens x n_heads heads of head_dim floats, token t rotated for
 * positions[t] (the first n_rot elements of each head; adjacent pairs, or
 * NeoX halves when neox), base/scale/factors as the CPU RoPE (freq_factors:
 * n_rot / 2 floats or NULL). In place. */
KVS_API kvs_status kvs_cuda_rope(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot,
                                 int32_t neox, const int32_t *positions, float freq_base, float freq_scale,
                                 const float *freq_factors);
/* gate = act(gate) * up for n elements: SiLU (gelu 0) or tanh-GELU (gelu 1). In place. */
KVS_API kvs_status kvs_cuda_glu(int32_t gelu, float *gate, const float *up, int64_t n);

/* ---- GGUF files --------------------------------------------------------- */

typedef struct kvs_gguf kvs_gguf;

/* GGUF metadata value types, as stored in the file. */
typedef enum kvs_gguf_type {
    KVS_GGUF_UINT8 = 0,
    KVS_GGUF_INT8 = 1,
    KVS_GGUF_UINT16 = 2,
    KVS_GGUF_INT16 = 3,
    KVS_GGUF_UINT32 = 4,
    KVS_GGUF_INT32 = 5,
    KVS_GGUF_FLOAT32 = 6,
    KVS_GGUF_BOOL = 7,
    KVS_GGUF_STRING = 8,
    KVS_GGUF_ARRAY = 9,
    KVS_GGUF_UINT64 = 10,
    KVS_GGUF_INT64 = 11,
    KVS_GGUF_FLOAT64 = 12
} kvs_gguf_type;

/* One metadata entry. Pointers point into the file mapping and live as long
 * as the kvs_gguf handle. */
typedef struct kvs_gguf_kv_info {
    const char *key;     /* not NUL-terminated: use key_len */
    uint64_t key_len;
    int32_t type;        /* kvs_gguf_type */
    int32_t elem_type;   /* element type when type == ARRAY, else == type */
    uint64_t count;      /* array length; 1 for a scalar; byte length for a STRING */
    const void *data;    /* scalar value, string bytes, or the packed elements of a
                            numeric array (little-endian, unaligned); NULL for an
                            array of strings (use kvs_gguf_kv_string) */
} kvs_gguf_kv_info;

/* One tensor description. */
typedef struct kvs_gguf_tensor_info {
    const char *name;    /* not NUL-terminated: use name_len */
    uint64_t name_len;
    int32_t type;        /* kvs_type */
    int32_t n_dims;
    int64_t ne[4];       /* elements per dimension, ne[0] innermost; unused = 1 */
    uint64_t offset;     /* relative to the data section */
    uint64_t n_bytes;
    const void *data;    /* in the mapping */
} kvs_gguf_tensor_info;

/* Map and validate a GGUF file (v2 or v3). Every count, length, offset and
 * dimension is checked against the file size before use. */
KVS_API kvs_status kvs_gguf_open(const char *path, kvs_gguf **out);
KVS_API void kvs_gguf_free(kvs_gguf *gguf);

KVS_API uint32_t kvs_gguf_version(const kvs_gguf *gguf);
KVS_API uint64_t kvs_gguf_alignment(const kvs_gguf *gguf);
KVS_API uint64_t kvs_gguf_data_offset(const kvs_gguf *gguf);
KVS_API uint64_t kvs_gguf_file_size(const kvs_gguf *gguf);
KVS_API int64_t kvs_gguf_n_kv(const kvs_gguf *gguf);
KVS_API int64_t kvs_gguf_n_tensors(const kvs_gguf *gguf);

KVS_API kvs_status kvs_gguf_kv(const kvs_gguf *gguf, int64_t index, kvs_gguf_kv_info *out);
/* Element j of an array-of-strings entry. */
KVS_API kvs_status kvs_gguf_kv_string(const kvs_gguf *gguf, int64_t index, uint64_t j,
                                      const char **str, uint64_t *len);
/* Index of a key, or -1 when absent. */
KVS_API int64_t kvs_gguf_find_key(const kvs_gguf *gguf, const char *key);

KVS_API kvs_status kvs_gguf_tensor(const kvs_gguf *gguf, int64_t index,
                                   kvs_gguf_tensor_info *out);
/* Index of a tensor, or -1 when absent. */
KVS_API int64_t kvs_gguf_find_tensor(const kvs_gguf *gguf, const char *name);

/* ---- models ------------------------------------------------------------- */

typedef struct kvs_model kvs_model;

typedef struct kvs_model_params {
    int32_t reserved;    /* keeps the struct non-empty; future options go here */
} kvs_model_params;

KVS_API kvs_model_params kvs_model_default_params(void);
/* Load a model; weights are used in place from the file mapping. */
KVS_API kvs_status kvs_model_load(const char *path, const kvs_model_params *params,
                                  kvs_model **out);
KVS_API void kvs_model_free(kvs_model *model);

/* The model's GGUF file (borrowed: lives as long as the model). */
KVS_API const kvs_gguf *kvs_model_gguf(const kvs_model *model);
KVS_API int32_t kvs_model_n_vocab(const kvs_model *model);
KVS_API int32_t kvs_model_n_ctx_train(const kvs_model *model);
KVS_API int32_t kvs_model_n_embd(const kvs_model *model);
KVS_API int32_t kvs_model_n_layer(const kvs_model *model);
/* 1 when the model has a sink profile (from its kvsink.* keys, or set below). */
KVS_API int32_t kvs_model_has_sink_profile(const kvs_model *model);
/* Give the model a sink profile (replacing any): after layer `layer`, a token
 * is a sink when |hidden[c]| > threshold for a c in channels[0..n_channels).
 * For profiles kept outside the GGUF; checked as the kvsink.* keys are. Call
 * it before creating contexts: they read the profile when they evaluate. */
KVS_API kvs_status kvs_model_set_sink_profile(kvs_model *model, int32_t layer, const int32_t *channels,
                                              int32_t n_channels, float threshold);

/* ---- contexts (a KV cache plus scratch; many per model) ----------------- */

/* x <- H x with the normalized Walsh-Hadamard matrix of order n (a power of
 * two up to 4096) and impl's kernel: the rotation of kv_rotate's blocks. */
KVS_API kvs_status kvs_hadamard(int32_t impl, int64_t n, float *x);

/* Quantize n values as one KV cache group of kv_type (kvs_kv_type; Q types
 * only) and dequantize them into y with impl's kernels: the cache's round trip. */
KVS_API kvs_status kvs_kv_roundtrip(int32_t kv_type, int32_t impl, const float *x, int64_t n, float *y);

typedef struct kvs_context kvs_context;

/* KV cache element types: F32/F16 rows, or integer blocks with fp16 scale and zero point. */
typedef enum kvs_kv_type {
    KVS_KV_F32 = 0,
    KVS_KV_F16 = 1,
    KVS_KV_Q8 = 2,
    KVS_KV_Q4 = 3,
    KVS_KV_Q3 = 4,
    KVS_KV_Q2 = 5
} kvs_kv_type;

/* Bits of kvs_context_params.kv_rotate: a Hadamard rotation (over head_dim, a
 * power of two) of quantized blocks, spreading outlier channels over all
 * channels before the integer groups are formed. Keys are stored rotated by
 * RoPE at their offset in the block and then by H, so attention rotates the
 * query instead of every key; value sums over rotated blocks are rotated back
 * once per head. Float caches and sink rows are never rotated. */
typedef enum kvs_kv_rotate {
    KVS_KV_ROTATE_K = 1,
    KVS_KV_ROTATE_V = 2
} kvs_kv_rotate;

/* Which tokens keep exact fp16 K/V rows. */
typedef enum kvs_sink_policy {
    KVS_SINKS_NONE = 0,
    KVS_SINKS_PFN = 1,    /* the first sink_pfn tokens                                   */
    KVS_SINKS_KVSINK = 2  /* predicted from the model's sink profile; without one, pfn:1 */
} kvs_sink_policy;

/* Where a context's forward pass runs, chosen once at creation. */
typedef enum kvs_device {
    KVS_DEVICE_CPU = 0,
    KVS_DEVICE_CUDA = 1   /* NVIDIA GPU 0: fails at creation with the reason where CUDA cannot run */
} kvs_device;

typedef struct kvs_context_params {
    int32_t n_ctx;       /* KV cache capacity in tokens; 0 = the model's training context */
    int32_t n_batch;     /* most tokens per kvs_context_eval call                          */
    int32_t n_threads;   /* worker threads for matrix products, 1..1024                     */
    int32_t impl;        /* kvs_impl: kernels to use                                       */
    int32_t type_k;      /* kvs_kv_type of keys (default KVS_KV_Q8; KVS_KV_F32 is exact)     */
    int32_t type_v;      /* kvs_kv_type of values                                          */
    int32_t kv_block;    /* tokens per quantized block: multiple of 8 in 8..64; 0 (default):
                            64 when a cache type is q4, else 32                            */
    int32_t kv_recent;   /* newest tokens always kept unquantized (default 32)             */
    int32_t kv_group;    /* channels per value group, and per key group when per token;
                            0 (default): 64 for q4 (when head_dim allows), else 32          */
    int32_t kv_key_per_token; /* 0: keys quantized per channel across a block (KIVI, default);
                                 1: per token in groups of kv_group channels                */
    int32_t sink_policy; /* kvs_sink_policy (default KVS_SINKS_KVSINK)                      */
    int32_t sink_pfn;    /* N of KVS_SINKS_PFN: the first N tokens are sinks               */
    int32_t sink_capacity; /* rows of the exact sink table; 0 (default): max(64, n_ctx / 32).
                              When full, a predicted sink with a higher score than the
                              weakest row takes its place (that token is quantized); the
                              first pfn tokens and position 0 under kvsink are pinned     */
    int32_t kv_ring;     /* 1: when full, evict the oldest blocks and keep the sinks
                            (StreamingLLM); 0 (default): eval fails with CONTEXT_FULL      */
    int32_t matmul;      /* kvs_matmul_mode of the matrix products (default KVS_MATMUL_Q8;
                            KVS_MATMUL_F32 is the exact reference)                          */
    int32_t kv_rotate;   /* KVS_KV_ROTATE_* bits; -1 (default): the q4/q3/q2 ones of keys and
                            values when head_dim is a power of two, else none              */
    float act_outlier_ratio; /* fast path: an activation above this many times its row's
                            median 32-block maximum (a massive activation, as sink tokens
                            carry) is taken out of its 8-bit block and multiplied exactly;
                            0: none (plain 8-bit). Default 4 */
    int32_t swa_full;    /* 1: sliding-window layers keep every token, as global layers do
                            (llama.cpp's --swa-full); 0 (default): only the blocks their
                            window can still reach, so going back more than a block from
                            the end (kvs_context_set_n_past) clears the cache            */
    int32_t device;      /* kvs_device the context runs on (default KVS_DEVICE_CPU)         */
} kvs_context_params;

KVS_API kvs_context_params kvs_context_default_params(void);
KVS_API kvs_status kvs_context_create(kvs_model *model, const kvs_context_params *params,
                                      kvs_context **out);
KVS_API void kvs_context_free(kvs_context *ctx);

/* The parameters the context runs with: defaults resolved (n_ctx, n_batch,
 * kv_block, kv_group, kv_rotate, sink_capacity, impl) and the sink policy as
 * it runs (kvsink on a model without a profile reads pfn with sink_pfn 1). */
KVS_API kvs_context_params kvs_context_get_params(const kvs_context *ctx);
KVS_API int32_t kvs_context_n_ctx(const kvs_context *ctx);
KVS_API int32_t kvs_context_n_batch(const kvs_context *ctx);
/* Tokens evaluated so far (positions 0 .. n_past-1; some may have been evicted). */
KVS_API int32_t kvs_context_n_past(const kvs_context *ctx);
/* Forget the cache from position n_past on (0 clears it); n_past <= current.
 * Quantized blocks are not cut: the cache may keep fewer tokens than asked
 * (read kvs_context_n_past afterwards and evaluate the rest again). */
KVS_API kvs_status kvs_context_set_n_past(kvs_context *ctx, int32_t n_past);
/* KV cache bytes per token once quantized (all layers, K and V, scales included). */
KVS_API double kvs_context_kv_bytes_per_token(const kvs_context *ctx);
/* Where a context's KV cache memory goes, by kind of layer: global layers
 * keep every token; sliding-window (local) layers, unless swa_full, only the
 * newest local_block_tokens of quantized blocks (their window and a margin). */
typedef struct kvs_kv_memory {
    int32_t n_global_layers, n_local_layers;
    int32_t local_window;          /* positions a local layer's query sees (0: no local layers) */
    int32_t local_block_tokens;    /* tokens of blocks local layers keep (0: every block) */
    double global_bytes_per_token; /* blocks of all global layers, K and V, scales included */
    double local_bytes_per_token;  /* the same for all local layers (while within their blocks) */
    int64_t allocated_bytes;       /* the cache's buffers: blocks, window, sink table, RoPE tables */
} kvs_kv_memory;
KVS_API void kvs_context_kv_memory(const kvs_context *ctx, kvs_kv_memory *out);
/* Rows in the sink table, and non-sink tokens evicted by the ring buffer. */
KVS_API int32_t kvs_context_n_sinks(const kvs_context *ctx);
KVS_API int32_t kvs_context_n_evicted(const kvs_context *ctx);
/* Predicted sinks that were quantized after all: no free row, or a stronger one took theirs. */
KVS_API int32_t kvs_context_n_sinks_dropped(const kvs_context *ctx);
/* Fast path: token rows of matrix-product inputs that had massive
 * activations taken out, and how many activations, since the context began. */
KVS_API void kvs_context_activation_outliers(const kvs_context *ctx, int64_t *rows, int64_t *activations);
/* Rows of the sink table (sink_capacity resolved). */
KVS_API int32_t kvs_context_sink_capacity(const kvs_context *ctx);
/* Positions of the tokens in the sink table, increasing: writes at most
 * capacity of them and returns how many there are. */
KVS_API int32_t kvs_context_sink_positions(const kvs_context *ctx, int32_t *positions, int32_t capacity);
/* Seconds spent in kvs_context_eval, and in the sink predictor within it. */
KVS_API void kvs_context_timings(const kvs_context *ctx, double *eval_seconds, double *sink_predict_seconds);
/* One-token steps that ran as a replayed CUDA graph (0 on the CPU; a GPU
 * context turns graphs off for good where a step cannot be captured, and
 * KVSINK_CUDA_GRAPHS=0 in the environment turns them off from the start). */
KVS_API int64_t kvs_context_graph_steps(const kvs_context *ctx);

/* Run n_tokens (1 .. n_batch) at positions n_past .. n_past+n_tokens-1 and
 * append them to the cache. logits receives n_vocab floats per token when
 * logits_all is non-zero, else only for the last token; it may be NULL. */
KVS_API kvs_status kvs_context_eval(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                                    int32_t logits_all, float *logits);

/* Ask kvs_context_eval to stop (cancel 1; from any thread) or let it run
 * (0). While the request stands, an evaluation stops before its next
 * forward pass (a block of tokens for quantized caches, n_batch for float
 * ones) and returns KVS_ERR_CANCELLED; the tokens already appended stay
 * (read kvs_context_n_past). The request stands until withdrawn. */
KVS_API void kvs_context_set_cancel(kvs_context *ctx, int32_t cancel);

/* Sessions: the cache as it is (quantized blocks, exact sink rows, the fp16
 * window, positions and sink scores), versioned and CRC-32 checked, so that a
 * restored context continues exactly as the saved one would have. Tokens and
 * logits are the caller's to keep. kvs_context_state_size gives the bytes the
 * state takes now; kvs_context_save_state writes it into buf (size at least
 * that) and sets *written. kvs_context_load_state replaces the cache with a
 * saved state after checking it: a truncated, corrupted or inconsistent state
 * is KVS_ERR_FORMAT, one saved with another model shape or other KV settings
 * (types, block, group, recent, rotation) KVS_ERR_INVALID_ARGUMENT, and either
 * leaves the cache as it was. n_ctx, n_batch, threads and the matrix-product
 * mode may differ, as long as the saved tokens fit. */
KVS_API size_t kvs_context_state_size(const kvs_context *ctx);
KVS_API kvs_status kvs_context_save_state(const kvs_context *ctx, void *buf, size_t size, size_t *written);
KVS_API kvs_status kvs_context_load_state(kvs_context *ctx, const void *buf, size_t size);

/* What kvs_context_eval_trace records for calibration (sink profiles); each
 * pointer may be NULL. */
typedef struct kvs_eval_trace {
    float *hidden;      /* [n_layer][n_tokens][n_embd]: residual stream after each layer   */
    float *attn_mass;   /* [n_layer][n_past + n_tokens]: attention probability each cached
                           position receives, summed over heads and the batch's queries     */
} kvs_eval_trace;

/* kvs_context_eval that also fills a trace (slower; for calibration). */
KVS_API kvs_status kvs_context_eval_trace(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                                          int32_t logits_all, float *logits,
                                          const kvs_eval_trace *trace);

#ifdef __cplusplus
}
#endif

#endif /* KVSINK_H */
