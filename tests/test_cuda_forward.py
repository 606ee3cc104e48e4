"""The forward pass on the GPU (Llama(device="cuda")) against the CPU's exact
path on the same ids: logits within 2e-3 of the largest |logit| (f32
products on both), top-1 agreement >= 99.5%, batched and token by token, with
f32, f16 and quantized caches, sinks on. Skips, saying why, where CUDA cannot
run (tests/test_device.py checks that asking for it then fails at load)."""
from __future__ import annotations

import numpy as np
import pytest

import kvsink_cpp
from kvsink_cpp import Llama
from test_gemma3 import gemma3_path  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cuda
if kvsink_cpp.cuda_status() != "ok":
    pytest.skip(kvsink_cpp.cuda_status(), allow_module_level=True)

TOKENS = 96


def logits(path, tokens, one_by_one=False, **kw) -> np.ndarray:
    with Llama(str(path), n_ctx=len(tokens) + 8, logits_all=True, verbose=False, **kw) as llm:
        if one_by_one:
            for t in tokens:
                llm.eval([t])
        else:
            llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)])


def ids(llm_path, n=TOKENS) -> list:
    with Llama(str(llm_path), vocab_only=True, verbose=False) as llm:
        text = "The quick brown fox jumps over the lazy dog. " * 20
        return llm.tokenize(text.encode())[:n]


def assert_close(gpu: np.ndarray, cpu: np.ndarray) -> None:
    scale = np.abs(cpu).max()
    assert np.abs(gpu - cpu).max() <= 2e-3 * scale, np.abs(gpu - cpu).max() / scale
    assert (gpu.argmax(-1) == cpu.argmax(-1)).mean() >= 0.995


@pytest.mark.parametrize("cache", ["f32", "f16", "q8", "q4"])
@pytest.mark.parametrize("one_by_one", [False, True])
def test_gpu_logits_match_the_cpu_exact_path(smollm2_path, cache, one_by_one):
    tokens = ids(smollm2_path)
    kw = dict(type_k=cache, type_v=cache, sinks="kvsink")
    cpu = logits(smollm2_path, tokens, one_by_one, matmul="f32", **kw)
    gpu = logits(smollm2_path, tokens, one_by_one, device="cuda", **kw)
    assert_close(gpu, cpu)


def test_gemma3_on_the_gpu(gemma3_path):
    tokens = ids(gemma3_path)
    cpu = logits(gemma3_path, tokens, matmul="f32", type_k="f16", type_v="f16")
    gpu = logits(gemma3_path, tokens, n_gpu_layers=-1, type_k="f16", type_v="f16")
    assert_close(gpu, cpu)


def test_gpu_context_reports_its_device(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=64, device="cuda", verbose=False) as llm:
        assert llm.settings()["device"] == "cuda" and llm.settings()["matmul"] == "f32"
        out = llm.create_completion("Hello", max_tokens=4, temperature=0)
        assert out["choices"][0]["text"]
