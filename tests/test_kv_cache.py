"""The KVSink KV cache: integer groups, fused attention over sink rows,
quantized blocks and the fp16 window, sink policies and ring eviction."""
from __future__ import annotations

import numpy as np
import pytest

from kvsink_cpp import Llama
from kvsink_cpp._native import check, ffi, lib

import synthetic
from kv_sim import BITS, KVSinkSim, quantize_group
from numpy_llama import NumpyLlama

# the layout the plain numpy cache model (KVSinkSim without rotate) describes
PLAIN = dict(kv_rotate="none", kv_group=32, matmul="f32")
KV_IDS = {"q8": lib.KVS_KV_Q8, "q4": lib.KVS_KV_Q4, "q3": lib.KVS_KV_Q3, "q2": lib.KVS_KV_Q2}


def roundtrip(kind, x, impl=lib.KVS_IMPL_SCALAR):
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    check(lib.kvs_kv_roundtrip(KV_IDS[kind], impl, ffi.from_buffer("float[]", x), len(x),
                               ffi.from_buffer("float[]", y, require_writable=True)))
    return y


@pytest.mark.parametrize("kind", list(KV_IDS))
@pytest.mark.parametrize("n", [8, 32, 64])
def test_group_roundtrip_error_is_within_half_a_step(kind, n):
    rng = np.random.default_rng(n)
    for scale in (1e-3, 1.0, 300.0):
        x = (rng.normal(size=n) * scale).astype(np.float32)
        y = roundtrip(kind, x)
        step = (x.max() - x.min()) / ((1 << BITS[kind]) - 1)
        # half a step, plus fp16 rounding of the scale and zero point
        bound = 0.5 * step * (1 + 2e-3) + 1e-3 * np.abs(x).max() + 1e-7
        assert np.abs(y - x).max() <= bound
        np.testing.assert_array_equal(y, quantize_group(x, BITS[kind]))  # the numpy model is exact


@pytest.mark.parametrize("kind", list(KV_IDS))
def test_avx2_dequantization_equals_scalar(kind):
    if not lib.kvs_cpu_has_avx2():
        pytest.skip("CPU lacks AVX2 (or the library was built without the AVX2 kernels)")
    rng = np.random.default_rng(7)
    for n in (8, 32, 64, 40):
        x = rng.normal(size=n).astype(np.float32) * 5
        np.testing.assert_array_equal(roundtrip(kind, x, lib.KVS_IMPL_AVX2), roundtrip(kind, x))


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_hadamard_kernels_equal_the_matrix_and_each_other(n):
    from kv_sim import hadamard
    x = np.random.default_rng(n).normal(size=n).astype(np.float32) * 10
    out = {}
    impls = [lib.KVS_IMPL_SCALAR] + ([lib.KVS_IMPL_AVX2] if lib.kvs_cpu_has_avx2() else [])
    for impl in impls:
        y = x.copy()
        check(lib.kvs_hadamard(impl, n, ffi.from_buffer("float[]", y, require_writable=True)))
        out[impl] = y
        np.testing.assert_allclose(y, hadamard(n) @ x.astype(np.float64), rtol=0, atol=1e-5 * np.abs(x).sum())
        twice = y.copy()
        check(lib.kvs_hadamard(impl, n, ffi.from_buffer("float[]", twice, require_writable=True)))
        np.testing.assert_allclose(twice, x, rtol=0, atol=1e-5 * np.abs(x).max())  # its own inverse
    for y in out.values():
        np.testing.assert_array_equal(y, out[lib.KVS_IMPL_SCALAR])  # the AVX2 twin rounds as the scalar one
    with pytest.raises(ValueError, match="power of two"):
        check(lib.kvs_hadamard(lib.KVS_IMPL_SCALAR, 48, ffi.new("float[]", 48)))


def test_constant_group_is_exact_up_to_fp16():
    x = np.full(32, 3.25, np.float32)
    np.testing.assert_array_equal(roundtrip("q2", x), x)


def test_roundtrip_rejects_float_types():
    with pytest.raises(ValueError, match="not an integer KV type"):
        check(lib.kvs_kv_roundtrip(lib.KVS_KV_F16, 0, ffi.new("float[]", 4), 4, ffi.new("float[]", 4)))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = synthetic.write_qwen2_legacy(tmp_path_factory.mktemp("kv") / "qwen2.gguf")
    return path, NumpyLlama(path)


CASES = [("q4", "q4", "pfn:2", "auto"), ("q2", "q3", "pfn:1", "auto"), ("q8", "q2", "none", "auto"),
         ("f16", "q4", "pfn:3", "auto"), ("q4", "q2", "pfn:2", "scalar")]


@pytest.mark.parametrize("type_k,type_v,sinks,impl", CASES)
def test_attention_over_sinks_blocks_and_window_matches_numpy(qwen, type_k, type_v, sinks, impl):
    path, ref = qwen
    tokens = list(np.random.default_rng(4).integers(0, 320, size=60))
    block, recent = 8, 8
    n_sinks = 0 if sinks == "none" else int(sinks[4:])
    sim = KVSinkSim(type_k, type_v, block, recent, group=32, sinks=set(range(n_sinks)))
    want = ref.forward_cached(tokens, sim, ubatch=block)
    with Llama(str(path), **PLAIN, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, impl=impl,
               type_k=type_k, type_v=type_v, sinks=sinks, kv_block=block, kv_recent=recent) as llm:
        llm.eval(tokens)
        got = llm.scores[:60].copy()
        assert llm.kv_cache_stats()["n_sinks"] == n_sinks
    tol = 1e-3 * np.abs(want).max()
    assert np.abs(got - want).max() <= tol
    # the quantization is real: an exact cache gives other logits
    exact = ref.forward(tokens)
    assert np.abs(exact - want).max() > 10 * np.abs(got - want).max()


DECODE_CASES = [("q4", "q4", "pfn:2", "auto"), ("q4", "q4", "pfn:2", "scalar"), ("q2", "q8", "pfn:3", "auto"),
                ("q8", "q2", "none", "auto"), ("q3", "q3", "pfn:1", "auto"), ("f16", "q4", "pfn:1", "auto"),
                ("f32", "f32", "none", "auto"), ("f16", "f16", "pfn:2", "scalar")]


@pytest.mark.parametrize("type_k,type_v,sinks,impl", DECODE_CASES)
def test_token_by_token_decode_over_blocks_matches_numpy(qwen, type_k, type_v, sinks, impl):
    """Decoding one token at a time takes the split attention (parts of the
    keys merged afterwards, value sums straight from the quantized groups):
    it must give the cache's reference logits at every step."""
    path, ref = qwen
    n = 80
    tokens = list(np.random.default_rng(6).integers(0, 320, size=n))
    block, recent = 32, 8
    n_sinks = 0 if sinks == "none" else int(sinks[4:])
    if type_k == "f32":  # an exact cache (f32 window and blocks): the plain forward pass
        want = ref.forward(tokens)
    else:
        sim = KVSinkSim(type_k, type_v, block, recent, group=32, sinks=set(range(n_sinks)))
        want = ref.forward_cached(tokens, sim, ubatch=1)
    got = []
    with Llama(str(path), **PLAIN, n_ctx=128, n_threads=2, verbose=False, impl=impl, type_k=type_k, type_v=type_v,
               sinks=sinks, kv_block=block, kv_recent=recent) as llm:
        for tok in tokens:
            llm.eval([int(tok)])
            got.append(llm.last_logits().copy())
    got = np.array(got)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_sink_rows_are_kept_exact(qwen):
    """With sinks, the sink tokens' K/V are fp16 rows; without, they are quantized."""
    path, ref = qwen
    tokens = list(np.random.default_rng(5).integers(0, 320, size=48))
    results = {}
    for sinks in ("pfn:4", "none"):
        sim = KVSinkSim("q2", "q2", 8, 8, 32, sinks=set(range(4)) if sinks != "none" else set())
        want = ref.forward_cached(tokens, sim, ubatch=8)
        with Llama(str(path), **PLAIN, n_ctx=64, n_threads=1, logits_all=True, verbose=False, type_k="q2", type_v="q2",
                   sinks=sinks, kv_block=8, kv_recent=8) as llm:
            llm.eval(tokens)
            results[sinks] = (llm.scores[:48].copy(), want)
    for got, want in results.values():
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert np.abs(results["pfn:4"][0] - results["none"][0]).max() > 1e-3


def _with_profile(path, tmp_path, ref, tokens, layer, channels, share):
    """A copy of the model with a sink profile that predicts about `share` of
    the tokens (threshold from the exact forward pass's hidden states)."""
    from kvsink_cpp.profile import SinkProfile, write_profile
    trace = {}
    ref.forward(tokens, trace=trace)
    scores = np.sort(np.abs(trace["hidden"][layer][:, channels]).max(axis=1))
    cut = int(len(scores) * (1 - share))
    threshold = float(np.sqrt(scores[cut - 1] * scores[cut]))  # between two tokens, not on one
    out = tmp_path / "profiled.gguf"
    write_profile(path, out, SinkProfile(layer=layer, channels=channels, threshold=threshold), progress=False)
    return out, threshold


def _assert_well_apart(scores: dict) -> None:
    """float32 (C) and float64 (numpy) must agree on every comparison made."""
    values = np.sort(np.array([s for s in scores.values() if np.isfinite(s)]))
    assert len(values) > 4
    assert np.diff(np.log(values)).min() > 1e-5


@pytest.mark.parametrize("type_k,type_v,capacity,ubatch,impl,rotate", [
    ("q4", "q2", 3, 8, "auto", "none"), ("q2", "q4", 4, 1, "auto", "none"), ("q3", "q3", 2, 8, "scalar", "none"),
    ("f16", "q4", 3, 8, "auto", "none"), ("q3", "q4", 3, 8, "auto", "kv"), ("q4", "q2", 2, 1, "auto", "kv")])
def test_kvsink_n_keeps_the_strongest_sinks_and_requantizes_the_rest(qwen, tmp_path, type_k, type_v, capacity,
                                                                     ubatch, impl, rotate):
    """kvsink:N: position 0 pinned, then the highest-scoring predicted sinks; a
    stronger sink displaces the weakest row, whose token is quantized with its
    block again. Logits, sink positions and the dropped count match the sim."""
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, 320, size=72)]
    layer, channels = 0, [3, 17]
    profiled, threshold = _with_profile(path, tmp_path, ref, tokens, layer, channels, share=0.35)
    block, recent = 8, 8
    sim = KVSinkSim(type_k, type_v, block, recent, group=32, sinks={0}, capacity=capacity,
                    profile=(layer, channels, threshold), rotate=rotate, rope=ref._rope)
    want = ref.forward_cached(tokens, sim, ubatch=ubatch)
    predicted = {p: s for p, s in sim.scores.items() if p != 0}
    assert all(abs(np.log(s)) > 1e-4 for s in predicted.values())
    _assert_well_apart(predicted)
    assert sim.dropped > 0 and len(sim.table) == capacity  # the rule was exercised
    with Llama(str(profiled), n_ctx=128, n_batch=ubatch, n_threads=2, logits_all=True, verbose=False, impl=impl,
               type_k=type_k, type_v=type_v, sinks=f"kvsink:{capacity}", kv_block=block, kv_recent=recent,
               kv_rotate=rotate, kv_group=32, matmul="f32") as llm:
        llm.eval(tokens)
        got = llm.scores[:len(tokens)].copy()
        stats = llm.kv_cache_stats()
    assert stats["sink_positions"] == sim.table and stats["sink_positions"][0] == 0
    assert stats["n_sinks_dropped"] == sim.dropped and stats["sink_capacity"] == capacity
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_plain_kvsink_keeps_every_predicted_sink(qwen, tmp_path):
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, 320, size=72)]
    profiled, threshold = _with_profile(path, tmp_path, ref, tokens, 0, [3, 17], share=0.3)
    sim = KVSinkSim("q4", "q4", 8, 8, group=32, sinks={0}, profile=(0, [3, 17], threshold))
    want = ref.forward_cached(tokens, sim, ubatch=8)
    assert all(abs(np.log(s)) > 1e-4 for s in sim.scores.values())
    with Llama(str(profiled), **PLAIN, n_ctx=128, n_batch=8, n_threads=2, logits_all=True, verbose=False, type_k="q4",
               type_v="q4", kv_block=8, kv_recent=8) as llm:
        llm.eval(tokens)
        stats = llm.kv_cache_stats()
        assert np.abs(llm.scores[:72] - want).max() <= 1e-3 * np.abs(want).max()
    assert stats["sink_capacity"] == 64 and stats["n_sinks_dropped"] == 0
    assert stats["sink_positions"] == sim.table and len(sim.table) > 10


def test_sinks_of_evicted_blocks_give_way_and_count_as_evicted(qwen, tmp_path):
    """A sink row whose block the ring evicted is forgotten when a stronger
    sink needs its row: the cache's positions stay consistent (every kept
    token has one), and the counts add up."""
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(9).integers(0, 320, size=200)]
    profiled, _ = _with_profile(path, tmp_path, ref, tokens[:72], 0, [3, 17], share=0.35)
    with Llama(str(profiled), n_ctx=32, n_batch=8, n_threads=2, verbose=False, type_k="q4", type_v="q4",
               sinks="kvsink:3", kv_block=8, kv_recent=8, kv_ring=True) as llm:
        llm.eval(tokens)
        stats = llm.kv_cache_stats()
        assert np.isfinite(llm.last_logits()).all()
    assert stats["sink_positions"][0] == 0 and stats["n_sinks"] == 3 and stats["n_sinks_dropped"] > 0
    assert stats["n_evicted"] > 100


def test_bad_sink_options(qwen):
    path, _ = qwen
    for sinks in ("kvsink:0", "kvsink:x", "pfn:-1"):
        with pytest.raises(ValueError, match="sinks|kvsink"):
            Llama(str(path), verbose=False, sinks=sinks)


ROTATE_CASES = [("q4", "q4", "kv", "pfn:2", 8, "auto"), ("q2", "q3", "k", "pfn:1", 8, "scalar"),
                ("q3", "q2", "v", "none", 8, "auto"), ("q4", "q2", "kv", "pfn:2", 1, "auto"),
                ("q2", "q4", "kv", "pfn:1", 1, "scalar"), ("f16", "q4", "kv", "pfn:1", 1, "auto")]


@pytest.mark.parametrize("type_k,type_v,rotate,sinks,ubatch,impl", ROTATE_CASES)
def test_rotated_blocks_match_numpy(qwen, type_k, type_v, rotate, sinks, ubatch, impl):
    """kv_rotate: keys stored as H (RoPE by the offset in the block) k and
    values as H v before quantizing; attention must give the logits of a cache
    whose blocks hold exactly those round trips, rotated back (batched prefill
    and token-by-token decode)."""
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(11).integers(0, 320, size=56)]
    block, recent = 8, 8
    n_sinks = 0 if sinks == "none" else int(sinks[4:])
    sim = KVSinkSim(type_k, type_v, block, recent, group=32, sinks=set(range(n_sinks)), rotate=rotate,
                    rope=ref._rope)
    want = ref.forward_cached(tokens, sim, ubatch=ubatch)
    with Llama(str(path), n_ctx=64, n_batch=ubatch, n_threads=2, logits_all=True, verbose=False, impl=impl,
               type_k=type_k, type_v=type_v, sinks=sinks, kv_block=block, kv_recent=recent, kv_rotate=rotate,
               kv_group=32, matmul="f32") as llm:
        for start in range(0, len(tokens), ubatch):
            llm.eval(tokens[start:start + ubatch])
        got = llm.scores[:len(tokens)].copy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # the rotation is real: without it the cache gives other logits
    plain = ref.forward_cached(tokens, KVSinkSim(type_k, type_v, block, recent, 32, set(range(n_sinks))), ubatch)
    assert np.abs(plain - want).max() > 10 * np.abs(got - want).max()


def test_rotation_needs_a_power_of_two_head(tmp_path):
    from kvsink_cpp import UnsupportedError
    path = synthetic.write_model(tmp_path / "hd48.gguf", "llama", {k: synthetic.T.F16 for k in
                                 ("embd", "q", "k", "v", "o", "gate", "up", "down", "out")}, n_embd=192, n_head=4)
    with pytest.raises(UnsupportedError, match="power-of-two head_dim"):
        Llama(str(path), verbose=False, type_k="q4", type_v="q4", kv_rotate="kv")
    with pytest.raises(ValueError, match="kv_rotate"):
        Llama(str(path), verbose=False, kv_rotate="yes")


def test_cache_bytes_per_token(qwen):
    path, _ = qwen
    sizes = {}
    for kind in ("f32", "f16", "q8", "q4", "q3", "q2"):
        with Llama(str(path), n_ctx=64, verbose=False, type_k=kind, type_v=kind) as llm:
            sizes[kind] = llm.kv_cache_bytes_per_token()
    # 2 layers x 2 KV heads x 64 dims, K and V
    assert sizes["f32"] == 2 * 2 * 64 * 2 * 4 and sizes["f16"] == 2 * 2 * 64 * 2 * 2
    per_value = {k: sizes[k] / (2 * 2 * 64 * 2) for k in ("q8", "q4", "q3", "q2")}
    # q4 by default: blocks of 64 tokens (keys per channel) and 64-channel value groups, 4.5 bits
    assert per_value == {"q8": 9 / 8 + 0.0, "q4": 9 / 16, "q3": 4 / 8, "q2": 3 / 8}
    with Llama(str(path), n_ctx=64, verbose=False, type_k="q4", type_v="q4", kv_block=32, kv_group=32) as llm:
        assert llm.kv_cache_bytes_per_token() / (2 * 2 * 64 * 2) == 5 / 8


@pytest.mark.parametrize("type_kv", ["f32", "q4"])
def test_eviction_keeps_sinks_and_positions(qwen, type_kv):
    """After the ring evicts, the next token's logits equal a fresh evaluation of
    exactly the tokens the cache kept (sinks first), at their cache positions."""
    path, _ = qwen
    rng = np.random.default_rng(6)
    tokens = [int(t) for t in rng.integers(0, 320, size=70)]
    kw = dict(n_ctx=32, n_batch=8, n_threads=2, verbose=False, kv_block=8, kv_recent=8, type_k=type_kv,
              type_v=type_kv, matmul="f32")
    with Llama(str(path), sinks="pfn:2", kv_ring=True, **kw) as llm:
        llm.eval(tokens)
        stats = llm.kv_cache_stats()
        assert stats["n_evicted"] > 0 and stats["n_sinks"] == 2
        ring_logits = llm.last_logits().copy()
    # kept: the 2 sinks, then every token after the evicted ones
    kept = tokens[:2] + tokens[2 + stats["n_evicted"]:]
    assert len(kept) <= 32 + 8 + 8 + 2
    kw.update(n_ctx=64)
    with Llama(str(path), sinks="pfn:2", **kw) as fresh:
        fresh.eval(kept)
        want = fresh.last_logits()
    if type_kv == "f32":
        np.testing.assert_allclose(ring_logits, want, rtol=0, atol=1e-4 * np.abs(want).max())
    else:  # blocks formed at other times quantize differently; close, not equal
        assert np.abs(ring_logits - want).max() <= 0.05 * np.abs(want).max()


def test_ring_generation_continues_past_n_ctx(qwen):
    path, _ = qwen
    with Llama(str(path), n_ctx=32, n_threads=2, verbose=False, type_k="q4", type_v="q4", kv_block=8,
               kv_recent=8, kv_ring=True) as llm:
        llm.eval(list(range(1, 200)))
        assert llm.n_tokens == 199
        assert np.isfinite(llm.last_logits()).all()
        assert llm.kv_cache_stats()["n_evicted"] > 150


def test_without_ring_a_full_cache_is_an_error(qwen):
    from kvsink_cpp import ContextFullError
    path, _ = qwen
    with Llama(str(path), n_ctx=32, verbose=False, type_k="q4", type_v="q4") as llm:
        with pytest.raises(ContextFullError):
            llm.eval(list(range(1, 40)))


def test_prefix_reuse_inside_a_committed_block_evaluates_the_rest_again(qwen):
    """f32 blocks are exact, so re-evaluating from the block start must give the
    fresh result (a quantized block would depend on when it was formed)."""
    type_kv = "f32"
    path, _ = qwen
    tokens = list(range(3, 60))
    kw = dict(n_ctx=64, n_threads=2, verbose=False, type_k=type_kv, type_v=type_kv, kv_block=8, kv_recent=8,
              logits_all=True)
    with Llama(str(path), **kw) as llm, Llama(str(path), **kw) as fresh:
        llm.eval(tokens)
        llm.n_tokens = 13  # inside a committed block: the cache keeps 8 and re-evaluates 8..12
        llm.eval([7, 8, 9])
        assert llm.n_tokens == 16 and list(llm.eval_tokens) == tokens[:13] + [7, 8, 9]
        fresh.eval(tokens[:13] + [7, 8, 9])
        want = fresh.scores[13:16]
        np.testing.assert_allclose(llm.scores[13:16], want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_bad_cache_options(qwen):
    path, _ = qwen
    for kwargs, pattern in (({"type_k": "q5"}, "type_k"), ({"sinks": "first"}, "sinks"),
                            ({"kv_block": 12}, "kv_block"), ({"kv_recent": -1}, "kv_recent")):
        with pytest.raises(ValueError, match=pattern):
            Llama(str(path), verbose=False, **kwargs)


def test_default_layout_is_the_measured_one(qwen):
    """q4: blocks and value groups of 64, rotated; q3/q2 rotated; q8 not (README, KV quality)."""
    path, _ = qwen
    tokens = [int(t) for t in np.random.default_rng(12).integers(0, 320, size=200)]  # several blocks committed

    def last_logits(**kw):
        with Llama(str(path), n_ctx=256, n_threads=2, verbose=False, **kw) as llm:
            llm.eval(tokens)
            return llm.last_logits().copy()

    for kind, explicit in (("q4", dict(kv_rotate="kv", kv_block=64, kv_group=64)),
                           ("q2", dict(kv_rotate="kv", kv_block=32, kv_group=32)),
                           ("q8", dict(kv_rotate="none", kv_block=32, kv_group=32))):
        default = last_logits(type_k=kind, type_v=kind)
        np.testing.assert_array_equal(default, last_logits(type_k=kind, type_v=kind, **explicit))
        other = dict(explicit, kv_rotate="none" if explicit["kv_rotate"] == "kv" else "kv")
        assert np.abs(default - last_logits(type_k=kind, type_v=kind, **other)).max() > 0
