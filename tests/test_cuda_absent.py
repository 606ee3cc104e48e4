"""The CUDA entry points answer on every machine and build, GPU or not.

A library built without CUDA says so (kvs_cuda_built() == 0, every entry
UNSUPPORTED with cuda_absent.c's "built without CUDA"); a CUDA build on a
machine where CUDA cannot run says why (no driver, an old driver, no device,
no kernels for the device), the same reason from every entry; where CUDA
runs, the entries succeed (test_cuda.py checks their results). Not marked
`cuda` and never skipped: test_cuda.py skips as a whole where there is no GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from kvsink_cpp._native import ffi, lib

NO_CUDA = "this kvsink_cpp library was built without CUDA"
# The reasons cuda_device.cu gives when CUDA cannot run (kvs_cuda_check).
CANNOT_RUN = ("CUDA: no NVIDIA driver", "CUDA: the NVIDIA driver supports CUDA", "CUDA: no CUDA device",
              "CUDA: this build has no kernels for", "CUDA: a test kernel failed", "CUDA: cannot use the GPU")


def last_error() -> str:
    return ffi.string(lib.kvs_last_error()).decode()


def floats(a: np.ndarray):
    return ffi.from_buffer("float[]", a, require_writable=True)


def call_dequantize() -> int:
    src, dst = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    return lib.kvs_cuda_dequantize(lib.KVS_TYPE_F32, ffi.from_buffer(src), 32, floats(dst))


def call_matmul() -> int:
    w, x, y = np.ones((3, 32), np.float32), np.ones((2, 32), np.float32), np.zeros((2, 3), np.float32)
    return lib.kvs_cuda_matmul(lib.KVS_TYPE_F32, ffi.from_buffer(w), 3, 32, floats(x), 2, floats(y))


def call_rmsnorm() -> int:
    x, w, out = np.ones((2, 8), np.float32), np.ones(8, np.float32), np.zeros((2, 8), np.float32)
    return lib.kvs_cuda_rmsnorm(floats(x), floats(w), 2, 8, 1e-6, floats(out))


def call_rope() -> int:
    x, pos = np.ones((2, 3, 8), np.float32), np.array([0, 5], np.int32)
    return lib.kvs_cuda_rope(floats(x), 2, 3, 8, 8, 0, ffi.from_buffer("int32_t[]", pos), 10000.0, 1.0, ffi.NULL)


def call_glu() -> int:
    gate, up = np.ones(16, np.float32), np.ones(16, np.float32)
    return lib.kvs_cuda_glu(0, floats(gate), floats(up), 16)


ENTRIES = {"dequantize": call_dequantize, "matmul": call_matmul, "rmsnorm": call_rmsnorm, "rope": call_rope,
           "glu": call_glu}


def test_check_says_why_cuda_cannot_run():
    built = lib.kvs_cuda_built()
    status = lib.kvs_cuda_check()
    reason = last_error()
    if built == 0:
        assert status == lib.KVS_ERR_UNSUPPORTED
        assert reason.startswith(NO_CUDA), reason
    else:
        assert built == 1
        if status != lib.KVS_OK:
            assert status == lib.KVS_ERR_UNSUPPORTED
            assert reason.startswith(CANNOT_RUN), reason


def test_check_is_cached_and_repeats_its_reason():
    first, reason = lib.kvs_cuda_check(), last_error()
    # another failure in between: the second check must record its reason anew
    assert lib.kvs_dequantize(-1, ffi.NULL, 32, ffi.NULL) == lib.KVS_ERR_UNSUPPORTED
    assert lib.kvs_cuda_check() == first
    if first != lib.KVS_OK:
        assert last_error() == reason  # recorded again for this call, not left over


@pytest.mark.parametrize("name", list(ENTRIES))
def test_entry_answers_like_the_check(name):
    expected = lib.kvs_cuda_check()
    reason = last_error()
    status = ENTRIES[name]()
    if expected == lib.KVS_OK:
        assert status == lib.KVS_OK, last_error()
    else:
        assert status == lib.KVS_ERR_UNSUPPORTED
        assert last_error() == reason
