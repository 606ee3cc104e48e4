"""Runs under the llama.cpp environment: tokenize a text with llama.cpp, evaluate
it in one batch and save the token ids and every position's logits."""
import sys

import numpy as np
from llama_cpp import Llama

model, text_file, n_tokens, n_threads, out = sys.argv[1:6]
llm = Llama(model_path=model, n_ctx=int(n_tokens), n_batch=int(n_tokens), n_threads=int(n_threads),
            logits_all=True, verbose=False)
text = open(text_file, encoding="utf-8").read()
tokens = llm.tokenize(text.encode("utf-8"), add_bos=False)[: int(n_tokens)]
llm.eval(tokens)
np.savez(out, tokens=np.array(tokens, dtype=np.int32), logits=llm.scores[: len(tokens)].astype(np.float32))
