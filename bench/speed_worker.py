"""Times one engine and one KV cache setting in a fresh process (so that its
peak RSS is its own). Runs under either environment: the API names are the
same in kvsink_cpp and llama-cpp-python, so both are timed by the same code.

    speed_worker.py ENGINE MODEL TOKENS.npy SPEC_JSON

ENGINE is "kvsink_cpp", "llama.cpp" or "torch" (bench/torch_anchor.py); SPEC_JSON holds n_ctx, threads, reps,
n_prompt, n_gen, depth and the engine's KV keyword arguments. Prints one JSON
object: per case the median tokens/s over `reps` timed repetitions (one
warm-up excluded) with every repetition, and the RSS figures.
"""
import json
import statistics
import sys
import time

import numpy as np


def status_bytes(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc (VmHWM is the peak RSS; unlike
    getrusage's ru_maxrss it is not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def generate(llm, tokens, start: int) -> None:
    """Decode tokens one at a time after `start` cached ones (the ids are given,
    not sampled, so both engines do exactly the same work)."""
    llm.n_tokens = start
    for tok in tokens:
        llm.eval([int(tok)])


def repeat(reps: int, n_tokens: int, fn) -> dict:
    times = [timed(fn) for _ in range(reps + 1)][1:]  # the first is a warm-up
    rates = [n_tokens / t for t in times]
    return {"tokens_per_s": statistics.median(rates), "runs": rates}


def open_engine(engine: str, model: str, spec: dict):
    if engine == "torch":  # the GPU anchor (torch_anchor.py)
        from torch_anchor import TorchLlama
        return TorchLlama(model, n_ctx=spec["n_ctx"], **spec["kv"])
    common = dict(model_path=model, n_ctx=spec["n_ctx"], n_batch=spec["n_prompt"], n_threads=spec["threads"],
                  verbose=False)
    if engine == "llama.cpp":
        from llama_cpp import Llama
        return Llama(n_threads_batch=spec["threads"], flash_attn=True, **common, **spec["kv"])
    from kvsink_cpp import Llama
    return Llama(**common, **spec["kv"])


def main() -> None:
    engine, model, tokens_file, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    tokens = np.load(tokens_file)
    reps, n_prompt, n_gen, depth = spec["reps"], spec["n_prompt"], spec["n_gen"], spec["depth"]
    rss_before = status_bytes()
    llm = open_engine(engine, model, spec)
    rss_loaded = status_bytes()
    prompt, gen = tokens[:n_prompt], tokens[depth:depth + n_gen]

    def prompt_once():
        llm.reset()
        llm.eval(prompt.tolist())

    out = {"pp": repeat(reps, n_prompt, prompt_once),
           "tg": repeat(reps, n_gen, lambda: generate(llm, gen, 0))}
    if depth:
        llm.reset()
        fill = timed(lambda: llm.eval(tokens[:depth].tolist()))
        out["fill"] = {"tokens_per_s": depth / fill, "runs": [depth / fill]}
        out["tg_deep"] = repeat(reps, n_gen, lambda: generate(llm, gen, depth))
    if engine == "kvsink_cpp":
        out["kv_bytes_per_token"] = llm.kv_cache_bytes_per_token()
    out["rss_before_load"] = rss_before
    out["rss_after_load"] = rss_loaded
    out["rss_end"] = status_bytes()
    out["rss_peak"] = status_bytes("VmHWM")
    llm.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
