"""Perplexity computed as llama.cpp's `llama-perplexity` computes it, and the
KL-divergence of a KV cache setting from the f16 cache.

The rules (llama.cpp tools/perplexity/perplexity.cpp, `perplexity()`): the whole
text is tokenized once (with BOS when the vocab adds one) and cut into
non-overlapping chunks of n_ctx tokens (trailing tokens that do not fill a chunk
are dropped). Each chunk is evaluated from an empty cache, its first token
replaced by BOS when the vocab adds BOS. Only the second half is scored: the NLL
of token j+1 from the logits after token j, for j in [n_ctx/2, n_ctx - 1).
PPL = exp(mean NLL) +/- PPL * sqrt(var(NLL) / (count - 1)).

KL-divergence: llama.cpp's `--kl-divergence` reads a base run's log-probs from a
file (stored in 16 bits, probabilities below e^-16 dropped). Here the base run
(the f16 cache, no sink rows) is evaluated in the same pass on the same chunk,
so KL(P_f16 || P_test) is exact, float64 over the whole vocabulary; its
uncertainty and the top-1 agreement ("same top p") follow llama.cpp.

    python -m kvsink_cpp perplexity -m MODEL -f FILE [-c 512] [--chunks N]
        [--cache-type-k T] [--cache-type-v T] [--sinks P] [--kv-block B]
        [--kv-recent R] [-t N] [--kl-divergence] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from .errors import KvsinkError
from .llama import Llama, resolve_device

# The cache every setting is compared with (llama.cpp's default KV cache).
REFERENCE_KV = {"type_k": "f16", "type_v": "f16", "sinks": "none"}
KV_OPTIONS = ("type_k", "type_v", "sinks", "kv_block", "kv_recent", "kv_rotate", "matmul", "device")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities in float64 along the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _mean_and_uncertainty(total: float, total2: float, count: int):
    """llama.cpp's mean_and_uncertainty (used for KL): no error below 11 values."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


@dataclass
class PerplexityStats:
    """Running sums over scored tokens, as llama.cpp keeps them."""

    count: int = 0
    nll_sum: float = 0.0
    nll2_sum: float = 0.0
    kl_count: int = 0
    kl_sum: float = 0.0
    kl2_sum: float = 0.0
    same_top: int = 0

    def add(self, logprobs: np.ndarray, targets: np.ndarray,
            ref_logprobs: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Score rows of log-probs against the next tokens; with ref_logprobs (the
        reference setting's rows for the same positions) also KL and top-1, and
        return the KL of each token (for paired comparisons)."""
        nll = -logprobs[np.arange(len(targets)), targets]
        self.count += len(nll)
        self.nll_sum += float(nll.sum())
        self.nll2_sum += float((nll * nll).sum())
        if ref_logprobs is not None:
            kl = (np.exp(ref_logprobs) * (ref_logprobs - logprobs)).sum(axis=-1)
            self.kl_count += len(kl)
            self.kl_sum += float(kl.sum())
            self.kl2_sum += float((kl * kl).sum())
            self.same_top += int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())
            return kl
        return None

    @property
    def nll_mean(self) -> float:
        return self.nll_sum / self.count if self.count else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_mean) if self.count else math.nan

    @property
    def ppl_error(self) -> float:
        """As llama.cpp's final line: PPL * standard error of the mean NLL."""
        if self.count < 2:
            return math.nan
        var = self.nll2_sum / self.count - self.nll_mean ** 2
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else 0.0

    def summary(self) -> dict:
        out = {"n_tokens_scored": self.count, "nll_mean": self.nll_mean,
               "ppl": self.ppl, "ppl_error": self.ppl_error}
        if self.kl_count:
            kl_mean, kl_error = _mean_and_uncertainty(self.kl_sum, self.kl2_sum, self.kl_count)
            top1 = self.same_top / self.kl_count
            top1_error = math.sqrt(top1 * (1 - top1) / (self.kl_count - 1)) if self.kl_count > 1 else 0.0
            out.update(kl_mean=kl_mean, kl_error=kl_error, top1_agreement=top1, top1_error=top1_error)
        return out

    def postfix(self) -> str:
        """The running estimate shown on the progress bar."""
        text = f"PPL={self.ppl:.4f}"
        if self.kl_count:
            text += f" KL={self.kl_sum / self.kl_count:.5f} top1={100 * self.same_top / self.kl_count:.1f}%"
        return text


# ---- chunks ----------------------------------------------------------------

def count_chunks(n_tokens: int, n_ctx: int, n_chunks: Optional[int] = None) -> int:
    """How many chunks are evaluated: n_tokens // n_ctx, capped by n_chunks."""
    if n_ctx < 3:
        raise ValueError(f"n_ctx must be at least 3 to score a token per chunk, got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise ValueError(f"the text tokenizes to only {n_tokens} tokens; perplexity with a context "
                         f"of {n_ctx} needs at least {2 * n_ctx} (2 x n_ctx)")
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"n_chunks must be positive (or None for all), got {n_chunks}")
    available = n_tokens // n_ctx
    return available if n_chunks is None else min(n_chunks, available)


def chunk_tokens(tokens: Sequence[int], n_ctx: int, index: int, bos_id: Optional[int] = None) -> np.ndarray:
    """Chunk `index`, its first token replaced by BOS when bos_id is given
    (llama.cpp does so when the vocab adds BOS, so every chunk starts like a text)."""
    chunk = np.array(tokens[index * n_ctx:(index + 1) * n_ctx], dtype=np.int32)
    if bos_id is not None:
        chunk[0] = bos_id
    return chunk


def scored_targets(chunk: np.ndarray) -> np.ndarray:
    """The tokens whose NLL is scored: positions n_ctx/2 + 1 .. n_ctx - 1."""
    return chunk[len(chunk) // 2 + 1:]


def chunk_logprobs(llm: Llama, chunk: np.ndarray) -> np.ndarray:
    """Log-probs after the scored positions [n_ctx/2, n_ctx - 1) of one chunk
    evaluated from an empty cache (float64, one row per scored token)."""
    llm.reset()
    llm.eval(chunk)
    return log_softmax(llm.scores[len(chunk) // 2:len(chunk) - 1])


def _check_logits_all(llm: Llama, n_ctx: int) -> None:
    if not llm.logits_all:
        raise ValueError("perplexity needs a Llama created with logits_all=True")
    if llm.n_ctx() < n_ctx:
        raise ValueError(f"chunks of {n_ctx} tokens do not fit the context of {llm.n_ctx()}")


def perplexity_of_tokens(llm: Llama, tokens: Sequence[int], n_ctx: Optional[int] = None,
                         n_chunks: Optional[int] = None, bos_id: Optional[int] = None,
                         reference: Optional[Llama] = None, progress: bool = False) -> dict:
    """Perplexity of token ids by llama.cpp's rules (see the module docstring).

    `bos_id` replaces each chunk's first token (pass it when the vocab adds BOS);
    `reference` (another context on the same model, e.g. with the f16 cache)
    adds KL(P_reference || P_llm) and top-1 agreement over the scored tokens.
    """
    n_ctx = llm.n_ctx() if n_ctx is None else n_ctx
    n = count_chunks(len(tokens), n_ctx, n_chunks)
    for context in (llm, reference):
        if context is not None:
            _check_logits_all(context, n_ctx)
    stats, ref_stats = PerplexityStats(), PerplexityStats()
    with tqdm(range(n), desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr) as bar:
        for i in bar:
            chunk = chunk_tokens(tokens, n_ctx, i, bos_id)
            targets = scored_targets(chunk)
            ref = None
            if reference is not None:
                ref = chunk_logprobs(reference, chunk)
                ref_stats.add(ref, targets)
            stats.add(chunk_logprobs(llm, chunk), targets, ref)
            bar.set_postfix_str(stats.postfix())
    result = {"n_ctx": n_ctx, "n_chunks": n, "n_tokens": len(tokens), **stats.summary()}
    if reference is not None:
        result.update(ref_ppl=ref_stats.ppl, ref_ppl_error=ref_stats.ppl_error)
    return result


# ---- models and text -------------------------------------------------------

def open_llama(model_path, n_ctx: int, n_threads: Optional[int] = None, n_batch: int = 512, **kv) -> Llama:
    """A context that keeps every position's logits, with the given KV cache options
    (None = the runtime default)."""
    kv = {k: v for k, v in kv.items() if v is not None}
    return Llama(os.fspath(model_path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads,
                 logits_all=True, verbose=False, **kv)


def vocab_bos(llm: Llama) -> Optional[int]:
    """The BOS id when the vocab adds BOS to a text (llama_vocab_get_add_bos), else None."""
    return llm.token_bos() if llm.tokenizer_.add_bos else None


def perplexity(model_path, text, n_ctx: int = 512, n_chunks: Optional[int] = None,
               n_threads: Optional[int] = None, kl_divergence: bool = False, progress: bool = True,
               n_batch: int = 512, **kv_options) -> dict:
    """Perplexity of a text (str or bytes) with the KV cache options given
    (type_k, type_v, sinks, kv_block, kv_recent; None = the runtime default)
    and matrix-product path (matmul "f32" or "q8"; the KL reference uses the
    same one, so that KL measures the KV cache alone).

    Returns every figure: ppl, ppl_error, nll_mean, n_chunks, n_tokens (of the
    text), n_tokens_scored, the KV options, kv_bytes_per_token and, with
    kl_divergence, kl_mean, kl_error, top1_agreement (a fraction), top1_error
    and the f16 reference's ref_ppl / ref_ppl_error.
    """
    unknown = sorted(set(kv_options) - set(KV_OPTIONS))
    if unknown:
        raise TypeError(f"perplexity() got unexpected keyword arguments {unknown}")
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    with ExitStack() as stack:
        llm = stack.enter_context(open_llama(model_path, n_ctx, n_threads, n_batch, **kv_options))
        tokens = llm.tokenize(data, add_bos=True)
        count_chunks(len(tokens), n_ctx, n_chunks)  # fail before loading a reference
        reference = None
        if kl_divergence:
            reference = stack.enter_context(open_llama(model_path, n_ctx, n_threads, n_batch, **REFERENCE_KV,
                                                       matmul=kv_options.get("matmul"),
                                                       device=kv_options.get("device")))
        result = perplexity_of_tokens(llm, tokens, n_ctx, n_chunks, vocab_bos(llm), reference, progress)
        stats = llm.kv_cache_stats()
        result.update({"model": os.fspath(model_path), **{k: kv_options.get(k) for k in KV_OPTIONS},
                       "kv_bytes_per_token": llm.kv_cache_bytes_per_token(),
                       "sink_rows_last_chunk": stats["n_sinks"], "sinks_dropped": stats["n_sinks_dropped"],
                       "eval_seconds": stats["eval_seconds"],
                       "sink_predict_seconds": stats["sink_predict_seconds"]})
        if kl_divergence:
            result["reference"] = dict(REFERENCE_KV)
    return result


# ---- command line ----------------------------------------------------------

def _configure(p: argparse.ArgumentParser) -> None:
    """Flags named as llama-perplexity's."""
    p.add_argument("model", nargs="?", help="GGUF file (same as -m)")
    p.add_argument("-m", "--model", dest="model_flag", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-f", "--file", required=True, help="text file, e.g. wikitext-2-raw/wiki.test.raw")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="chunk length in tokens (default 512)")
    p.add_argument("--chunks", type=int, default=-1, help="most chunks to evaluate (default -1: all)")
    p.add_argument("-ctk", "--cache-type-k", default=None, help="K cache type: f32 f16 q8 q4 q3 q2")
    p.add_argument("-ctv", "--cache-type-v", default=None, help="V cache type: f32 f16 q8 q4 q3 q2")
    p.add_argument("--sinks", default=None, help="sink rows kept exact: none, pfn:N, kvsink, kvsink:N")
    p.add_argument("--kv-rotate", default=None, choices=("none", "k", "v", "kv"),
                   help="Hadamard-rotate quantized keys, values or both (default: q4/q3/q2 blocks when head_dim is a power of two)")
    p.add_argument("--matmul", default=None, choices=("f32", "q8"),
                   help="matrix products: q8 (default: 8-bit activations, outliers exact) or f32 (exact, the reference)")
    p.add_argument("--kv-block", type=int, default=None, help="tokens per quantized block")
    p.add_argument("--kv-recent", type=int, default=None, help="most recent tokens kept unquantized")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: the physical cores)")
    p.add_argument("--kl-divergence", action="store_true",
                   help="also evaluate with the f16 cache and report KL-divergence and top-1 agreement")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None,
                   help="-1 (or at least the model's layers): run on the GPU (a CUDA build), 0: the CPU")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")


def add_perplexity_parser(subparsers) -> argparse.ArgumentParser:
    """Register `perplexity` on the CLI's subparsers."""
    p = subparsers.add_parser("perplexity", help="llama.cpp-comparable perplexity (and KL vs the f16 cache)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run_perplexity_command)
    return p


def _default_model() -> str:
    from .models import find_default_model, pull_default_model
    return str(find_default_model() or pull_default_model())


def run_perplexity_command(args) -> int:
    if args.chunks == 0 or args.chunks < -1:
        raise ValueError(f"--chunks must be positive, or -1 for all, got {args.chunks}")
    if args.ctx_size < 2:
        raise ValueError(f"-c (the chunk length in tokens) must be at least 2, got {args.ctx_size}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"-t must be positive, got {args.threads}")
    if os.path.isdir(args.file):
        raise IsADirectoryError(f"-f {args.file} is a directory; give a text file, e.g. wiki.test.raw")
    if not os.path.isfile(args.file):
        raise FileNotFoundError(f"text file not found: {args.file}")
    model = args.model_flag or args.model or _default_model()
    with open(args.file, "rb") as f:
        text = f.read()
    result = perplexity(model, text, n_ctx=args.ctx_size, n_chunks=None if args.chunks < 0 else args.chunks,
                        n_threads=args.threads, kl_divergence=args.kl_divergence, progress=True,
                        type_k=args.cache_type_k, type_v=args.cache_type_v, sinks=args.sinks,
                        kv_block=args.kv_block, kv_recent=args.kv_recent, kv_rotate=args.kv_rotate,
                        matmul=args.matmul, device=None if args.device is None and not args.n_gpu_layers
                        else resolve_device(args.device, args.n_gpu_layers))
    result["file"] = args.file
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_report(result)
    return 0


def _print_report(r: dict) -> None:
    """Human-readable figures; the last line is llama.cpp's final estimate."""
    kv = ", ".join(f"{k}={r[k]}" for k in KV_OPTIONS if r[k] is not None) or "default"
    print(f"{r['n_chunks']} chunks of {r['n_ctx']} tokens, {r['n_tokens_scored']} scored; "
          f"KV cache {kv}, {r['kv_bytes_per_token']:,.0f} bytes/token")
    if r.get("eval_seconds"):
        print(f"evaluation {r['eval_seconds']:.1f} s, of which sink prediction {1e3 * r['sink_predict_seconds']:.2f} ms")
    if "kl_mean" in r:
        print(f"Mean PPL(f16 cache): {r['ref_ppl']:.4f} +/- {r['ref_ppl_error']:.5f}")
        print(f"Mean    KLD: {r['kl_mean']:10.6f} +/- {r['kl_error']:10.6f}")
        print(f"Same top p: {100 * r['top1_agreement']:6.3f} +/- {100 * r['top1_error']:5.3f} %")
    print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_error']:.5f}")


def main(argv=None) -> int:
    """`python -m kvsink_cpp.perplexity ARGS` (the same flags as the subcommand)."""
    parser = argparse.ArgumentParser(prog="python -m kvsink_cpp.perplexity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    args = parser.parse_args(argv)
    try:
        return run_perplexity_command(args)
    except (KvsinkError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
