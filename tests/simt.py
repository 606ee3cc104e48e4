"""Build the C core with its CUDA sources run by the SIMT emulator (tests/simt/).

native/src/*.cu is compiled as C++ for the CPU against tests/simt/cuda_runtime.h
after three mechanical rewrites of what only nvcc parses - `kernel<<<grid,
block, smem, stream>>>(args)` launches, `extern __shared__` arrays and the
PTX `asm` fp16 conversions - so the kernels that run are the ones nvcc
compiles, line for line. The C core and the CUDA glue (*_cuda.c) are the
CUDA build's. test_cuda_simt.py runs the GPU test modules against the result.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from fuzz import NATIVE, BuildUnavailable, c_compiler, compile_objects, core_sources

SIMT = Path(__file__).resolve().parent / "simt"
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-mf16c", "-mfma", "-fvisibility=hidden", "-w"]


def cxx_compiler() -> str:
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return name
    raise BuildUnavailable("the SIMT emulator needs a C++17 compiler (g++ or clang++), none is on PATH")


def _launch_rewrites(text: str) -> str:
    """kernel<<<cfg>>>(args) -> simt::Launch(cfg).run(kernel, args); newlines kept."""
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        end = text.index(">>>", start)
        # the kernel's name ends where <<< starts: an identifier, maybe with <template args>
        k = start
        while text[k - 1].isspace():
            k -= 1
        name_end = k
        depth = 0
        while k > 0:
            ch = text[k - 1]
            if ch == ">":
                depth += 1
            elif ch == "<":
                depth -= 1
            elif depth == 0 and not (ch.isalnum() or ch in "_:"):
                break
            k -= 1
        kernel, config = text[k:name_end], text[start + 3:end]
        rest = end + 3
        paren = text.index("(", rest)
        assert text[rest:paren].strip() == "", f"a launch without its arguments: {text[k:paren + 1]!r}"
        no_args = text[paren + 1:].lstrip().startswith(")")
        out.append(text[pos:k])
        newlines = "\n" * (text[name_end:start] + text[rest:paren]).count("\n")  # line numbers stay the source's
        out.append(f"simt::Launch({config}).run({kernel}{'' if no_args else ', '}{newlines}")
        pos = paren + 1
    out.append(text[pos:])
    return "".join(out)


SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];")
PTX = re.compile(r'asm\(\s*("[^"]*")\s*:\s*"=\w"\((\w+)\)\s*:\s*"\w"\((\w+)\)\s*\);')


def rewrite(text: str) -> str:
    text = _launch_rewrites(text)
    text = SHARED.sub(r"\1 *\2 = (\1 *)simt::dynamic_smem();", text)
    return PTX.sub(r"\2 = simt::ptx(\1, \3);", text)


def _simt_flags() -> list:
    return [*CXX_FLAGS, "-D__CUDACC__", "-DKVS_HAVE_CUDA=1", "-I", str(SIMT), "-I", str(NATIVE / "include")]


def _check_platform() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise BuildUnavailable(f"the SIMT emulator's fibers switch with x86-64 code; this is {platform.machine()}")
    return cxx_compiler()


def _unit(source: Path, out: Path) -> Path:
    """The rewritten C++ of a .cu file, its diagnostics naming the original."""
    unit = out / (source.stem + "_cu.cpp")
    unit.write_text(f'#line 1 "{source}"\n' + rewrite(source.read_text()))
    return unit


def build_simt_program(source: Path, out: Path) -> Path:
    """An executable of one .cu file on the emulator (tests/simt/selftest.cu)."""
    cxx = _check_platform()
    out.mkdir(parents=True, exist_ok=True)
    unit = _unit(source, out)
    exe = out / source.stem
    r = subprocess.run([cxx, *_simt_flags(), str(unit), str(SIMT / "simt.cpp"), "-lpthread", "-o", str(exe)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building {source.name} on the SIMT emulator failed:\n{r.stderr}")
    return exe


def build_simt_library(out: Path, native: Path = NATIVE, extra_flags: Sequence[str] = ()) -> Path:
    """libkvsink.so in out: the C core + CUDA glue + the .cu files and
    private headers of native/src (or of another tree, `native`, a mutated
    copy) on the emulator; extra_flags for every compile and the link
    (sanitizers)."""
    cxx = _check_platform()
    out.mkdir(parents=True, exist_ok=True)
    src = out / "src"
    src.mkdir(exist_ok=True)
    # rewritten sources, and every private header beside them: a quoted
    # #include finds the rewritten copy (kv_cuda_math.h's PTX) first
    for h in (native / "src").glob("*.h"):
        (src / h.name).write_text(rewrite(h.read_text()))
    units = [_unit(cu, src) for cu in sorted((native / "src").glob("*.cu"))]
    c_flags = ["-O2", "-fPIC", "-DKVS_HAVE_CUDA=1", "-fvisibility=hidden", *extra_flags]
    objects = compile_objects(c_compiler(), core_sources(cuda_glue=True), out / "c", c_flags)
    objects += compile_objects(cxx, [*units, SIMT / "simt.cpp"], out / "cxx", [*_simt_flags(), *extra_flags])
    lib = out / "libkvsink.so"
    r = subprocess.run([cxx, "-shared", *extra_flags, *map(str, objects), "-lm", "-lpthread", "-o", str(lib)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the SIMT library failed:\n{r.stderr}")
    return lib
