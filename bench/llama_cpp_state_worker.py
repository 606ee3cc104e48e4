"""Runs under the llama.cpp environment: evaluate the given token ids and
report the size of llama.cpp's saved state (llama_state_get_size via
llama-cpp-python's save_state) for each KV cache type asked for."""
import json
import sys

from llama_cpp import Llama

model, ids_file, n_ctx, out = sys.argv[1:5]
ids = json.load(open(ids_file))
GGML = {"f16": 1, "q8_0": 8, "q4_0": 2}
sizes = {}
for name in sys.argv[5:]:
    # flash attention: llama.cpp quantizes the V cache only with it
    llm = Llama(model_path=model, n_ctx=int(n_ctx), n_batch=512, type_k=GGML[name], type_v=GGML[name],
                flash_attn=True, verbose=False)
    llm.eval(ids)
    state = llm.save_state()
    sizes[name] = {"llama_state_bytes": state.llama_state_size,
                   "with_scores_bytes": state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes}
    llm.close()
json.dump(sizes, open(out, "w"))
