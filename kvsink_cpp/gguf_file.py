"""Read-only access to a GGUF file through the C reader (validated, memory-mapped).

    with GGUFFile("model.gguf") as f:
        f.metadata["general.architecture"]   # -> "llama"
        f.tensors[0].shape                    # ne order, innermost first

`read_metadata(handle)` builds the same metadata dict from any `kvs_gguf *`
(for example `lib.kvs_model_gguf(model)`).
"""
from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple

import numpy as np

from ._native import check, ffi, lib

# Little-endian numpy dtypes of the numeric GGUF metadata types (kvs_gguf_type).
_DTYPES = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
    4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),
    10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_U64 = struct.Struct("<Q")


class GGUFTensor(NamedTuple):
    name: str
    type: int            # kvs_type / GGML type id
    type_name: str       # "Q4_K"
    shape: tuple         # ne order: innermost dimension first, like gguf.ReaderTensor.shape
    offset: int          # relative to the data section
    n_bytes: int


def _decode(ptr, n: int) -> str:
    return bytes(ffi.buffer(ptr, n)).decode("utf-8", "replace")


def _numbers(elem_type: int, data, count: int) -> list:
    dtype = _DTYPES[elem_type]
    arr = np.frombuffer(ffi.buffer(data, count * dtype.itemsize), dtype=dtype)
    return arr.astype(bool).tolist() if elem_type == _BOOL else arr.tolist()


def _strings(handle, index: int, count: int) -> list[str]:
    """An array of strings, parsed from one copy of its bytes: one C call per element
    is several times slower for 150k-token vocabularies."""
    if count == 0:
        return []
    s, n = ffi.new("const char **"), ffi.new("uint64_t *")
    check(lib.kvs_gguf_kv_string(handle, index, 0, s, n))
    first = s[0]
    check(lib.kvs_gguf_kv_string(handle, index, count - 1, s, n))
    # GGUF stores the elements back to back as (u64 length, bytes); the C reader
    # validated every length, so this block holds exactly `count` of them.
    block = ffi.buffer(first - 8, (s[0] + n[0]) - (first - 8))[:]
    unpack = _U64.unpack_from
    out, pos = [], 0
    for _ in range(count):
        (length,) = unpack(block, pos)
        pos += 8
        out.append(block[pos:pos + length].decode("utf-8", "replace"))
        pos += length
    if pos != len(block):
        raise RuntimeError(f"string array {index}: parsed {pos} of {len(block)} bytes")
    return out


def _value(handle, index: int, kv) -> Any:
    if kv.type == _STRING:
        return _decode(kv.data, kv.count)
    if kv.type == _ARRAY:
        if kv.elem_type == _STRING:
            return _strings(handle, index, kv.count)
        return _numbers(kv.elem_type, kv.data, kv.count)
    return _numbers(kv.type, kv.data, 1)[0]


def read_value(handle, key: str, default: Any = None) -> Any:
    """One metadata value of a `kvs_gguf *`, or default when the key is absent."""
    index = lib.kvs_gguf_find_key(handle, key.encode())
    if index < 0:
        return default
    kv = ffi.new("kvs_gguf_kv_info *")
    check(lib.kvs_gguf_kv(handle, index, kv))
    return _value(handle, index, kv)


def read_metadata(handle) -> dict[str, Any]:
    """key -> Python value (int, float, bool, str or list) for a `kvs_gguf *`."""
    kv = ffi.new("kvs_gguf_kv_info *")
    out = {}
    for i in range(lib.kvs_gguf_n_kv(handle)):
        check(lib.kvs_gguf_kv(handle, i, kv))
        out[_decode(kv.key, kv.key_len)] = _value(handle, i, kv)
    return out


def read_metadata_types(handle) -> dict[str, tuple[int, int]]:
    """key -> (type, elem_type) as stored (elem_type == type for non-arrays)."""
    kv = ffi.new("kvs_gguf_kv_info *")
    out = {}
    for i in range(lib.kvs_gguf_n_kv(handle)):
        check(lib.kvs_gguf_kv(handle, i, kv))
        out[_decode(kv.key, kv.key_len)] = (kv.type, kv.elem_type)
    return out


def read_tensors(handle) -> list[GGUFTensor]:
    info = ffi.new("kvs_gguf_tensor_info *")
    out = []
    for i in range(lib.kvs_gguf_n_tensors(handle)):
        check(lib.kvs_gguf_tensor(handle, i, info))
        type_name = lib.kvs_type_name(info.type)
        out.append(GGUFTensor(
            name=_decode(info.name, info.name_len),
            type=info.type,
            type_name=ffi.string(type_name).decode() if type_name != ffi.NULL else str(info.type),
            shape=tuple(info.ne[d] for d in range(info.n_dims)),
            offset=info.offset,
            n_bytes=info.n_bytes,
        ))
    return out


class GGUFFile:
    """A validated, memory-mapped GGUF file; close() (or `with`) unmaps it."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        out = ffi.new("kvs_gguf **")
        check(lib.kvs_gguf_open(os.fsencode(self.path), out))
        self._handle = ffi.gc(out[0], lib.kvs_gguf_free)
        self._metadata: dict[str, Any] | None = None
        self._tensors: list[GGUFTensor] | None = None

    @property
    def handle(self):
        """The `kvs_gguf *`; ValueError once closed."""
        if self._handle is None:
            raise ValueError(f"GGUF file {self.path!r} is closed")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            ffi.release(handle)  # runs kvs_gguf_free now instead of at collection

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def version(self) -> int:
        return lib.kvs_gguf_version(self.handle)

    @property
    def alignment(self) -> int:
        return lib.kvs_gguf_alignment(self.handle)

    @property
    def data_offset(self) -> int:
        return lib.kvs_gguf_data_offset(self.handle)

    @property
    def file_size(self) -> int:
        return lib.kvs_gguf_file_size(self.handle)

    @property
    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = read_metadata(self.handle)
        return self._metadata

    @property
    def metadata_types(self) -> dict[str, tuple[int, int]]:
        return read_metadata_types(self.handle)

    @property
    def tensors(self) -> list[GGUFTensor]:
        if self._tensors is None:
            self._tensors = read_tensors(self.handle)
        return self._tensors

    def tensor_bytes(self, index: int) -> bytes:
        """A copy of one tensor's data."""
        info = ffi.new("kvs_gguf_tensor_info *")
        check(lib.kvs_gguf_tensor(self.handle, index, info))
        return bytes(ffi.buffer(info.data, info.n_bytes))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"v{self.version}"
        return f"GGUFFile({self.path!r}, {state})"
