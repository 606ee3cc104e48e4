"""Greedy chat answers of several settings beside the exact path's: the share
of prompts whose whole answer (token for token) equals the exact one, and the
mean length of the common prefix.

    python bench/greedy_agreement.py [-m MODEL] [--prompts bench/chat_prompts.txt]
        [--max-tokens 48] [-t 2] [--configs default,fast-plain,fast,llama.cpp] [--json]

Every setting gets the same prompt ids: the model's chat template rendered by
kvsink_cpp and tokenized once, llama.cpp included (through llama-cpp-python in
its own environment, bench/llama_cpp_env.py). Greedy means the most likely
token at every step; an answer ends at the template's stop token or after
--max-tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

from llama_cpp_env import run_worker  # noqa: E402

# the reference and the settings compared with it (kvsink_cpp.Llama keywords)
EXACT = {"matmul": "f32", "type_k": "f32", "type_v": "f32"}
SETTINGS = {
    "default": {},
    "fast-plain": {"matmul": "q8", "act_outlier_ratio": 0, "type_k": "f32", "type_v": "f32"},
    "fast": {"matmul": "q8", "type_k": "f32", "type_v": "f32"},
    "exact-f16": {"matmul": "f32", "type_k": "f16", "type_v": "f16"},
}


def prompt_ids(llm, prompts: list[str]) -> tuple[list[list[int]], list[int]]:
    """Each prompt as one user turn through the model's chat template (as
    create_chat_completion renders it), and the ids that end an answer."""
    ids, stop = [], {llm.token_eos()} - {-1}
    for text in prompts:
        tokens, stop_ids = llm.chat_prompt_tokens([{"role": "user", "content": text}])
        ids.append(tokens)
        stop.update(stop_ids)
    return ids, sorted(stop)


def greedy(model: str, settings: dict, prompts: list[list[int]], stop: list[int], max_tokens: int,
           threads: int) -> list[list[int]]:
    from kvsink_cpp import Llama
    answers = []
    with Llama(model, n_ctx=512, n_threads=threads, verbose=False, **settings) as llm:
        for ids in prompts:
            answer = []
            for token in llm.generate(ids, temp=0.0, top_k=1):
                if token in stop or len(answer) == max_tokens:
                    break
                answer.append(token)
            answers.append(answer)
    return answers


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> int:
    from kvsink_cpp import Llama
    from kvsink_cpp.models import find_default_model, pull_default_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--prompts", default=str(HERE / "chat_prompts.txt"), help="one chat question per line")
    ap.add_argument("--max-tokens", type=int, default=48, help="most tokens per answer (default 48)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--configs", default="default,fast-plain,fast,exact-f16,llama.cpp",
                    help=f"comma-separated, from {', '.join(SETTINGS)}, llama.cpp")
    ap.add_argument("--show", type=int, default=3, help="print this many answers that differ, per setting")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    model = args.model or str(find_default_model() or pull_default_model())
    prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]

    with Llama(model, n_ctx=512, verbose=False) as llm:
        ids, stop = prompt_ids(llm, prompts)
        detok = lambda toks: llm.detokenize(toks).decode("utf-8", "replace")  # noqa: E731
        t0 = time.time()
        exact = greedy(model, EXACT, ids, stop, args.max_tokens, args.threads)
        results = {"model": model, "prompts": len(prompts), "max_tokens": args.max_tokens, "settings": {}}
        print(f"exact: {time.time() - t0:.0f} s", file=sys.stderr)
        for name in args.configs.split(","):
            t0 = time.time()
            if name == "llama.cpp":
                with tempfile.TemporaryDirectory() as tmp:
                    job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
                    job.write_text(json.dumps({"prompts": ids, "stop": stop, "max_tokens": args.max_tokens}))
                    run_worker("llama_cpp_greedy_worker.py", model, str(job), "512", str(args.threads), str(out))
                    answers = json.loads(out.read_text())["answers"]
            else:
                answers = greedy(model, SETTINGS[name], ids, stop, args.max_tokens, args.threads)
            same = [a == e for a, e in zip(answers, exact)]
            prefix = [common_prefix(a, e) / max(len(e), 1) for a, e in zip(answers, exact)]
            results["settings"][name] = {
                "identical": sum(same), "share_identical": sum(same) / len(same),
                "mean_common_prefix": sum(prefix) / len(prefix),
                "differing": [{"prompt": prompts[i], "exact": detok(exact[i]), "answer": detok(answers[i])}
                              for i in range(len(prompts)) if not same[i]],
            }
            print(f"{name}: {time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{model}: {len(prompts)} prompts, greedy, at most {args.max_tokens} tokens\n")
    print("| setting | answers identical to exact | share | mean common prefix |")
    print("|---|---|---|---|")
    for name, r in results["settings"].items():
        print(f"| {name} | {r['identical']} / {len(prompts)} | {100 * r['share_identical']:.0f}% | "
              f"{100 * r['mean_common_prefix']:.0f}% |")
    for name, r in results["settings"].items():
        for d in r["differing"][:args.show]:
            print(f"\n[{name}] {d['prompt']}\n  exact:  {d['exact']!r}\n  {name}: {d['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
