"""Choosing where a context runs: Llama(device=...) / llama-cpp-python's
n_gpu_layers / the CLI's -ngl, and kvsink_cpp.cuda_available().

Where CUDA cannot run (a build without it, no driver, no device) asking for
the GPU must fail at load with the reason; where it can, the GPU forward pass
is checked by tests/test_cuda_forward.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

import kvsink_cpp
from kvsink_cpp import Llama, UnsupportedError
from kvsink_cpp._native import lib


def expected_reason() -> str:
    """What a request for the GPU must say here."""
    status = kvsink_cpp.cuda_status()
    if status == "ok":
        pytest.skip("CUDA runs here: asking for the GPU succeeds (tests/test_cuda_forward.py)")
    return status


def test_cuda_status_names_the_reason():
    status = kvsink_cpp.cuda_status()
    assert kvsink_cpp.cuda_available() == (status == "ok")
    if not lib.kvs_cuda_built():
        assert "built without CUDA" in status and "KVSINK_CUDA=ON" in status
    elif status != "ok":
        assert status.startswith("CUDA"), status


@pytest.mark.parametrize("kwargs", [{"device": "cuda"}, {"n_gpu_layers": -1}, {"n_gpu_layers": 99},
                                    {"device": "cuda", "n_gpu_layers": -1}])
def test_asking_for_the_gpu_fails_at_load_with_the_reason(smollm2_path, kwargs):
    with pytest.raises(UnsupportedError) as info:
        Llama(str(smollm2_path), n_ctx=32, verbose=False, **kwargs)
    assert expected_reason() in str(info.value)


def test_cpu_is_the_default_and_n_gpu_layers_0_stays_there(smollm2_path):
    for kwargs in ({}, {"n_gpu_layers": 0}, {"device": "cpu"}, {"device": "cpu", "n_gpu_layers": 0}):
        with Llama(str(smollm2_path), n_ctx=32, verbose=False, **kwargs) as llm:
            assert llm.device == "cpu" and llm.settings()["device"] == "cpu"
            llm.eval([1, 2, 3])


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "tpu"}, "device must be one of"),
    ({"device": "cpu", "n_gpu_layers": -1}, "contradicts"),
    ({"n_gpu_layers": 1.5}, "n_gpu_layers must be an int"),
    ({"n_gpu_layers": True}, "n_gpu_layers must be an int"),
])
def test_bad_device_arguments_are_value_errors(smollm2_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Llama(str(smollm2_path), n_ctx=32, verbose=False, **kwargs)


def test_partial_offload_is_refused_by_name(smollm2_path):
    """Some layers on the GPU is not implemented: refused, not rounded to all or none."""
    with Llama(str(smollm2_path), n_ctx=32, verbose=False) as llm:
        n_layer = lib.kvs_model_n_layer(llm._model)
    for n in (1, n_layer - 1):
        with pytest.raises(ValueError, match=f"all {n_layer} layers or none"):
            Llama(str(smollm2_path), n_ctx=32, verbose=False, n_gpu_layers=n)


def test_cli_ngl_fails_with_the_reason(smollm2_path):
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "generate", "-m", str(smollm2_path), "-p", "hi", "-n", "2",
                          "-ngl", "-1"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert expected_reason() in run.stderr, run.stderr


def test_perplexity_cli_asks_for_the_gpu_with_ngl(smollm2_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "perplexity", "-m", str(smollm2_path), "-f", str(text),
                          "-c", "64", "--chunks", "1", "-ngl", "-1"], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert expected_reason() in run.stderr, run.stderr
