"""Logits of kvsink_cpp and llama.cpp on the same GGUF and the same token ids,
each compared with an exact float64 numpy forward pass (tests/numpy_llama.py):
our exact path (f32 activations), with an f16 cache, our fast path (8-bit
activations, matmul="q8") with massive activations split off (the default)
and without (act_outlier_ratio=0, the fast path before the split), and what
Llama(path) runs with no options.

    python bench/compare_logits.py [-m MODEL] [-n 96] [-t 2] [--json]

llama.cpp runs through llama-cpp-python in its own environment (created on
first use, see bench/llama_cpp_env.py); it also tokenizes the text, so both
runtimes see identical ids.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from llama_cpp_env import run_worker  # noqa: E402

DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def stats(got: np.ndarray, want: np.ndarray) -> dict:
    diff = np.abs(got.astype(np.float64) - want)
    return {
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_rel": float(diff.max() / np.abs(want).max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def main() -> int:
    from kvsink_cpp import Llama
    from kvsink_cpp.models import find_default_model, pull_default_model
    from numpy_llama import NumpyLlama

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("-f", "--file", default=str(DEFAULT_TEXT), help="text to tokenize")
    ap.add_argument("-n", "--n-tokens", type=int, default=96)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    model = args.model or str(find_default_model() or pull_default_model())

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(Path(args.file).read_text(encoding="utf-8")[:20000], encoding="utf-8")
        out = Path(tmp) / "llama_cpp.npz"
        run_worker("llama_cpp_logits_worker.py", model, str(text), str(args.n_tokens), str(args.threads), str(out))
        saved = np.load(out)
        tokens, llama_cpp_logits = saved["tokens"].tolist(), saved["logits"]

    results = {"model": model, "n_tokens": len(tokens)}
    exact = NumpyLlama(model).forward(tokens)
    f32_kv = {"type_k": "f32", "type_v": "f32"}
    runs = (("kvsink_cpp exact", {"matmul": "f32", **f32_kv}),
            ("kvsink_cpp f16 KV", {"matmul": "f32", "type_k": "f16", "type_v": "f16"}),
            ("kvsink_cpp q8 matmul, plain", {"matmul": "q8", "act_outlier_ratio": 0, **f32_kv}),
            ("kvsink_cpp q8 matmul", {"matmul": "q8", **f32_kv}),
            ("kvsink_cpp defaults", {}))
    for label, kw in runs:
        with Llama(model, n_ctx=len(tokens), n_batch=len(tokens), n_threads=args.threads,
                   logits_all=True, verbose=False, **kw) as llm:
            llm.eval(tokens)
            ours = llm.scores[: len(tokens)].copy()
        results[f"{label} vs exact"] = stats(ours, exact)
        results[f"{label} vs llama.cpp"] = stats(ours, llama_cpp_logits.astype(np.float64))
    results["llama.cpp vs exact"] = stats(llama_cpp_logits, exact)

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{model}, {len(tokens)} tokens of {Path(args.file).name}\n")
    print("| comparison | mean abs diff | max abs diff | max diff / max logit | top-1 agreement |")
    print("|---|---|---|---|---|")
    for key, s in results.items():
        if isinstance(s, dict):
            print(f"| {key} | {s['mean_abs_diff']:.4f} | {s['max_abs_diff']:.4f} | "
                  f"{s['max_abs_diff_rel']:.2e} | {100 * s['top1_agreement']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
