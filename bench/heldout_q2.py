"""q2 with kvsink, pfn:1 and pfn:4 on a text that is neither WikiText nor the
calibration text: perplexity, KL from the f16 cache and the paired KL
differences (fast matrix products for the cache and its reference alike).

    python bench/heldout_q2.py TEXT_FILE
e.g. the license texts Debian ships:
    cat /usr/share/common-licenses/{GPL-3,GFDL-1.3,Apache-2.0} > heldout.txt
"""
import sys, numpy as np
from kvsink_cpp.perplexity import open_llama, chunk_tokens, chunk_logprobs, scored_targets, PerplexityStats
from kvsink_cpp.models import default_model_path
M=str(default_model_path()); text=open(sys.argv[1],'rb').read()
ref=open_llama(M, 512, 2, type_k="f16", type_v="f16", sinks="none", matmul="q8")
toks=ref.tokenize(text, add_bos=True); n=len(toks)//512
chunks=[chunk_tokens(toks,512,i) for i in range(n)]
refs=[chunk_logprobs(ref,c) for c in chunks]
rs=PerplexityStats(); [rs.add(r, scored_targets(c)) for c,r in zip(chunks,refs)]
print(f"{n} chunks; f16 PPL {rs.ppl:.3f}")
res={}
for sinks in ("pfn:1","pfn:4","kvsink"):
    llm=open_llama(M,512,2,type_k="q2",type_v="q2",sinks=sinks,matmul="q8")
    st=PerplexityStats(); kl=[]; rows=[]
    for c,r in zip(chunks,refs):
        kl.append(st.add(chunk_logprobs(llm,c), scored_targets(c), r)); rows.append(llm.kv_cache_stats()["n_sinks"])
    res[sinks]=np.concatenate(kl)
    print(f"q2/{sinks}: PPL {st.ppl:.3f} ({100*(st.ppl/rs.ppl-1):+.1f}%), KL {res[sinks].mean():.4f}, rows {np.mean(rows):.1f}", flush=True)
for b in ("pfn:1","pfn:4"):
    d=res["kvsink"]-res[b]; print(f"KL(kvsink)-KL({b}) = {d.mean():+.4f} ± {d.std(ddof=1)/np.sqrt(len(d)):.4f}")
