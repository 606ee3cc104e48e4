"""High-level API with llama-cpp-python's names: `Llama(model_path, ...)`."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections import deque
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from ._native import check, ffi, lib
from . import chat_format
from .completion import (StopMatcher, chat_chunk, chat_logprobs, chat_response, completion_chunk,
                         completion_logprobs, completion_response, new_id, normalize_stop, now, token_logprob)
from .errors import CancelledError, ContextFullError, KvsinkError, KvsinkWarning
from .gguf_file import read_metadata
from .loaded_model import LoadedModel, load_model, load_vocab
from .sampling import Sampler, SamplingParams
from . import session
from .structured import constrained_sample, constraint_for
from .tokenizer import StreamDecoder, Tokenizer


def format_metadata_value(value) -> str:
    """Render a metadata value as llama.cpp's llama_model_meta_val_str does."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_array_item(v) for v in value) + "]"
    return str(value)


def _format_array_item(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return format_metadata_value(value)


KV_TYPES = {"f32": 0, "f16": 1, "q8": 2, "q4": 3, "q3": 4, "q2": 5}
# llama-cpp-python passes GGML type ids: F32, F16, Q8_0, Q4_0 map to ours
_GGML_KV_TYPES = {0: 0, 1: 1, 8: 2, 2: 3}
# the C core's limit on worker threads (kvs_context_params.n_threads)
_MAX_THREADS = 1024
# tokens per C call while a generation evaluates its prompt: how soon Ctrl-C
# (which Python raises between C calls) takes effect
_INTERRUPT_STEP = 64
_KV_ALIASES = {"q8_0": "q8", "q4_0": "q4"}
# what a context gets when no type is given (kvs_context_default_params)
DEFAULT_KV_TYPE = {v: k for k, v in KV_TYPES.items()}[lib.kvs_context_default_params().type_k]


def _kv_type(value, name: str, default: int) -> int:
    """A KV cache type given as a name ("q4") or a GGML type id (llama-cpp-python style)."""
    if value is None:
        return default
    if isinstance(value, str):
        key = _KV_ALIASES.get(value.lower(), value.lower())
        if key not in KV_TYPES:
            raise ValueError(f"{name} must be one of {list(KV_TYPES)}, got {value!r}")
        return KV_TYPES[key]
    if isinstance(value, int) and not isinstance(value, bool) and value in _GGML_KV_TYPES:
        return _GGML_KV_TYPES[value]
    raise ValueError(f"{name} must be one of {list(KV_TYPES)} or a GGML type id of F32, F16, Q8_0, "
                     f"Q4_0, got {value!r}")


MATMUL_MODES = {"f32": "KVS_MATMUL_F32", "q8": "KVS_MATMUL_Q8"}


def _matmul_mode(value, default: int) -> int:
    """"f32" (exact activations, the reference) or "q8" (8-bit activations and
    integer dots for the 32-element weight formats); None keeps the default."""
    if value is None:
        return default
    if value not in MATMUL_MODES:
        raise ValueError(f"matmul must be one of {sorted(MATMUL_MODES)}, got {value!r}")
    return getattr(lib, MATMUL_MODES[value])


def parse_sinks(value) -> tuple:
    """(policy, pfn, capacity) from "none", "pfn:N", "kvsink" or "kvsink:N".

    kvsink:N keeps at most N exact rows: position 0, then the predicted sinks
    with the highest scores (a stronger sink displaces the weakest row);
    capacity 0 lets the table scale with the context."""
    text = "kvsink" if value is None else str(value).strip().lower()
    if text == "none":
        return lib.KVS_SINKS_NONE, 0, 0
    if text == "kvsink":
        return lib.KVS_SINKS_KVSINK, 1, 0
    for prefix, policy in (("pfn:", lib.KVS_SINKS_PFN), ("kvsink:", lib.KVS_SINKS_KVSINK)):
        if text.startswith(prefix) and text[len(prefix):].isdigit():
            n = int(text[len(prefix):])
            if policy == lib.KVS_SINKS_KVSINK and n < 1:
                raise ValueError(f"kvsink:N needs N >= 1 (position 0 always keeps a row), got {value!r}")
            return (policy, n, 0) if policy == lib.KVS_SINKS_PFN else (policy, 1, n)
    raise ValueError(f"sinks must be none, pfn:N, kvsink or kvsink:N, got {value!r}")


KV_ROTATE = {"none": 0, "k": 1, "v": 2, "kv": 3}


def _kv_rotate(value, default: int) -> int:
    """"none", "k", "v" or "kv": which quantized blocks are Hadamard-rotated."""
    if value is None:
        return default
    if value not in KV_ROTATE:
        raise ValueError(f"kv_rotate must be one of {', '.join(KV_ROTATE)}, got {value!r}")
    return KV_ROTATE[value]


_warned_no_profile: set = set()


_LLAMA_DEFAULT_SEED = 0xFFFFFFFF

# llama-cpp-python constructor options that only tune speed or memory
# placement (results are the same whatever their value), accepted as given
_SPEED_HINTS = {
    "split_mode", "main_gpu", "tensor_split", "use_mmap", "use_mlock", "n_ubatch", "n_threads_batch",
    "offload_kqv", "flash_attn", "last_n_tokens_size", "numa", "op_offload", "no_perf",
    "mul_mat_q", "embedding",
}
# options that change results: only their llama-cpp-python default (or what
# kvsink_cpp does anyway) is accepted; any other value is refused by name
_DEFAULT_ONLY = {
    "chat_handler": (None,), "draft_model": (None,), "tokenizer": (None,), "lora_path": (None,),
    "lora_base": (None,), "lora_scale": (1.0,), "kv_overrides": (None, {}), "rpc_servers": (None,),
    "rope_scaling_type": (None, -1), "rope_freq_base": (0.0,), "rope_freq_scale": (0.0,),
    "yarn_ext_factor": (-1.0,), "yarn_attn_factor": (1.0,), "yarn_beta_fast": (32.0,),
    "yarn_beta_slow": (1.0,), "yarn_orig_ctx": (0,), "pooling_type": (None, -1, 1),  # 1: mean, as embed()
    "spm_infill": (False,),
}


def _check_llama_cpp_options(options: dict) -> None:
    """Accept llama-cpp-python's options that change nothing here; refuse any
    that would change results unless it has the one value we honour, by
    name, rather than silently ignoring a setting the caller relies on.
    (n_gpu_layers is a device choice: see resolve_device.)"""
    for name, value in options.items():
        if name == "n_gpu_layers":
            continue
        if name in _DEFAULT_ONLY:
            if value not in _DEFAULT_ONLY[name]:
                raise ValueError(f"{name}={value!r} is not supported by kvsink_cpp (accepted: "
                                 f"{', '.join(repr(v) for v in _DEFAULT_ONLY[name])})")
        elif name not in _SPEED_HINTS:
            raise TypeError(f"Llama() got an unexpected keyword argument {name!r}")


_DEVICES = {"cpu": "KVS_DEVICE_CPU", "cuda": "KVS_DEVICE_CUDA"}


def resolve_device(device: Optional[str], n_gpu_layers) -> str:
    """The device a context runs on: `device`, else llama-cpp-python's
    n_gpu_layers (0: the CPU; -1, or at least the model's layers as scripts
    write 99: every layer on the GPU). Offload is all or nothing: a part of
    the layers is refused rather than quietly rounded."""
    if n_gpu_layers is not None and (not isinstance(n_gpu_layers, int) or isinstance(n_gpu_layers, bool)):
        raise ValueError(f"n_gpu_layers must be an int, got {n_gpu_layers!r}")
    if device is not None:
        if device not in _DEVICES:
            raise ValueError(f"device must be one of {sorted(_DEVICES)}, got {device!r}")
        if device == "cpu" and n_gpu_layers:
            raise ValueError(f"device='cpu' contradicts n_gpu_layers={n_gpu_layers}")
        return device
    return "cuda" if n_gpu_layers else "cpu"


def cuda_status() -> str:
    """"ok" when the CUDA backend can run here, else the reason it cannot:
    this library built without CUDA, no driver, no device, no kernels for it."""
    if lib.kvs_cuda_check() == lib.KVS_OK:
        return "ok"
    return ffi.string(lib.kvs_last_error()).decode("utf-8", "replace")


def cuda_available() -> bool:
    """True when this build has the CUDA backend and an NVIDIA GPU it can use."""
    return cuda_status() == "ok"


def _check_offload(n_gpu_layers, n_layer: int) -> None:
    if n_gpu_layers is not None and 0 < n_gpu_layers < n_layer:
        raise ValueError(f"n_gpu_layers={n_gpu_layers}: kvsink_cpp offloads all {n_layer} layers or none "
                         f"(partial offload is not implemented); pass -1 for all, 0 for the CPU")


def physical_cores() -> int:
    """Physical cores this process may run on: the distinct (package, core)
    pairs of the CPUs in its affinity mask (Linux sysfs), else the CPU count.
    Hyperthread siblings share one core's arithmetic units, so the matrix
    products gain nothing from a second thread on them."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as pkg, open(topology + "core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count the CPU itself
    return max(len(cores), 1)


def _default_threads() -> int:
    return min(physical_cores(), 16)


class LastTokenScores:
    """`scores` without logits_all: indexed like llama-cpp-python's (n_ctx,
    n_vocab) array, but only the row of the last evaluated token,
    scores[n_tokens - 1], is kept (n_ctx rows of a 49k vocabulary would be
    ~100 MB per 512 tokens); other rows raise IndexError saying so."""

    def __init__(self, llama: "Llama"):
        self._llama = llama

    @property
    def shape(self) -> tuple:
        return (self._llama._n_ctx, self._llama._n_vocab)

    def __len__(self) -> int:
        return self._llama._n_ctx

    def __getitem__(self, key):
        row, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        n = self._llama.n_tokens
        if isinstance(row, (int, np.integer)) and not isinstance(row, bool) and n > 0 and row == n - 1:
            last = self._llama._scores[(n - 1) % len(self._llama._scores)]
            return last[rest] if rest else last
        raise IndexError(f"scores[{row!r}]: without logits_all only the last evaluated token's row, "
                         f"scores[n_tokens - 1] = scores[{n - 1}], is kept (create the Llama with "
                         f"logits_all=True for every row)")


def _check_unsupported(method: str, options: dict) -> None:
    """llama-cpp-python arguments we do not implement: refused by name, not ignored."""
    if options:
        names = ", ".join(sorted(options))
        raise TypeError(f"{method}() got arguments kvsink_cpp does not support: {names}")


def _check_logprobs(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise ValueError(f"{name} must be an int in 0..20, got {value!r}")
    return value


class Llama:
    """A loaded model plus one context (its KV cache), as in llama-cpp-python.

    `eval(tokens)` appends tokens to the context; `scores[i]` holds the logits
    after token i when `logits_all`; otherwise its only row holds the logits
    after the last evaluated token (`last_logits()`).
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        logits_all: bool = False,
        verbose: bool = True,
        type_k=None,
        type_v=None,
        impl: str = "auto",
        chat_format: Optional[str] = None,
        seed: Optional[int] = None,
        sinks: Optional[str] = None,
        kv_block: Optional[int] = None,
        kv_recent: Optional[int] = None,
        kv_ring: bool = False,
        kv_rotate: Optional[str] = None,
        kv_group: Optional[int] = None,
        kv_key_per_token: Optional[bool] = None,
        matmul: Optional[str] = None,
        act_outlier_ratio: Optional[float] = None,
        swa_full: bool = False,
        device: Optional[str] = None,
        vocab_only: bool = False,
        **llama_cpp_options,
    ):
        self._loaded: Optional[LoadedModel] = None
        self._model = None
        self._ctx = None
        # one call at a time on this Llama (its context); see _exclusive
        self._lock = threading.Lock()
        self._lock_owner: Optional[int] = None
        chat_format_name = chat_format
        _check_llama_cpp_options(llama_cpp_options)
        n_gpu_layers = llama_cpp_options.get("n_gpu_layers")
        self.device = resolve_device(device, n_gpu_layers)
        # llama-cpp-python's seed is the default for sampling calls that give none
        self.seed = None if seed is None or seed == _LLAMA_DEFAULT_SEED else seed
        self.model_path = os.fspath(model_path)
        self.verbose = verbose
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if n_batch == 0:
            raise ValueError("n_batch must be positive")
        n_threads = _default_threads() if n_threads is None else n_threads
        if not isinstance(n_threads, int) or isinstance(n_threads, bool) or not 1 <= n_threads <= _MAX_THREADS:
            raise ValueError(f"n_threads must be an int in 1..{_MAX_THREADS}, got {n_threads!r}")
        impls = {"auto": lib.KVS_IMPL_AUTO, "scalar": lib.KVS_IMPL_SCALAR, "avx2": lib.KVS_IMPL_AVX2}
        if impl not in impls:
            raise ValueError(f"impl must be one of {sorted(impls)}, got {impl!r}")
        if not os.path.exists(self.model_path):
            raise FileNotFoundError(f"model file not found: {self.model_path}")

        self._cancel = threading.Event()
        self._cancel_lock = threading.Lock()
        self._generating = False  # cancel() interrupts a long prompt only inside a generation
        self._chat_formatter = None
        self.chat_format = chat_format_name
        if vocab_only:
            self._open_vocab_only(n_ctx, n_batch, n_threads)
            return
        # the model is loaded once per file and shared by every Llama on it
        self._loaded = load_model(self.model_path)
        self._model = self._loaded.handle
        self._typed_metadata = self._loaded.typed_metadata
        self.sink_profile = self._loaded.sink_profile

        ctx_params = ffi.new("kvs_context_params *", lib.kvs_context_default_params())
        if self.device == "cuda":
            _check_offload(n_gpu_layers, lib.kvs_model_n_layer(self._model))
        ctx_params.device = getattr(lib, _DEVICES[self.device])
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_threads = n_threads
        ctx_params.impl = impls[impl]
        ctx_params.type_k = _kv_type(type_k, "type_k", ctx_params.type_k)
        ctx_params.type_v = _kv_type(type_v, "type_v", ctx_params.type_v)
        ctx_params.sink_policy, ctx_params.sink_pfn, ctx_params.sink_capacity = parse_sinks(sinks)
        self._sinks_arg = sinks
        for name, value in (("kv_block", kv_block), ("kv_recent", kv_recent), ("kv_group", kv_group)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if kv_group is not None:
            ctx_params.kv_group = kv_group
        if kv_key_per_token is not None:
            ctx_params.kv_key_per_token = int(bool(kv_key_per_token))
        if kv_block is not None:
            ctx_params.kv_block = kv_block
        if kv_recent is not None:
            ctx_params.kv_recent = kv_recent
        if kv_ring and logits_all:
            raise ValueError("kv_ring cannot be combined with logits_all (scores has n_ctx rows)")
        ctx_params.kv_ring = int(bool(kv_ring))
        ctx_params.swa_full = int(bool(swa_full))
        ctx_params.matmul = _matmul_mode(matmul, ctx_params.matmul)
        ctx_params.kv_rotate = _kv_rotate(kv_rotate, ctx_params.kv_rotate)
        if act_outlier_ratio is not None:
            if not isinstance(act_outlier_ratio, (int, float)) or isinstance(act_outlier_ratio, bool) \
                    or not (0 <= act_outlier_ratio < float("inf")):
                raise ValueError(f"act_outlier_ratio must be a finite number >= 0, got {act_outlier_ratio!r}")
            ctx_params.act_outlier_ratio = float(act_outlier_ratio)
        self.kv_ring = bool(kv_ring)
        ctx_ptr = ffi.new("kvs_context **")
        check(lib.kvs_context_create(self._model, ctx_params, ctx_ptr))
        self._ctx = ffi.gc(ctx_ptr[0], lib.kvs_context_free)

        self.n_threads = n_threads
        self.n_batch = lib.kvs_context_n_batch(self._ctx)
        self.logits_all = bool(logits_all)
        self._n_ctx = lib.kvs_context_n_ctx(self._ctx)
        self._n_vocab = lib.kvs_model_n_vocab(self._model)
        if ctx_params.sink_policy == lib.KVS_SINKS_KVSINK and not lib.kvs_model_has_sink_profile(self._model):
            self._warn_no_profile()
        # llama-cpp-python reports metadata values as strings
        self.metadata = {k: format_metadata_value(v) for k, v in self._typed_metadata.items()}
        self.n_tokens = 0
        self.cache: Optional[session.LlamaRAMCache] = None
        self.last_timings: Dict[str, float] = {}
        self.input_ids = np.zeros(self._n_ctx, dtype=np.intc)
        # n_ctx rows with logits_all (as llama-cpp-python), else one row holding
        # the last token's logits: n_batch rows of a 49k vocabulary would be
        # ~100 MB of resident memory for nothing
        rows = self._n_ctx if self.logits_all else 1
        self._scores = np.zeros((rows, self._n_vocab), dtype=np.single)
        self.scores = self._scores if self.logits_all else LastTokenScores(self)
        if verbose:
            arch = self._typed_metadata.get("general.architecture", "?")
            print(f"kvsink_cpp: loaded {self.model_path} ({arch}, n_vocab {self._n_vocab}, "
                  f"n_ctx {self._n_ctx})\nkvsink_cpp: {self.describe_settings()}", file=sys.stderr)

    def _open_vocab_only(self, n_ctx: int, n_batch: int, n_threads: int) -> None:
        """vocab_only=True: the tokenizer, chat template and metadata from the
        GGUF header, no weights and no context (as llama-cpp-python's tokenising tools use it)."""
        self._loaded = load_vocab(self.model_path)
        self._typed_metadata = self._loaded.typed_metadata
        self.metadata = {k: format_metadata_value(v) for k, v in self._typed_metadata.items()}
        self.sink_profile = None
        self._n_vocab = self._loaded.n_vocab
        self._n_ctx = n_ctx or int(self._typed_metadata.get(
            f"{self._typed_metadata.get('general.architecture', '')}.context_length", 0) or 512)
        self.n_batch, self.n_threads, self.logits_all, self.kv_ring = n_batch, n_threads, False, False
        self.n_tokens = 0
        self.last_timings = {}
        self.input_ids = np.zeros(0, dtype=np.intc)
        self._scores = np.zeros((1, self._n_vocab), dtype=np.single)
        self.scores = LastTokenScores(self)

    def _warn_no_profile(self) -> None:
        """Say once per model file that kvsink fell back to pfn:1."""
        if self.model_path in _warned_no_profile:
            return
        _warned_no_profile.add(self.model_path)
        # a warning, so that an app can filter it (warnings.simplefilter or -W)
        warnings.warn(f"kvsink_cpp: {os.path.basename(self.model_path)} has no sink profile (none in the file, "
                      f"none shipped for these weights); sinks=kvsink falls back to pfn:1 (run `python -m "
                      f"kvsink_cpp profile` to calibrate one)", KvsinkWarning, stacklevel=3)

    def settings(self) -> Dict[str, object]:
        """What this context runs with, defaults resolved: matrix products,
        KV cache types and layout, sink policy, KV bytes per token, threads."""
        p = lib.kvs_context_get_params(self._require_context())
        names = {v: k for k, v in KV_TYPES.items()}
        if p.sink_policy == lib.KVS_SINKS_NONE:
            sinks = "none"
        elif p.sink_policy == lib.KVS_SINKS_PFN:
            sinks = f"pfn:{p.sink_pfn}"
        else:
            sinks = "kvsink" if self._sinks_arg in (None, "kvsink") else str(self._sinks_arg)
        rotate = {v: k for k, v in KV_ROTATE.items()}.get(p.kv_rotate, str(p.kv_rotate))
        return {"matmul": "q8" if p.matmul == lib.KVS_MATMUL_Q8 else "f32",
                "act_outlier_ratio": float(p.act_outlier_ratio),
                "type_k": names.get(p.type_k, str(p.type_k)), "type_v": names.get(p.type_v, str(p.type_v)),
                "kv_block": p.kv_block, "kv_group": p.kv_group, "kv_rotate": rotate, "kv_recent": p.kv_recent,
                "sinks": sinks, "sink_capacity": p.sink_capacity,
                "kv_bytes_per_token": self.kv_cache_bytes_per_token(), "swa_full": bool(p.swa_full),
                "n_threads": p.n_threads, "device": "cuda" if p.device == lib.KVS_DEVICE_CUDA else "cpu",
                "impl": "avx2" if p.impl == lib.KVS_IMPL_AVX2 else "scalar"}

    def describe_settings(self) -> str:
        """settings() in one line, as verbose=True and chat's /stats print it."""
        s = self.settings()
        if s["matmul"] == "q8":
            outliers = f", outliers above {s['act_outlier_ratio']:g}x split off exactly" if s["act_outlier_ratio"] else ""
            matmul = f"q8 (8-bit activations{outliers})"
        else:
            matmul = "f32 (exact)"
        quantized = [t for t in (s["type_k"], s["type_v"]) if t not in ("f32", "f16")]
        layout = (f", blocks of {s['kv_block']}, groups of {s['kv_group']}, rotate {s['kv_rotate']}"
                  if quantized else "")
        profile = (f" [profile {self.sink_profile.source}]" if s["sinks"].startswith("kvsink") and self.sink_profile
                   else "")
        mem = self.kv_cache_memory()
        local = ""
        if mem["n_local_layers"]:
            kept = (f"keep {mem['local_block_tokens']} tokens" if mem["local_block_tokens"]
                    else "keep every token (swa_full)")
            local = (f" ({mem['global_bytes_per_token']:,.0f} in {mem['n_global_layers']} global layers; "
                     f"{mem['n_local_layers']} sliding-window layers {kept})")
        return (f"matmul {matmul}; KV {s['type_k']}/{s['type_v']}{layout}; sinks {s['sinks']}{profile}; "
                f"{s['kv_bytes_per_token']:,.0f} KV bytes/token{local}; {s['n_threads']} threads, {s['impl']}")

    def kv_cache_bytes_per_token(self) -> float:
        """KV cache bytes per token once quantized (all layers, K and V, scales included)."""
        return lib.kvs_context_kv_bytes_per_token(self._require_context())

    def kv_cache_memory(self) -> Dict[str, float]:
        """Where the KV cache's memory goes by kind of layer: global layers keep
        every token; sliding-window (local) layers, unless swa_full, keep only
        `local_block_tokens` tokens of blocks, so past them a token costs
        `global_bytes_per_token` alone. `allocated_bytes`: every buffer of the
        cache (blocks, fp16 window, sink table, RoPE tables)."""
        m = ffi.new("kvs_kv_memory *")
        lib.kvs_context_kv_memory(self._require_context(), m)
        return {"n_global_layers": m.n_global_layers, "n_local_layers": m.n_local_layers,
                "local_window": m.local_window, "local_block_tokens": m.local_block_tokens,
                "global_bytes_per_token": m.global_bytes_per_token,
                "local_bytes_per_token": m.local_bytes_per_token, "allocated_bytes": m.allocated_bytes}

    def kv_cache_stats(self) -> Dict[str, float]:
        """The sink table (rows in use, capacity, their positions, predicted sinks
        quantized for want of a row), evicted tokens, and the time spent
        evaluating and predicting sinks, and the one-token steps a GPU context
        ran as CUDA graphs."""
        ctx = self._require_context()
        eval_s, predict_s = ffi.new("double *"), ffi.new("double *")
        lib.kvs_context_timings(ctx, eval_s, predict_s)
        n_sinks = lib.kvs_context_n_sinks(ctx)
        positions = ffi.new("int32_t[]", max(n_sinks, 1))
        lib.kvs_context_sink_positions(ctx, positions, n_sinks)
        return {"n_sinks": n_sinks, "sink_capacity": lib.kvs_context_sink_capacity(ctx),
                "sink_positions": [int(p) for p in positions[0:n_sinks]],
                "n_sinks_dropped": lib.kvs_context_n_sinks_dropped(ctx),
                "n_evicted": lib.kvs_context_n_evicted(ctx),
                "eval_seconds": eval_s[0], "sink_predict_seconds": predict_s[0],
                "cuda_graph_steps": int(lib.kvs_context_graph_steps(ctx))}

    # ---- sizes -----------------------------------------------------------
    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def n_embd(self) -> int:
        return lib.kvs_model_n_embd(self._require_model())

    # ---- evaluation ------------------------------------------------------
    def reset(self) -> None:
        """Forget the evaluated tokens (the cache is overwritten by the next eval)."""
        with self._exclusive():
            self.n_tokens = 0

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after the first `n_tokens` ones, in batches of n_batch."""
        with self._exclusive():
            self._eval(tokens)

    def _eval(self, tokens: Sequence[int]) -> None:
        ctx = self._require_context()
        ids = self._token_ids(tokens)
        if self.n_tokens + len(ids) > self._n_ctx and not self.kv_ring:
            raise ContextFullError(
                f"{len(ids)} tokens do not fit: {self.n_tokens} of n_ctx {self._n_ctx} are in use")
        # like llama-cpp-python: drop whatever the cache holds past n_tokens; a
        # quantized cache may keep fewer (it cannot cut a block), so evaluate
        # the dropped tokens again first
        check(lib.kvs_context_set_n_past(ctx, self.n_tokens))
        kept = lib.kvs_context_n_past(ctx)
        if kept < self.n_tokens:
            ids = np.concatenate([self.input_ids[kept:self.n_tokens].astype(np.int32), ids])
            self.n_tokens = kept
        self._reserve_ids(self.n_tokens + len(ids))
        # inside a generation a long prompt goes in smaller steps, so that
        # Ctrl-C (raised between C calls) stops it soon; cancel() from another
        # thread also stops the C core between its forward passes
        step = min(self.n_batch, _INTERRUPT_STEP) if self._generating else self.n_batch
        for start in range(0, len(ids), step):
            if self._cancel.is_set() and self._generating:
                raise CancelledError("cancelled")
            self._eval_batch(ctx, ids[start:start + step])

    def _token_ids(self, tokens: Sequence[int]) -> np.ndarray:
        """tokens as int32 ids, each checked: an int (not a float or bool, which
        a cast would truncate) in [0, n_vocab) — a ValueError naming the first
        bad one otherwise, however large it is."""
        values = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
        for i, t in enumerate(values):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"token ids must be ints, got {t!r} ({type(t).__name__}) at index {i}")
            if not 0 <= t < self._n_vocab:
                raise ValueError(f"token id {t} at index {i} is out of range [0, {self._n_vocab})")
        return np.asarray(values, dtype=np.int32).reshape(-1)

    def _reserve_ids(self, n: int) -> None:
        """input_ids grows past n_ctx only with the ring buffer."""
        if n > len(self.input_ids):
            grown = np.zeros(max(n, 2 * len(self.input_ids)), dtype=np.intc)
            grown[: self.n_tokens] = self.input_ids[: self.n_tokens]
            self.input_ids = grown

    def _eval_batch(self, ctx, batch: np.ndarray) -> None:
        n_past, n = self.n_tokens, len(batch)
        if self.logits_all:
            out = self._scores[n_past:n_past + n]
        else:
            row = (n_past + n - 1) % len(self._scores)
            out = self._scores[row:row + 1]
        try:
            status = lib.kvs_context_eval(ctx, ffi.from_buffer("int32_t[]", batch), n, int(self.logits_all),
                                          ffi.from_buffer("float[]", out, require_writable=True))
        finally:
            # whatever stopped the call (an error, cancel(), a KeyboardInterrupt
            # raised as it returned), the tokens the cache holds are kept
            done = max(lib.kvs_context_n_past(ctx) - n_past, 0)
            self.input_ids[n_past:n_past + done] = batch[:done]
            self.n_tokens = n_past + done
        check(status)  # a CancelledError when cancel() stopped it

    def trace(self, tokens: Sequence[int]):
        """Evaluate tokens from an empty cache, recording for calibration the
        residual stream after every layer, (n_layer, n, n_embd), and the
        attention probability each position receives, summed over heads and
        queries, (n_layer, n)."""
        with self._exclusive():
            return self._trace(tokens, with_mass=True)

    def _trace(self, tokens: Sequence[int], with_mass: bool):
        ctx = self._require_context()
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        n, n_layer, n_embd = len(ids), lib.kvs_model_n_layer(self._model), self.n_embd()
        if not 0 < n <= self._n_ctx:
            raise ValueError(f"trace needs 1..n_ctx ({self._n_ctx}) tokens, got {n}")
        hidden = np.empty((n_layer, n, n_embd), dtype=np.float32)
        mass = np.zeros((n_layer, n), dtype=np.float32)
        self.n_tokens = 0
        check(lib.kvs_context_set_n_past(ctx, 0))
        for start in range(0, n, self.n_batch):
            batch = ids[start:start + self.n_batch]
            h = np.empty((n_layer, len(batch), n_embd), dtype=np.float32)
            m = np.zeros((n_layer, start + len(batch)), dtype=np.float32)
            trace = ffi.new("kvs_eval_trace *", {
                "hidden": ffi.from_buffer("float[]", h, require_writable=True),
                "attn_mass": ffi.from_buffer("float[]", m, require_writable=True) if with_mass else ffi.NULL})
            out = self._scores[(start + len(batch) - 1) % len(self._scores):][:1]
            check(lib.kvs_context_eval_trace(ctx, ffi.from_buffer("int32_t[]", batch), len(batch), 0,
                                             ffi.from_buffer("float[]", out, require_writable=True), trace))
            self.input_ids[start:start + len(batch)] = batch
            self.n_tokens += len(batch)
            hidden[:, start:start + len(batch)] = h
            mass[:, : start + len(batch)] += m
        return hidden, mass

    # ---- embeddings --------------------------------------------------------
    def embed(self, input: Union[str, List[str]], normalize: bool = True, truncate: bool = True,
              return_count: bool = False):
        """Sentence embeddings: the final-normed hidden state of the last layer,
        mean-pooled over the tokens (llama.cpp's mean pooling), L2-normalized
        unless normalize=False. A string gives one vector, a list a list of
        them. truncate: cut inputs longer than n_ctx (else ValueError). The
        context's cache is used for this and reset."""
        texts = [input] if isinstance(input, str) else list(input)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("input must be a string or a list of strings")
        vectors, count = [], 0
        with self._exclusive():
            for text in texts:
                ids = self.tokenize(text.encode("utf-8"), add_bos=True)
                if len(ids) > self._n_ctx:
                    if not truncate:
                        raise ContextFullError(f"an input has {len(ids)} tokens but n_ctx is {self._n_ctx}")
                    ids = ids[: self._n_ctx]
                hidden, _ = self._trace(ids, with_mass=False)
                pooled = self._final_norm(hidden[-1]).mean(axis=0)
                if normalize:
                    pooled /= max(float(np.linalg.norm(pooled)), 1e-12)
                vectors.append(pooled.astype(np.float32).tolist())
                count += len(ids)
            self.n_tokens = 0
        result = vectors[0] if isinstance(input, str) else vectors
        return (result, count) if return_count else result

    def create_embedding(self, input: Union[str, List[str]], model: Optional[str] = None) -> dict:
        """embed() in the OpenAI response format."""
        vectors, count = self.embed(input, return_count=True)
        if isinstance(input, str):
            vectors = [vectors]
        return {"object": "list", "model": model or self.model_path,
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": count, "total_tokens": count}}

    def _final_norm(self, h: np.ndarray) -> np.ndarray:
        """The model's output RMSNorm of hidden rows (n, n_embd), as before the logits."""
        weight, eps = self._loaded.output_norm()
        x = h.astype(np.float64)
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight

    @property
    def eval_tokens(self) -> Deque[int]:
        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> Deque[List[float]]:
        if self.logits_all:
            rows = self._scores[: self.n_tokens].tolist()
        else:
            rows = [self.last_logits().tolist()] if self.n_tokens else []
        return deque(rows, maxlen=self._n_ctx if self.logits_all else 1)

    def last_logits(self) -> np.ndarray:
        """Logits after the last evaluated token (a view into `scores`)."""
        if self.n_tokens == 0:
            raise ValueError("no token has been evaluated")
        return self._scores[(self.n_tokens - 1) % len(self._scores)]

    # ---- text ------------------------------------------------------------
    @property
    def tokenizer_(self) -> Tokenizer:
        """The model's tokenizer, built from its GGUF metadata on first use."""
        return self._loaded.tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        """Token ids of text; add_bos=True adds BOS when the model asks for it."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"text must be bytes, got {type(text).__name__}")
        return self.tokenizer_.encode(bytes(text), add_bos=None if add_bos else False, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        """Bytes of tokens; with prev_tokens, as a continuation of them (no leading-space strip)."""
        tok = self.tokenizer_
        for t in tokens:
            if not 0 <= int(t) < self._n_vocab:
                raise ValueError(f"token id {t} is out of range [0, {self._n_vocab})")
        if prev_tokens:
            return b"".join(tok.token_bytes(int(t), special=special) for t in tokens)
        return tok.decode([int(t) for t in tokens], special=special)

    def token_bos(self) -> int:
        return -1 if self.tokenizer_.bos_id is None else self.tokenizer_.bos_id

    def token_eos(self) -> int:
        return -1 if self.tokenizer_.eos_id is None else self.tokenizer_.eos_id

    def cancel(self) -> None:
        """Stop the generation in progress (safe to call from another thread):
        at the next token, or within one forward pass of its prompt."""
        with self._cancel_lock:  # not after the generation has ended (a stale request)
            self._cancel.set()
            if self._generating and self._ctx is not None:
                lib.kvs_context_set_cancel(self._ctx, 1)

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, typical_p: float = 1.0, temp: float = 0.80,
                 repeat_penalty: float = 1.0, reset: bool = True, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, penalty_last_n: int = 64, seed: Optional[int] = None,
                 logit_bias: Optional[Dict[int, float]] = None) -> Iterator[int]:
        """Yield sampled tokens forever (the caller stops); the prompt's prefix
        already in the cache is reused rather than evaluated again. The Llama
        is held by this iterator until it is exhausted or closed; cancel() ends it."""
        with self._exclusive(), self._generation():
            try:
                for token in self._generate(tokens, top_k, top_p, min_p, typical_p, temp, repeat_penalty, reset,
                                            frequency_penalty, presence_penalty, penalty_last_n, seed, logit_bias):
                    yield token
                    if self._cancel.is_set():
                        return
            except CancelledError:
                return

    @contextlib.contextmanager
    def _generation(self):
        """A generation is running: cancel() (from any thread) stops it, at the
        next token or, inside a prompt, after the C core's current forward pass."""
        with self._cancel_lock:
            self._cancel.clear()
            self._generating = True
        try:
            yield
        finally:
            with self._cancel_lock:
                self._generating = False
                self._cancel.clear()
                if self._ctx is not None:
                    lib.kvs_context_set_cancel(self._ctx, 0)

    def _generate(self, tokens, top_k, top_p, min_p, typical_p, temp, repeat_penalty, reset,
                  frequency_penalty, presence_penalty, penalty_last_n, seed, logit_bias,
                  constraint=None) -> Iterator[int]:
        sampler = Sampler(SamplingParams(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, penalty_last_n=penalty_last_n,
            logit_bias=logit_bias, seed=seed))
        tokens = list(tokens)
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        if reset:
            tokens = tokens[self._reuse_prefix(tokens):]
        while True:
            self._eval(tokens)
            history = self.input_ids[: self.n_tokens]
            token = constrained_sample(self.last_logits(), constraint, lambda logits: sampler.sample(logits, history))
            yield token
            tokens = [token]

    def _reuse_prefix(self, tokens: List[int]) -> int:
        """Keep the longest cached prefix of tokens (at least one token is left
        to evaluate, for its logits); returns how many are kept."""
        cached = self.input_ids[: self.n_tokens]
        n = min(len(cached), len(tokens) - 1)
        keep = 0
        while keep < n and cached[keep] == tokens[keep]:
            keep += 1
        self.n_tokens = keep
        return keep

    def _check_prompt(self, tokens: List[int]) -> None:
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self._n_ctx and not self.kv_ring:
            raise ContextFullError(f"the prompt has {len(tokens)} tokens but n_ctx is {self._n_ctx}: "
                                   f"shorten it or create the Llama with a larger n_ctx")

    def _stream_text(self, prompt_tokens: List[int], max_tokens: Optional[int], stop: List[str],
                     sampling: dict, stop_token_ids: Sequence[int] = (), constraint=None,
                     n_logprobs: Optional[int] = None) -> Iterator[tuple]:
        """Yield (text, None, logprobs) deltas, then ("", finish_reason, logprobs)
        once; logprobs lists the TokenLogprob of the tokens consumed since the
        previous delta (empty unless n_logprobs is given). With a constraint
        (response_format), the reply ends when its JSON document is complete.
        Counts and times go to self.last_timings."""
        with self._exclusive():
            yield from self._stream_tokens(prompt_tokens, max_tokens, stop, sampling, stop_token_ids,
                                           constraint, n_logprobs)

    def _stream_tokens(self, prompt_tokens, max_tokens, stop, sampling, stop_token_ids, constraint,
                       n_logprobs) -> Iterator[tuple]:
        # the ring buffer evicts old blocks, so only max_tokens bounds a reply
        limit = float("inf") if self.kv_ring else self._n_ctx - len(prompt_tokens)
        if max_tokens is not None and max_tokens > 0:
            limit = min(limit, max_tokens)
        tok = self.tokenizer_
        decoder, matcher = StreamDecoder(tok, strip_leading_space=False), StopMatcher(stop)
        stop_ids = set(stop_token_ids)
        t0 = time.perf_counter()
        self._restore_from_cache(prompt_tokens)
        reused = self._reuse_prefix(prompt_tokens)
        timings = {"prompt_tokens": len(prompt_tokens) - reused, "generated_tokens": 0,
                   "prompt_seconds": 0.0, "generation_seconds": 0.0}
        self.last_timings = timings
        finish, pending = "length", []
        tokens = self._generate(prompt_tokens[reused:], reset=False, penalty_last_n=64, constraint=constraint,
                                **sampling)
        with self._generation():
            try:
                for token in tokens:
                    self._time_token(timings, time.perf_counter() - t0)
                    if self._cancel.is_set():
                        finish = "cancelled"
                        break
                    if tok.is_eog(token) or token in stop_ids:
                        finish = "stop"
                        break
                    timings["generated_tokens"] += 1
                    if n_logprobs is not None:
                        pending.append(token_logprob(tok, self.last_logits(), token, n_logprobs))
                    text, stopped = matcher.push(decoder.push(token))
                    if text:
                        yield text, None, pending
                        pending = []
                    if stopped or (constraint is not None and constraint.is_finished):
                        finish = "stop"  # a stop string, or a complete JSON document
                        break
                    if timings["generated_tokens"] >= limit or (self.n_tokens >= self._n_ctx and not self.kv_ring):
                        break
            except CancelledError:
                finish = "cancelled"
            finally:
                tokens.close()
        if self.cache is not None and finish != "cancelled":
            self.cache[self.input_ids[: self.n_tokens].tolist()] = self._save_state()
        if finish != "stop" or (constraint is not None and constraint.is_finished):
            tail, stopped = matcher.push(decoder.flush())
            tail += "" if stopped else matcher.flush()
            if tail:
                yield tail, None, pending
                pending = []
        yield "", finish, pending

    @staticmethod
    def _time_token(timings: dict, elapsed: float) -> None:
        """The first token closes the prompt phase; later ones the generation phase."""
        if timings["generated_tokens"] == 0 and timings["prompt_seconds"] == 0.0:
            timings["prompt_seconds"] = elapsed
        else:
            timings["generation_seconds"] = elapsed - timings["prompt_seconds"]

    def _sampling_args(self, temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                       frequency_penalty, presence_penalty, seed, logit_bias) -> dict:
        bias = None if logit_bias is None else {int(k): float(v) for k, v in logit_bias.items()}
        return dict(temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                    repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                    presence_penalty=presence_penalty, seed=self.seed if seed is None else seed,
                    logit_bias=bias)

    def create_completion(self, prompt: Union[str, List[int]], suffix: Optional[str] = None,
                          max_tokens: Optional[int] = 16, temperature: float = 0.8, top_p: float = 0.95,
                          min_p: float = 0.05, typical_p: float = 1.0, logprobs: Optional[int] = None,
                          echo: bool = False, stop=None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
                          stream: bool = False, seed: Optional[int] = None,
                          logit_bias: Optional[Dict[int, float]] = None, response_format=None,
                          grammar=None, **unsupported):
        """Complete a prompt (text or token ids); an OpenAI-style dict, or with
        stream=True an iterator of chunks. max_tokens None or <= 0: until the
        context is full (or, with response_format, the JSON is complete).
        suffix: text after the completion — filled in the middle when the
        model has FIM tokens, else appended to the returned text.
        logprobs: how many top alternatives to report per generated token.
        grammar: a LlamaGrammar (or GBNF text) the completion must follow."""
        _check_unsupported("create_completion", unsupported)
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError(f"suffix must be a string, got {type(suffix).__name__}")
        n_logprobs = _check_logprobs("logprobs", logprobs)
        tokens, fim = self._completion_prompt(prompt, suffix)
        constraint = constraint_for(self.tokenizer_, response_format, grammar=grammar)
        if constraint is not None and max_tokens == 16:
            max_tokens = None  # llama-cpp-python's default of 16 would cut every JSON reply
        sampling = self._sampling_args(temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                                       frequency_penalty, presence_penalty, seed, logit_bias)
        self._check_prompt(tokens)
        parts = self._stream_text(tokens, max_tokens, normalize_stop(stop), sampling, constraint=constraint,
                                  n_logprobs=n_logprobs)
        cid, created, model = new_id("cmpl"), now(), self.model_path
        prefix = prompt if echo and isinstance(prompt, str) else ""
        appended = suffix if suffix is not None and not fim else ""
        if stream:
            return self._completion_chunks(parts, cid, created, model, prefix, appended, n_logprobs)
        text, finish, entries = self._collect(parts)
        lp = completion_logprobs(entries, len(prefix)) if n_logprobs is not None else None
        return completion_response(cid, model, created, prefix + text + appended, finish, len(tokens),
                                   self.last_timings["generated_tokens"], lp)

    __call__ = create_completion

    def _completion_prompt(self, prompt, suffix: Optional[str]) -> tuple:
        """(prompt ids, whether they are a fill-in-the-middle prompt)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt], False
        fim = self.tokenizer_.fim_ids() if suffix is not None else None
        if fim is None:
            return self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), False
        pre, suf, mid = fim
        encode = self.tokenizer_.encode
        return ([pre] + encode(prompt, add_bos=False) + [suf] + encode(suffix, add_bos=False) + [mid]), True

    @staticmethod
    def _collect(parts) -> tuple:
        pieces, finish, entries = [], "length", []
        for text, reason, logprobs in parts:
            pieces.append(text)
            entries += logprobs
            finish = reason or finish
        return "".join(pieces), finish, entries

    @staticmethod
    def _completion_chunks(parts, cid, created, model, prefix, appended, n_logprobs):
        if prefix:
            yield completion_chunk(cid, model, created, prefix, None)
        offset = len(prefix)
        for text, reason, entries in parts:
            if reason and appended:
                yield completion_chunk(cid, model, created, appended, None)
            if text or reason:
                lp = completion_logprobs(entries, offset) if n_logprobs is not None else None
                yield completion_chunk(cid, model, created, text, reason, lp)
                offset += len(text)

    def chat_formatter(self):
        """The chat template: the GGUF's own, or the built-in named by chat_format."""
        if self._chat_formatter is None:
            self._chat_formatter = chat_format.from_metadata(self._typed_metadata, self.chat_format)
        return self._chat_formatter

    def chat_prompt_tokens(self, messages: List[dict], tools: Optional[list] = None,
                           tool_choice=None) -> tuple:
        """The prompt ids of a conversation rendered with the chat template
        (BOS added unless the template writes it) and the ids of the
        template's single-token stop strings, which end a reply. Message
        content may be a string, a list of text parts (OpenAI style) or None;
        tools (and tool_choice) are given to the template as it expects them."""
        formatter = self.chat_formatter()
        extra = {k: v for k, v in (("tools", tools), ("tool_choice", tool_choice)) if v is not None}
        prompt = formatter.render(chat_format.normalize_messages(messages), add_generation_prompt=True, **extra)
        tok = self.tokenizer_
        bos_text = tok.token_text(tok.bos_id) if tok.bos_id is not None else None
        add_bos = tok.add_bos and not (bos_text and prompt.startswith(bos_text))
        tokens = tok.encode(prompt, add_bos=add_bos, special=True)
        stop_ids = [ids[0] for ids in (tok.encode(s, add_bos=False, special=True) for s in formatter.stop_strings)
                    if len(ids) == 1]
        return tokens, stop_ids

    def create_chat_completion(self, messages: List[dict], functions=None, function_call=None,
                               tools: Optional[list] = None, tool_choice=None, temperature: float = 0.2,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               typical_p: float = 1.0, stream: bool = False, stop=None,
                               seed: Optional[int] = None, response_format=None,
                               max_tokens: Optional[int] = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               model: Optional[str] = None, logit_bias: Optional[Dict[int, float]] = None,
                               logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None,
                               grammar=None, **unsupported):
        """Reply to a conversation rendered with the model's chat template; an
        OpenAI-style dict, or with stream=True an iterator of chunks.
        response_format: {"type": "json_object"} or {"type": "json_schema", ...}
        constrains the reply to parse (llguidance). tools are rendered into the
        prompt by the template; the reply is returned as text (no tool-call
        parsing). logprobs / top_logprobs as in the OpenAI format."""
        _check_unsupported("create_chat_completion", unsupported)
        if functions is not None or function_call is not None:
            raise ValueError("functions/function_call (the deprecated OpenAI form) are not supported; pass tools")
        if isinstance(messages, (list, tuple)) and not messages:
            raise ValueError("messages is empty: a chat completion needs at least one message")
        n_top = _check_logprobs("top_logprobs", top_logprobs)
        n_logprobs = (n_top or 0) if logprobs else None
        if n_top is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        tokens, stop_ids = self.chat_prompt_tokens(messages, tools, tool_choice)
        stops = normalize_stop(stop) + list(self.chat_formatter().stop_strings)
        constraint = constraint_for(self.tokenizer_, response_format, end_ids=stop_ids, grammar=grammar)
        sampling = self._sampling_args(temperature, top_k, top_p, min_p, typical_p, repeat_penalty,
                                       frequency_penalty, presence_penalty, seed, logit_bias)
        self._check_prompt(tokens)
        parts = self._stream_text(tokens, max_tokens, stops, sampling, stop_ids, constraint, n_logprobs)
        cid, created, name = new_id("chatcmpl"), now(), model or self.model_path
        if stream:
            return self._chat_chunks(parts, cid, created, name, n_logprobs)
        text, finish, entries = self._collect(parts)
        lp = chat_logprobs(entries) if n_logprobs is not None else None
        return chat_response(cid, name, created, text, finish, len(tokens),
                             self.last_timings["generated_tokens"], lp)

    @staticmethod
    def _chat_chunks(parts, cid, created, model, n_logprobs):
        yield chat_chunk(cid, model, created, {"role": "assistant"}, None)
        for text, reason, entries in parts:
            lp = chat_logprobs(entries) if n_logprobs is not None and entries else None
            if text:
                yield chat_chunk(cid, model, created, {"content": text}, None, lp)
            if reason:
                yield chat_chunk(cid, model, created, {}, reason, None if text else lp)

    # ---- sessions --------------------------------------------------------
    def set_cache(self, cache: Optional[session.LlamaRAMCache]) -> None:
        """Use a prompt cache (LlamaRAMCache) for completions, or None for none."""
        self.cache = cache

    def _restore_from_cache(self, prompt_tokens: List[int]) -> None:
        """Continue from a cached state when it shares more of the prompt than the context does."""
        if self.cache is None:
            return
        try:
            state = self.cache[prompt_tokens]
        except KeyError:
            return
        cached = session._common_prefix(state.input_ids.tolist(), prompt_tokens)
        if cached > session._common_prefix(self.input_ids[: self.n_tokens].tolist(), prompt_tokens):
            self._load_state(state)

    def save_state(self) -> session.LlamaState:
        """The conversation so far: the tokens, the last logits (every row with
        logits_all) and the KV cache as it is (quantized blocks, exact sink
        rows, fp16 window), for load_state on a Llama of the same model and KV
        settings."""
        with self._exclusive():
            return self._save_state()

    def _save_state(self) -> session.LlamaState:
        ctx = self._require_context()
        self._eval([])  # the cache holds exactly n_tokens (cuts back to them)
        blob = bytearray(lib.kvs_context_state_size(ctx))
        written = ffi.new("size_t *")
        check(lib.kvs_context_save_state(ctx, ffi.from_buffer(blob, require_writable=True), len(blob), written))
        n = self.n_tokens
        scores = (self._scores[:n] if self.logits_all else self._scores[:1] if n else self._scores[:0]).copy()
        return session.LlamaState(input_ids=self.input_ids[:n].copy(), scores=scores, n_tokens=n,
                                  llama_state=bytes(blob[:written[0]]), llama_state_size=int(written[0]),
                                  seed=self.seed, model_fingerprint=self._loaded.fingerprint,
                                  settings=self._session_settings())

    def load_state(self, state: session.LlamaState) -> None:
        """Continue a saved conversation: its tokens, logits and KV cache
        replace this context's. A state from another model or saved with
        other KV settings is refused (SessionError) and changes nothing."""
        with self._exclusive():
            self._load_state(state)

    def _load_state(self, state: session.LlamaState) -> None:
        ctx = self._require_context()
        if state.model_fingerprint and state.model_fingerprint != self._loaded.fingerprint:
            raise session.SessionError(f"the state was saved with another model than {self.model_path}")
        n = int(state.n_tokens)
        if len(state.input_ids) != n or n > len(self.input_ids) and not self.kv_ring:
            raise session.SessionError(f"the state holds {n} tokens ({len(state.input_ids)} ids); "
                                       f"this context holds at most {self._n_ctx}")
        scores = np.asarray(state.scores, dtype=np.float32)
        rows = n if self.logits_all else min(n, 1)
        if scores.shape != (rows, self._n_vocab):
            raise session.SessionError(f"the state's scores have shape {scores.shape}; this context needs "
                                       f"{(rows, self._n_vocab)} (logits_all={self.logits_all})")
        ids = self._token_ids(state.input_ids)
        blob = bytes(state.llama_state)
        try:
            check(lib.kvs_context_load_state(ctx, blob, len(blob)))
        except KvsinkError as exc:
            raise session.SessionError(f"cannot load the KV state: {exc}") from None
        held = lib.kvs_context_n_past(ctx)
        if held != n:
            check(lib.kvs_context_set_n_past(ctx, 0))
            self.n_tokens = 0
            raise session.SessionError(f"the KV state holds {held} tokens, the session {n}")
        self._reserve_ids(n)
        self.input_ids[:n] = ids
        self.n_tokens = n
        if rows:
            dst = self._scores[:n] if self.logits_all else self._scores[(n - 1) % len(self._scores):][:1]
            dst[:] = scores

    def save_session(self, path) -> int:
        """save_state() into a file (written atomically); returns its size in bytes."""
        return session.write_session(os.fspath(path), self.save_state())

    def load_session(self, path) -> None:
        """load_state() from a file written by save_session, checked first
        (a truncated, corrupted or foreign file is a SessionError)."""
        self.load_state(session.read_session(os.fspath(path)))

    def _session_settings(self) -> dict:
        s = self.settings()
        return {k: s[k] for k in ("type_k", "type_v", "kv_block", "kv_group", "kv_rotate", "kv_recent", "sinks",
                                  "swa_full")}

    # ---- lifetime --------------------------------------------------------
    def close(self) -> None:
        """Free the context, and the model unless another Llama shares it;
        safe to call twice. Waits for a call running on another thread."""
        with self._exclusive():
            # ffi.release runs the ffi.gc destructor now, and only once; the
            # context goes first because it points into the model
            if self._ctx is not None:
                ffi.release(self._ctx)
                self._ctx = None
            self._model = None
            self._loaded = None  # the model is freed with its last user

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            self.close()

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold this Llama for one call: its context is one KV cache, so calls
        from several threads are serialised (cancel() does not wait). A thread
        that already holds it — an unfinished stream or generate() iterator
        of its own — gets an error rather than a deadlock."""
        me = threading.get_ident()
        if self._lock_owner == me:
            raise RuntimeError("this Llama is in use by an unfinished stream or generate() iterator in this "
                               "thread; exhaust or close() it first")
        with self._lock:
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    def _require_context(self):
        if self._ctx is None:
            raise RuntimeError("this Llama was opened with vocab_only=True: it tokenizes but has no weights or "
                               "context" if self._loaded is not None else "this Llama has been closed")
        return self._ctx

    def _require_model(self):
        if self._model is None:
            raise RuntimeError("this Llama has been closed")
        return self._model
