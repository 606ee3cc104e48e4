"""Tensor formats: dequantization and dot products against the gguf package.

gguf.quants is a numpy port of ggml's reference dequantizers, so kvs_dequantize
must match it bit for bit; the dot kernels must match a float64 numpy dot of
those weights, and the AVX2 twin must match the scalar reference.
"""
from __future__ import annotations

import numpy as np
import pytest

import gguf  # a dependency of kvsink_cpp itself (pyproject): the oracle, never a reason to skip

from kvsink_cpp._native import ffi, lib, check  # noqa: E402
from kvsink_cpp.errors import InvalidArgumentError, UnsupportedError  # noqa: E402

QT = gguf.GGMLQuantizationType

TYPES = {
    "F32": lib.KVS_TYPE_F32,
    "F16": lib.KVS_TYPE_F16,
    "BF16": lib.KVS_TYPE_BF16,
    "Q4_0": lib.KVS_TYPE_Q4_0,
    "Q4_1": lib.KVS_TYPE_Q4_1,
    "Q5_0": lib.KVS_TYPE_Q5_0,
    "Q5_1": lib.KVS_TYPE_Q5_1,
    "Q8_0": lib.KVS_TYPE_Q8_0,
    "Q2_K": lib.KVS_TYPE_Q2_K,
    "Q3_K": lib.KVS_TYPE_Q3_K,
    "Q4_K": lib.KVS_TYPE_Q4_K,
    "Q5_K": lib.KVS_TYPE_Q5_K,
    "Q6_K": lib.KVS_TYPE_Q6_K,
}
QUANTIZED = [name for name in TYPES if name not in ("F32", "F16", "BF16")]

# Byte offsets of the fp16 scale fields in each block (blocks.h); random bytes
# there could be NaN or inf, so they get moderate finite values instead.
HALF_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


def layout(name: str) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[QT[name]]


def random_row(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n elements of type `name` as raw bytes (uint8), all values finite."""
    if name == "F32":
        return rng.standard_normal(n).astype(np.float32).view(np.uint8)
    if name == "F16":
        return (rng.standard_normal(n) * 4).astype(np.float16).view(np.uint8)
    if name == "BF16":
        bits = (rng.standard_normal(n) * 4).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    block_elems, block_bytes = layout(name)
    n_blocks = n // block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS[name]:
        halves = rng.uniform(-2, 2, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def oracle(name: str, data: np.ndarray) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, QT[name]), dtype=np.float32).reshape(-1)


def kvs_dequantize(type_id: int, data: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.float32)
    check(lib.kvs_dequantize(type_id, ffi.from_buffer(data), n,
                             ffi.from_buffer("float[]", out, require_writable=True)))
    return out


def kvs_vec_dot(type_id: int, impl: int, data: np.ndarray, x: np.ndarray) -> float:
    out = ffi.new("float *")
    check(lib.kvs_vec_dot(type_id, impl, ffi.from_buffer(data), ffi.from_buffer("float[]", x),
                          len(x), out))
    return float(out[0])


def sizes(name: str) -> list[int]:
    block_elems, _ = layout(name)
    if block_elems == 1:  # odd lengths exercise the SIMD tails
        return [1, 7, 8, 33, 100, 4099]
    return [block_elems, 3 * block_elems, 4096]


def assert_dot_close(got: float, weights: np.ndarray, x: np.ndarray) -> None:
    w, xd = weights.astype(np.float64), x.astype(np.float64)
    ref = float(w @ xd)
    scale = float(np.abs(w * xd).sum())
    assert abs(got - ref) <= 1e-5 * scale + 1e-30, (got, ref, scale)


def require_avx2() -> None:
    if lib.kvs_cpu_has_avx2() == 0:
        pytest.skip("CPU lacks AVX2 (or the library was built without the AVX2 kernels)")


# ---- layouts -------------------------------------------------------------


@pytest.mark.parametrize("name", list(TYPES))
def test_layout_matches_gguf(name):
    block_elems, block_bytes = ffi.new("int64_t *"), ffi.new("int64_t *")
    check(lib.kvs_type_layout(TYPES[name], block_elems, block_bytes))
    assert (block_elems[0], block_bytes[0]) == layout(name)
    assert ffi.string(lib.kvs_type_name(TYPES[name])).decode() == name


# ---- dequantization ----------------------------------------------------------


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_matches_gguf_exactly(name):
    rng = np.random.default_rng(1234 + TYPES[name])
    for n in sizes(name):
        data = random_row(name, n, rng)
        got = kvs_dequantize(TYPES[name], data, n)
        want = oracle(name, data)
        assert want.shape == (n,)
        assert np.array_equal(got, want, equal_nan=True), name


def test_f16_every_bit_pattern():
    """All 65536 halves (subnormals, inf, NaN) convert exactly."""
    data = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = kvs_dequantize(lib.KVS_TYPE_F16, data.view(np.uint8), data.size)
    want = data.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_bf16_every_bit_pattern():
    data = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = kvs_dequantize(lib.KVS_TYPE_BF16, data.view(np.uint8), data.size)
    want = (data.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_unaligned_source(name):
    """Blocks are read in place from a mapping, at any byte offset."""
    rng = np.random.default_rng(99)
    n = 2 * layout(name)[0]
    data = random_row(name, n, rng)
    shifted = np.empty(data.size + 1, dtype=np.uint8)
    shifted[1:] = data
    got = kvs_dequantize(TYPES[name], shifted[1:], n)
    assert np.array_equal(got, oracle(name, data))


# ---- dot products ------------------------------------------------------------


@pytest.mark.parametrize("name", list(TYPES))
def test_scalar_vec_dot_matches_numpy(name):
    rng = np.random.default_rng(4321 + TYPES[name])
    for n in sizes(name):
        data = random_row(name, n, rng)
        x = rng.standard_normal(n).astype(np.float32)
        got = kvs_vec_dot(TYPES[name], lib.KVS_IMPL_SCALAR, data, x)
        assert_dot_close(got, oracle(name, data), x)


@pytest.mark.parametrize("name", list(TYPES))
def test_avx2_vec_dot_matches_scalar(name):
    require_avx2()
    rng = np.random.default_rng(777 + TYPES[name])
    for n in sizes(name):
        data = random_row(name, n, rng)
        x = rng.standard_normal(n).astype(np.float32)
        scalar = kvs_vec_dot(TYPES[name], lib.KVS_IMPL_SCALAR, data, x)
        avx2 = kvs_vec_dot(TYPES[name], lib.KVS_IMPL_AVX2, data, x)
        auto = kvs_vec_dot(TYPES[name], lib.KVS_IMPL_AUTO, data, x)
        assert auto == avx2
        assert_dot_close(avx2, oracle(name, data), x)
        w = oracle(name, data).astype(np.float64)
        assert abs(avx2 - scalar) <= 1e-5 * float(np.abs(w * x).sum()) + 1e-30


@pytest.mark.parametrize("name", ["F32", "F16", "Q4_0", "Q5_1", "Q3_K", "Q6_K"])
def test_vec_dot_unaligned_row_and_x(name):
    rng = np.random.default_rng(5)
    n = 2 * layout(name)[0] + (3 if layout(name)[0] == 1 else 0)
    data = random_row(name, n, rng)
    row = np.empty(data.size + 1, dtype=np.uint8)
    row[1:] = data
    x = rng.standard_normal(n).astype(np.float32)
    xbuf = np.empty(4 * n + 4, dtype=np.uint8)
    xbuf[4:] = x.view(np.uint8)  # 4-byte aligned but not 32-byte aligned in general
    impls = [lib.KVS_IMPL_SCALAR] + ([lib.KVS_IMPL_AVX2] if lib.kvs_cpu_has_avx2() else [])
    for impl in impls:
        got = kvs_vec_dot(TYPES[name], impl, row[1:], xbuf[4:].view(np.float32))
        assert_dot_close(got, oracle(name, data), x)


def test_auto_without_avx2_is_scalar():
    rng = np.random.default_rng(8)
    data = random_row("Q4_K", 256, rng)
    x = rng.standard_normal(256).astype(np.float32)
    auto = kvs_vec_dot(lib.KVS_TYPE_Q4_K, lib.KVS_IMPL_AUTO, data, x)
    if lib.kvs_cpu_has_avx2() == 0:
        assert auto == kvs_vec_dot(lib.KVS_TYPE_Q4_K, lib.KVS_IMPL_SCALAR, data, x)
        with pytest.raises(UnsupportedError, match="AVX2"):
            kvs_vec_dot(lib.KVS_TYPE_Q4_K, lib.KVS_IMPL_AVX2, data, x)
    else:
        assert auto == kvs_vec_dot(lib.KVS_TYPE_Q4_K, lib.KVS_IMPL_AVX2, data, x)


# ---- errors ------------------------------------------------------------------


def test_unknown_type_is_unsupported():
    data = np.zeros(64, dtype=np.uint8)
    out = np.zeros(32, dtype=np.float32)
    with pytest.raises(UnsupportedError, match=r"\b99\b"):
        check(lib.kvs_dequantize(99, ffi.from_buffer(data), 32,
                                 ffi.from_buffer("float[]", out, require_writable=True)))
    x = np.zeros(32, dtype=np.float32)
    with pytest.raises(UnsupportedError, match=r"\b99\b"):
        check(lib.kvs_vec_dot(99, lib.KVS_IMPL_SCALAR, ffi.from_buffer(data),
                              ffi.from_buffer("float[]", x), 32, ffi.new("float *")))
    with pytest.raises(UnsupportedError, match=r"-1\b"):
        check(lib.kvs_vec_dot(-1, lib.KVS_IMPL_SCALAR, ffi.from_buffer(data),
                              ffi.from_buffer("float[]", x), 32, ffi.new("float *")))


@pytest.mark.parametrize("n", [33, 16, 0, -32])
def test_bad_length_is_invalid_argument(n):
    data = np.zeros(18 * 4, dtype=np.uint8)
    out = np.zeros(128, dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match="Q4_0"):
        check(lib.kvs_dequantize(lib.KVS_TYPE_Q4_0, ffi.from_buffer(data), n,
                                 ffi.from_buffer("float[]", out, require_writable=True)))
    with pytest.raises(InvalidArgumentError, match="Q4_0"):
        check(lib.kvs_vec_dot(lib.KVS_TYPE_Q4_0, lib.KVS_IMPL_SCALAR, ffi.from_buffer(data),
                              ffi.from_buffer("float[]", out), n, ffi.new("float *")))


def test_null_pointers_are_invalid_argument():
    data = np.zeros(18, dtype=np.uint8)
    buf = np.zeros(32, dtype=np.float32)
    src, fl = ffi.from_buffer(data), ffi.from_buffer("float[]", buf, require_writable=True)
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_dequantize(lib.KVS_TYPE_Q4_0, ffi.NULL, 32, fl))
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_dequantize(lib.KVS_TYPE_Q4_0, src, 32, ffi.NULL))
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_vec_dot(lib.KVS_TYPE_Q4_0, 0, ffi.NULL, fl, 32, ffi.new("float *")))
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_vec_dot(lib.KVS_TYPE_Q4_0, 0, src, ffi.NULL, 32, ffi.new("float *")))
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_vec_dot(lib.KVS_TYPE_Q4_0, 0, src, fl, 32, ffi.NULL))


def test_unknown_impl_is_invalid_argument():
    data = np.zeros(18, dtype=np.uint8)
    x = np.zeros(32, dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match="impl"):
        check(lib.kvs_vec_dot(lib.KVS_TYPE_Q4_0, 7, ffi.from_buffer(data),
                              ffi.from_buffer("float[]", x), 32, ffi.new("float *")))
