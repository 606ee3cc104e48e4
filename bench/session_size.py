"""Session files beside llama.cpp's saved state for the same conversation.

kvsink_cpp's save_session stores the KV cache as it is (quantized blocks, exact
sink rows, the fp16 window) plus the tokens and the last logits;
llama.cpp's state (llama_state_get_size, what llama-cpp-python's save_state
holds) stores its KV cache in its own type plus the logits. Both are measured
after the same token ids (the first N tokens of wiki.test.raw, tokenized by
kvsink_cpp), at N = 512, 1024 and 2048 by default.

    python bench/session_size.py [-m MODEL] [-n 512 -n 2048] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llama_cpp_env import run_worker  # noqa: E402

TEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
OURS = {"f16": dict(type_k="f16", type_v="f16"), "q8 (default)": {}, "q4": dict(type_k="q4", type_v="q4")}


def main() -> int:
    from kvsink_cpp import Llama, default_model_path
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=str(default_model_path()))
    ap.add_argument("-n", "--tokens", type=int, action="append")
    ap.add_argument("--json", default=str(HERE / "results-session-size-smollm2.json"))
    args = ap.parse_args()
    lengths = args.tokens or [512, 1024, 2048]
    if not TEXT.is_file():
        sys.exit(f"{TEXT} is absent (../shared is not checked out beside the repo)")
    text = TEXT.read_text(encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            row = {"tokens": n}
            for name, kw in OURS.items():
                with Llama(args.model, n_ctx=n + 64, verbose=False, **kw) as llm:
                    ids = llm.tokenize(text.encode("utf-8"))[:n]
                    llm.eval(ids)
                    row[f"kvsink_cpp {name}"] = llm.save_session(os.path.join(tmp, "s.kvs"))
            ids_file = os.path.join(tmp, "ids.json")
            json.dump([int(i) for i in ids], open(ids_file, "w"))
            out = os.path.join(tmp, "llama.json")
            run_worker("llama_cpp_state_worker.py", args.model, ids_file, str(n + 64), out, "f16", "q8_0", "q4_0")
            for name, sizes in json.load(open(out)).items():
                row[f"llama.cpp {name}"] = sizes["llama_state_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    json.dump({"model": os.path.basename(args.model), "rows": rows}, open(args.json, "w"), indent=1)
    names = [k for k in rows[0] if k != "tokens"]
    print("\n| tokens | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
    for row in rows:
        print(f"| {row['tokens']} | " + " | ".join(f"{row[k] / 1e6:.2f} MB" for k in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
