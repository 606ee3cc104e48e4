"""Speed side by side with llama.cpp: prompt processing (pp512), generation of
128 tokens at an empty cache (tg128) and at depth 4096 (tg128@4096), the rate
of filling those 4096 tokens, KV cache bytes per token and peak RSS, for
kvsink_cpp's f16/q8/q4/q2 caches (sinks on, fast matrix products: matmul="q8";
"q4 exact" is the exact f32 path) and llama.cpp's f16 and q4_0 caches (flash
attention on), same GGUF, same threads, same token ids, in one run.

    python bench/speed.py [-m MODEL] [-t 2] [-t 1 ...] [--reps 3] [--depth 4096]
                          [--configs PATTERNS] [--device cuda] [--json] [--list]

--device cuda times our CUDA backend with f16/q8/q4/q2 caches beside PyTorch
eager on the same dequantized weights with an f16 cache
(bench/torch_anchor.py), the anchor where no CUDA build of llama.cpp runs.

Each setting runs in its own process (bench/speed_worker.py; llama.cpp's under
the environment of bench/llama_cpp_env.py, KVSINK_LLAMA_CPP_VENV picks an
existing one). Rates are medians of --reps timed repetitions after one warm-up;
ratios are to llama.cpp's f16 cache at the same thread count in this run. The
bench also measures this machine's read bandwidth (numpy, one reader thread per
bench thread) and prints the decode rate it allows for the model's weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import numpy as np

from kv_quality import select_names
from llama_cpp_env import llama_cpp_python

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WORKER = HERE / "speed_worker.py"
REFERENCE = "llama.cpp/f16"
GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}

FAST = {"matmul": "q8"}  # our fast path (8-bit activations), as llama.cpp's own products are
CONFIGS = {
    # what Llama(path) runs with no options: the defaults a user gets
    "kvsink_cpp/default": ("kvsink_cpp", {}),
    "kvsink_cpp/f16": ("kvsink_cpp", {"type_k": "f16", "type_v": "f16", "sinks": "kvsink", **FAST}),
    "kvsink_cpp/q8": ("kvsink_cpp", {"type_k": "q8", "type_v": "q8", "sinks": "kvsink", **FAST}),
    "kvsink_cpp/q4": ("kvsink_cpp", {"type_k": "q4", "type_v": "q4", "sinks": "kvsink", **FAST}),
    "kvsink_cpp/q2": ("kvsink_cpp", {"type_k": "q2", "type_v": "q2", "sinks": "kvsink", **FAST}),
    # the layout before the measured defaults (blocks and groups of 32, no rotation), for comparison
    "kvsink_cpp/q4 32/32 unrotated": ("kvsink_cpp", {"type_k": "q4", "type_v": "q4", "sinks": "kvsink", "kv_block": 32,
                                                     "kv_group": 32, "kv_rotate": "none", **FAST}),
    # the defaults with Hadamard-rotated q8 blocks: keys stored rotated need no RoPE by offset when read
    "kvsink_cpp/default rotated": ("kvsink_cpp", {"kv_rotate": "kv"}),
    # the fast path before massive activations were split off, for comparison
    "kvsink_cpp/q4 plain": ("kvsink_cpp", {"type_k": "q4", "type_v": "q4", "sinks": "kvsink", "act_outlier_ratio": 0,
                                           **FAST}),
    "kvsink_cpp/q4 exact": ("kvsink_cpp", {"type_k": "q4", "type_v": "q4", "sinks": "kvsink", "matmul": "f32"}),
    "llama.cpp/f16": ("llama.cpp", {"type_k": GGML_TYPES["f16"], "type_v": GGML_TYPES["f16"]}),
    "llama.cpp/q4_0": ("llama.cpp", {"type_k": GGML_TYPES["q4_0"], "type_v": GGML_TYPES["q4_0"]}),
}
# --device cuda: our CUDA backend per cache type, beside PyTorch eager on the
# same dequantized weights with an f16 cache (bench/torch_anchor.py), the
# anchor where no CUDA build of llama.cpp runs
CUDA_CONFIGS = {
    **{f"kvsink_cpp/cuda {t}": ("kvsink_cpp", {"device": "cuda", "type_k": t, "type_v": t, "sinks": "kvsink"})
       for t in ("f16", "q8", "q4", "q2")},
    # decode launch by launch instead of as CUDA graphs: what the graphs gain
    "kvsink_cpp/cuda q4 no graphs": ("kvsink_cpp", {"device": "cuda", "type_k": "q4", "type_v": "q4", "sinks": "kvsink",
                                                    "env": {"KVSINK_CUDA_GRAPHS": "0"}}),
    "torch/cuda f16": ("torch", {"device": "cuda", "dtype": "float16"}),
}
CUDA_REFERENCE = "torch/cuda f16"
CASES = (("pp", "pp{n_prompt}"), ("tg", "tg{n_gen}"), ("tg_deep", "tg{n_gen}@{depth}"), ("fill", "fill {depth}"))


def read_bandwidth(n_threads: int, n_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Sustained read bandwidth in bytes/s: n_threads threads each summing its
    share of a buffer far larger than the caches (numpy releases the GIL)."""
    data = np.ones(n_bytes // 8, dtype=np.int64)
    parts = np.array_split(data, n_threads)
    best = 0.0
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, n_bytes / (time.perf_counter() - t0))
    return best


def weight_bytes_per_token(model: str) -> int:
    """Bytes of weights read to decode one token: every matrix once (a tied
    output reads the whole embedding table), the norms, one embedding row."""
    from gguf import GGUFReader
    tensors = {t.name: t for t in GGUFReader(model).tensors}
    total = sum(int(t.n_bytes) for name, t in tensors.items() if name != "token_embd.weight")
    embd = tensors["token_embd.weight"]
    total += int(embd.n_bytes) // int(embd.shape[-1])
    if "output.weight" not in tensors:
        total += int(embd.n_bytes)
    return total


def bench_tokens(model: str, text: Path, n: int) -> np.ndarray:
    """n token ids of real text (repeated if the text is short), BOS first."""
    from kvsink_cpp.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(model_metadata(model))
    ids = tok.encode(text.read_bytes()[: 64 * n].decode("utf-8", "ignore"), add_bos=True)
    while len(ids) < n:
        ids += ids[1:]
    return np.asarray(ids[:n], dtype=np.int32)


def run_config(name: str, model: str, tokens_file: str, spec: dict) -> dict:
    engine, kv = {**CONFIGS, **CUDA_CONFIGS}[name]
    python = str(llama_cpp_python()) if engine == "llama.cpp" else sys.executable
    env = {**os.environ, **kv.get("env", {})}  # settings read from the environment (KVSINK_CUDA_GRAPHS)
    spec = dict(spec, kv={k: v for k, v in kv.items() if k != "env"})
    proc = subprocess.run([python, str(WORKER), engine, model, tokens_file, json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if engine == "llama.cpp":
        result["kv_bytes_per_token"] = llama_cpp_kv_bytes(model, kv["type_k"])
    if engine == "torch":
        result["kv_bytes_per_token"] = llama_cpp_kv_bytes(model, GGML_TYPES["f16"])
    return result


def llama_cpp_kv_bytes(model: str, ggml_type: int) -> float:
    from kv_quality import LLAMA_CPP_BYTES_PER_ELEMENT, kv_elements_per_token
    name = {v: k for k, v in GGML_TYPES.items()}[ggml_type]
    return kv_elements_per_token(model_metadata(model)) * LLAMA_CPP_BYTES_PER_ELEMENT[name]


def model_metadata(model: str) -> dict:
    from kvsink_cpp.gguf_file import GGUFFile
    with GGUFFile(model) as f:
        return f.metadata


def print_table(report: dict) -> None:
    spec = report["spec"]
    labels = [(key, label.format(**spec)) for key, label in CASES if key in ("pp", "tg") or spec["depth"]]
    busy = f"; {spec['busy']} competing busy process(es)" if spec.get("busy") else ""
    reference = spec.get("reference", REFERENCE)
    print(f"{Path(report['model']).name}; median of {spec['reps']} runs after a warm-up; ratio to "
          f"{reference} at the same thread count in this run{busy}\n")
    print("| threads | engine / KV | " + " | ".join(label for _, label in labels)
          + " | KV bytes/token | peak RSS (MB) |")
    print("|---|---|" + "---|" * len(labels) + "---|---|")
    for threads, results in report["runs"].items():
        ref = results.get(reference, {})
        for name, r in results.items():
            if "error" in r:
                print(f"| {threads} | {name} | error: {r['error'][:100]} |")
                continue
            cells = []
            for key, _ in labels:
                rate = r[key]["tokens_per_s"]
                ratio = f" ({rate / ref[key]['tokens_per_s']:.2f}×)" if key in ref else ""
                cells.append(f"{rate:.1f}{ratio}")
            print(f"| {threads} | {name} | " + " | ".join(cells)
                  + f" | {r['kv_bytes_per_token']:,.0f} | {r['rss_peak'] / 2**20:.0f} |")
    print()
    for threads, bw in report["bandwidth"].items():
        bound = bw / report["weight_bytes_per_token"]
        ours = [f"{name} {r['tg']['tokens_per_s'] / bound:.0%}" for name, r in report["runs"][threads].items()
                if "tg" in r]
        print(f"{threads} thread(s): read bandwidth {bw / 1e9:.1f} GB/s, weights {report['weight_bytes_per_token'] / 1e6:.1f}"
              f" MB/token -> decode bound {bound:.0f} tokens/s; tg{spec['n_gen']} reaches " + ", ".join(ours))
    print_memory(report)


def print_memory(report: dict) -> None:
    """Peak RSS against what must be resident: the weights file (mmapped, read
    in place), the KV cache at full n_ctx and a 64 MB allowance (interpreter,
    libraries, scratch)."""
    n_ctx, file_bytes = report["spec"]["n_ctx"], report["model_bytes"]
    for threads, results in report["runs"].items():
        for name, r in results.items():
            if "error" in r or not name.startswith("kvsink_cpp"):
                continue
            budget = file_bytes + n_ctx * r["kv_bytes_per_token"] + 64 * 2**20
            print(f"{threads} thread(s) {name}: peak RSS {r['rss_peak'] / 2**20:.0f} MB "
                  f"(before loading {r['rss_before_load'] / 2**20:.0f} MB) vs weights {file_bytes / 2**20:.0f} MB"
                  f" + KV {n_ctx * r['kv_bytes_per_token'] / 2**20:.0f} MB at n_ctx {n_ctx} + 64 MB = "
                  f"{budget / 2**20:.0f} MB: {'within' if r['rss_peak'] <= budget else 'OVER'}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("-f", "--file", default=str(DEFAULT_TEXT), help="text for the token ids (default: WikiText-2)")
    ap.add_argument("-t", "--threads", type=int, action="append", help="thread count; repeat for several (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case (default 3)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4096, help="cached tokens for the deep tg case (0: skip it)")
    ap.add_argument("-c", "--ctx-size", type=int, default=8192, help="n_ctx of every context (default 8192)")
    ap.add_argument("--configs", help="comma-separated glob patterns, e.g. 'kvsink_cpp/q4,llama.cpp/*'")
    ap.add_argument("--busy", type=int, default=0,
                    help="competing busy processes kept running during the timings (a shared desktop; default 0)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: our CUDA backend (f16/q8/q4/q2 caches) beside PyTorch eager with an f16 cache "
                         "(needs a CUDA build, a GPU and torch); ratios to the PyTorch anchor")
    ap.add_argument("--list", action="store_true", help="list the settings and exit")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


class BusyProcesses:
    """n processes spinning on a core each, for timings on a machine that is not quiet."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = CUDA_CONFIGS if args.device == "cuda" else CONFIGS
    if args.list:
        print("\n".join(configs))
        return 0
    names = select_names(list(configs), args.configs)
    if args.model is None:
        from kvsink_cpp.models import find_default_model, pull_default_model
        args.model = str(find_default_model() or pull_default_model())
    text = Path(args.file)
    if not text.is_file():
        from kvsink_cpp.profile import BUILTIN_TEXT
        text = BUILTIN_TEXT
    if args.ctx_size < max(args.n_prompt, args.depth + args.n_gen):
        raise SystemExit(f"-c {args.ctx_size} is too small for depth {args.depth} + {args.n_gen} tokens")
    threads = args.threads or [2]
    spec = {"n_ctx": args.ctx_size, "reps": args.reps, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
            "depth": args.depth, "busy": args.busy, "device": args.device,
            "reference": CUDA_REFERENCE if args.device == "cuda" else REFERENCE}
    report = {"model": args.model, "spec": spec, "weight_bytes_per_token": weight_bytes_per_token(args.model),
              "model_bytes": os.path.getsize(args.model),
              "bandwidth": {}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp, BusyProcesses(args.busy):
        tokens_file = os.path.join(tmp, "tokens.npy")
        np.save(tokens_file, bench_tokens(args.model, text, max(args.n_prompt, args.depth + args.n_gen)))
        for n in threads:
            report["bandwidth"][n] = read_bandwidth(n)
            report["runs"][n] = {}
            for name in names:
                print(f"{n} thread(s): {name} ...", file=sys.stderr, flush=True)
                report["runs"][n][name] = run_config(name, args.model, tokens_file, dict(spec, threads=n))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
