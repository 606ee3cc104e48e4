"""The binding and the library agree: the cffi cdef in kvsink_cpp/_native.py declares
exactly what kvsink.h does, the ABI versions match, and the loader refuses a
library of another ABI version (or none) with a message naming both versions."""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvsink_cpp import _native

HEADER = Path(__file__).resolve().parent.parent / "native" / "include" / "kvsink.h"


def normalize(text: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)       # comments
    text = re.sub(r"#ifdef __cplusplus.*?#endif", " ", text, flags=re.S)  # extern "C" guards
    text = re.sub(r"^\s*#.*$", " ", text, flags=re.M)         # preprocessor lines
    text = text.replace("KVS_API", " ")
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*([;{}(),*=])\s*", r"\1", text)
    return [d.strip() for d in text.split(";") if d.strip()]


def test_cdef_matches_header():
    if not HEADER.is_file():
        pytest.skip(f"{HEADER} not found (tests run outside the source tree)")
    assert normalize(_native.CDEF) == normalize(HEADER.read_text())


def test_abi_version_is_the_headers():
    """The binding's ABI_VERSION is the header's KVS_ABI_VERSION. (The loaded
    library's own version needs no test here: _native refuses to load any
    other, see the tests below.)"""
    if not HEADER.is_file():
        pytest.skip(f"{HEADER} not found (tests run outside the source tree)")
    found = re.findall(r"^\s*#\s*define\s+KVS_ABI_VERSION\s+(\d+)\b", HEADER.read_text(), flags=re.M)
    assert len(found) == 1, f"expected one #define KVS_ABI_VERSION in {HEADER}, found {found}"
    assert int(found[0]) == _native.ABI_VERSION == _native.lib.kvs_abi_version()


# ---- the loader refuses what it cannot use ------------------------------------------

def _build_library(tmp_path: Path, name: str, source: str) -> Path:
    """A tiny shared library compiled from C source (skips without a C compiler)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build a stand-in library")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / f"lib{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def _other_abi_library(tmp_path: Path) -> tuple[Path, int]:
    other = _native.ABI_VERSION + 1
    path = _build_library(tmp_path, "otherabi", "#include <stdint.h>\n"
                          f"int32_t kvs_abi_version(void) {{ return {other}; }}\n")
    return path, other


@pytest.mark.skipif(sys.platform != "linux", reason="builds a stand-in .so with cc")
def test_loader_refuses_another_abi_version_and_names_both(tmp_path, monkeypatch):
    path, other = _other_abi_library(tmp_path)
    monkeypatch.setenv("KVSINK_LIBRARY", str(path))
    with pytest.raises(OSError) as info:
        _native._load()
    message = str(info.value)
    assert str(path) in message
    assert f"ABI version {other}, this binding needs {_native.ABI_VERSION}" in message
    assert "KVSINK_LIBRARY" in message  # the way out is named


@pytest.mark.skipif(sys.platform != "linux", reason="builds a stand-in .so with cc")
def test_loader_refuses_a_library_without_the_abi_symbol(tmp_path, monkeypatch):
    path = _build_library(tmp_path, "unrelated", "int unrelated_function(void) { return 1; }\n")
    monkeypatch.setenv("KVSINK_LIBRARY", str(path))
    with pytest.raises(OSError, match="not a kvsink library"):
        _native._load()
    monkeypatch.setenv("KVSINK_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(OSError, match=r"missing\.so \(not found\)"):
        _native._load()


def test_loader_accepts_the_real_library_by_name(monkeypatch):
    """The other half of the refusal tests: KVSINK_LIBRARY naming the library in
    use loads it, so the refusals above are about the version, not the seam."""
    monkeypatch.setenv("KVSINK_LIBRARY", _native.library_path)
    lib, path = _native._load()
    assert path == _native.library_path and lib.kvs_abi_version() == _native.ABI_VERSION


@pytest.mark.skipif(sys.platform != "linux", reason="builds a stand-in .so with cc")
def test_import_fails_on_another_abi_version(tmp_path):
    """What a user sees: importing kvsink_cpp with a mismatching library fails
    at once, naming both versions (no crash on a later call)."""
    path, other = _other_abi_library(tmp_path)
    env = dict(os.environ, KVSINK_LIBRARY=str(path))
    run = subprocess.run([sys.executable, "-c", "import kvsink_cpp"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert f"ABI version {other}, this binding needs {_native.ABI_VERSION}" in run.stderr, run.stderr


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").is_file(),
                    reason="reads the x86 CPU flags from /proc/cpuinfo")
def test_avx2_kernels_are_built_and_used_where_the_cpu_has_them():
    """Every AVX2-twin test skips when kvs_cpu_has_avx2() is 0 ("CPU lacks AVX2,
    or the library was built without the AVX2 kernels"): so a build that lost
    its AVX2 kernels would pass those tests silently. On a CPU with AVX2, FMA
    and F16C the library in use must report them (a deliberately scalar-only
    build is tested in a subprocess of its own, test_portable_build.py)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU lacks AVX2, FMA or F16C")
    if os.environ.get("KVSINK_LIBRARY"):
        pytest.skip("KVSINK_LIBRARY names another build, which may be scalar-only on purpose")
    assert _native.lib.kvs_cpu_has_avx2() == 1
