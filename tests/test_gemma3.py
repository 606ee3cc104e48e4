"""Gemma 3 (gemma3 architecture) against the numpy forward pass (tests/numpy_llama.py):
random gemma3 models with a window of 16 positions, so that local layers
slide within a short test, and Gemma 3 270M itself (window 512) when it is in
the cache. Exact path first, then the fast path and quantized caches."""
from __future__ import annotations

import numpy as np
import pytest

from kvsink_cpp import Llama
from kvsink_cpp import chat_format

import synthetic
from kv_sim import KVSinkSim
from logits_check import EXACT, assert_logits_close, max_rel_diff, run
from numpy_llama import NumpyLlama

N_TOKENS = 48  # three windows of the synthetic models

# (writer keywords): head_dim 128 with one KV head; head_dim 256 with 4 query
# heads per KV head, Gemma 3 270M's shape; two KV heads with a per-layer
# pattern (array) and a final soft-cap (random logits reach ~750: a cap of 400
# bends them without flattening them into ties)
MODELS = {
    "hd128": dict(),
    "hd256-270m-shape": dict(head_dim=256, n_head=4, n_head_kv=1),
    "hd64-pattern-softcap": dict(head_dim=64, n_head=4, n_head_kv=2,
                                 swa_pattern=[True, False, True, True, True, True, False], softcap=400.0),
}


@pytest.fixture(scope="module", params=list(MODELS))
def synthetic_model(request, tmp_path_factory):
    path = synthetic.write_gemma3(tmp_path_factory.mktemp("gemma3") / "model.gguf", **MODELS[request.param])
    tokens = list(np.random.default_rng(2).integers(0, 320, size=N_TOKENS))
    ref = NumpyLlama(path)
    return path, ref, tokens, ref.forward(tokens)


@pytest.mark.parametrize("impl", ["auto", "scalar"])
def test_synthetic_gemma3_matches_numpy(synthetic_model, impl):
    path, _, tokens, want = synthetic_model
    assert_logits_close(run(path, tokens, impl=impl), want)
    assert_logits_close(run(path, tokens, batched=False, impl=impl), want)


def test_the_window_and_both_rope_bases_matter(tmp_path):
    """The comparison above would catch a missing window or a wrong base: each
    moves the logits by far more than its tolerance."""
    path = synthetic.write_gemma3(tmp_path / "model.gguf")
    tokens = list(np.random.default_rng(2).integers(0, 320, size=N_TOKENS))
    want = NumpyLlama(path).forward(tokens)
    variants = {"no window": dict(n_swa=0), "local base 1e6": dict(freq_base_swa=1e6),
                "global base 1e4": dict(freq_base=1e4)}
    for name, change in variants.items():
        ref = NumpyLlama(path)
        for key, value in change.items():
            setattr(ref, key, value)
        assert max_rel_diff(ref.forward(tokens), want) > 5e-3, name


def test_chunked_prefill_crosses_the_window(tmp_path):
    """Batches of 5 tokens: a batch's first query sees an earlier window
    than its last, so segments are skipped per query, not per batch."""
    path = synthetic.write_gemma3(tmp_path / "model.gguf")
    tokens = list(np.random.default_rng(5).integers(0, 320, size=N_TOKENS))
    want = NumpyLlama(path).forward(tokens)
    with Llama(str(path), n_ctx=64, n_batch=5, n_threads=2, logits_all=True, verbose=False, **EXACT) as llm:
        llm.eval(tokens)
        assert_logits_close(llm.scores[:N_TOKENS], want)


def test_default_path_stays_close_to_exact(synthetic_model):
    """8-bit products and a q8 cache (the defaults) against the exact path:
    a loose bound (measured: at most 4e-3 of the largest logit, the top-1
    token the same at every position)."""
    path, _, tokens, _ = synthetic_model
    exact = run(path, tokens)
    fast = run(path, tokens, matmul="q8", type_k="q8", type_v="q8", sinks="pfn:1")
    assert max_rel_diff(fast, exact) < 2e-2
    assert (fast.argmax(-1) == exact.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("kw,message", [
    (dict(swa_pattern=[True, False, True]), "sliding_window_pattern' must be a period or 7 bools"),
    (dict(omit=("blk.3.post_ffw_norm.weight",)), "required tensor 'blk.3.post_ffw_norm.weight' is missing"),
    (dict(omit=("blk.0.attn_k_norm.weight",)), "required tensor 'blk.0.attn_k_norm.weight' is missing"),
])
def test_malformed_gemma3_files_are_refused_with_the_reason(tmp_path, kw, message):
    from kvsink_cpp.errors import GGUFFormatError
    path = synthetic.write_gemma3(tmp_path / "model.gguf", **kw)
    with pytest.raises(GGUFFormatError, match=message):
        Llama(str(path), verbose=False)


# (type_k, type_v, kv_rotate, key per token, sinks)
CACHE_CASES = [("q8", "q8", "none", False, "none"), ("q4", "q4", "none", False, "pfn:1"),
               ("q4", "q4", "kv", False, "pfn:2"), ("q2", "q3", "kv", False, "pfn:1"),
               ("q4", "q2", "k", True, "pfn:1"), ("f16", "q4", "v", False, "none"),
               ("f16", "f16", "none", False, "pfn:1")]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "token-by-token"])
@pytest.mark.parametrize("type_k,type_v,rotate,per_token,sinks", CACHE_CASES)
def test_quantized_caches_match_the_cache_model(tmp_path, type_k, type_v, rotate, per_token, sinks, batched):
    """Every cache type, rotated or not, keys per channel or per token: the
    runtime against the numpy model of the cache (tests/kv_sim.py), with
    blocks of 8 so that blocks, sink rows and the window all slide past a
    local layer's window of 16; head_dim 256, one KV head."""
    path = synthetic.write_gemma3(tmp_path / "model.gguf", head_dim=256)
    ref = NumpyLlama(path)
    tokens = list(np.random.default_rng(4).integers(0, 320, size=N_TOKENS))
    block, recent, group = 8, 8, 32
    n_sinks = 0 if sinks == "none" else int(sinks[4:])
    sim = KVSinkSim(type_k, type_v, block, recent, group=group, sinks=set(range(n_sinks)), rotate=rotate,
                    rope=ref._rope, key_per_token=per_token)
    want = ref.forward_cached(tokens, sim, ubatch=block if batched else 1)
    got = run(path, tokens, batched=batched, type_k=type_k, type_v=type_v, sinks=sinks, kv_block=block,
              kv_recent=recent, kv_group=group, kv_rotate=rotate, kv_key_per_token=per_token)
    assert_logits_close(got, want)


# ---- Gemma 3 270M --------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma3_path():
    from kvsink_cpp.models import find_gemma3_model, gemma3_model_path
    path = find_gemma3_model()
    if path is None:
        pytest.skip(f"Gemma 3 270M not in the cache ({gemma3_model_path()}); run `python -m kvsink_cpp pull gemma3`")
    return path


TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning there was only the "
        "river, and the people who lived by the water learned to read the seasons from the "
        "colour of its banks. Every spring the floods came, and every autumn the fields were "
        "green again with new grass for the animals that the families kept near their homes "
        "along the long road to the city. ")


def tokenize(path, text, n):
    with Llama(str(path), vocab_only=True, verbose=False) as vocab:
        tokens = vocab.tokenize(text.encode())
    assert len(tokens) >= n
    return tokens[:n]


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_path):
    """The numpy model (dequantizing 270M weights takes a while: once per module)."""
    return NumpyLlama(gemma3_path)


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_270m_matches_numpy(gemma3_path, gemma3_reference):
    tokens = tokenize(gemma3_path, TEXT, 64)
    want = gemma3_reference.forward(tokens)
    with Llama(str(gemma3_path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False,
               **EXACT) as llm:
        llm.eval(tokens)
        assert_logits_close(llm.scores[:64], want)
        llm.reset()
        for t in tokens:
            llm.eval([t])
        assert_logits_close(llm.scores[:64], want)


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_270m_beyond_the_window_matches_numpy(gemma3_path, gemma3_reference):
    """600 tokens, past the 512-position window: every layer's residual
    stream of a batched pass, then the logits of 40 tokens decoded one at a
    time after a prefill (the split decode attention over > 512 keys)."""
    n, tail = 600, 40
    tokens = tokenize(gemma3_path, TEXT * 12, n)
    trace = {}
    want = gemma3_reference.forward(tokens, trace=trace, n_logits=tail)
    want_hidden = np.stack(trace["hidden"])
    with Llama(str(gemma3_path), n_ctx=640, n_batch=640, n_threads=2, verbose=False, **EXACT) as llm:
        hidden, _ = llm.trace(tokens)
        for il in range(len(hidden)):
            assert max_rel_diff(hidden[il], want_hidden[il]) < 1e-4, f"layer {il}"
        llm.reset()
        llm.eval(tokens[:n - tail])
        got = []
        for t in tokens[n - tail:]:
            llm.eval([t])
            got.append(llm.last_logits().copy())
    assert_logits_close(np.array(got), want)


@pytest.mark.model
def test_gemma3_270m_greedy_answer(gemma3_path):
    """The GGUF is the pretrained model (no chat template, no instruction
    tuning): it answers a question in the form it was trained on."""
    with Llama(str(gemma3_path), n_ctx=256, n_threads=2, verbose=False) as llm:
        out = llm("Question: What is the capital of France?\nAnswer:", max_tokens=4, temperature=0)
    assert out["choices"][0]["text"].strip().startswith("Paris")


@pytest.mark.model
def test_gemma3_270m_chat_uses_the_gemma_template(gemma3_path):
    """No template in the GGUF: the built-in gemma one, whose turn markers
    are single tokens of Gemma's vocabulary; a greedy chat reply comes back."""
    with Llama(str(gemma3_path), n_ctx=256, n_threads=2, verbose=False) as llm:
        assert llm.chat_formatter().template == chat_format.BUILTIN_TEMPLATES["gemma"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids, stop_ids = llm.chat_prompt_tokens(messages)
        # one <bos>, <start_of_turn> (105) twice, <end_of_turn> (106) once and as the stop token
        assert ids[:2] == [2, 105] and ids.count(2) == 1 and ids.count(105) == 2 and ids.count(106) == 1
        assert 106 in stop_ids
        reply = llm.create_chat_completion(messages, max_tokens=16, temperature=0)
    assert reply["choices"][0]["message"]["content"].strip()


def test_gemma_architectures_fall_back_to_the_gemma_template():
    meta = {"general.architecture": "gemma3", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    formatter = chat_format.from_metadata(meta)
    assert formatter.render([{"role": "user", "content": "hi"}]) == \
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert "<end_of_turn>" in formatter.stop_strings
    llama = chat_format.from_metadata({**meta, "general.architecture": "llama"})
    assert llama.template == chat_format.BUILTIN_TEMPLATES["chatml"]
