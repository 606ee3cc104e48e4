"""Runs under the llama.cpp environment: greedy continuations of given prompt
token ids with llama.cpp's defaults (f16 KV cache), one fresh cache per
prompt. Reads {"prompts": [[ids]], "stop": [ids], "max_tokens": n} and writes
{"answers": [[ids]]}."""
import json
import sys

from llama_cpp import Llama

model, job_file, n_ctx, n_threads, out = sys.argv[1:6]
job = json.load(open(job_file))
llm = Llama(model_path=model, n_ctx=int(n_ctx), n_threads=int(n_threads), verbose=False)
stop = set(job["stop"])
answers = []
for prompt in job["prompts"]:
    answer = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token in stop or len(answer) == job["max_tokens"]:
            break
        answer.append(int(token))
    answers.append(answer)
json.dump({"answers": answers}, open(out, "w"))
