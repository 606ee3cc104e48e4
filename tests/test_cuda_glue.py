"""The CUDA backend's glue (native/src/backend_cuda.c, kv_cache_cuda.c) over a
host emulation of the CUDA side, built with ASan+UBSan: tests/cuda_host_emulation.c
registers "device" memory (a host pointer handed to a kernel fails the call),
runs the weight kernels' CPU twins and the KV cache's per-thread code
(kv_cuda_math.h) phase by phase, so the synthetic-model tests of
test_cuda_forward.py show any byte read or written outside what the device
holds. The kernels themselves, barriers and shared memory included, run on
the SIMT emulator (test_cuda_simt.py), whose fibers the sanitizers do not
follow; on a GPU, test_cuda.py and test_cuda_forward.py run as they are."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import NATIVE, REPO, SAN_FLAGS, BuildUnavailable, _check_sanitizers, c_compiler, compile_objects, \
    core_sources

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def emulated_build(tmp_path_factory) -> tuple:
    """(the shared library, its object files)."""
    out = tmp_path_factory.mktemp("cuda-glue")
    flags = ["-O2", "-fPIC", "-DKVS_HAVE_CUDA=1", "-fvisibility=hidden"]
    objects = compile_objects(c_compiler(), [*core_sources(cuda_glue=True), HERE / "cuda_host_emulation.c"], out,
                              flags)
    lib = out / "libkvsink.so"
    r = subprocess.run([c_compiler(), "-shared", *map(str, objects), "-lm", "-lpthread", "-o", str(lib)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return lib, objects


@pytest.fixture(scope="module")
def emulated_cuda_library(emulated_build) -> Path:
    return emulated_build[0]


def test_emulated_library_says_cuda_runs(emulated_cuda_library):
    code = "import kvsink_cpp; print(kvsink_cpp.cuda_status())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "KVSINK_LIBRARY": str(emulated_cuda_library)})
    assert r.stdout.strip() == "ok", r.stderr


def test_gpu_cache_tests_pass_under_sanitizers(tmp_path):
    """The KV kernels' per-thread code indexes tables by distances, slots and
    groups: built with ASan+UBSan, the emulated GPU cache's tests on synthetic
    models (every layout, sink displacement, rings, local windows, states)
    must not read or write a byte outside what the device holds."""
    cc = c_compiler()
    try:
        _check_sanitizers(cc, tmp_path)
    except BuildUnavailable as exc:
        pytest.skip(str(exc))
    flags = [*SAN_FLAGS, "-fPIC", "-DKVS_HAVE_CUDA=1", "-fvisibility=hidden"]
    objects = compile_objects(cc, [*core_sources(cuda_glue=True), HERE / "cuda_host_emulation.c"], tmp_path, flags)
    lib = tmp_path / "libkvsink.so"
    r = subprocess.run([cc, "-shared", "-fsanitize=address,undefined", *map(str, objects), "-lm", "-lpthread", "-o",
                        str(lib)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runtimes = " ".join(subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                        for name in ("libasan.so", "libubsan.so"))
    log = tmp_path / "sanitizer"  # reports go to files: pytest's capture would swallow them with the process
    env = {**os.environ, "KVSINK_LIBRARY": str(lib), "LD_PRELOAD": runtimes,
           "ASAN_OPTIONS": f"detect_leaks=0:abort_on_error=0:log_path={log}",
           "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={log}"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_cuda_forward.py"),
                        "-k", "layouts or ring or local or state or rewind or reads"], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=1200)
    reports = "".join(f.read_text(errors="replace")[:3000] for f in sorted(tmp_path.glob("sanitizer*")))
    tail = reports + r.stdout[-2000:] + r.stderr[-2000:]
    assert r.returncode == 0 and not reports and " passed" in r.stdout.splitlines()[-1], tail
    assert "skipped" not in r.stdout.splitlines()[-1], tail


def _skips_name_absent_models(stdout: str) -> bool:
    """Skips are allowed only for a model that is not in the cache (CI pulls both)."""
    skips = [line for line in stdout.splitlines() if line.startswith("SKIPPED")]
    return all("not in the cache" in line for line in skips)


def test_a_host_pointer_handed_to_a_kernel_fails(emulated_build):
    """The emulation is strict: without it the forward tests could not tell a
    forgotten device copy (which a GPU would fault on) from a right one."""
    lib, objects = emulated_build
    probe = lib.parent / "probe.c"
    probe.write_text('#include <stdio.h>\n#include "cuda_memory.h"\n#include "kernels_cuda.h"\n'
                     "int main(void) {\n"
                     "    float host[8] = {0};\n"
                     "    void *dev = NULL;\n"
                     "    if (kvs_cuda_alloc(&dev, sizeof host, \"probe\") != KVS_OK) return 2;\n"
                     "    const int good = kvs_cuda_add(dev, dev, 8, NULL) == KVS_OK;\n"
                     "    const int bad = kvs_cuda_add(host, dev, 8, NULL) != KVS_OK;\n"
                     "    printf(\"%d %d %s\\n\", good, bad, kvs_last_error());\n"
                     "    return 0;\n}\n")
    exe = lib.parent / "probe"
    r = subprocess.run([c_compiler(), "-I", str(NATIVE / "include"), "-I", str(NATIVE / "src"), str(probe),
                        *map(str, objects), "-lm", "-lpthread", "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True).stdout
    assert out.startswith("1 1 ") and "is not device memory" in out, out
