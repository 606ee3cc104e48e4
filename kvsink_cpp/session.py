"""Saved conversations: `Llama.save_state()` / `load_state()` (llama-cpp-python's
names, in memory) and `save_session(path)` / `load_session(path)` (a file).

The KV cache is saved as it is — quantized blocks, exact sink rows, the fp16
window — by the C core (kvs_context_save_state: versioned, CRC-32 checked,
validated on load); the tokens, the last logits and the model's fingerprint
are kept beside it. A session file:

    b"KVSINKSS", u32 version, u32 header bytes, header (JSON),
    input_ids (int32 x n_tokens), scores (float32 x rows x n_vocab),
    the C KV state (kv_state_bytes), u32 CRC-32 (zlib) of all that precedes it.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import KvsinkError

MAGIC = b"KVSINKSS"
VERSION = 1
_PREFIX = struct.Struct("<8sII")
_CRC = struct.Struct("<I")
# a header is a few hundred bytes of JSON; anything far larger is not ours
_MAX_HEADER_BYTES = 1 << 20


class SessionError(KvsinkError, ValueError):
    """A saved state or session file that cannot be loaded here: truncated,
    corrupted, from another model, or saved with other KV settings."""

    status = 3


@dataclass
class LlamaState:
    """One context's saved conversation (llama-cpp-python's LlamaState fields,
    plus the model fingerprint it belongs to)."""

    input_ids: np.ndarray            # int32 [n_tokens]
    scores: np.ndarray               # float32 [rows, n_vocab]: every token's logits with
                                     # logits_all, else the last token's (one row)
    n_tokens: int
    llama_state: bytes               # the C KV state
    llama_state_size: int
    seed: Optional[int] = None
    model_fingerprint: str = ""
    settings: dict = field(default_factory=dict)


def write_session(path: str, state: LlamaState) -> int:
    """Write a session file atomically (a .partial renamed into place); returns its size."""
    header = json.dumps({
        "model_fingerprint": state.model_fingerprint, "n_tokens": state.n_tokens,
        "n_vocab": int(state.scores.shape[1]), "score_rows": int(state.scores.shape[0]),
        "kv_state_bytes": state.llama_state_size, "seed": state.seed, "settings": state.settings,
    }).encode()
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header,
                     np.ascontiguousarray(state.input_ids, dtype="<i4").tobytes(),
                     np.ascontiguousarray(state.scores, dtype="<f4").tobytes(), state.llama_state])
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(body)
        f.write(_CRC.pack(zlib.crc32(body)))
    os.replace(partial, path)
    return len(body) + _CRC.size


def read_session(path: str) -> LlamaState:
    """Read and check a session file (not yet against a model: Llama.load_state does that)."""
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(path)
    if len(data) < _PREFIX.size + _CRC.size or not data.startswith(MAGIC):
        raise SessionError(f"{name} is not a kvsink_cpp session file")
    _, version, header_bytes = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise SessionError(f"{name} is a version {version} session; this kvsink_cpp reads version {VERSION}")
    if header_bytes > min(_MAX_HEADER_BYTES, len(data) - _PREFIX.size - _CRC.size):
        raise SessionError(f"{name} is truncated or corrupted (header of {header_bytes} bytes)")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[:-_CRC.size]) != crc:
        raise SessionError(f"{name} is truncated or corrupted (checksum mismatch)")
    header = _parse_header(name, data[_PREFIX.size:_PREFIX.size + header_bytes])
    return _unpack_body(name, header, memoryview(data)[_PREFIX.size + header_bytes:-_CRC.size])


def _parse_header(name: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionError(f"{name} has an unreadable header ({exc})") from None
    ints = ("n_tokens", "n_vocab", "score_rows", "kv_state_bytes")
    if not isinstance(header, dict) or not all(
            isinstance(header.get(k), int) and not isinstance(header.get(k), bool) and header[k] >= 0 for k in ints):
        raise SessionError(f"{name} has a malformed header (needs non-negative {', '.join(ints)})")
    if not isinstance(header.get("model_fingerprint"), str) or not isinstance(header.get("settings", {}), dict):
        raise SessionError(f"{name} has a malformed header (model_fingerprint, settings)")
    return header


def _unpack_body(name: str, header: dict, body: memoryview) -> LlamaState:
    n, rows, n_vocab, kv = header["n_tokens"], header["score_rows"], header["n_vocab"], header["kv_state_bytes"]
    if len(body) != 4 * n + 4 * rows * n_vocab + kv:
        raise SessionError(f"{name} holds {len(body)} bytes after its header; its header describes "
                           f"{4 * n + 4 * rows * n_vocab + kv}")
    ids = np.frombuffer(body, dtype="<i4", count=n).astype(np.intc)
    scores = np.frombuffer(body, dtype="<f4", count=rows * n_vocab, offset=4 * n).reshape(rows, n_vocab).copy()
    blob = bytes(body[4 * n + 4 * rows * n_vocab:])
    return LlamaState(input_ids=ids, scores=scores, n_tokens=n, llama_state=blob, llama_state_size=kv,
                      seed=header.get("seed"), model_fingerprint=header["model_fingerprint"],
                      settings=header.get("settings", {}))


class LlamaRAMCache:
    """llama-cpp-python's prompt cache, in memory (`llm.set_cache(LlamaRAMCache())`):
    after each completion the context's state is stored under its tokens;
    a later prompt that starts with a stored key continues from that state
    when it shares more with it than with what the context holds (e.g. after
    switching between conversations). Least recently used states go first
    once capacity_bytes is exceeded."""

    def __init__(self, capacity_bytes: int = 2 << 30):
        self.capacity_bytes = int(capacity_bytes)
        self._states: "OrderedDict[tuple, LlamaState]" = OrderedDict()

    @property
    def cache_size(self) -> int:
        return sum(_state_bytes(s) for s in self._states.values())

    def _longest_prefix_key(self, tokens: tuple) -> Optional[tuple]:
        best, best_len = None, 0
        for key in self._states:
            n = _common_prefix(key, tokens)
            if n > best_len:
                best, best_len = key, n
        return best

    def __contains__(self, tokens) -> bool:
        return self._longest_prefix_key(tuple(tokens)) is not None

    def __getitem__(self, tokens) -> LlamaState:
        key = self._longest_prefix_key(tuple(tokens))
        if key is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        self._states.move_to_end(key)
        return self._states[key]

    def __setitem__(self, tokens, state: LlamaState) -> None:
        key = tuple(int(t) for t in tokens)
        self._states.pop(key, None)
        self._states[key] = state
        while len(self._states) > 1 and self.cache_size > self.capacity_bytes:
            self._states.popitem(last=False)


def _state_bytes(state: LlamaState) -> int:
    return state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
