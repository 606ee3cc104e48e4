"""qwen3, phi3, llama with a sliding window and Llama 3.x RoPE scaling against
the numpy forward pass (tests/numpy_llama.py), on random synthetic GGUFs.

Exact path first (batched and token by token, AVX2 and scalar kernels), then
why those comparisons would catch a bug, the default fast path (fused weights
packed per part), quantized caches against the numpy model of the cache
(tests/kv_sim.py), and the files that must be refused with their reason.
Windows are 16 positions over 48 tokens, so that they slide."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from kvsink_cpp import GGUFFormatError, Llama, UnsupportedError
from kvsink_cpp import chat_format

import synthetic
from kv_sim import KVSinkSim
from logits_check import EXACT, assert_logits_close, max_rel_diff, run
from numpy_llama import NumpyLlama

N_TOKENS = 48  # three windows of 16

LLAMA_TYPES = {"embd": T.Q8_0, "q": T.Q4_0, "k": T.Q5_1, "v": T.Q5_0, "o": T.Q4_0,
               "gate": T.Q4_0, "up": T.Q5_0, "down": T.Q4_0, "out": T.F16}


def write_llama_window(path, **kw):
    """llama, Mistral's convention: a window of 16 on every layer, with linear
    scaling and Llama 3.1 frequency factors, which local layers must take too."""
    return synthetic.write_model(path, "llama", LLAMA_TYPES, sliding_window=16, rope_scale=2.0,
                                 rope_freqs=True, weight_scale=0.01, **kw)


def write_llama3_scaling(path, **kw):
    """llama declaring rope.scaling.type "llama3" (factor 8) with its rope_freqs.weight."""
    return synthetic.write_model(path, "llama", LLAMA_TYPES, rope_scale=8.0, rope_scaling_type="llama3",
                                 rope_freqs=True, weight_scale=0.01, **kw)


MODELS = {
    "qwen3-hd128-tied": lambda p: synthetic.write_qwen3(p),
    "qwen3-hd64-8heads-untied-kquants": lambda p: synthetic.write_qwen3(
        p, synthetic.QWEN3_KQUANT_TYPES, head_dim=64, n_head=8, n_head_kv=2, tied=False, weight_scale=0.05),
    "phi3-window16": lambda p: synthetic.write_phi3(p),
    "phi3-gqa-no-window": lambda p: synthetic.write_phi3(p, n_head_kv=2, n_swa=None),
    "llama-window16-scaled": write_llama_window,
    "llama-llama3-scaling": write_llama3_scaling,
}


def tokens_for(seed=2):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 320, size=N_TOKENS)]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    path = MODELS[request.param](tmp_path_factory.mktemp("arch") / "model.gguf")
    tokens = tokens_for()
    return path, tokens, NumpyLlama(path).forward(tokens)


@pytest.mark.parametrize("impl", ["auto", "scalar"])
def test_exact_path_matches_numpy(model, impl):
    path, tokens, want = model
    assert_logits_close(run(path, tokens, impl=impl), want)
    assert_logits_close(run(path, tokens, batched=False, impl=impl), want)


def test_chunked_prefill_crosses_the_window(tmp_path):
    """Batches of 5 tokens on a model whose every layer is local."""
    path = synthetic.write_phi3(tmp_path / "model.gguf")
    tokens = tokens_for(5)
    want = NumpyLlama(path).forward(tokens)
    with Llama(str(path), n_ctx=64, n_batch=5, n_threads=2, logits_all=True, verbose=False, **EXACT) as llm:
        llm.eval(tokens)
        assert_logits_close(llm.scores[:N_TOKENS], want)


# ---- the comparisons above would catch a bug ----------------------------------

def _no_qk_norm(ref):
    for name in [n for n in ref.w if n.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))]:
        del ref.w[name]


def _gate_up_swapped(ref):
    for name in [n for n in ref.w if n.endswith("ffn_up.weight")]:
        gate, up = np.split(ref.w[name], 2, axis=0)
        ref.w[name] = np.concatenate([up, gate])


def _factor_as_linear(ref):
    ref.freq_scale = 1.0 / 8.0


# (writer, {variant: how the reference is broken})
BUGS = {
    "qwen3": (synthetic.write_qwen3, {
        "no q/k norm": _no_qk_norm,
        "adjacent RoPE pairs": lambda ref: setattr(ref, "neox", False),
    }),
    "phi3": (synthetic.write_phi3, {
        "no window": lambda ref: setattr(ref, "n_swa", 0),
        "window 15": lambda ref: setattr(ref, "n_swa", 15),
        "adjacent RoPE pairs": lambda ref: setattr(ref, "neox", False),
        "gate and up swapped": _gate_up_swapped,
    }),
    "llama-window": (write_llama_window, {
        "no window": lambda ref: setattr(ref, "n_swa", 0),
        "window 17": lambda ref: setattr(ref, "n_swa", 17),
        "local layers rotate like gemma3's": lambda ref: setattr(ref, "own_local_rope", True),
    }),
    "llama3-scaling": (write_llama3_scaling, {
        "factor applied as linear scaling too": _factor_as_linear,
        "no frequency factors": lambda ref: setattr(ref, "rope_freqs", None),
    }),
}


@pytest.mark.parametrize("arch", list(BUGS))
def test_the_comparison_catches_a_wrong_model(tmp_path, arch):
    """Each plausible mistake moves the logits by far more than the exact
    path's tolerance of 1e-3 of the largest logit (measured: from 1.7e-2,
    qwen3 with adjacent RoPE pairs, to 0.71, phi3's gate and up swapped)."""
    writer, variants = BUGS[arch]
    path = writer(tmp_path / "model.gguf")
    tokens = tokens_for()
    want = NumpyLlama(path).forward(tokens)
    for name, breaks in variants.items():
        ref = NumpyLlama(path)
        breaks(ref)
        assert max_rel_diff(ref.forward(tokens), want) > 1e-2, name


def test_qwen3_heads_wider_than_n_embd_over_n_head(tmp_path):
    """q is n_head * key_length = 512 wide on n_embd 256: attn_q has 512 rows
    and attn_output 512 columns; a runtime taking head_dim = n_embd / n_head
    would not even accept the shapes."""
    path = synthetic.write_qwen3(tmp_path / "model.gguf")
    from gguf import GGUFReader
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in GGUFReader(path).tensors}
    assert shapes["blk.0.attn_q.weight"] == (256, 512) and shapes["blk.0.attn_output.weight"] == (512, 256)
    with Llama(str(path), n_ctx=16, verbose=False, **EXACT) as llm:
        llm.eval([1, 2, 3])


# ---- fast path and quantized caches --------------------------------------------

@pytest.mark.parametrize("name", ["qwen3-hd128-tied", "phi3-window16", "phi3-gqa-no-window",
                                  "llama-window16-scaled"])
def test_default_path_stays_close_to_numpy(tmp_path, name):
    """The defaults (8-bit activations with packed weights, fused phi3 weights
    packed per part, a q8 cache; sinks pfn:1, what kvsink falls back to
    without a profile) against numpy's exact forward: a loose bound (measured:
    at most 2.3e-2 of the largest logit, phi3; the same top token everywhere)
    that a misplaced part of a fused weight or a wrong window breaks many
    times over (test_the_comparison_catches_a_wrong_model: 0.2 to 0.7)."""
    path = MODELS[name](tmp_path / "model.gguf")
    tokens = tokens_for()
    want = NumpyLlama(path).forward(tokens)
    for batched in (True, False):
        got = run(path, tokens, batched=batched, matmul=None, type_k=None, type_v=None, sinks="pfn:1")
        assert max_rel_diff(got, want) < 5e-2
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def unfuse_as_qwen2(src, dst):
    """The same weights as a qwen2 file: attn_qkv split into attn_q/k/v,
    ffn_up into ffn_gate and ffn_up (rows cut from the quantized data as
    stored), zero q/k/v biases (qwen2 requires them). Without a window, phi3
    and qwen2 compute the same function."""
    import gguf
    reader = gguf.GGUFReader(src)
    get = {f.name: f.contents() for f in reader.fields.values()}
    hd = get["phi3.embedding_length"] // get["phi3.attention.head_count"]
    q_dim, kv_dim = get["phi3.attention.head_count"] * hd, get["phi3.attention.head_count_kv"] * hd
    n_ff = get["phi3.feed_forward_length"]
    w = gguf.GGUFWriter(str(dst), "qwen2")
    for field in reader.fields.values():
        if field.name.startswith("phi3."):
            w.add_key_value("qwen2." + field.name[5:], field.contents(), field.types[0])
    for t in reader.tensors:
        rows = np.asarray(t.data)
        if t.name.endswith("attn_qkv.weight"):
            p = t.name[:-len("attn_qkv.weight")]
            for part, r0, n in (("attn_q", 0, q_dim), ("attn_k", q_dim, kv_dim), ("attn_v", q_dim + kv_dim, kv_dim)):
                w.add_tensor(p + part + ".weight", rows[r0:r0 + n].copy(), raw_dtype=t.tensor_type)
                w.add_tensor(p + part + ".bias", np.zeros(n, np.float32))
        elif t.name.endswith("ffn_up.weight"):
            p = t.name[:-len("ffn_up.weight")]
            w.add_tensor(p + "ffn_gate.weight", rows[:n_ff].copy(), raw_dtype=t.tensor_type)
            w.add_tensor(p + "ffn_up.weight", rows[n_ff:].copy(), raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, rows, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("impl", ["auto", "scalar"])
def test_fused_weights_on_the_fast_path_equal_separate_ones(tmp_path, impl):
    """phi3's fused matrices, packed and multiplied per part with 8-bit
    activations, give exactly the logits of the same rows stored as separate
    matrices (qwen2 with zero biases, itself checked against numpy above and
    in test_forward.py): batched, token by token, and with a quantized cache."""
    fused = synthetic.write_phi3(tmp_path / "phi3.gguf", n_head_kv=2, n_swa=None)
    separate = unfuse_as_qwen2(fused, tmp_path / "qwen2.gguf")
    tokens = tokens_for()
    np.testing.assert_allclose(NumpyLlama(separate).forward(tokens), NumpyLlama(fused).forward(tokens),
                               rtol=0, atol=1e-9)
    for kw in (dict(), dict(batched=False), dict(type_k="q4", type_v="q4")):
        opts = dict(matmul="q8", impl=impl, **kw)
        np.testing.assert_array_equal(run(fused, tokens, **opts), run(separate, tokens, **opts))


# (model, type_k, type_v, kv_rotate, sinks): heads of 96 (phi3) cannot be rotated
CACHE_CASES = [("qwen3-hd128-tied", "q4", "q4", "kv", "pfn:1"), ("qwen3-hd128-tied", "q8", "q2", "none", "none"),
               ("phi3-window16", "q4", "q4", "none", "pfn:1"), ("phi3-window16", "q2", "q8", "none", "pfn:2"),
               ("llama-window16-scaled", "q4", "q4", "kv", "pfn:1")]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "token-by-token"])
@pytest.mark.parametrize("name,type_k,type_v,rotate,sinks", CACHE_CASES)
def test_quantized_caches_match_the_cache_model(tmp_path, name, type_k, type_v, rotate, sinks, batched):
    """The runtime's quantized cache against the numpy model of its arithmetic,
    blocks of 8 sliding past windows of 16."""
    path = MODELS[name](tmp_path / "model.gguf")
    ref = NumpyLlama(path)
    tokens = tokens_for(4)
    block, recent, group = 8, 8, 32
    n_sinks = 0 if sinks == "none" else int(sinks[4:])
    sim = KVSinkSim(type_k, type_v, block, recent, group=group, sinks=set(range(n_sinks)), rotate=rotate,
                    rope=ref._rope)
    want = ref.forward_cached(tokens, sim, ubatch=block if batched else 1)
    got = run(path, tokens, batched=batched, type_k=type_k, type_v=type_v, sinks=sinks, kv_block=block,
              kv_recent=recent, kv_group=group, kv_rotate=rotate)
    assert_logits_close(got, want)


# ---- refused files ---------------------------------------------------------------

@pytest.mark.parametrize("writer,error,message", [
    (lambda p: synthetic.write_model(p, "llama", LLAMA_TYPES, rope_scale=4.0, rope_scaling_type="yarn"),
     UnsupportedError, "rope scaling type 'yarn' is not supported"),
    (lambda p: synthetic.write_model(p, "llama", LLAMA_TYPES, rope_scale=4.0, rope_scaling_type="longrope"),
     UnsupportedError, "rope scaling type 'longrope' is not supported"),
    (lambda p: synthetic.write_model(p, "qwen3", synthetic.QWEN3_TYPES, head_dim=128, qk_norm=True,
                                     rope_scale=4.0, rope_scaling_type="yarn"),
     UnsupportedError, "rope scaling type 'yarn' is not supported"),
    (lambda p: synthetic.write_phi3(p, long_rope=True), UnsupportedError, "LongRoPE"),
    (lambda p: synthetic.write_model(p, "llama", LLAMA_TYPES, rope_scale=8.0, rope_scaling_type="llama3"),
     GGUFFormatError, "'llama3' needs its frequency factors, tensor 'rope_freqs.weight'"),
    (lambda p: synthetic.write_qwen3(p, omit=("blk.1.attn_k_norm.weight",)),
     GGUFFormatError, "required tensor 'blk.1.attn_k_norm.weight' is missing"),
    (lambda p: synthetic.write_model(p, "phi3", synthetic.PHI3_TYPES | {"k": T.Q4_0, "v": T.Q4_0, "gate": T.Q4_1},
                                     n_embd=384, n_head=4),
     GGUFFormatError, r"tensor 'blk.0.ffn_up.weight' has shape \[384, 512, 1, 1\], expected \[384, 1024\]"),
    (lambda p: synthetic.write_model(p, "gpt2", LLAMA_TYPES),
     UnsupportedError, r"architecture 'gpt2' is not supported \(llama, qwen2, qwen3, phi3, gemma3 are\)"),
], ids=["yarn", "longrope", "qwen3-yarn", "phi3-longrope-tensors", "llama3-without-factors",
        "qwen3-no-k-norm", "phi3-unfused-ffn", "unsupported-arch"])
def test_refused_with_the_reason(tmp_path, writer, error, message):
    path = tmp_path / "model.gguf"
    writer(path)
    with pytest.raises(error, match=message):
        Llama(str(path), verbose=False)


def test_phi3_with_separate_q_k_v_matches_numpy(tmp_path):
    """phi3 files may carry attn_q/k/v apart (llama.cpp's loader takes both layouts)."""
    types = synthetic.PHI3_TYPES | {"k": T.Q8_0, "v": T.Q4_1}
    path = synthetic.write_phi3(tmp_path / "model.gguf", types, fused=("gate_up",))
    tokens = tokens_for()
    want = NumpyLlama(path).forward(tokens)
    assert_logits_close(run(path, tokens), want)
    assert_logits_close(run(path, tokens, batched=False), want)


# ---- chat templates ----------------------------------------------------------------

META = {"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<|endoftext|>"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 3}


def test_phi3_files_without_a_template_use_phi3s_format():
    formatter = chat_format.from_metadata({**META, "general.architecture": "phi3"})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert formatter.render(messages) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert formatter.stop_strings[0] == "<|end|>"
    assert chat_format.arch_template_name("phi3") == "phi3"


def test_qwen3_files_without_a_template_use_chatml():
    formatter = chat_format.from_metadata({**META, "general.architecture": "qwen3"})
    assert formatter.template == chat_format.BUILTIN_TEMPLATES["chatml"]
    assert formatter.render([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
