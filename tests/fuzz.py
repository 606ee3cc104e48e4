"""A mutation fuzzer over a sanitizer build of the C core (tests/test_fuzz.py
drives it): native/fuzz/fuzz_main.c built with ASan+UBSan, fed batches of
mutated files, one process per batch. A sanitizer report, a hang or a non-zero
exit fails the run and keeps the input that caused it.

No libFuzzer here (gcc only), so the mutations know the formats instead of
learning them from coverage: they aim at the fields the readers validate
(counts, lengths, types, dimensions, offsets) with boundary values."""
from __future__ import annotations

import concurrent.futures
import os
import platform
import random
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / "native"
SAN_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"]
# the reader's mmap becomes an exactly sized heap copy (fuzz_main.c explains)
WRAP_FLAGS = ["-Wl,--wrap=mmap,--wrap=munmap,--wrap=madvise"]
# leaks count; a huge allocation returns NULL so the library's own
# out-of-memory path runs instead of the sanitizer aborting the batch
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:allocator_may_return_null=1:max_allocation_size_mb=1024:"
                    "abort_on_error=0:symbolize=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
BATCH_TIMEOUT_S = 120  # a batch that takes this long holds a hang


class BuildUnavailable(Exception):
    """No C compiler, or no sanitizer runtime: the fuzz tests skip with this reason."""


# ---- building the harness ------------------------------------------------

def c_compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BuildUnavailable("no C compiler (cc/gcc) on PATH")
    return cc


def _check_sanitizers(cc: str, out: Path) -> None:
    """Compile and run a trivial program: the runtime libraries may be missing."""
    src, exe = out / "probe.c", out / "probe"
    src.write_text("int main(void) { return 0; }\n")
    r = subprocess.run([cc, *SAN_FLAGS, str(src), "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildUnavailable(f"{cc} cannot build with ASan+UBSan: {r.stderr.strip()[:300]}")
    r = subprocess.run([str(exe)], capture_output=True, text=True, env={**os.environ, **SAN_ENV})
    if r.returncode != 0:
        raise BuildUnavailable(f"ASan+UBSan programs do not run here: {r.stderr.strip()[:300]}")


# as CMakeLists.txt: on x86 the AVX2 files are built, alone with the ISA flags,
# and picked at run time by cpuid; elsewhere they are left out
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _object_command(cc: str, src: Path, obj: Path, flags: Sequence[str]) -> list[str]:
    isa = ["-mavx2", "-mfma", "-mf16c"] if src.stem.endswith("_avx2") else []
    avx2 = ["-DKVS_HAVE_AVX2_BUILD=1"] if X86 else []
    return [cc, *flags, *isa, *avx2, "-I", str(NATIVE / "include"), "-I", str(NATIVE / "src"),
            "-c", str(src), "-o", str(obj)]


def core_sources(cuda_glue: bool = False) -> list[Path]:
    """native/src/*.c as CMake builds them without CUDA: the *_cuda.c glue is
    the CUDA build's, cuda_absent.c answers without it (cuda_glue swaps them)."""
    def kept(s: Path) -> bool:
        if s.stem.endswith("_avx2"):
            return X86
        if s.stem.endswith("_cuda"):
            return cuda_glue
        return s.name != "cuda_absent.c" or not cuda_glue
    return [s for s in (NATIVE / "src").glob("*.c") if kept(s)]


def compile_objects(cc: str, sources: Sequence[Path], out: Path, flags: Sequence[str]) -> list[Path]:
    """Object files of sources in out, compiled in parallel (the longest first)."""
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(sources, key=lambda s: -s.stat().st_size)
    commands = [_object_command(cc, s, out / (s.stem + ".o"), flags) for s in sources]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), commands))
    for cmd, r in zip(commands, results):
        if r.returncode != 0:
            raise RuntimeError(f"compiling {cmd[-3]} failed:\n{r.stderr}")
    return [Path(c[-1]) for c in commands]


def build_harness(out: Path) -> Path:
    """native/src/*.c and the driver with ASan+UBSan, object files in parallel."""
    cc = c_compiler()
    out.mkdir(parents=True, exist_ok=True)
    _check_sanitizers(cc, out)
    objects = compile_objects(cc, [*core_sources(), NATIVE / "fuzz" / "fuzz_main.c"], out, SAN_FLAGS)
    exe = out / "kvs_fuzz"
    link = [cc, *SAN_FLAGS, *map(str, objects), *WRAP_FLAGS, "-lm", "-lpthread", "-o", str(exe)]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the fuzz harness failed:\n{r.stderr}")
    return exe


# ---- generic mutations -----------------------------------------------------

@dataclass
class Field:
    """An integer field of a seed the readers validate: where, how wide, what it means."""
    offset: int
    size: int  # 4 or 8 bytes, little-endian
    kind: str


BOUNDARY = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4095, 4096,
            2**15 - 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def _int_candidates(data: bytes, f: Field, extra: Sequence[int]) -> list[int]:
    old = int.from_bytes(data[f.offset:f.offset + f.size], "little")
    near = [old + 1, old - 1, old * 2, old // 2, len(data), len(data) - f.offset, -old]
    return BOUNDARY + near + list(extra)


def set_int(data: bytearray, offset: int, size: int, value: int) -> None:
    if offset + size <= len(data):
        data[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def _pick_offset(rng: random.Random, data: bytearray, hot_end: int) -> int:
    """Mostly inside the structured head (hot_end), where a byte changes meaning."""
    end = hot_end if hot_end and rng.random() < 0.85 else len(data)
    return rng.randrange(max(1, min(end, len(data))))


def bit_flip(rng, data, hot_end):
    at = _pick_offset(rng, data, hot_end)
    data[at] ^= 1 << rng.randrange(8)


def byte_set(rng, data, hot_end):
    data[_pick_offset(rng, data, hot_end)] = rng.choice([0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)])


def blind_int(rng, data, hot_end):
    """A boundary value at any offset, for fields the locator does not know."""
    size = rng.choice([4, 8])
    set_int(data, _pick_offset(rng, data, hot_end), size, rng.choice(BOUNDARY + [len(data)]))


def truncate(rng, data, hot_end):
    end = hot_end if hot_end and rng.random() < 0.6 else len(data)
    del data[rng.randrange(max(1, end)):]


def duplicate_chunk(rng, data, hot_end):
    a = _pick_offset(rng, data, hot_end)
    chunk = data[a:a + rng.randint(1, 64)]
    at = _pick_offset(rng, data, hot_end)
    data[at:at] = chunk


def delete_chunk(rng, data, hot_end):
    a = _pick_offset(rng, data, hot_end)
    del data[a:a + rng.randint(1, 64)]


GENERIC = [bit_flip, byte_set, blind_int, truncate, duplicate_chunk, delete_chunk]


@dataclass
class Seed:
    """A valid input and what the mutator knows about its layout."""
    data: bytes
    fields: list[Field]
    hot_end: int                        # bytes of header and tables, the rest is payload (0: all)
    extra: dict[str, list[int]] = field(default_factory=dict)  # more values per field kind
    fixup: Callable[[bytearray], None] | None = None  # e.g. recompute a checksum


def mutate(rng: random.Random, seed: Seed) -> bytes:
    """1 to 4 mutations, half of them on a known field; most mutants then get
    the seed's fixup (e.g. a recomputed checksum), so the checks past it run."""
    data = bytearray(seed.data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        if not data:  # truncated to nothing: itself a mutant
            break
        if seed.fields and rng.random() < 0.5:
            f = rng.choice(seed.fields)
            set_int(data, f.offset, f.size, rng.choice(_int_candidates(data, f, seed.extra.get(f.kind, ()))))
        else:
            rng.choice(GENERIC)(rng, data, seed.hot_end)
    if seed.fixup and rng.random() < 0.9:
        seed.fixup(data)
    return bytes(data)


# ---- GGUF seeds: the fields of a valid file --------------------------------

GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_EXTRA = {
    "version": [1, 2, 3, 4, 0x03000000],
    "vtype": list(range(14)) + [0x7FFFFFFF],
    "ttype": list(range(32)) + [39, 0x7FFFFFFF],
    "n_dims": [0, 1, 2, 3, 4, 5],
    "toffset": [32 * k for k in range(8)],
}


class _Reader:
    """Walks a valid GGUF file, recording each field it passes."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.fields = data, 0, []

    def int(self, size: int, kind: str) -> int:
        if kind:
            self.fields.append(Field(self.pos, size, kind))
        v = int.from_bytes(self.data[self.pos:self.pos + size], "little")
        self.pos += size
        return v

    def string(self) -> None:
        n = self.int(8, "strlen")
        self.pos += n

    def value(self, vtype: int) -> None:
        if vtype == 8:
            self.string()
        elif vtype == 9:
            elem, count = self.int(4, "vtype"), self.int(8, "count")
            for _ in range(count):  # (no arrays of arrays: the reader refuses them)
                self.string() if elem == 8 else self.int(GGUF_SCALAR_SIZE[elem], "")
        else:
            size = GGUF_SCALAR_SIZE[vtype]
            self.int(size, "value" if size >= 4 else "")


def gguf_seed(data: bytes) -> Seed:
    r = _Reader(data)
    r.pos = 4
    r.int(4, "version")
    n_tensors, n_kv = r.int(8, "count"), r.int(8, "count")
    for _ in range(n_kv):
        r.string()
        r.value(r.int(4, "vtype"))
    for _ in range(n_tensors):
        r.string()
        for _ in range(r.int(4, "n_dims")):
            r.int(8, "dim")
        r.int(4, "ttype")
        r.int(8, "toffset")
    return Seed(data, r.fields, r.pos, GGUF_EXTRA)


# ---- running batches ---------------------------------------------------------

class FuzzFailure(AssertionError):
    pass


@dataclass
class Campaign:
    """One target: the harness command before the file names, seeds, budget."""
    name: str
    command: list[str]
    seeds: list[Seed]
    seconds: float
    seed: int
    crash_dir: Path
    batch: int = 200
    lines: list[str] = field(default_factory=list)  # every input's status line

    def run(self) -> int:
        """Batches until the time is up; the next batch is written while one runs."""
        rng = random.Random(f"{self.name}:{self.seed}")
        deadline = time.monotonic() + self.seconds
        n, running = 0, None
        with tempfile.TemporaryDirectory(prefix=f"kvsink-fuzz-{self.name}-") as tmp, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            while time.monotonic() < deadline:
                # two folders in turn: a batch's files stay until its run is over
                paths = self._write_batch(rng, Path(tmp) / str(n // self.batch % 2), n)
                if running:
                    running.result()
                running = pool.submit(self._run_batch, paths)
                n += len(paths)
            if running:
                running.result()
        return n

    def _write_batch(self, rng, folder: Path, first: int) -> list[Path]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        paths = []
        for i in range(self.batch):
            p = folder / f"{first + i:07d}.bin"
            p.write_bytes(mutate(rng, rng.choice(self.seeds)))
            paths.append(p)
        return paths

    def _run_batch(self, paths: list[Path]) -> None:
        try:
            r = _run_harness([*self.command, *map(str, paths)])
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""  # bytes, whatever the encoding asked for
            done = _lines(out.decode(errors="replace") if isinstance(out, bytes) else out)
            self._fail(paths[min(len(done), len(paths) - 1)], f"hang: the batch ran past {BATCH_TIMEOUT_S} s")
        lines = _lines(r.stdout)
        self.lines += lines
        if r.returncode != 0 and len(lines) < len(paths):
            # inputs print their line when done: the first without one crashed
            self._fail(paths[len(lines)], r.stderr)
        if r.returncode != 0:  # at exit, after every input: a leak, to be found one input at a time
            culprit = next((p for p in paths if _run_harness([*self.command, str(p)]).returncode != 0), paths[-1])
            self._fail(culprit, r.stderr)

    def _fail(self, culprit: Path, report: str) -> None:
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        kept = self.crash_dir / f"{self.name}-seed{self.seed}-{culprit.stem}.bin"
        shutil.copyfile(culprit, kept)
        # the harness and its model go along, so the rerun outlives pytest's temporary folders
        command = []
        for arg in self.command:
            if Path(arg).is_file():
                copy = self.crash_dir / f"{self.name}-{Path(arg).name}"
                shutil.copy2(arg, copy)
                arg = str(copy)
            command.append(arg)
        alone = _run_harness([*command, str(kept)])  # for a report about this input only
        if alone.returncode != 0:
            report = alone.stderr
        else:
            report = "(it passes alone: an earlier input of the batch is involved)\n" + report
        kept.with_suffix(".txt").write_text(report)
        raise FuzzFailure(f"{self.name} fuzzing failed on {kept}; rerun: {' '.join(command)} {kept}\n"
                          + _report_head(report))


def _lines(out: str) -> list[str]:
    # "\n" only: str.splitlines also splits at characters an input's bytes may decode to
    return out.split("\n")[:-1]


def _run_harness(command: list[str]) -> subprocess.CompletedProcess:
    # error messages quote the input's bytes: not always UTF-8
    return subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace",
                          env={**os.environ, **SAN_ENV}, timeout=BATCH_TIMEOUT_S)


def _report_head(report: str, n: int = 40) -> str:
    lines = report.splitlines()
    start = next((i for i, l in enumerate(lines) if "ERROR" in l or "runtime error" in l), 0)
    return "\n".join(lines[start:start + n])


# ---- session seeds: the fields of a saved KV state (native/src/kv_state.c) ----

STATE_HEADER = 24  # "KVSC", u32 version, u64 payload bytes, u32 CRC-32, u32 zero
GEOMETRY, COUNTERS = 16, 8  # i32 fields each


def _f32_bits(*values: float) -> list[int]:
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]


STATE_EXTRA = {
    "version": [0, 1, 2],
    "geometry": [5, 6, 9, 48, 96, 128],
    "counter": [5, 6, 7, 9, 39, 40, 41, 63, 99, 100, 101, 2**26, 2**30, 2**30 + 1],
    "position": [5, 6, 7, 9, 39, 40, 41, 63, 99, 100, 101, 2**30],
    "score": _f32_bits(0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-45, 1e30),
    "mask": [1 << k for k in (0, 1, 7, 31, 32, 63)],
}


def fix_state_header(data: bytearray) -> None:
    """The payload length and CRC-32 (zlib's) a mutant's payload now needs."""
    if len(data) >= STATE_HEADER:
        set_int(data, 8, 8, len(data) - STATE_HEADER)
        set_int(data, 16, 4, zlib.crc32(bytes(data[STATE_HEADER:])))


def state_seed(data: bytes) -> Seed:
    """Fields of a valid state: header, geometry, counters, sink positions and
    scores, block starts and masks, window scores (the K/V bytes are skipped)."""
    fields = [Field(4, 4, "version"), Field(8, 8, "length"), Field(16, 4, "crc"), Field(20, 4, "zero")]
    g = struct.unpack_from(f"<{GEOMETRY}i", data, STATE_HEADER)
    fields += [Field(STATE_HEADER + 4 * i, 4, "geometry") for i in range(GEOMETRY)]
    pos = STATE_HEADER + 4 * GEOMETRY
    n_past, win_start, _, _, n_sinks, _, n_blocks, _ = struct.unpack_from(f"<{COUNTERS}i", data, pos)
    fields += [Field(pos + 4 * i, 4, "counter") for i in range(COUNTERS)]
    pos += 4 * COUNTERS
    # a window or sink row: every layer and KV head, f32 when either type is (geometry 0..6)
    row = g[0] * g[1] * g[2] * (4 if 0 in (g[5], g[6]) else 2)
    n_win = n_past - win_start
    for i in range(n_sinks):
        fields += [Field(pos + 8 * i, 4, "position"), Field(pos + 8 * i + 4, 4, "score")]
    pos += n_sinks * (8 + 2 * row)
    block_bytes = (len(data) - pos - n_blocks * 12 - n_win * (4 + 2 * row)) // max(n_blocks, 1)
    for k in range(n_blocks):
        fields += [Field(pos + 12 * k, 4, "position"), Field(pos + 12 * k + 4, 8, "mask")]
    pos += n_blocks * (12 + block_bytes)
    fields += [Field(pos + 4 * t, 4, "score") for t in range(n_win)]
    if pos + n_win * (4 + 2 * row) != len(data):
        raise ValueError("a seed state does not parse: has kv_state.c's layout changed?")
    return Seed(data, fields, 0, STATE_EXTRA, fix_state_header)


def state_seeds(harness: Path, model: Path, folder: Path) -> list[Seed]:
    """Valid states of each of the harness's KV presets, saved by the harness itself."""
    folder.mkdir(parents=True, exist_ok=True)
    made = _run_harness([str(harness), "session-seeds", str(model), str(folder)])
    if made.returncode != 0:
        raise RuntimeError(f"the harness could not save seed states:\n{made.stderr}")
    return [state_seed(p.read_bytes()) for p in sorted(folder.glob("*.kvsc"))]


def settings() -> tuple[float, int, Path]:
    """Seconds per target, the random seed and where crashing inputs go, from the environment."""
    seconds = float(os.environ.get("KVSINK_FUZZ_SECONDS", "30"))
    seed = int(os.environ.get("KVSINK_FUZZ_SEED", "0"))
    crash_dir = Path(os.environ.get("KVSINK_FUZZ_CRASH_DIR",
                                    Path(tempfile.gettempdir()) / "kvsink-fuzz-crashes"))
    return seconds, seed, crash_dir
