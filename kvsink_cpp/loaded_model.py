"""A GGUF file loaded once and shared: every `Llama` opened on the same file
(same path, size and modification time) uses one C model — one mapping of
the weights, one packed copy for the fast path, one sink profile, one
tokenizer — and only its own context (KV cache and scratch).

The C model is read-only once loaded (kvsink.h), so contexts on it may run
on different threads at once; it is freed when the last `Llama` using it is.
"""
from __future__ import annotations

import hashlib
import os
import threading
import weakref
from typing import Optional

import numpy as np

from ._native import check, ffi, lib
from .errors import UnsupportedError
from .gguf_file import read_metadata
from .sink_profiles import resolve_profile
from .tokenizer import Tokenizer

# bytes of tensor data hashed into the fingerprint after the header (which
# holds the metadata and vocabulary): enough to tell fine-tunes apart
_FINGERPRINT_DATA_BYTES = 1 << 20


class LoadedModel:
    """The C model of one file plus what is derived from it once."""

    def __init__(self, path: str):
        handle = ffi.new("kvs_model **")
        params = ffi.new("kvs_model_params *", lib.kvs_model_default_params())
        check(lib.kvs_model_load(path.encode(), params, handle))
        self.handle = ffi.gc(handle[0], lib.kvs_model_free)
        self.path = path
        self.typed_metadata = read_metadata(lib.kvs_model_gguf(self.handle))
        # before any context: kvsink falls back to pfn:1 when the model has no profile
        self.sink_profile = resolve_profile(self.handle, self.typed_metadata)
        self.n_vocab = lib.kvs_model_n_vocab(self.handle)
        self._lock = threading.Lock()
        self._tokenizer: Optional[Tokenizer] = None
        self._fingerprint: Optional[str] = None
        self._output_norm: Optional[tuple] = None

    @property
    def tokenizer(self) -> Tokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = Tokenizer.from_metadata(self.typed_metadata)
            return self._tokenizer

    def output_norm(self) -> tuple:
        """(weight as float64, epsilon) of the final RMSNorm, for embeddings."""
        from .gguf_file import GGUFFile
        with self._lock:
            if self._output_norm is None:
                arch = self.typed_metadata.get("general.architecture", "")
                eps = float(self.typed_metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
                with GGUFFile(self.path) as gguf:
                    index = next((i for i, t in enumerate(gguf.tensors) if t.name == "output_norm.weight"), None)
                    if index is None:
                        raise UnsupportedError("the model has no output_norm.weight to embed with")
                    tensor = gguf.tensors[index]
                    if tensor.type != 0:
                        raise UnsupportedError(f"output_norm.weight has type {tensor.type}; embeddings need F32")
                    weight = np.frombuffer(gguf.tensor_bytes(index), dtype="<f4").astype(np.float64)
                self._output_norm = (weight, eps)
            return self._output_norm

    @property
    def fingerprint(self) -> str:
        """sha256 of the GGUF header (metadata, vocabulary, tensor table) and
        the first MiB of tensor data: what a saved session is checked against."""
        with self._lock:
            if self._fingerprint is None:
                gguf = lib.kvs_model_gguf(self.handle)
                n = min(lib.kvs_gguf_data_offset(gguf) + _FINGERPRINT_DATA_BYTES, lib.kvs_gguf_file_size(gguf))
                digest = hashlib.sha256()
                with open(self.path, "rb") as f:
                    digest.update(f.read(n))
                self._fingerprint = digest.hexdigest()
            return self._fingerprint


_loaded: "weakref.WeakValueDictionary[tuple, LoadedModel]" = weakref.WeakValueDictionary()
_loading = threading.Lock()


def load_model(path: str) -> LoadedModel:
    """The shared LoadedModel of a file, loading it if no live Llama holds it.
    A file rewritten since (other size, mtime or inode) is loaded afresh."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _loading:
        model = _loaded.get(key)
        if model is None:
            model = LoadedModel(path)
            _loaded[key] = model
        return model


class VocabOnly:
    """vocab_only=True: a GGUF's header (metadata, vocabulary) without its weights."""

    handle = None
    sink_profile = None

    def __init__(self, path: str):
        from .gguf_file import GGUFFile
        with GGUFFile(path) as gguf:  # validated like any GGUF; the mapping is released at once
            self.typed_metadata = gguf.metadata
        self.path = path
        self.tokenizer = Tokenizer.from_metadata(self.typed_metadata)
        self.n_vocab = self.tokenizer.n_vocab

    @property
    def fingerprint(self) -> str:
        raise RuntimeError("a vocab_only Llama has no weights to fingerprint")


def load_vocab(path: str) -> VocabOnly:
    return VocabOnly(path)
