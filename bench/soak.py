"""Soak test: thousands of chat turns through one small context with the ring
buffer, watching memory, turn latency, errors and degenerate (repetitive)
replies over time.

    nice -n 10 python bench/soak.py [--turns 10000] [--max-tokens 24] [-m MODEL]
        [--mode ring|cli] [-c 512] [-t 2] [--every 100] [--out bench/results-soak-smollm2.json]

Two ways of holding a conversation much longer than n_ctx, both through the
public API, with kv_ring=True as `python -m kvsink_cpp chat` creates its Llama:

- ring (default): the conversation only grows. Each turn's new tokens (the
  end of the previous reply, the user message, the assistant header) are
  evaluated after what the cache holds, and the reply is sampled from there
  (Llama.generate(..., reset=False)); the ring buffer evicts the oldest
  blocks and keeps the sink rows. This is the pattern that puts hundreds of
  thousands of tokens through one 512-token cache.
- cli: what the chat command itself does (kvsink_cpp/chat_cli.ChatSession):
  the whole kept conversation is rendered with the chat template every turn,
  the oldest exchanges are dropped so that prompt + reply fit n_ctx, and
  create_chat_completion reuses the cached prefix (once exchanges are being
  dropped the prefix is short, so most of the prompt is evaluated again).

Every --every turns the process's RSS (VmRSS of /proc/self/status), the
latency of the turns since the last sample, the cache's counters and the
repetition measures are recorded; the JSON (bench/results-soak-smollm2.json)
is rewritten at each sample, so an interrupted run keeps its series (the run
itself cannot be resumed: the cache's state is not saved).

Repetition: per reply, the share of its token 4-grams that occur more than
once in it ("repeat4"); a reply counts as repetitive when repeat4 > 0.5, and
as stuck when it equals one of the previous 5 replies (the prompts cycle
through 60 different questions, so equal replies mean the question was
ignored). Across turns, "echo4" is the share of a reply's 4-grams found in
the previous 5 replies, and "same_opening" counts replies whose first 4
tokens open one of the previous 5 replies. --save-replies keeps every reply's
text in the JSON (about 100 bytes a turn).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results-soak-smollm2.json"
DEFAULT_PROMPTS = HERE / "chat_prompts.txt"
SENTINEL = "\x00REPLY\x00"  # stands for a reply's text when the template is rendered around it
RECENT_REPLIES = 5
REPETITIVE = 0.5


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def grams4(tokens) -> list:
    return [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]


def repeat4(tokens: list) -> float:
    """Share of the reply's 4-grams that are repeats of an earlier 4-gram in it."""
    grams = grams4(tokens)
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def echo4(tokens: list, recent) -> float:
    """Share of the reply's 4-grams that occur in the recent replies."""
    grams = grams4(tokens)
    seen = {g for r in recent for g in grams4(r)}
    return 0.0 if not grams else sum(g in seen for g in grams) / len(grams)


class NullWriter:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


class RingConversation:
    """The conversation evaluated into the cache turn after turn (see the module doc)."""

    def __init__(self, llm, sampling: dict, max_tokens: int, system: str | None):
        self.llm, self.sampling, self.max_tokens = llm, sampling, max_tokens
        self.system = [{"role": "system", "content": system}] if system else []
        self.formatter = llm.chat_formatter()
        tok = llm.tokenizer_
        _, stop_ids = llm.chat_prompt_tokens([{"role": "user", "content": "x"}])
        self.stop = set(stop_ids) | ({llm.token_eos()} - {-1})
        self.is_eog = tok.is_eog
        self.last_user = None
        self.pending = []  # a reply's last token, sampled but not evaluated (cut at max_tokens)
        self.turns = 0

    def _new_tokens(self, user: str) -> list:
        """Tokens to evaluate before the reply: all of the first prompt, then
        the template's text between the previous reply and this reply."""
        llm = self.llm
        if self.last_user is None:
            tokens, _ = llm.chat_prompt_tokens(self.system + [{"role": "user", "content": user}])
            return tokens
        messages = self.system + [{"role": "user", "content": self.last_user},
                                  {"role": "assistant", "content": SENTINEL}, {"role": "user", "content": user}]
        text = self.formatter.render(messages, add_generation_prompt=True)
        if text.count(SENTINEL) != 1:
            raise RuntimeError("the chat template does not render a reply verbatim; use --mode cli")
        after = text.split(SENTINEL, 1)[1]
        return self.pending + llm.tokenize(after.encode("utf-8"), add_bos=False, special=True)

    def reply(self, user: str, seed: int) -> tuple:
        """(reply tokens, tokens evaluated before the reply)."""
        new = self._new_tokens(user)
        reply = []
        self.pending = []
        stream = self.llm.generate(new, reset=self.last_user is None, seed=seed, **self.sampling)
        try:
            for token in stream:
                if token in self.stop or self.is_eog(token):
                    break
                reply.append(token)
                if len(reply) >= self.max_tokens:
                    self.pending = [token]
                    break
        finally:
            stream.close()
        self.last_user = user
        self.turns += 1
        return reply, len(new)

    def restart(self):
        self.llm.reset()
        self.last_user, self.pending = None, []


class CliConversation:
    """kvsink_cpp.chat_cli.ChatSession, as `python -m kvsink_cpp chat` runs it."""

    def __init__(self, llm, sampling: dict, max_tokens: int, system: str | None):
        from kvsink_cpp.chat_cli import ChatSession
        self.llm = llm
        self.session = ChatSession(llm, system, dict(sampling_cli(sampling)), max_tokens, out=NullWriter())

    def reply(self, user: str, seed: int) -> tuple:
        self.session.sampling["seed"] = seed
        text = self.session.reply(user)
        prompt = self.llm.last_timings.get("prompt_tokens", 0)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False), prompt

    def restart(self):
        self.session.reset()
        self.llm.reset()


def new_window() -> dict:
    return dict(lat=[], prompt=[], gen=[], rep=[], echo=[], repetitive=0, stuck=0, same_opening=0, empty=0,
                errors=0)


def sampling_cli(sampling: dict) -> dict:
    """Llama.generate's names -> create_chat_completion's."""
    names = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repeat_penalty": "repeat_penalty"}
    return {names[k]: v for k, v in sampling.items()}


def percentile(values: list, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--turns", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=24, help="most tokens per reply")
    p.add_argument("--mode", choices=("ring", "cli"), default="ring")
    p.add_argument("-c", "--ctx-size", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--temp", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234, help="turn i samples with seed + i")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--sinks", default="kvsink")
    p.add_argument("-ctk", "--cache-type-k", default=None)
    p.add_argument("-ctv", "--cache-type-v", default=None)
    p.add_argument("--matmul", default=None, choices=("f32", "q8"), help="default: the library's (q8)")
    p.add_argument("--every", type=int, default=100, help="turns between samples")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--save-replies", action="store_true", help="keep every reply's text in the JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm
    from kvsink_cpp import Llama
    from kvsink_cpp.models import default_model_path

    model = args.model or str(default_model_path())
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    sampling = dict(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty)
    rss_start = rss_kb()
    t_load = time.perf_counter()
    llm = Llama(model, n_ctx=args.ctx_size, n_threads=args.threads, verbose=False, kv_ring=True,
                sinks=args.sinks, type_k=args.cache_type_k, type_v=args.cache_type_v, matmul=args.matmul)
    load_s = time.perf_counter() - t_load
    conv_class = RingConversation if args.mode == "ring" else CliConversation
    conv = conv_class(llm, sampling, args.max_tokens, args.system)
    result = {
        "bench": "soak", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": Path(model).name, "mode": args.mode, "turns": args.turns, "max_tokens": args.max_tokens,
                   "n_ctx": args.ctx_size, "threads": args.threads, "sampling": sampling, "seed": args.seed,
                   "sinks": args.sinks, "settings": llm.describe_settings(), "prompts": Path(args.prompts).name,
                   "n_prompts": len(prompts), "every": args.every, "machine": platform.machine(),
                   "cpus": os.cpu_count(), "python": platform.python_version()},
        "rss_kb_before_load": rss_start, "load_seconds": round(load_s, 3),
        "samples": [], "errors": [], "latency_ms": [], "reply_tokens": [], "repeat4": [], "echo4": [],
    }
    if args.save_replies:
        result["replies"] = []
    out = Path(args.out)
    recent = deque(maxlen=RECENT_REPLIES)
    window = new_window()
    total_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=args.turns, unit="turn", disable=args.no_progress, dynamic_ncols=True)
    turn = 0
    try:
        for turn in range(1, args.turns + 1):
            user = prompts[(turn - 1) % len(prompts)]
            start = time.perf_counter()
            try:
                reply, n_prompt = conv.reply(user, args.seed + turn)
            except Exception as exc:  # recorded, then the conversation starts over
                result["errors"].append({"turn": turn, "type": type(exc).__name__, "message": str(exc)[:500],
                                         "traceback": traceback.format_exc(limit=4)[-1500:]})
                window["errors"] += 1
                conv.restart()
                reply, n_prompt = [], 0
            ms = (time.perf_counter() - start) * 1e3
            r4, e4 = repeat4(reply), echo4(reply, recent)
            window["echo"].append(e4)
            window["same_opening"] += len(reply) >= 4 and any(tuple(r[:4]) == tuple(reply[:4]) for r in recent)
            window["lat"].append(ms)
            window["prompt"].append(n_prompt)
            window["gen"].append(len(reply))
            window["rep"].append(r4)
            window["repetitive"] += r4 > REPETITIVE
            window["empty"] += not reply
            window["stuck"] += bool(reply) and tuple(reply) in recent
            recent.append(tuple(reply))
            total_tokens += n_prompt + len(reply)
            result["latency_ms"].append(round(ms, 2))
            result["reply_tokens"].append(len(reply))
            result["repeat4"].append(round(r4, 3))
            result["echo4"].append(round(e4, 3))
            if args.save_replies:
                result["replies"].append(llm.detokenize(reply).decode("utf-8", "replace"))
            bar.update(1)
            if turn % args.every == 0 or turn == args.turns:
                stats = llm.kv_cache_stats()
                sample = {
                    "turn": turn, "elapsed_s": round(time.perf_counter() - t0, 2), "rss_kb": rss_kb(),
                    "latency_ms_mean": round(statistics.fmean(window["lat"]), 2),
                    "latency_ms_p50": round(percentile(window["lat"], 0.5), 2),
                    "latency_ms_p95": round(percentile(window["lat"], 0.95), 2),
                    "latency_ms_max": round(max(window["lat"]), 2),
                    "prompt_tokens_mean": round(statistics.fmean(window["prompt"]), 2),
                    "reply_tokens_mean": round(statistics.fmean(window["gen"]), 2),
                    "repeat4_mean": round(statistics.fmean(window["rep"]), 4),
                    "echo4_mean": round(statistics.fmean(window["echo"]), 4),
                    "repetitive_replies": window["repetitive"], "stuck_replies": window["stuck"],
                    "same_opening_replies": window["same_opening"],
                    "empty_replies": window["empty"], "errors": window["errors"],
                    "tokens_total": total_tokens, "n_tokens": llm.n_tokens,
                    "n_evicted": stats["n_evicted"], "n_sinks": stats["n_sinks"],
                    "sink_capacity": stats["sink_capacity"],
                    "n_sinks_dropped": stats["n_sinks_dropped"],
                    "last_reply": llm.detokenize(reply).decode("utf-8", "replace"),
                }
                result["samples"].append(sample)
                bar.set_postfix(rss_mb=f"{sample['rss_kb'] / 1024:.0f}", ms=f"{sample['latency_ms_mean']:.0f}",
                                rep=f"{sample['repeat4_mean']:.2f}", err=len(result["errors"]))
                window = new_window()
                result["turns_done"] = turn
                _write(out, result)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {turn} turns", file=sys.stderr)
    finally:
        bar.close()
        llm.close()
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["turns_done"] = len(result["latency_ms"])
    result["summary"] = summarize(result)
    _write(out, result)
    print_table(result)
    print(f"wrote {out}")
    return 0


def summarize(result: dict) -> dict:
    samples, lat = result["samples"], result["latency_ms"]
    if not samples:
        return {}
    first, last = samples[0], samples[-1]
    n = len(lat)
    head, tail = lat[: max(1, n // 10)], lat[-max(1, n // 10):]
    return {
        "turns": n, "wall_seconds": last["elapsed_s"], "turns_per_second": round(n / max(last["elapsed_s"], 1e-9), 3),
        "rss_mb_first_sample": round(first["rss_kb"] / 1024, 1), "rss_mb_last_sample": round(last["rss_kb"] / 1024, 1),
        "rss_mb_max": round(max(s["rss_kb"] for s in samples) / 1024, 1),
        "rss_growth_mb_per_1000_turns": round((last["rss_kb"] - first["rss_kb"]) / 1024 /
                                              max(last["turn"] - first["turn"], 1) * 1000, 3),
        "latency_ms_mean": round(statistics.fmean(lat), 2), "latency_ms_p95": round(percentile(lat, 0.95), 2),
        "latency_ms_mean_first_10pct": round(statistics.fmean(head), 2),
        "latency_ms_mean_last_10pct": round(statistics.fmean(tail), 2),
        "errors": len(result["errors"]),
        "repeat4_mean": round(statistics.fmean(result["repeat4"]), 4),
        "echo4_mean": round(statistics.fmean(result["echo4"]), 4),
        "repetitive_replies": sum(s["repetitive_replies"] for s in samples),
        "stuck_replies": sum(s["stuck_replies"] for s in samples),
        "same_opening_replies": sum(s["same_opening_replies"] for s in samples),
        "empty_replies": sum(s["empty_replies"] for s in samples),
        "tokens_total": last["tokens_total"], "n_evicted_last": last["n_evicted"],
    }


def print_table(result: dict) -> None:
    rows = result["samples"]
    header = (f"{'turn':>6} {'time s':>8} {'RSS MB':>7} {'ms/turn':>8} {'p95 ms':>7} {'prompt':>6} {'reply':>5} "
              f"{'rep4':>5} {'echo4':>5} {'repet.':>6} {'stuck':>5} {'open.':>5} {'empty':>5} {'err':>4} "
              f"{'evicted':>9} {'sinks':>5}")
    print(header)
    for s in rows:
        print(f"{s['turn']:>6} {s['elapsed_s']:>8.1f} {s['rss_kb'] / 1024:>7.1f} {s['latency_ms_mean']:>8.1f} "
              f"{s['latency_ms_p95']:>7.1f} {s['prompt_tokens_mean']:>6.1f} {s['reply_tokens_mean']:>5.1f} "
              f"{s['repeat4_mean']:>5.3f} {s['echo4_mean']:>5.3f} {s['repetitive_replies']:>6} "
              f"{s['stuck_replies']:>5} {s['same_opening_replies']:>5} {s['empty_replies']:>5} {s['errors']:>4} "
              f"{s['n_evicted']:>9} {s['n_sinks']:>5}")
    summary = result.get("summary") or {}
    if summary:
        print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
