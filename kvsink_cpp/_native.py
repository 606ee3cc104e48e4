"""Thin cffi (ABI mode) binding to the kvsink C library.

The cdef below mirrors native/include/kvsink.h (tests/test_binding.py checks that
they agree). The library is looked up inside this package; the environment
variable KVSINK_LIBRARY may name another file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cffi

from .errors import raise_for_status

ABI_VERSION = 7

CDEF = """
typedef enum kvs_status {
    KVS_OK = 0,
    KVS_ERR_INVALID_ARGUMENT = 1,
    KVS_ERR_IO = 2,
    KVS_ERR_FORMAT = 3,
    KVS_ERR_UNSUPPORTED = 4,
    KVS_ERR_OUT_OF_MEMORY = 5,
    KVS_ERR_CONTEXT_FULL = 6,
    KVS_ERR_INTERNAL = 7,
    KVS_ERR_CANCELLED = 8
} kvs_status;

const char *kvs_last_error(void);

const char *kvs_status_string(kvs_status status);

int32_t kvs_abi_version(void);

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

typedef enum kvs_impl {
    KVS_IMPL_AUTO = 0,
    KVS_IMPL_SCALAR = 1,
    KVS_IMPL_AVX2 = 2
} kvs_impl;

int32_t kvs_cpu_has_avx2(void);

kvs_status kvs_type_layout(int32_t type, int64_t *block_elems, int64_t *block_bytes);

const char *kvs_type_name(int32_t type);

kvs_status kvs_dequantize(int32_t type, const void *src, int64_t n, float *dst);

kvs_status kvs_vec_dot(int32_t type, int32_t impl, const void *row,
                               const float *x, int64_t n, float *out);

typedef enum kvs_matmul_mode {
    KVS_MATMUL_F32 = 0,
    KVS_MATMUL_Q8 = 1
} kvs_matmul_mode;

kvs_status kvs_quantize_activations(int32_t impl, const float *x, int64_t n, int8_t *q, float *d);

kvs_status kvs_matmul_q8(int32_t type, int32_t impl, float outlier_ratio, const void *rows, int64_t n_rows, int64_t n,
                                 const float *x, int64_t n_tokens, float *out);

kvs_status kvs_matmul_q16(int32_t type, int32_t impl, const void *rows, int64_t n_rows, int64_t n,
                                  const float *x, int64_t n_tokens, float *out);

int32_t kvs_cuda_built(void);
kvs_status kvs_cuda_check(void);
kvs_status kvs_cuda_dequantize(int32_t type, const void *src, int64_t n, float *dst);
kvs_status kvs_cuda_matmul(int32_t type, const void *rows, int64_t n_rows, int64_t n, const float *x,
                                   int64_t n_tokens, float *out);
kvs_status kvs_cuda_rmsnorm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                                    float *out);
kvs_status kvs_cuda_rope(float *x, int64_t n_tokens, int32_t n_heads, int32_t head_dim, int32_t n_rot,
                                 int32_t neox, const int32_t *positions, float freq_base, float freq_scale,
                                 const float *freq_factors);
kvs_status kvs_cuda_glu(int32_t gelu, float *gate, const float *up, int64_t n);

typedef struct kvs_gguf kvs_gguf;

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

typedef struct kvs_gguf_kv_info {
    const char *key;
    uint64_t key_len;
    int32_t type;
    int32_t elem_type;
    uint64_t count;
    const void *data;
} kvs_gguf_kv_info;

typedef struct kvs_gguf_tensor_info {
    const char *name;
    uint64_t name_len;
    int32_t type;
    int32_t n_dims;
    int64_t ne[4];
    uint64_t offset;
    uint64_t n_bytes;
    const void *data;
} kvs_gguf_tensor_info;

kvs_status kvs_gguf_open(const char *path, kvs_gguf **out);
void kvs_gguf_free(kvs_gguf *gguf);

uint32_t kvs_gguf_version(const kvs_gguf *gguf);
uint64_t kvs_gguf_alignment(const kvs_gguf *gguf);
uint64_t kvs_gguf_data_offset(const kvs_gguf *gguf);
uint64_t kvs_gguf_file_size(const kvs_gguf *gguf);
int64_t kvs_gguf_n_kv(const kvs_gguf *gguf);
int64_t kvs_gguf_n_tensors(const kvs_gguf *gguf);

kvs_status kvs_gguf_kv(const kvs_gguf *gguf, int64_t index, kvs_gguf_kv_info *out);

kvs_status kvs_gguf_kv_string(const kvs_gguf *gguf, int64_t index, uint64_t j,
                                      const char **str, uint64_t *len);

int64_t kvs_gguf_find_key(const kvs_gguf *gguf, const char *key);

kvs_status kvs_gguf_tensor(const kvs_gguf *gguf, int64_t index,
                                   kvs_gguf_tensor_info *out);

int64_t kvs_gguf_find_tensor(const kvs_gguf *gguf, const char *name);

typedef struct kvs_model kvs_model;

typedef struct kvs_model_params {
    int32_t reserved;
} kvs_model_params;

kvs_model_params kvs_model_default_params(void);

kvs_status kvs_model_load(const char *path, const kvs_model_params *params,
                                  kvs_model **out);
void kvs_model_free(kvs_model *model);

const kvs_gguf *kvs_model_gguf(const kvs_model *model);
int32_t kvs_model_n_vocab(const kvs_model *model);
int32_t kvs_model_n_ctx_train(const kvs_model *model);
int32_t kvs_model_n_embd(const kvs_model *model);
int32_t kvs_model_n_layer(const kvs_model *model);

int32_t kvs_model_has_sink_profile(const kvs_model *model);
kvs_status kvs_model_set_sink_profile(kvs_model *model, int32_t layer, const int32_t *channels,
                                              int32_t n_channels, float threshold);

kvs_status kvs_hadamard(int32_t impl, int64_t n, float *x);

kvs_status kvs_kv_roundtrip(int32_t kv_type, int32_t impl, const float *x, int64_t n, float *y);

typedef struct kvs_context kvs_context;

typedef enum kvs_kv_type {
    KVS_KV_F32 = 0,
    KVS_KV_F16 = 1,
    KVS_KV_Q8 = 2,
    KVS_KV_Q4 = 3,
    KVS_KV_Q3 = 4,
    KVS_KV_Q2 = 5
} kvs_kv_type;

typedef enum kvs_kv_rotate {
    KVS_KV_ROTATE_K = 1,
    KVS_KV_ROTATE_V = 2
} kvs_kv_rotate;

typedef enum kvs_sink_policy {
    KVS_SINKS_NONE = 0,
    KVS_SINKS_PFN = 1,
    KVS_SINKS_KVSINK = 2
} kvs_sink_policy;

typedef enum kvs_device {
    KVS_DEVICE_CPU = 0,
    KVS_DEVICE_CUDA = 1
} kvs_device;

typedef struct kvs_context_params {
    int32_t n_ctx;
    int32_t n_batch;
    int32_t n_threads;
    int32_t impl;
    int32_t type_k;
    int32_t type_v;
    int32_t kv_block;
    int32_t kv_recent;
    int32_t kv_group;
    int32_t kv_key_per_token;
    int32_t sink_policy;
    int32_t sink_pfn;
    int32_t sink_capacity;
    int32_t kv_ring;
    int32_t matmul;
    int32_t kv_rotate;
    float act_outlier_ratio;
    int32_t swa_full;
    int32_t device;
} kvs_context_params;

kvs_context_params kvs_context_default_params(void);
kvs_status kvs_context_create(kvs_model *model, const kvs_context_params *params,
                                      kvs_context **out);
void kvs_context_free(kvs_context *ctx);

kvs_context_params kvs_context_get_params(const kvs_context *ctx);
int32_t kvs_context_n_ctx(const kvs_context *ctx);
int32_t kvs_context_n_batch(const kvs_context *ctx);

int32_t kvs_context_n_past(const kvs_context *ctx);

kvs_status kvs_context_set_n_past(kvs_context *ctx, int32_t n_past);

double kvs_context_kv_bytes_per_token(const kvs_context *ctx);

typedef struct kvs_kv_memory {
    int32_t n_global_layers, n_local_layers;
    int32_t local_window;
    int32_t local_block_tokens;
    double global_bytes_per_token;
    double local_bytes_per_token;
    int64_t allocated_bytes;
} kvs_kv_memory;
void kvs_context_kv_memory(const kvs_context *ctx, kvs_kv_memory *out);

int32_t kvs_context_n_sinks(const kvs_context *ctx);
int32_t kvs_context_n_evicted(const kvs_context *ctx);

int32_t kvs_context_n_sinks_dropped(const kvs_context *ctx);

void kvs_context_activation_outliers(const kvs_context *ctx, int64_t *rows, int64_t *activations);
int32_t kvs_context_sink_capacity(const kvs_context *ctx);

int32_t kvs_context_sink_positions(const kvs_context *ctx, int32_t *positions, int32_t capacity);

void kvs_context_timings(const kvs_context *ctx, double *eval_seconds, double *sink_predict_seconds);
int64_t kvs_context_graph_steps(const kvs_context *ctx);

kvs_status kvs_context_eval(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                                    int32_t logits_all, float *logits);

void kvs_context_set_cancel(kvs_context *ctx, int32_t cancel);

size_t kvs_context_state_size(const kvs_context *ctx);
kvs_status kvs_context_save_state(const kvs_context *ctx, void *buf, size_t size, size_t *written);
kvs_status kvs_context_load_state(kvs_context *ctx, const void *buf, size_t size);

typedef struct kvs_eval_trace {
    float *hidden;
    float *attn_mass;
} kvs_eval_trace;

kvs_status kvs_context_eval_trace(kvs_context *ctx, const int32_t *tokens, int32_t n_tokens,
                                          int32_t logits_all, float *logits,
                                          const kvs_eval_trace *trace);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)


def _library_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libkvsink.dylib"]
    if sys.platform == "win32":
        return ["kvsink.dll", "libkvsink.dll"]
    return ["libkvsink.so"]


def _candidate_paths() -> list[str]:
    """KVSINK_LIBRARY alone when set; else this package's folder, then the
    installed distribution (when Python imports a source checkout), then a
    CMake build folder of the checkout."""
    override = os.environ.get("KVSINK_LIBRARY")
    if override:
        return [override]
    here = Path(__file__).resolve().parent
    paths = [here / name for name in _library_names()]
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution("kvsink_cpp")
        paths += [Path(dist.locate_file(f"kvsink_cpp/{name}")) for name in _library_names()]
    except (ImportError, PackageNotFoundError):
        pass
    paths += [here.parent / "build" / name for name in _library_names()]
    unique = []
    for p in paths:
        if str(p) not in unique:
            unique.append(str(p))
    return unique


def _load():
    tried = []
    for path in _candidate_paths():
        if not os.path.exists(path):
            tried.append(f"{path} (not found)")
            continue
        try:
            lib = ffi.dlopen(path)
        except OSError as exc:
            tried.append(f"{path} ({exc})")
            continue
        try:
            version = lib.kvs_abi_version()
        except AttributeError as exc:  # an unrelated or truncated library
            tried.append(f"{path} (not a kvsink library: {exc})")
            continue
        if version != ABI_VERSION:
            tried.append(f"{path} (ABI version {version}, this binding needs {ABI_VERSION})")
            continue
        return lib, path
    raise OSError(
        "could not load the kvsink native library; reinstall with `pip install .` "
        "or set KVSINK_LIBRARY. Tried:\n  " + "\n  ".join(tried)
    )


lib, library_path = _load()


def check(status: int) -> None:
    """Raise the matching KvsinkError when a C call failed."""
    if status != lib.KVS_OK:
        raise_for_status(status, ffi.string(lib.kvs_last_error()).decode("utf-8", "replace"))
