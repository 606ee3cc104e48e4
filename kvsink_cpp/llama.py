"""High-level API with llama-cpp-python's names: `Llama(model_path, ...)`."""
from __future__ import annotations

import os
import sys
from collections import deque
from typing import Deque, List, Optional, Sequence

import numpy as np

from ._native import check, ffi, lib
from .errors import ContextFullError
from .gguf_file import read_metadata


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


_KV_TYPES = {"f32": 0, "f16": 1}


def _kv_type(value, name: str, default: int) -> int:
    """A KV cache type given as a GGML type id (llama-cpp-python style) or a name."""
    if value is None:
        return default
    if isinstance(value, str):
        if value.lower() not in _KV_TYPES:
            raise ValueError(f"{name} must be one of {sorted(_KV_TYPES)}, got {value!r}")
        return _KV_TYPES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in _KV_TYPES.values():
        return value
    raise ValueError(f"{name} must be one of {sorted(_KV_TYPES)} or their GGML ids "
                     f"{sorted(_KV_TYPES.values())}, got {value!r}")


def _default_threads() -> int:
    return max((os.cpu_count() or 2) // 2, 1)


class Llama:
    """A loaded model plus one context (its KV cache), as in llama-cpp-python.

    `eval(tokens)` appends tokens to the context; `scores[i]` holds the logits
    after token i (every row when `logits_all`, else the last row of each eval).
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
    ):
        self._model = None
        self._ctx = None
        self.model_path = os.fspath(model_path)
        self.verbose = verbose
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if n_batch == 0:
            raise ValueError("n_batch must be positive")
        n_threads = _default_threads() if n_threads is None else n_threads
        if not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
        impls = {"auto": lib.KVS_IMPL_AUTO, "scalar": lib.KVS_IMPL_SCALAR, "avx2": lib.KVS_IMPL_AVX2}
        if impl not in impls:
            raise ValueError(f"impl must be one of {sorted(impls)}, got {impl!r}")
        if not os.path.exists(self.model_path):
            raise FileNotFoundError(f"model file not found: {self.model_path}")

        model_ptr = ffi.new("kvs_model **")
        params = ffi.new("kvs_model_params *", lib.kvs_model_default_params())
        check(lib.kvs_model_load(self.model_path.encode(), params, model_ptr))
        self._model = ffi.gc(model_ptr[0], lib.kvs_model_free)

        ctx_params = ffi.new("kvs_context_params *", lib.kvs_context_default_params())
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_threads = n_threads
        ctx_params.impl = impls[impl]
        ctx_params.type_k = _kv_type(type_k, "type_k", ctx_params.type_k)
        ctx_params.type_v = _kv_type(type_v, "type_v", ctx_params.type_v)
        ctx_ptr = ffi.new("kvs_context **")
        check(lib.kvs_context_create(self._model, ctx_params, ctx_ptr))
        self._ctx = ffi.gc(ctx_ptr[0], lib.kvs_context_free)

        self.n_threads = n_threads
        self.n_batch = lib.kvs_context_n_batch(self._ctx)
        self.logits_all = bool(logits_all)
        self._n_ctx = lib.kvs_context_n_ctx(self._ctx)
        self._n_vocab = lib.kvs_model_n_vocab(self._model)
        self._typed_metadata = read_metadata(lib.kvs_model_gguf(self._model))
        # llama-cpp-python reports metadata values as strings
        self.metadata = {k: format_metadata_value(v) for k, v in self._typed_metadata.items()}
        self.n_tokens = 0
        self.input_ids = np.zeros(self._n_ctx, dtype=np.intc)
        # np.empty commits pages only where rows are written, so n_ctx rows cost
        # nothing until used.
        self.scores = np.empty((self._n_ctx, self._n_vocab), dtype=np.single)
        if verbose:
            arch = self._typed_metadata.get("general.architecture", "?")
            print(f"kvsink_cpp: loaded {self.model_path} ({arch}, n_vocab {self._n_vocab}, "
                  f"n_ctx {self._n_ctx}, {n_threads} threads)", file=sys.stderr)

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
        self.n_tokens = 0

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after the first `n_tokens` ones, in batches of n_batch."""
        ctx = self._require_context()
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if ids.ndim != 1:
            raise ValueError("tokens must be a flat sequence of ints")
        if self.n_tokens + len(ids) > self._n_ctx:
            raise ContextFullError(
                f"{len(ids)} tokens do not fit: {self.n_tokens} of n_ctx {self._n_ctx} are in use")
        bad = np.flatnonzero((ids < 0) | (ids >= self._n_vocab))
        if bad.size:
            raise ValueError(f"token id {int(ids[bad[0]])} at index {int(bad[0])} is out of range "
                             f"[0, {self._n_vocab})")
        # like llama-cpp-python: drop whatever the cache holds past n_tokens
        check(lib.kvs_context_set_n_past(ctx, self.n_tokens))
        for start in range(0, len(ids), self.n_batch):
            self._eval_batch(ctx, ids[start:start + self.n_batch])

    def _eval_batch(self, ctx, batch: np.ndarray) -> None:
        n_past, n = self.n_tokens, len(batch)
        if self.logits_all:
            out = self.scores[n_past:n_past + n]
        else:
            out = self.scores[n_past + n - 1:n_past + n]
        check(lib.kvs_context_eval(ctx, ffi.from_buffer("int32_t[]", batch), n, int(self.logits_all),
                                   ffi.from_buffer("float[]", out, require_writable=True)))
        self.input_ids[n_past:n_past + n] = batch
        self.n_tokens += n

    @property
    def eval_tokens(self) -> Deque[int]:
        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> Deque[List[float]]:
        if self.logits_all:
            rows = self.scores[: self.n_tokens]
        else:
            rows = self.scores[self.n_tokens - 1: self.n_tokens] if self.n_tokens else self.scores[:0]
        return deque(rows.tolist(), maxlen=self._n_ctx if self.logits_all else 1)

    # ---- lifetime --------------------------------------------------------
    def close(self) -> None:
        """Free the context and the model; safe to call twice."""
        # ffi.release runs the ffi.gc destructor now, and only once; the
        # context goes first because it points into the model
        if self._ctx is not None:
            ffi.release(self._ctx)
            self._ctx = None
        if self._model is not None:
            ffi.release(self._model)
            self._model = None

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _require_context(self):
        if self._ctx is None:
            raise RuntimeError("this Llama has been closed")
        return self._ctx

    def _require_model(self):
        if self._model is None:
            raise RuntimeError("this Llama has been closed")
        return self._model
