"""Runs under the llama.cpp environment: evaluate perplexity chunks with
llama.cpp's own KV cache types and save the logits of the scored positions.

    llama_cpp_ppl_worker.py MODEL CHUNKS.npy N_THREADS OUT_DIR TYPE [TYPE ...]

CHUNKS.npy holds the token ids, one chunk of n_ctx per row, exactly as the
caller evaluates them (BOS already in place); each chunk starts from an empty
cache. For each TYPE (f16, q8_0, q4_0), OUT_DIR/TYPE.npz gets `logits`,
float32 (n_chunks, n_ctx - 1 - n_ctx/2, n_vocab): the rows after positions
n_ctx/2 .. n_ctx-2, the ones llama-perplexity scores.
"""
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


def scored_logits(llm, chunks, first):
    out = np.empty((len(chunks), chunks.shape[1] - 1 - first, llm.n_vocab()), dtype=np.float32)
    for i, chunk in enumerate(chunks):
        llm.reset()  # the next eval drops every cached position
        llm.eval(chunk.tolist())
        out[i] = llm.scores[first:chunks.shape[1] - 1]
    return out


def main():
    model, chunks_file, n_threads, out_dir, *types = sys.argv[1:]
    chunks = np.load(chunks_file)
    n_ctx = chunks.shape[1]
    for name in types:
        # a quantized V cache needs flash attention in llama.cpp
        llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=int(n_threads), logits_all=True,
                    type_k=GGML_TYPES[name], type_v=GGML_TYPES[name], flash_attn=True, verbose=False)
        np.savez(f"{out_dir}/{name}.npz", logits=scored_logits(llm, chunks, n_ctx // 2))
        llm.close()


if __name__ == "__main__":
    main()
