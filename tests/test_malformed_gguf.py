"""The C GGUF reader rejects malformed files with a specific reason and never
crashes: truncations at every length, corrupt headers, absurd counts and
lengths, bad types, shapes, offsets and alignments, duplicates, random
byte flips."""
from __future__ import annotations

import random
import struct

import gguf  # the reference writer and reader; a dependency of kvsink_cpp itself (pyproject)
import numpy as np
import pytest

from kvsink_cpp._native import check, ffi, lib
from kvsink_cpp.errors import (GGUFFormatError, InvalidArgumentError, KvsinkError,
                               KvsinkIOError, UnsupportedError)
from kvsink_cpp.gguf_file import GGUFFile

# GGUF metadata value types and GGML tensor types used below
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_F16, T_Q4_0 = 0, 1, 2


# ---- a hand-written GGUF builder (every field under the test's control) -----

def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, U32, u32(v))


def kv_str(key: str, v: str) -> bytes:
    return kv(key, STR, gstr(v))


def kv_array(key: str, elem: int, count: int, elems: bytes) -> bytes:
    return kv(key, ARR, u32(elem) + u64(count) + elems)


def tinfo(name: str, dims, ttype: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


def build(kvs=(), tensors=(), data=b"", *, magic=b"GGUF", version=3, n_kv=None, n_tensors=None,
          alignment=32, pad=True) -> bytes:
    head = magic + u32(version)
    head += u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    if pad:
        body += b"\0" * (-len(body) % alignment)
    return body + data


def good_parts():
    """(kvs, tensors, data) of a small valid file: 'a' F32 [8, 2], 'b' F16 [32]."""
    kvs = [
        # long enough that the later entries lie past what the count check demands
        kv_str("general.description", "x" * 200),
        kv_str("general.architecture", "llama"),
        kv_u32("llama.block_count", 2),
        kv("llama.rope.freq_base", F32, struct.pack("<f", 10000.0)),
        kv("general.flag", BOOL, b"\1"),
        kv_array("tokenizer.ggml.tokens", STR, 3, gstr("<s>") + gstr("hé") + gstr("")),
        kv_array("tokenizer.ggml.scores", F32, 3, struct.pack("<3f", 0.5, -1.0, 2.25)),
        kv_array("empty", I32, 0, b""),
    ]
    tensors = [tinfo("a", [8, 2], T_F32, 0), tinfo("b", [32], T_F16, 64)]
    data = np.arange(16, dtype="<f4").tobytes() + np.ones(32, "<f2").tobytes()
    return kvs, tensors, data


def good_file() -> bytes:
    return build(*good_parts())


def write(tmp_path, blob: bytes, name="t.gguf"):
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def fails(tmp_path, blob: bytes, exc=GGUFFormatError, *words: str) -> str:
    """Open must raise `exc` whose message contains every word; returns the message."""
    with pytest.raises(exc) as info:
        GGUFFile(write(tmp_path, blob))
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg


# ---- the valid baseline -------------------------------------------------------

def test_hand_built_file_reads_back(tmp_path):
    with GGUFFile(write(tmp_path, good_file())) as f:
        assert f.version == 3 and f.alignment == 32 and f.data_offset % 32 == 0
        m = f.metadata
        assert m["general.architecture"] == "llama"
        assert m["llama.block_count"] == 2
        assert m["llama.rope.freq_base"] == 10000.0
        assert m["general.flag"] is True
        assert m["tokenizer.ggml.tokens"] == ["<s>", "hé", ""]
        assert m["tokenizer.ggml.scores"] == [0.5, -1.0, 2.25]
        assert m["empty"] == []
        a, b = f.tensors
        assert (a.name, a.type_name, a.shape, a.offset, a.n_bytes) == ("a", "F32", (8, 2), 0, 64)
        assert (b.name, b.type_name, b.shape, b.offset, b.n_bytes) == ("b", "F16", (32,), 64, 64)
        assert np.frombuffer(f.tensor_bytes(0), "<f4").tolist() == list(range(16))


def test_version_2_and_other_alignment(tmp_path):
    kvs, tensors, data = good_parts()
    blob = build(kvs + [kv_u32("general.alignment", 64)], tensors, data, version=2, alignment=64)
    with GGUFFile(write(tmp_path, blob)) as f:
        assert f.version == 2 and f.alignment == 64 and f.data_offset % 64 == 0
        assert f.tensors[1].n_bytes == 64


def test_lookups_and_index_checks(tmp_path):
    with GGUFFile(write(tmp_path, good_file())) as f:
        h = f.handle
        assert lib.kvs_gguf_find_key(h, b"llama.block_count") == 2
        assert lib.kvs_gguf_find_key(h, b"llama.block") == -1
        assert lib.kvs_gguf_find_tensor(h, b"b") == 1
        assert lib.kvs_gguf_find_tensor(h, b"c") == -1
        kv_info = ffi.new("kvs_gguf_kv_info *")
        t_info = ffi.new("kvs_gguf_tensor_info *")
        s, n = ffi.new("const char **"), ffi.new("uint64_t *")
        for call in (lambda: lib.kvs_gguf_kv(h, 8, kv_info),
                     lambda: lib.kvs_gguf_kv(h, -1, kv_info),
                     lambda: lib.kvs_gguf_tensor(h, 2, t_info),
                     lambda: lib.kvs_gguf_kv_string(h, 5, 3, s, n),
                     lambda: lib.kvs_gguf_kv_string(h, 0, 0, s, n)):
            with pytest.raises(InvalidArgumentError):
                check(call())
        check(lib.kvs_gguf_kv(h, 5, kv_info))
        assert kv_info.type == ARR and kv_info.elem_type == STR and kv_info.data == ffi.NULL
        check(lib.kvs_gguf_kv_string(h, 5, 1, s, n))
        assert bytes(ffi.buffer(s[0], n[0])).decode() == "hé"
    lib.kvs_gguf_free(ffi.NULL)  # allowed


def test_gguf_writer_file_reads_back(tmp_path):
    path = _writer_file(gguf, tmp_path)
    with GGUFFile(path) as f:
        assert f.metadata["general.architecture"] == "llama"
        assert [t.name for t in f.tensors] == ["w", "v"]


def _writer_file(gguf, tmp_path):
    path = tmp_path / "writer.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list(["a", "bb", "ccc"])
    w.add_tensor("w", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("v", np.ones(16, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- truncation ------------------------------------------------------------------

def test_truncated_at_every_length_of_a_writer_file(tmp_path):
    blob = _writer_file(gguf, tmp_path).read_bytes()
    ref = gguf.GGUFReader(tmp_path / "writer.gguf")
    needed = max(t.data_offset + t.n_bytes for t in ref.tensors)
    path = tmp_path / "cut.gguf"
    for length in range(len(blob) + 1):
        path.write_bytes(blob[:length])
        if length >= needed:  # only padding after the last tensor is missing
            GGUFFile(path).close()
            continue
        with pytest.raises(GGUFFormatError) as info:
            GGUFFile(path)
        msg = str(info.value)
        assert any(w in msg for w in ("truncated", "empty", "past the end", "data ends at")), \
            (length, msg)


def _section_offsets():
    kvs, tensors, data = good_parts()
    header = 24
    kv_start = [header]
    for k in kvs:
        kv_start.append(kv_start[-1] + len(k))
    ti_start = kv_start[-1]
    ti_end = ti_start + sum(len(t) for t in tensors)
    return kvs, kv_start, ti_start, ti_end


@pytest.mark.parametrize("where, cut, words", [
    ("header: version", lambda o: 6, ["truncated", "GGUF version"]),
    ("header: tensor count", lambda o: 12, ["truncated", "tensor count"]),
    ("header: metadata count", lambda o: 20, ["truncated", "metadata count"]),
    ("kv key length", lambda o: o[1][1] + 4, ["truncated", "key of metadata entry 1"]),
    ("kv key bytes", lambda o: o[1][1] + 10, ["key of metadata entry 1", "past the end"]),
    ("kv string value", lambda o: o[1][1] + 8 + 20 + 4 + 3,
     ["truncated", "value of metadata 'general.architecture'"]),
    ("kv value type", lambda o: o[1][2] + 8 + 17 + 2, ["value type of metadata 'llama.block_count'"]),
    ("kv value", lambda o: o[1][2] + 8 + 17 + 4 + 1, ["value of metadata 'llama.block_count'"]),
    ("kv string array element", lambda o: o[1][6] - 2, ["'tokenizer.ggml.tokens' element 2"]),
    ("kv numeric array", lambda o: o[1][7] - 3, ["'tokenizer.ggml.scores'", "past the end"]),
    ("tensor name", lambda o: o[2] + 5, ["name of tensor 0"]),
    ("tensor dims", lambda o: o[2] + 8 + 1 + 4 + 3, ["dimension 0 of tensor 'a'"]),
    ("tensor type", lambda o: o[2] + 8 + 1 + 4 + 16 + 1, ["type of tensor 'a'"]),
    ("tensor offset", lambda o: o[3] - 1, ["offset of tensor 'b'"]),
    ("padding", lambda o: o[3] + 1, ["tensor 'a' data ends at"]),
    ("data", lambda o: -10, ["tensor 'b' data ends at"]),
])
def test_truncated_inside_each_section(tmp_path, where, cut, words):
    blob = good_file()
    kvs, kv_start, ti_start, ti_end = _section_offsets()
    length = cut((kvs, kv_start, ti_start, ti_end))
    assert 0 < abs(length) < len(blob)
    msg = fails(tmp_path, blob[:length], GGUFFormatError, *words)
    assert "t.gguf" in msg  # the path is named too


def test_truncated_at_every_length_of_a_hand_built_file(tmp_path):
    blob = good_file()
    path = tmp_path / "cut.gguf"
    for length in range(len(blob)):
        path.write_bytes(blob[:length])
        with pytest.raises(GGUFFormatError):
            GGUFFile(path)


# ---- header ----------------------------------------------------------------------

def test_empty_and_tiny_files(tmp_path):
    fails(tmp_path, b"", GGUFFormatError, "empty")
    fails(tmp_path, b"GG", GGUFFormatError, "truncated")


def test_bad_magic(tmp_path):
    fails(tmp_path, build(magic=b"GGML"), GGUFFormatError, "not a GGUF file", "magic")
    fails(tmp_path, b"\x7fELF" + b"\0" * 60, GGUFFormatError, "not a GGUF file")


@pytest.mark.parametrize("version, words", [
    (1, ["version 1", "not supported"]),
    (99, ["version 99", "not supported"]),
    (0, ["version 0"]),
    (0x03000000, ["big-endian"]),
    (0x02000000, ["big-endian"]),
])
def test_bad_versions(tmp_path, version, words):
    fails(tmp_path, build(*good_parts(), version=version), UnsupportedError, *words)


def test_real_big_endian_file(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="big-endian"):
        GGUFFile(path)


@pytest.mark.parametrize("field, count", [("n_tensors", 2**60), ("n_tensors", 2**64 - 1),
                                          ("n_kv", 2**60), ("n_kv", 2**62), ("n_kv", 2**64 - 1)])
def test_absurd_counts(tmp_path, field, count):
    word = "tensor count" if field == "n_tensors" else "metadata count"
    fails(tmp_path, build(*good_parts(), **{field: count}), GGUFFormatError, word, "impossible")


def test_counts_larger_than_the_entries(tmp_path):
    # plausible for the file size, so the padding and data get parsed as entries
    kvs, tensors, data = good_parts()
    fails(tmp_path, build(kvs, tensors, data, n_tensors=5), GGUFFormatError, "tensor")
    fails(tmp_path, build(kvs, tensors, data, n_kv=9), GGUFFormatError)


# ---- metadata --------------------------------------------------------------------

def _with_kvs(*extra) -> bytes:
    kvs, tensors, data = good_parts()
    return build(kvs + list(extra), tensors, data)


def test_string_length_past_eof(tmp_path):
    kvs, tensors, data = good_parts()
    key = u64(10**6) + b"general.name"  # key length far past the end
    fails(tmp_path, build([key] + kvs, tensors, data), GGUFFormatError,
          "string of 1000000 bytes", "past the end")
    fails(tmp_path, _with_kvs(kv("general.name", STR, u64(2**63) + b"x")), GGUFFormatError,
          "metadata 'general.name'", "past the end")
    fails(tmp_path, _with_kvs(kv("general.name", STR, u64(2**64 - 1))), GGUFFormatError,
          "past the end")


@pytest.mark.parametrize("elem, count", [(U32, 2**40), (U8, 2**64 - 1), (F64, 2**61),
                                         (STR, 2**61), (STR, 1000)])
def test_array_count_past_eof(tmp_path, elem, count):
    fails(tmp_path, _with_kvs(kv_array("general.big", elem, count, b"")), GGUFFormatError,
          "metadata 'general.big'", "past the end")


@pytest.mark.parametrize("vtype", [13, 99, 2**32 - 1])
def test_unknown_value_type(tmp_path, vtype):
    fails(tmp_path, _with_kvs(kv("general.odd", vtype, u32(0))), GGUFFormatError,
          "'general.odd'", f"unknown value type {vtype}")
    fails(tmp_path, _with_kvs(kv_array("general.odd", vtype, 1, u32(0))), GGUFFormatError,
          "'general.odd'", f"unknown array element type {vtype}")


def test_arrays_of_arrays_are_unsupported(tmp_path):
    inner = u32(U8) + u64(1) + b"\1"
    fails(tmp_path, _with_kvs(kv_array("general.nested", ARR, 1, inner)), UnsupportedError,
          "'general.nested'", "arrays of arrays")


def test_duplicate_key(tmp_path):
    fails(tmp_path, _with_kvs(kv_u32("llama.block_count", 3)), GGUFFormatError,
          "duplicate metadata key 'llama.block_count'")


@pytest.mark.parametrize("value, words", [
    (kv_u32("general.alignment", 0), ["general.alignment 0", "power of two"]),
    (kv_u32("general.alignment", 3), ["general.alignment 3", "power of two"]),
    (kv("general.alignment", U64, u64(32)), ["general.alignment must be a uint32", "uint64"]),
])
def test_bad_alignment(tmp_path, value, words):
    fails(tmp_path, _with_kvs(value), GGUFFormatError, *words)


# ---- tensor infos ------------------------------------------------------------------

def _with_tensor(info: bytes, data_size: int = 128) -> bytes:
    kvs, tensors, data = good_parts()
    return build(kvs, tensors + [info], data + b"\0" * (data_size - len(data)) if
                 data_size > len(data) else data)


def test_tensor_data_past_eof(tmp_path):
    fails(tmp_path, _with_tensor(tinfo("c", [16], T_F32, 2**20)), GGUFFormatError,
          "tensor 'c' data ends at", "the file has")
    fails(tmp_path, _with_tensor(tinfo("c", [16], T_F32, 2**64 - 32)), GGUFFormatError,
          "tensor 'c' data ends at")
    fails(tmp_path, _with_tensor(tinfo("c", [2**40, 2**20], T_F32, 128)), GGUFFormatError,
          "tensor 'c' data ends at")


def test_misaligned_offset(tmp_path):
    fails(tmp_path, _with_tensor(tinfo("c", [4], T_F32, 132), 160), GGUFFormatError,
          "tensor 'c' offset 132", "alignment 32")


@pytest.mark.parametrize("ttype", [99, 4, 5, 2**31, 2**32 - 1])
def test_unknown_tensor_type(tmp_path, ttype):
    fails(tmp_path, _with_tensor(tinfo("blk.3.attn_q.weight", [32], ttype, 128), 256),
          UnsupportedError, "tensor 'blk.3.attn_q.weight'", f"unsupported type id {ttype}")


@pytest.mark.parametrize("dims", [[], [1, 1, 1, 1, 1]])
def test_bad_dimension_count(tmp_path, dims):
    fails(tmp_path, _with_tensor(tinfo("c", dims, T_F32, 128), 256), GGUFFormatError,
          "tensor 'c'", f"{len(dims)} dimensions")


def test_bad_dimension_count_absurd(tmp_path):
    info = gstr("c") + u32(2**32 - 1) + u64(1) + u32(T_F32) + u64(128)
    fails(tmp_path, _with_tensor(info, 256), GGUFFormatError, "tensor 'c'", "dimensions")


@pytest.mark.parametrize("dims, words", [
    ([2**40, 2**40], ["overflows the element count"]),
    ([2**40, 2**40, 0], ["overflows the element count"]),
    ([2**32, 2**32, 2**32, 2**32], ["overflows"]),
    ([2**61, 2], ["byte size overflows"]),       # 2^62 elements fit, their bytes do not
    ([2**64 - 1], ["dimension 0", "negative"]),
    ([4, 2**63], ["dimension 1", "negative"]),
])
def test_dimension_overflow(tmp_path, dims, words):
    fails(tmp_path, _with_tensor(tinfo("c", dims, T_F32, 128), 256), GGUFFormatError,
          "tensor 'c'", *words)


def test_row_not_a_multiple_of_the_block(tmp_path):
    fails(tmp_path, _with_tensor(tinfo("q", [20, 2], T_Q4_0, 128), 256), GGUFFormatError,
          "tensor 'q'", "not a multiple of the Q4_0 block size 32")


def test_duplicate_tensor_name(tmp_path):
    fails(tmp_path, _with_tensor(tinfo("a", [16], T_F32, 128), 256), GGUFFormatError,
          "duplicate tensor name 'a'")


def test_zero_sized_tensor_is_accepted(tmp_path):
    with GGUFFile(write(tmp_path, _with_tensor(tinfo("z", [0, 4], T_F32, 128)))) as f:
        assert f.tensors[2].shape == (0, 4) and f.tensors[2].n_bytes == 0


# ---- files that are not there -------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "no" / "such.gguf"
    with pytest.raises(KvsinkIOError) as info:
        GGUFFile(path)
    assert isinstance(info.value, OSError)
    assert str(path) in str(info.value) and "No such file" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(KvsinkIOError, match="not a regular file"):
        GGUFFile(tmp_path)


# ---- random corruption: every outcome is a clean open or a KvsinkError -------------------

def test_random_byte_flips_never_crash(tmp_path):
    blob = bytearray(good_file())
    rng = random.Random(1234)
    path = tmp_path / "fuzz.gguf"
    opened = rejected = 0
    for _ in range(800):
        mutated = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(mutated))
            mutated[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        path.write_bytes(bytes(mutated[:rng.choice([len(mutated), rng.randrange(len(mutated))])]))
        try:
            f = GGUFFile(path)
        except KvsinkError:
            rejected += 1
            continue
        with f:  # whatever opened must be fully readable
            f.metadata, f.tensors
            for i in range(len(f.tensors)):
                f.tensor_bytes(i)
        opened += 1
    assert opened > 0 and rejected > 0
