"""The CUDA kernels themselves, run on the CPU by the SIMT emulator (tests/simt/).

native/src/*.cu is compiled for the CPU against tests/simt/cuda_runtime.h
(tests/simt.py) and linked with the C core and the CUDA glue: every GPU
thread of every launch runs the kernel's own code on a fiber, with real
barriers, warp shuffles and shared memory, and the runtime refuses what a
GPU refuses (host pointers as device memory, blocks over 1024 threads,
dynamic shared memory beyond 48 KiB without the kernel's opt-in, a barrier
some threads skip). Against that library the GPU test modules run as they
would on a GPU: test_cuda.py (each kernel against its CPU twin) and
test_cuda_forward.py (the whole forward pass and the KV cache in device
memory against the CPU), with the threads of each block in a shuffled order
so that a race on shared memory changes results; decode steps are captured
and replayed as CUDA graphs, and a driver that refuses to capture is
emulated too. Built with ASan+UBSan, the same kernels have every access to
device memory checked. What no emulator shows: speed, and the hardware's own
limits beyond those above. x86-64 only (the fibers' stack switch); skips
elsewhere, saying so."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import REPO, SAN_FLAGS, BuildUnavailable, _check_sanitizers, c_compiler
from simt import build_simt_library, build_simt_program

HERE = Path(__file__).resolve().parent
ORDER = "shuffle:2026"  # threads and blocks in a seeded random order


@pytest.fixture(scope="module")
def simt_library(tmp_path_factory) -> Path:
    try:
        return build_simt_library(tmp_path_factory.mktemp("simt"))
    except BuildUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    try:
        return build_simt_program(HERE / "simt" / "selftest.cu", tmp_path_factory.mktemp("simt-self"))
    except BuildUnavailable as exc:
        pytest.skip(str(exc))


def run_case(exe: Path, case: str, order: str = "forward") -> tuple[str, str]:
    r = subprocess.run([str(exe), case], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SIMT_ORDER": order})
    assert r.returncode == 0, r.stderr
    name, _, result = r.stdout.strip().partition(" ")
    assert name == case
    return result, r.stderr


def values(result: str) -> list:
    return [float(v) for v in result.rstrip(",").split(",")]


NEIGHBOURS = [float(((t + 1) % 64 + 1) * (b + 1)) for b in range(4) for t in range(64)]


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle:7"])
def test_a_kernel_with_its_barrier_gives_one_answer_in_every_order(selftest, order):
    assert values(run_case(selftest, "barrier", order)[0]) == NEIGHBOURS


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_race_on_shared_memory_shows_as_a_wrong_answer(selftest, order):
    """Without its barrier each thread reads a neighbour's slot before (or
    after) the neighbour writes it, depending on the order."""
    assert values(run_case(selftest, "race", order)[0]) != NEIGHBOURS


def test_warp_shuffles_exchange_within_each_warp(selftest):
    assert values(run_case(selftest, "shuffle")[0]) == [528.0] * 32 + [1552.0] * 32


@pytest.mark.parametrize("case, error, reason", [
    ("divergent", "unspecified launch failure", "__syncthreads that not every thread reaches"),
    ("smem_without_opt_in", "invalid argument", "bytes of dynamic shared memory, the kernel may use 49152"),
    ("host_pointer", "an illegal memory access", "a host pointer is handed to a kernel"),
    ("huge_block", "invalid configuration argument", "a block of 2048x1x1 threads"),
    ("copy_direction", "invalid argument", "cudaMemcpy kind 1"),
    ("sync_in_capture", "operation would make the legacy stream depend", "cudaMemcpy while a stream is being captured"),
    ("pageable_in_capture", "operation not permitted when stream is capturing", "graphs copy from and to pinned"),
])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_the_emulator_refuses_what_a_gpu_refuses(selftest, case, error, reason, order):
    result, stderr = run_case(selftest, case, order)
    assert result.startswith(error) and reason in stderr, (result, stderr)


def test_a_captured_graph_replays_with_new_inputs_and_arguments(selftest):
    """Three steps of copy-in, add `step`, copy-out, captured each time: the
    graph instantiated at the first is updated and replayed."""
    assert values(run_case(selftest, "graph")[0]) == [float(i + 200 + 2) for i in range(64)]


def test_shared_memory_past_48k_runs_once_the_kernel_opts_in(selftest):
    assert values(run_case(selftest, "smem_opted_in")[0]) == [float(63 - t) for t in range(64)]


def start_tests(library: Path, module: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(HERE / module),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "KVSINK_LIBRARY": str(library), "SIMT_ORDER": ORDER, **env})


def finish(run: subprocess.Popen) -> str:
    """pytest's output, which must report success, with skips only for a
    model that is not in the cache (CI pulls both)."""
    out, _ = run.communicate(timeout=1800)
    assert run.returncode == 0, out[-6000:]
    summary = out.splitlines()[-1]
    assert " passed" in summary, summary
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all("not in the cache" in line for line in skips), out[-3000:]
    return summary


def test_the_kernels_match_their_cpu_twins_on_the_emulator(simt_library):
    """test_cuda.py in full: dequantization of every weight type bit for bit,
    both matrix products, RMSNorm, RoPE, GLU, soft-cap, channel maxima."""
    summary = finish(start_tests(simt_library, "test_cuda.py"))
    assert "skipped" not in summary, summary


TOKEN_BY_TOKEN = "logits_match and True"  # the slowest tests: SmolLM2 one token at a time


def test_the_gpu_forward_pass_matches_the_cpu_on_the_emulator(simt_library):
    """test_cuda_forward.py in full, in two processes side by side (the
    emulator is single-threaded): SmolLM2 batched and token by token with four
    caches and Gemma 3 (on 24 ids instead of 96: the emulator runs every GPU
    thread), decode as CUDA graphs, and the KV cache in device memory against
    the CPU's in every layout, ring, window, state and rewind."""
    runs = [start_tests(simt_library, "test_cuda_forward.py", "-k", TOKEN_BY_TOKEN, KVSINK_CUDA_TEST_TOKENS="24"),
            start_tests(simt_library, "test_cuda_forward.py", "-k", f"not ({TOKEN_BY_TOKEN})",
                        KVSINK_CUDA_TEST_TOKENS="24")]
    for run in runs:
        finish(run)


def test_a_step_that_cannot_be_captured_runs_launch_by_launch(simt_library):
    """Where the driver refuses to capture (SIMT_REFUSE_CAPTURE), a context
    turns graphs off and runs its steps directly: the ring test, one token at
    a time, still matches the CPU."""
    finish(start_tests(simt_library, "test_cuda_forward.py", "-k", "ring", SIMT_REFUSE_CAPTURE="1"))


SANITIZED = "ring or graphs or (layouts and q2-q4)"


def test_kernels_and_glue_touch_only_what_the_device_holds(tmp_path):
    """The emulator built with ASan+UBSan (the fibers' stack switches
    announced to ASan): every kernel's access to device memory is checked, so
    a read or write past a buffer - a fault or garbage on a GPU - fails here.
    test_cuda.py in full and the forward tests over a ring with displaced
    sinks, graph steps and a mixed rotated per-token layout."""
    try:
        _check_sanitizers(c_compiler(), tmp_path)
        lib = build_simt_library(tmp_path / "asan", extra_flags=SAN_FLAGS)
    except BuildUnavailable as exc:
        pytest.skip(str(exc))
    runtimes = " ".join(subprocess.run([c_compiler(), f"-print-file-name={name}"], capture_output=True,
                                       text=True).stdout.strip() for name in ("libasan.so", "libubsan.so"))
    log = tmp_path / "sanitizer"  # reports go to files: pytest's capture would swallow them with the process
    env = dict(LD_PRELOAD=runtimes, ASAN_OPTIONS=f"detect_leaks=0:abort_on_error=0:log_path={log}",
               UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={log}", KVSINK_CUDA_TEST_TOKENS="24")
    runs = [start_tests(lib, "test_cuda.py", **env), start_tests(lib, "test_cuda_forward.py", "-k", SANITIZED, **env)]
    outcomes = []
    for run in runs:
        try:
            finish(run)
            outcomes.append("")
        except AssertionError as exc:
            outcomes.append(str(exc))
    reports = "".join(f.read_text(errors="replace")[:3000] for f in sorted(tmp_path.glob("sanitizer*")))
    assert not reports and not any(outcomes), reports + "".join(outcomes)


def test_a_barrier_dropped_from_a_kernel_fails_the_kernel_tests(simt_library, tmp_path):
    """The emulator is strict enough to matter: the matrix product without the
    barrier that keeps a step's tiles until every thread has read them
    (kernels_cuda.cu) fails test_cuda.py."""
    native = tmp_path / "native"
    shutil.copytree(REPO / "native", native)
    source = native / "src" / "kernels_cuda.cu"
    barrier = "__syncthreads(); /* the tiles are overwritten next step */"
    assert barrier in source.read_text(), "the barrier this test drops has moved"
    source.write_text(source.read_text().replace(barrier, ""))
    run = start_tests(build_simt_library(tmp_path / "build", native), "test_cuda.py", "-k", "matmul")
    out, _ = run.communicate(timeout=600)
    assert run.returncode != 0 and " failed" in out.splitlines()[-1], out[-2000:]
