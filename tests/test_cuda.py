"""The CUDA kernels against their CPU twins (kernels_cuda.cu vs formats.c / ops.c).

- dequantization of every weight type equals the CPU's kvs_dequantize bit for
  bit: the GPU evaluates the same formula in the same order with the same
  IEEE roundings (kernels_cuda.cu spells it with __fmul_rn/__fadd_rn so that
  nvcc does not fuse what formats.c rounds twice);
- the f32 matrix product (decode kernel for one token, tiled kernel for more)
  matches a float64 numpy dot of the CPU-dequantized rows within 1e-5 of
  sum |w * x| (f32 accumulation over at most 2048 terms in short chains);
- RMSNorm, RoPE and SwiGLU/GeGLU match float64 numpy versions of ops.c's
  formulas within a few float32 roundings.

Skips as a whole, with kvs_cuda_check()'s reason, where CUDA cannot run
(test_cuda_absent.py covers that case).
"""
from __future__ import annotations

import numpy as np
import pytest

from kvsink_cpp._native import check, ffi, lib
from kvsink_cpp.errors import InvalidArgumentError, UnsupportedError

pytestmark = pytest.mark.cuda

if lib.kvs_cuda_check() != lib.KVS_OK:
    pytest.skip(ffi.string(lib.kvs_last_error()).decode(), allow_module_level=True)

from test_formats import TYPES, kvs_dequantize, layout, random_row  # noqa: E402

FLOAT_TYPES = ("F32", "F16", "BF16")


def floats(a: np.ndarray):
    return ffi.from_buffer("float[]", a, require_writable=True)


def cuda_dequantize(type_id: int, data: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.nan, dtype=np.float32)
    check(lib.kvs_cuda_dequantize(type_id, ffi.from_buffer(data), n, floats(out)))
    return out


def cuda_matmul(type_id: int, rows: np.ndarray, n_rows: int, n: int, x: np.ndarray) -> np.ndarray:
    out = np.full((x.shape[0], n_rows), np.nan, dtype=np.float32)
    check(lib.kvs_cuda_matmul(type_id, ffi.from_buffer(rows), n_rows, n, floats(x), x.shape[0], floats(out)))
    return out


# ---- dequantization ------------------------------------------------------------


def dequant_sizes(name: str) -> list[int]:
    block_elems, _ = layout(name)
    if block_elems == 1:  # lengths ending inside a chunk of 8 and a row of 32 lanes
        return [1, 7, 8, 33, 100, 4099]
    return [block_elems, 3 * block_elems, 4096]


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_equals_cpu_bit_for_bit(name):
    rng = np.random.default_rng(11)
    for n in dequant_sizes(name):
        data = random_row(name, n, rng)
        want = kvs_dequantize(TYPES[name], data, n)
        got = cuda_dequantize(TYPES[name], data, n)
        # compare bits: -0.0 and 0.0 differ, as every rounding must match
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{name} n={n}")


def test_dequantize_extreme_scales():
    """fp16 scales at the ends of the range (subnormal, largest finite) convert exactly."""
    rng = np.random.default_rng(12)
    data = random_row("Q8_0", 32 * 4, rng).reshape(4, 34)
    scales = np.array([2.0 ** -24, 6.1e-5, 65504.0, -0.0], dtype=np.float16)
    data[:, 0:2] = scales.view(np.uint8).reshape(4, 2)
    data = data.reshape(-1)
    want = kvs_dequantize(TYPES["Q8_0"], data, 128)
    got = cuda_dequantize(TYPES["Q8_0"], data, 128)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---- matrix products -------------------------------------------------------------


def matmul_shapes(name: str) -> list[tuple[int, int]]:
    """(n_rows, n): rows not a multiple of the 64-row tile nor of 4 warps; n from
    one k-quant block up to 2048, and ragged lengths for the float types."""
    if name in FLOAT_TYPES:
        return [(1, 256), (67, 1001), (130, 2048)]
    block_elems, _ = layout(name)
    return [(1, 256), (67, 3 * 256), (130, 2048)] if block_elems == 256 else [(1, 256), (67, 800), (130, 2048)]


def assert_product_close(got: np.ndarray, w: np.ndarray, x: np.ndarray, what: str) -> None:
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    ref = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - 1e-5 * scale), err.shape)
    assert np.all(err <= 1e-5 * scale + 1e-30), (what, worst, got[worst], ref[worst], scale[worst])


@pytest.mark.parametrize("n_tokens", [1, 3, 8, 9, 17, 64])  # 1..8 share the few-token kernel, 9.. are tiled
@pytest.mark.parametrize("name", list(TYPES))
def test_matmul_matches_float64_dot(name, n_tokens):
    rng = np.random.default_rng(21 + n_tokens)
    for n_rows, n in matmul_shapes(name):
        rows = random_row(name, n_rows * n, rng)
        w = kvs_dequantize(TYPES[name], rows, n_rows * n).reshape(n_rows, n)
        x = rng.standard_normal((n_tokens, n)).astype(np.float32)
        got = cuda_matmul(TYPES[name], rows, n_rows, n, x)
        assert_product_close(got, w, x, f"{name} {n_rows}x{n} tokens={n_tokens}")


def test_a_tokens_product_does_not_depend_on_its_batch():
    """Decode and the logits' chunks of 8 rows share the few-token kernel:
    each token's row is what it would be alone, bit for bit."""
    rng = np.random.default_rng(23)
    n_rows, n = 300, 576
    rows = random_row("Q4_1", n_rows * n, rng)
    x = rng.standard_normal((5, n)).astype(np.float32)
    together = cuda_matmul(TYPES["Q4_1"], rows, n_rows, n, x)
    alone = np.concatenate([cuda_matmul(TYPES["Q4_1"], rows, n_rows, n, x[t:t + 1]) for t in range(5)])
    np.testing.assert_array_equal(together, alone)


@pytest.mark.parametrize("n_tokens", [1, 65])
def test_matmul_many_rows(n_tokens):
    """70001 rows (more than 65535, the most a y grid dimension indexes) and a
    second token tile: the 1-D grids cover them all."""
    rng = np.random.default_rng(31)
    n_rows, n = 70_001, 64
    rows = random_row("Q4_0", n_rows * n, rng)
    w = kvs_dequantize(TYPES["Q4_0"], rows, n_rows * n).reshape(n_rows, n)
    x = rng.standard_normal((n_tokens, n)).astype(np.float32)
    assert_product_close(cuda_matmul(TYPES["Q4_0"], rows, n_rows, n, x), w, x, f"Q4_0 many rows, {n_tokens}")


# ---- RMSNorm ----------------------------------------------------------------------


@pytest.mark.parametrize("n_rows,n", [(1, 1), (3, 64), (5, 896), (2, 2048), (4, 4099)])
def test_rmsnorm_matches_float64(n_rows, n):
    rng = np.random.default_rng(41 + n)
    x = (rng.standard_normal((n_rows, n)) * 3).astype(np.float32)
    x[0, 0] = 0.0
    weight = rng.uniform(-2, 2, n).astype(np.float32)
    eps = np.float32(1e-6)
    out = np.full_like(x, np.nan)
    check(lib.kvs_cuda_rmsnorm(floats(x), floats(weight), n_rows, n, float(eps), floats(out)))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).sum(axis=1, keepdims=True) / n + np.float64(eps)) * weight
    # the scale rounded to float once, then two float products: within 1.5 ulp
    np.testing.assert_allclose(out, ref, rtol=4e-7, atol=0)


# ---- RoPE ---------------------------------------------------------------------------


def rope_reference(x, positions, n_rot, neox, base, scale, factors):
    """ops.c's kvs_rope in float64 (cos and sin rounded to float as it does),
    and per element the bound |a| + |b| of its pair for the tolerance."""
    out = x.astype(np.float64)
    bound = np.zeros_like(out)
    half = n_rot // 2
    i = np.arange(half)
    freq = np.power(np.float64(np.float32(base)), -2.0 * i / n_rot)
    if factors is not None:
        freq = freq / factors.astype(np.float64)
    theta = positions.astype(np.float64)[:, None] * np.float64(np.float32(scale)) * freq[None, :]
    c = np.cos(theta).astype(np.float32).astype(np.float64)[:, None, :]
    s = np.sin(theta).astype(np.float32).astype(np.float64)[:, None, :]
    ia = i if neox else 2 * i
    ib = ia + (half if neox else 1)
    a, b = out[:, :, ia], out[:, :, ib]
    out[:, :, ia], out[:, :, ib] = a * c - b * s, a * s + b * c
    bound[:, :, ia] = bound[:, :, ib] = np.abs(a) + np.abs(b)
    return out, bound


ROPE_CASES = [  # head_dim, n_rot, neox, freq_base, freq_scale, with factors
    (64, 64, 0, 10000.0, 1.0, False),
    (64, 64, 1, 10000.0, 1.0, True),
    (128, 128, 0, 500000.0, 1.0, True),
    (128, 128, 1, 1000000.0, 0.25, False),
    (256, 256, 1, 10000.0, 1.0, False),
    (256, 256, 0, 10000.0, 0.125, True),
    (128, 64, 0, 10000.0, 1.0, False),   # n_rot < head_dim: the rest stays as it is
    (128, 32, 1, 10000.0, 1.0, True),
]


@pytest.mark.parametrize("head_dim,n_rot,neox,base,scale,with_factors", ROPE_CASES)
def test_rope_matches_float64(head_dim, n_rot, neox, base, scale, with_factors):
    rng = np.random.default_rng(head_dim + n_rot + neox)
    n_tokens, n_heads = 9, 5
    positions = np.array([0, 1, 2, 17, 511, 4096, 20000, 32767, 32768], dtype=np.int32)
    x = rng.standard_normal((n_tokens, n_heads, head_dim)).astype(np.float32)
    factors = rng.uniform(1.0, 8.0, n_rot // 2).astype(np.float32) if with_factors else None
    got = x.copy()
    check(lib.kvs_cuda_rope(floats(got), n_tokens, n_heads, head_dim, n_rot, neox,
                            ffi.from_buffer("int32_t[]", positions), base, scale,
                            ffi.from_buffer("float[]", factors) if factors is not None else ffi.NULL))
    ref, bound = rope_reference(x, positions, n_rot, neox, base, scale, factors)
    rotated = got[:, :, :n_rot].astype(np.float64)
    # three float roundings (two products, one sum) of terms at most |a| + |b|
    assert np.all(np.abs(rotated - ref[:, :, :n_rot]) <= 4e-7 * bound[:, :, :n_rot] + 1e-30)
    np.testing.assert_array_equal(got[:, :, n_rot:], x[:, :, n_rot:])


# ---- SwiGLU / GeGLU -----------------------------------------------------------------


def glu_reference(gelu: int, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    if gelu:  # ops.c's constants, as the floats it uses
        k0, k1 = np.float64(np.float32(0.7978845608)), np.float64(np.float32(0.044715))
        return 0.5 * g64 * (1.0 + np.tanh(k0 * (g64 + k1 * g64 ** 3))) * u64
    return g64 / (1.0 + np.exp(-g64)) * u64


@pytest.mark.parametrize("gelu", [0, 1])
@pytest.mark.parametrize("n", [1, 1000, 65537])
def test_glu_matches_float64(gelu, n):
    rng = np.random.default_rng(51 + n + gelu)
    gate = (rng.standard_normal(n) * 4).astype(np.float32)
    extremes = np.array([-100, -89, -20, -5, -0.0, 0, 5, 20, 100], dtype=np.float32)
    gate[:min(n, extremes.size)] = extremes[:n]
    up = rng.standard_normal(n).astype(np.float32)
    got = gate.copy()
    check(lib.kvs_cuda_glu(gelu, floats(got), ffi.from_buffer("float[]", up), n))
    ref = glu_reference(gelu, gate, up)
    # expf/tanhf are within 2 ulp; GELU's 1 + tanh(u) cancels for negative
    # gates, an absolute error of a few ulp of 1 times |g * u|
    tol = 1e-6 * np.abs(ref) + 1e-30
    if gelu:
        tol += 3e-7 * np.abs(gate.astype(np.float64) * up)
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= tol), (gelu, gate[np.argmax(err - tol)], got[np.argmax(err - tol)], ref[np.argmax(err - tol)])


# ---- argument errors ------------------------------------------------------------------


def test_dequantize_rejects_bad_arguments():
    data = random_row("Q4_0", 64, np.random.default_rng(61))
    out = np.zeros(64, np.float32)
    with pytest.raises(UnsupportedError, match="type id 99"):
        check(lib.kvs_cuda_dequantize(99, ffi.from_buffer(data), 64, floats(out)))
    with pytest.raises(InvalidArgumentError, match="block size 32"):
        check(lib.kvs_cuda_dequantize(TYPES["Q4_0"], ffi.from_buffer(data), 31, floats(out)))
    with pytest.raises(InvalidArgumentError, match="NULL"):
        check(lib.kvs_cuda_dequantize(TYPES["Q4_0"], ffi.NULL, 64, floats(out)))
    with pytest.raises(InvalidArgumentError, match="NULL"):
        check(lib.kvs_cuda_dequantize(TYPES["Q4_0"], ffi.from_buffer(data), 64, ffi.NULL))


def test_matmul_rejects_bad_arguments():
    rows = random_row("Q8_0", 2 * 64, np.random.default_rng(62))
    x, out = np.ones((2, 64), np.float32), np.zeros((2, 2), np.float32)
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_cuda_matmul(TYPES["Q8_0"], ffi.from_buffer(rows), 2, 64, floats(x), 0, floats(out)))
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_cuda_matmul(TYPES["Q8_0"], ffi.from_buffer(rows), 0, 64, floats(x), 2, floats(out)))
    with pytest.raises(InvalidArgumentError, match="block size 32"):
        check(lib.kvs_cuda_matmul(TYPES["Q8_0"], ffi.from_buffer(rows), 2, 48, floats(x), 2, floats(out)))
    with pytest.raises(InvalidArgumentError, match="NULL"):
        check(lib.kvs_cuda_matmul(TYPES["Q8_0"], ffi.from_buffer(rows), 2, 64, ffi.NULL, 2, floats(out)))


def test_rmsnorm_rope_glu_reject_bad_arguments():
    x, w = np.ones((2, 8), np.float32), np.ones(8, np.float32)
    with pytest.raises(InvalidArgumentError):
        check(lib.kvs_cuda_rmsnorm(floats(x), floats(w), 2, 0, 1e-6, floats(x)))
    with pytest.raises(InvalidArgumentError, match="NULL"):
        check(lib.kvs_cuda_rmsnorm(floats(x), ffi.NULL, 2, 8, 1e-6, floats(x)))
    pos = ffi.from_buffer("int32_t[]", np.zeros(2, np.int32))
    for n_rot in (0, 3, 10):  # zero, odd, more than head_dim
        with pytest.raises(InvalidArgumentError, match="n_rot"):
            check(lib.kvs_cuda_rope(floats(x), 2, 1, 8, n_rot, 0, pos, 10000.0, 1.0, ffi.NULL))
    with pytest.raises(InvalidArgumentError, match="NULL"):
        check(lib.kvs_cuda_rope(floats(x), 2, 1, 8, 8, 0, ffi.NULL, 10000.0, 1.0, ffi.NULL))
    with pytest.raises(InvalidArgumentError, match="gelu"):
        check(lib.kvs_cuda_glu(2, floats(x), floats(w), 8))
