"""KV cache quality on WikiText-2: perplexity, KL-divergence from our f16 cache
and top-1 agreement for every KV cache setting, beside llama.cpp's own f16,
q8_0 and q4_0 caches on the same token ids and chunks.

    python bench/kv_quality.py [-m MODEL] [-f FILE] [--chunks 40] [-c 512] [-t 2]
                               [--configs PATTERNS] [--json] [--list]

Rules as llama-perplexity's (kvsink_cpp/perplexity.py): the text is tokenized
once, cut into chunks of n_ctx, each evaluated from an empty cache, the second
half scored. Every setting sees the same chunks; KL(P_ref || P) and top-1
agreement are taken against our f16 cache without sink rows ("f16/none"),
which is always evaluated. llama.cpp rows also report KL against llama.cpp's
own f16 cache when "llama.cpp/f16" is among the configs (that isolates what its
cache quantization costs from how its matrix products differ from ours).

llama.cpp runs through llama-cpp-python in its own environment (see
bench/llama_cpp_env.py; KVSINK_LLAMA_CPP_VENV picks an existing one) on groups
of chunks, and writes the scored logits for this process to compare.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from llama_cpp_env import run_worker
from kvsink_cpp.errors import KvsinkError
from kvsink_cpp.perplexity import (REFERENCE_KV, PerplexityStats, chunk_logprobs, chunk_tokens, count_chunks,
                                   log_softmax, open_llama, scored_targets, vocab_bos)

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
OUR_TYPES = ("f16", "q8", "q4", "q3", "q2")
# pfn:eq is pfn:N with N = the mean number of rows kvsink keeps (measured first, on the same chunks)
SINKS = ("none", "pfn:1", "pfn:4", "pfn:eq", "kvsink", "kvsink:5")
REFERENCE = "f16/none"
DEFAULTS = "defaults"
# llama.cpp's block formats: bytes per cached element
LLAMA_CPP_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CHUNKS_PER_WORKER_RUN = 4  # bounds the logits held in memory (~50 MB per chunk and type for SmolLM2)


@dataclass
class Config:
    name: str
    kv: dict
    llama_cpp: bool = False
    stats: PerplexityStats = field(default_factory=PerplexityStats)
    own_stats: PerplexityStats = field(default_factory=PerplexityStats)
    kv_bytes: Optional[float] = None
    error: Optional[str] = None
    kl_tokens: list = field(default_factory=list)   # per-token KL, for paired differences
    sink_rows: list = field(default_factory=list)   # exact rows at the end of each chunk


def all_configs() -> List[Config]:
    configs = [Config("f32", {"type_k": "f32", "type_v": "f32"})]
    configs += [Config(f"{t}/{s}{rot}", {"type_k": t, "type_v": t, "sinks": s, "kv_rotate": "kv" if rot else "none"})
                for t in OUR_TYPES for rot in ("", " rot") for s in SINKS if t != "f16" or not rot]
    # q4 as it was before the measured defaults: blocks and value groups of 32, no rotation
    configs.append(Config("q4/kvsink 32/32 unrotated", {"type_k": "q4", "type_v": "q4", "sinks": "kvsink",
                                                        "kv_block": 32, "kv_group": 32, "kv_rotate": "none"}))
    # the fast matrix products against the exact reference (DESIGN 9's bar: as close as llama.cpp),
    # with massive activations split off (the default) and without (before the split)
    configs.append(Config("f16/none matmul=q8", {"type_k": "f16", "type_v": "f16", "sinks": "none", "matmul": "q8"}))
    configs.append(Config("f16/none matmul=q8 plain", {"type_k": "f16", "type_v": "f16", "sinks": "none",
                                                       "matmul": "q8", "act_outlier_ratio": 0}))
    # what Llama(path) runs with no options (matmul and KV cache included)
    configs.append(Config(DEFAULTS, {}))
    configs += [Config(f"llama.cpp/{t}", {"ggml_type": t}, llama_cpp=True) for t in LLAMA_CPP_BYTES_PER_ELEMENT]
    return configs


def select_names(names: List[str], patterns: Optional[str]) -> List[str]:
    """The names matching one of the comma-separated glob patterns (all when
    none are given); a pattern that matches nothing is an error."""
    if not patterns:
        return list(names)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not any(fnmatch.fnmatchcase(name, p) for name in names):
            raise SystemExit(f"--configs: {p!r} matches none of {', '.join(names)}")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in wanted)]


def resolve_equal_budget(configs: List[Config], model: str, chunks: np.ndarray, n_threads: int) -> None:
    """pfn:eq -> pfn:N, N = the mean number of rows kvsink keeps on these chunks
    (the predictor's decisions with an f16 cache and fast products: a few
    comparisons per token, so the mean hardly depends on the cache type)."""
    rows = []
    with open_llama(model, chunks.shape[1], n_threads, type_k="f16", type_v="f16", sinks="kvsink",
                    matmul="q8") as llm:
        for chunk in tqdm(chunks, desc="kvsink rows", unit="chunk", file=sys.stderr):
            llm.reset()
            llm.eval(chunk)
            rows.append(llm.kv_cache_stats()["n_sinks"])
    n = max(1, int(round(float(np.mean(rows)))))
    print(f"kvsink keeps {np.mean(rows):.2f} rows per chunk: pfn:eq is pfn:{n}", file=sys.stderr)
    for c in configs:
        if c.kv.get("sinks") == "pfn:eq":
            c.kv["sinks"] = f"pfn:{n}"
            c.name = c.name.replace("pfn:eq", f"pfn:{n}")


def select(configs: List[Config], patterns: Optional[str]) -> List[Config]:
    """The configs whose names match one of the comma-separated glob patterns."""
    chosen = set(select_names([c.name for c in configs], patterns))
    return [c for c in configs if c.name in chosen]


def kv_elements_per_token(metadata: dict) -> int:
    """Cached K and V elements per token over all layers, from the GGUF metadata."""
    arch = metadata["general.architecture"]

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}")
        return default if value is None else int(value)

    n_head = get("attention.head_count")
    head_k = get("attention.key_length", get("embedding_length") // n_head)
    head_v = get("attention.value_length", get("embedding_length") // n_head)
    return get("block_count") * get("attention.head_count_kv", n_head) * (head_k + head_v)


def open_ours(configs: List[Config], model: str, n_ctx: int, n_threads: int) -> Dict[str, object]:
    """One context per available setting of ours; the others get their error."""
    contexts = {}
    for c in configs:
        if c.llama_cpp or c.name == REFERENCE:
            continue
        try:
            contexts[c.name] = open_llama(model, n_ctx, n_threads, **c.kv)
        except (KvsinkError, TypeError, ValueError) as exc:
            c.error = f"{type(exc).__name__}: {exc}"
            print(f"{c.name}: not available ({c.error})", file=sys.stderr)
            continue
        c.kv_bytes = contexts[c.name].kv_cache_bytes_per_token()
    return contexts


def llama_cpp_logits(model: str, chunks: np.ndarray, n_threads: int, types: List[str], tmp: Path) -> dict:
    """Scored logits (n_chunks, n_scored, n_vocab) per llama.cpp cache type."""
    np.save(tmp / "chunks.npy", chunks)
    run_worker("llama_cpp_ppl_worker.py", model, str(tmp / "chunks.npy"), str(n_threads), str(tmp), *types)
    return {t: np.load(tmp / f"{t}.npz")["logits"] for t in types}


class Bench:
    def __init__(self, args, configs: List[Config]):
        self.args = args
        self.configs = configs
        self.by_name = {c.name: c for c in configs}
        self.llama_cpp_types = [c.kv["ggml_type"] for c in configs if c.llama_cpp]
        self.completed = 0

    def run(self, ref_llm, contexts: dict, chunks: np.ndarray) -> None:
        with tempfile.TemporaryDirectory() as tmp, \
                tqdm(total=len(chunks), desc="chunks", unit="chunk", file=sys.stderr) as bar:
            for start in range(0, len(chunks), CHUNKS_PER_WORKER_RUN):
                group = chunks[start:start + CHUNKS_PER_WORKER_RUN]
                theirs = {}
                if self.llama_cpp_types:
                    bar.set_postfix_str("llama.cpp")
                    theirs = llama_cpp_logits(self.args.model, group, self.args.threads, self.llama_cpp_types,
                                              Path(tmp))
                for i, chunk in enumerate(group):
                    self._score_chunk(ref_llm, contexts, chunk, {t: a[i] for t, a in theirs.items()}, bar)
                    self.completed += 1
                    bar.update(1)
                    tqdm.write(self._progress_line(len(chunks)), file=sys.stderr)

    def _score_chunk(self, ref_llm, contexts: dict, chunk: np.ndarray, theirs: dict, bar) -> None:
        targets = scored_targets(chunk)
        bar.set_postfix_str(REFERENCE)
        ref = chunk_logprobs(ref_llm, chunk)
        if REFERENCE in self.by_name:
            self.by_name[REFERENCE].stats.add(ref, targets, ref)
        for name, llm in contexts.items():
            bar.set_postfix_str(name)
            c = self.by_name[name]
            c.kl_tokens.append(c.stats.add(chunk_logprobs(llm, chunk), targets, ref))
            c.sink_rows.append(llm.kv_cache_stats()["n_sinks"])
        own_ref = log_softmax(theirs["f16"]) if "f16" in theirs else None
        for t, logits in theirs.items():
            c = self.by_name[f"llama.cpp/{t}"]
            logprobs = own_ref if t == "f16" else log_softmax(logits)
            c.stats.add(logprobs, targets, ref)
            if own_ref is not None:
                c.own_stats.add(logprobs, targets, own_ref)

    def _progress_line(self, n_chunks: int) -> str:
        done = [c for c in self.configs if c.stats.count]
        return f"[{self.completed}/{n_chunks}] " + ", ".join(f"{c.name} {c.stats.ppl:.4f}" for c in done)


def paired_difference(a: Config, b: Config) -> tuple:
    """(mean, standard error) of KL(a) - KL(b) over the same scored tokens."""
    d = np.concatenate(a.kl_tokens) - np.concatenate(b.kl_tokens)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def sink_row_bytes(metadata: dict) -> int:
    """Bytes of one exact (fp16) K and V row over all layers."""
    return 2 * kv_elements_per_token(metadata)


def result_of(c: Config, by_name: dict, row_bytes: int, n_ctx: int) -> dict:
    if c.error:
        return {"kv": c.kv, "error": c.error}
    if not c.stats.count:
        return {"kv": c.kv, "error": "no chunk was evaluated"}
    out = {"kv": c.kv, "kv_bytes_per_token": c.kv_bytes, **c.stats.summary()}
    if c.sink_rows:
        rows = float(np.mean(c.sink_rows))
        # sink rows are fp16 beside their (unused) block slots: the memory they add per token of context
        out.update(sink_rows_per_chunk=rows, kv_bytes_per_token_with_sinks=c.kv_bytes + rows * row_bytes / n_ctx)
    if c.kv.get("sinks") == "kvsink" and c.kl_tokens:
        for o in by_name.values():   # every PFN setting of the same cache type and rotation
            same = o.kv.get("type_k") == c.kv["type_k"] and o.kv.get("kv_rotate") == c.kv.get("kv_rotate")
            if same and o.kl_tokens and str(o.kv.get("sinks", "")).startswith("pfn:"):
                mean, err = paired_difference(c, o)
                out.setdefault("kl_minus", {})[o.name] = {"mean": mean, "error": err}
    if c.own_stats.kl_count:
        own = c.own_stats.summary()
        out.update(kl_vs_own_f16=own["kl_mean"], kl_vs_own_f16_error=own["kl_error"],
                   top1_vs_own_f16=own["top1_agreement"])
    return out


def print_table(report: dict) -> None:
    print(f"{Path(report['model']).name}, {report['n_chunks']} chunks of {report['n_ctx']} tokens of "
          f"{Path(report['file']).name} ({report['n_tokens_scored']} scored tokens); KL and top-1 against "
          f"our {REFERENCE} cache; our matrix products: {report.get('matmul', 'f32')}\n")
    print("| KV cache | PPL | KL vs our f16 | top-1 vs our f16 | KL vs own f16 | top-1 vs own f16 | exact rows/chunk "
          "| KV bytes/token (blocks; with sink rows) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in report["configs"].items():
        if "error" in r:
            print(f"| {name} | not available: {r['error'][:80]} | | | | | | |")
            continue
        own_kl = f"{r['kl_vs_own_f16']:.4g} ± {r['kl_vs_own_f16_error']:.2g}" if "kl_vs_own_f16" in r else "—"
        own_top1 = f"{100 * r['top1_vs_own_f16']:.2f}%" if "top1_vs_own_f16" in r else "—"
        rows = f"{r['sink_rows_per_chunk']:.1f}" if "sink_rows_per_chunk" in r else "—"
        size = f"{r['kv_bytes_per_token']:,.0f}"
        if "kv_bytes_per_token_with_sinks" in r:
            size += f"; {r['kv_bytes_per_token_with_sinks']:,.0f}"
        print(f"| {name} | {r['ppl']:.4f} ± {r['ppl_error']:.4f} | {r['kl_mean']:.4g} ± {r['kl_error']:.2g} | "
              f"{100 * r['top1_agreement']:.2f}% | {own_kl} | {own_top1} | {rows} | {size} |")
    paired = [(name, other, d) for name, r in report["configs"].items() for other, d in r.get("kl_minus", {}).items()]
    if paired:
        print("\nkvsink against PFN, paired over the same tokens (KL(kvsink) - KL(PFN); negative: kvsink better):\n")
        print("| kvsink | PFN | KL difference | error | difference / error |")
        print("|---|---|---|---|---|")
        for name, other, d in paired:
            print(f"| {name} | {other} | {d['mean']:.4g} | {d['error']:.2g} | {d['mean'] / d['error']:.1f} |")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("-f", "--file", default=str(DEFAULT_TEXT), help="text (default: WikiText-2 wiki.test.raw)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk length (default 512)")
    ap.add_argument("--chunks", type=int, default=40, help="chunks to evaluate (default 40)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads for both runtimes (default 2)")
    ap.add_argument("--matmul", choices=("f32", "q8"), default="f32",
                    help="our matrix products: exact f32 activations (default) or the 8-bit fast path")
    ap.add_argument("--kv-block", type=int, default=None, help="our tokens per quantized block (default 32)")
    ap.add_argument("--kv-recent", type=int, default=None, help="our unquantized recent window (default 32)")
    ap.add_argument("--configs", help="comma-separated glob patterns of settings, e.g. 'f16/*,llama.cpp/*'")
    ap.add_argument("--list", action="store_true", help="list the settings and exit")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(c.name for c in all_configs()))
        return 0
    configs = select(all_configs(), args.configs)
    for c in configs:
        if not c.llama_cpp and c.name != DEFAULTS:
            c.kv.setdefault("matmul", args.matmul)
            c.kv.update({k: v for k, v in (("kv_block", args.kv_block), ("kv_recent", args.kv_recent)) if v})
    if not Path(args.file).is_file():
        raise SystemExit(f"text file not found: {args.file} (pass -f)")
    if args.model is None:
        from kvsink_cpp.models import find_default_model, pull_default_model
        args.model = str(find_default_model() or pull_default_model())

    with open_llama(args.model, args.ctx_size, args.threads, **REFERENCE_KV, matmul=args.matmul) as ref_llm:
        tokens = ref_llm.tokenize(Path(args.file).read_bytes(), add_bos=True)
        n = count_chunks(len(tokens), args.ctx_size, args.chunks)
        chunks = np.stack([chunk_tokens(tokens, args.ctx_size, i, vocab_bos(ref_llm)) for i in range(n)])
        if any(c.kv.get("sinks") == "pfn:eq" for c in configs):
            resolve_equal_budget(configs, args.model, chunks, args.threads)
        contexts = open_ours(configs, args.model, args.ctx_size, args.threads)
        if REFERENCE in (c.name for c in configs):
            next(c for c in configs if c.name == REFERENCE).kv_bytes = ref_llm.kv_cache_bytes_per_token()
        elements = kv_elements_per_token(ref_llm.metadata)
        for c in configs:
            if c.llama_cpp:
                c.kv_bytes = elements * LLAMA_CPP_BYTES_PER_ELEMENT[c.kv["ggml_type"]]
        bench = Bench(args, configs)
        try:
            bench.run(ref_llm, contexts, chunks)
        except KeyboardInterrupt:
            print(f"interrupted: reporting the {bench.completed} chunks done", file=sys.stderr)
        for llm in contexts.values():
            llm.close()

    scored = next((c.stats.count for c in configs if c.stats.count), 0)
    report = {"model": args.model, "file": args.file, "n_ctx": args.ctx_size, "n_chunks": bench.completed,
              "matmul": args.matmul,
              "n_tokens": len(tokens), "n_tokens_scored": scored, "reference": REFERENCE,
              "configs": {c.name: result_of(c, {x.name: x for x in configs}, sink_row_bytes(ref_llm.metadata),
                                            args.ctx_size) for c in configs}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
