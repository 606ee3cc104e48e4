"""The scalar-only build (what a CPU without AVX2, or ARM, gets) compiles and
computes the same logits as the numpy reference."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import synthetic
from numpy_llama import NumpyLlama
from kvsink_cpp import Llama
from kvsink_cpp._native import lib
assert lib.kvs_cpu_has_avx2() == 0, "the scalar-only build must not offer AVX2"
path = synthetic.write_qwen2_legacy({model!r})
tokens = list(range(3, 40))
want = NumpyLlama(path).forward(tokens)
with Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, matmul="f32", type_k="f32", type_v="f32") as llm:
    llm.eval(tokens)
    got = llm.scores[:len(tokens)]
assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
print("ok")
"""


@pytest.mark.slow
def test_scalar_only_build_matches_numpy(tmp_path):
    if not (REPO / "CMakeLists.txt").is_file() or shutil.which("cmake") is None:
        pytest.skip("needs the source tree and cmake")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DKVSINK_AVX2=OFF",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    lib = build / "libkvsink.so"
    assert lib.is_file()
    env = dict(os.environ, KVSINK_LIBRARY=str(lib))
    code = SCRIPT.format(tests=str(REPO / "tests"), model=str(tmp_path / "m.gguf"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
