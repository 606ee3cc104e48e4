"""The KV cache and the thread pool at their limits (issue 19, item 6):

- a sink table smaller than the sinks a text brings (kvsink:N): it never
  holds more than N rows, position 0 stays pinned, the weaker sinks are
  dropped and counted, and the logits are still those of the numpy model of
  the same cache (tests/kv_sim.py) -- on SmolLM2 with its shipped profile;
  with an exact (f32) cache the logits stay those of the plain forward pass;
- keys quantized per token (kv_key_per_token), batched and token by token,
  against the numpy model of that layout (tests/test_kv_cache.py covers only
  the default per-channel keys);
- more threads than cores: the same logits, generation completes, absurd
  thread counts are refused by name.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvsink_cpp import Llama
from kvsink_cpp.errors import InvalidArgumentError

from kv_sim import KVSinkSim
from numpy_llama import NumpyLlama
from test_kv_cache import PLAIN, _assert_well_apart, _with_profile, qwen  # noqa: F401 (qwen: a fixture)

# Many " the" tokens: SmolLM2's early-stage sinks (DESIGN.md section 4), far
# more of them than a kvsink:2 table has rows for.
SINKY_TEXT = (b"The road to the mill ran along the river, past the church and the old school, and the children "
              b"of the village walked it every morning. In the winter the water rose over the banks and the "
              b"road was closed, so the miller took the long way over the hill to bring the flour to the market "
              b"in the town, where the bakers waited for him at the gate.")


def _check_table(history: list, capacity: int) -> None:
    """Stats taken after every eval: the table never grows past its capacity,
    position 0 is always its first row, rows are distinct increasing
    positions, and the dropped count only grows."""
    dropped = 0
    for stats in history:
        positions = stats["sink_positions"]
        assert stats["sink_capacity"] == capacity
        assert stats["n_sinks"] == len(positions) <= capacity
        assert positions[:1] in ([], [0])  # empty until the first block is committed
        assert all(a < b for a, b in zip(positions, positions[1:]))
        assert stats["n_sinks_dropped"] >= dropped
        dropped = stats["n_sinks_dropped"]


def _eval_in_steps(llm: Llama, tokens: list, step: int) -> list:
    history = []
    for start in range(0, len(tokens), step):
        llm.eval(tokens[start:start + step])
        history.append(llm.kv_cache_stats())
    return history


# ---- a sink table that overflows, on SmolLM2 ----------------------------------------------

class _NumpyLlama64(NumpyLlama):
    """The numpy reference with its weights converted to float64 once (1.1 GB
    for SmolLM2) instead of at every product: the same numbers, several
    times faster for the simulator's many small batches."""

    def __init__(self, path):
        super().__init__(path)
        self.w = {name: w.astype(np.float64) for name, w in self.w.items()}
        self.output = self.w.get("output.weight", self.w["token_embd.weight"])

    def _linear(self, x, name):
        y = x @ self.w[name].T
        bias = name.replace(".weight", ".bias")
        return y + self.w[bias] if bias in self.w else y


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=32, verbose=False) as llm:
        tokens = llm.tokenize(SINKY_TEXT)
        p = llm.sink_profile
    assert p is not None and p.layer > 0, "SmolLM2's shipped profile is missing"
    return smollm2_path, _NumpyLlama64(smollm2_path), tokens, (p.layer, list(p.channels), float(p.threshold))


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_overflowing_sink_table_matches_the_simulator(smollm2):
    """kvsink:2 on a text with more than twice as many predicted sinks as
    rows: q4 blocks of 8 tokens (many commits, so sinks compete block after
    block), batches of 8. After every batch the table is within its
    capacity with position 0 first; at the end it holds the sinks the
    simulator keeps, and the dropped count is the simulator's.

    Logits: SmolLM2's q4 cache is chaotic at the 1e-3 level -- the simulator
    itself moves by 0.12 (max |logit|, 0.01 mean) when float32-sized noise
    (1e-6 relative) is put on its K and V, since a rounding step that flips
    moves a key by 1/15 of its group's range and later layers carry it on.
    So the logits are held to the simulator in the mean, and must be far
    closer to the simulation of this table than to the simulations of a
    table without predicted sinks (pfn:1) or of one large enough for all of
    them (measured: mean |difference| 0.014 against 0.043 and 0.028)."""
    path, ref, tokens, profile = smollm2
    capacity, block, recent, ubatch = 2, 8, 8, 8
    layer, channels, threshold = profile

    def simulate(**kw):
        sim = KVSinkSim("q4", "q4", block, recent, group=32, **kw)
        return sim, ref.forward_cached(tokens, sim, ubatch=ubatch)

    sim = KVSinkSim("q4", "q4", block, recent, group=32, sinks={0}, capacity=capacity, profile=profile)
    all_scores = {}
    observe = sim.observe

    def recording_observe(il, start, hidden):  # every token's score, not only those above 1
        if il == layer:
            for t, s in enumerate(np.abs(hidden[:, channels]).max(axis=1) / threshold):
                all_scores[start + t] = float(s)
        observe(il, start, hidden)

    sim.observe = recording_observe
    want = ref.forward_cached(tokens, sim, ubatch=ubatch)
    # float32 (C) and float64 (numpy) must take the same decisions: no token
    # sits on the threshold, no two sinks compete on a near tie
    assert min(abs(np.log(s)) for s in all_scores.values()) > 1e-3
    predicted = {p: s for p, s in sim.scores.items() if p != 0}
    _assert_well_apart(predicted)
    assert len(predicted) >= 2 * capacity and sim.dropped > 0 and len(sim.table) == capacity
    with Llama(str(path), **PLAIN, n_ctx=256, n_batch=ubatch, n_threads=2, logits_all=True, verbose=False,
               type_k="q4", type_v="q4", sinks=f"kvsink:{capacity}", kv_block=block, kv_recent=recent) as llm:
        history = _eval_in_steps(llm, tokens, ubatch)
        got = llm.scores[:len(tokens)].copy()
    _check_table(history, capacity)
    final = history[-1]
    assert final["sink_positions"] == sim.table and final["n_sinks_dropped"] == sim.dropped
    err = np.abs(got - want)
    assert err.mean() <= 1e-3 * np.abs(want).max() and err.max() <= 1e-2 * np.abs(want).max()
    for other in (simulate(sinks={0})[1], simulate(sinks={0}, capacity=64, profile=profile)[1]):
        assert err.mean() <= 0.6 * np.abs(got - other).mean()


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("capacity", [1, 2])
def test_smollm2_exact_cache_with_a_tiny_sink_table_is_still_exact(smollm2, capacity):
    """An f32 cache keeps sink rows exact and quantizes nothing, so however
    the table overflows the logits are the plain forward pass's, batched and
    token by token; the table still fills and drops (capacity 1: position 0
    alone, every predicted sink is dropped)."""
    path, ref, tokens, _ = smollm2
    want = ref.forward(tokens)
    kw = dict(n_ctx=256, n_threads=2, logits_all=True, verbose=False, matmul="f32", type_k="f32", type_v="f32",
              sinks=f"kvsink:{capacity}", kv_block=8, kv_recent=8)
    for step in (len(tokens), 1):
        with Llama(str(path), n_batch=max(step, 8), **kw) as llm:
            history = _eval_in_steps(llm, tokens, step)
            got = llm.scores[:len(tokens)].copy()
        _check_table(history, capacity)
        assert history[-1]["n_sinks"] == capacity and history[-1]["n_sinks_dropped"] > 0
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), step
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_overflowing_table_under_the_ring_keeps_its_bounds(qwen, tmp_path):
    """Ring eviction and sink displacement together, token by token and in
    batches, far past n_ctx: after every step the table is within capacity
    with position 0 first, and the logits stay finite."""
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(21).integers(0, 320, size=240)]
    profiled, _ = _with_profile(path, tmp_path, ref, tokens[:80], 0, [3, 17], share=0.4)
    for step in (1, 8):
        with Llama(str(profiled), n_ctx=32, n_batch=8, n_threads=2, verbose=False, type_k="q4", type_v="q4",
                   sinks="kvsink:3", kv_block=8, kv_recent=8, kv_ring=True) as llm:
            history = _eval_in_steps(llm, tokens, step)
            assert np.isfinite(llm.last_logits()).all()
        _check_table(history, 3)
        assert history[-1]["n_sinks_dropped"] > 0 and history[-1]["n_evicted"] > 150


# ---- keys quantized per token ---------------------------------------------------------------

# (type_k, type_v, sinks, ubatch, kv_rotate, impl, kv_group)
PER_TOKEN_CASES = [
    ("q8", "q4", "pfn:2", 8, "none", "auto", 32),
    ("q8", "q8", "pfn:1", 1, "none", "auto", 32),
    ("q4", "q4", "pfn:1", 1, "none", "auto", 32),
    ("q4", "q4", "pfn:2", 8, "none", "scalar", 64),
    ("q2", "q8", "none", 8, "none", "auto", 32),
    ("q2", "q2", "pfn:3", 1, "none", "scalar", 32),
    ("q4", "q2", "pfn:2", 1, "kv", "auto", 32),
    ("q2", "q4", "pfn:1", 8, "k", "scalar", 32),
    ("q8", "q4", "pfn:1", 1, "kv", "auto", 64),
]


@pytest.mark.parametrize("type_k,type_v,sinks,ubatch,rotate,impl,group", PER_TOKEN_CASES)
def test_per_token_keys_match_numpy(qwen, type_k, type_v, sinks, ubatch, rotate, impl, group):
    """kv_key_per_token: keys in per-token groups of kv_group channels, like
    values (rotated: RoPE by the offset in the block, then H). Batched
    prefill and token-by-token decode give the logits of the numpy model of
    that cache; and the option is real: per-channel keys give other logits."""
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(13).integers(0, 320, size=72)]
    block, recent = 8, 8
    n_sinks = 0 if sinks == "none" else int(sinks[4:])

    def sim(per_token):
        return KVSinkSim(type_k, type_v, block, recent, group=group, sinks=set(range(n_sinks)), rotate=rotate,
                         rope=ref._rope, key_per_token=per_token)

    want = ref.forward_cached(tokens, sim(True), ubatch=ubatch)
    with Llama(str(path), n_ctx=128, n_batch=ubatch, n_threads=2, logits_all=True, verbose=False, impl=impl,
               type_k=type_k, type_v=type_v, sinks=sinks, kv_block=block, kv_recent=recent, kv_rotate=rotate,
               kv_group=group, kv_key_per_token=True, matmul="f32") as llm:
        for start in range(0, len(tokens), ubatch):
            llm.eval(tokens[start:start + ubatch])
        got = llm.scores[:len(tokens)].copy()
        assert llm.kv_cache_stats()["n_sinks"] == n_sinks
    err = np.abs(got - want).max()
    assert err <= 1e-3 * np.abs(want).max()
    per_channel = ref.forward_cached(tokens, sim(False), ubatch=ubatch)
    assert np.abs(per_channel - want).max() > 10 * err


@pytest.mark.parametrize("type_k,type_v,capacity,ubatch,rotate", [
    ("q4", "q2", 2, 8, "none"), ("q2", "q4", 3, 1, "none"), ("q4", "q4", 2, 1, "kv")])
def test_per_token_keys_with_an_overflowing_sink_table(qwen, tmp_path, type_k, type_v, capacity, ubatch, rotate):
    """A sink displaced from the table is not quantized again (its key row
    was quantized on its own, per token): the cache reads its block's row.
    Positions, dropped count and logits match the simulator."""
    path, ref = qwen
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, 320, size=72)]
    layer, channels = 0, [3, 17]
    profiled, threshold = _with_profile(path, tmp_path, ref, tokens, layer, channels, share=0.35)
    sim = KVSinkSim(type_k, type_v, 8, 8, group=32, sinks={0}, capacity=capacity,
                    profile=(layer, channels, threshold), rotate=rotate, rope=ref._rope, key_per_token=True)
    want = ref.forward_cached(tokens, sim, ubatch=ubatch)
    _assert_well_apart({p: s for p, s in sim.scores.items() if p != 0})
    assert sim.dropped > 0 and len(sim.table) == capacity
    with Llama(str(profiled), n_ctx=128, n_batch=ubatch, n_threads=2, logits_all=True, verbose=False,
               type_k=type_k, type_v=type_v, sinks=f"kvsink:{capacity}", kv_block=8, kv_recent=8,
               kv_rotate=rotate, kv_group=32, kv_key_per_token=True, matmul="f32") as llm:
        history = _eval_in_steps(llm, tokens, ubatch)
        got = llm.scores[:len(tokens)].copy()
    _check_table(history, capacity)
    assert history[-1]["sink_positions"] == sim.table and history[-1]["n_sinks_dropped"] == sim.dropped
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


# ---- more threads than cores ----------------------------------------------------------------

MANY_THREADS = sorted({4 * (os.cpu_count() or 1), 33})
PATHS = {"exact": dict(matmul="f32"), "fast": {}}


def _batch_logits(path, tokens, n_threads, **kw):
    with Llama(str(path), n_ctx=256, n_threads=n_threads, logits_all=True, verbose=False, **kw) as llm:
        llm.eval(tokens)
        return llm.scores[:len(tokens)].copy()


def _decode_logits(path, tokens, n_prompt, n_threads, **kw):
    """A prompt in one batch, then token by token: the logits of each decoded token."""
    with Llama(str(path), n_ctx=256, n_threads=n_threads, verbose=False, **kw) as llm:
        llm.eval(tokens[:n_prompt])
        out = []
        for t in tokens[n_prompt:]:
            llm.eval([t])
            out.append(llm.last_logits().copy())
        return np.array(out)


@pytest.fixture(scope="module")
def long_tokens(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=32, verbose=False) as llm:
        tokens = llm.tokenize(SINKY_TEXT * 4)
    assert len(tokens) >= 200
    return tokens[:200]


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("kind", list(PATHS))
def test_more_threads_than_cores_give_the_same_batch_bit_for_bit(smollm2_path, long_tokens, kind):
    want = _batch_logits(smollm2_path, long_tokens, 1, **PATHS[kind])
    for n_threads in MANY_THREADS:
        np.testing.assert_array_equal(_batch_logits(smollm2_path, long_tokens, n_threads, **PATHS[kind]), want)


@pytest.mark.model
@pytest.mark.parametrize("kind", list(PATHS))
def test_more_threads_than_cores_decode_a_short_context_bit_for_bit(smollm2_path, long_tokens, kind):
    """Token by token while the whole context is one run of the window (the
    default cache keeps its newest 32 tokens unquantized, blocks of 32):
    attention has a single part, so nothing depends on the thread count."""
    want = _decode_logits(smollm2_path, long_tokens[:40], 8, 1, **PATHS[kind])
    for n_threads in MANY_THREADS:
        np.testing.assert_array_equal(_decode_logits(smollm2_path, long_tokens[:40], 8, n_threads, **PATHS[kind]),
                                      want)


@pytest.mark.slow
@pytest.mark.model
def test_more_threads_than_cores_decode_a_long_context_within_rounding(smollm2_path, long_tokens):
    """Deep in the context, decoding splits each head's keys into parts and
    merges them (native/src/llama.c) into parts that depend on the keys, not
    on n_threads: the exact path agrees across thread counts (to the bit:
    the next test; this bound is what float rounding would allow)."""
    want = _decode_logits(smollm2_path, long_tokens, 180, 1, matmul="f32", type_k="f32", type_v="f32")
    for n_threads in MANY_THREADS:
        got = _decode_logits(smollm2_path, long_tokens, 180, n_threads, matmul="f32", type_k="f32", type_v="f32")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("kind", list(PATHS))
def test_more_threads_than_cores_decode_a_long_context_bit_for_bit(smollm2_path, long_tokens, kind):
    want = _decode_logits(smollm2_path, long_tokens, 180, 1, **PATHS[kind])
    for n_threads in MANY_THREADS:
        np.testing.assert_array_equal(_decode_logits(smollm2_path, long_tokens, 180, n_threads, **PATHS[kind]),
                                      want)


@pytest.mark.model
def test_generation_with_many_threads_completes(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=256, n_threads=max(MANY_THREADS), verbose=False) as llm:
        out = llm.create_chat_completion([{"role": "user", "content": "Name three rivers."}], max_tokens=24,
                                         temperature=0.7, seed=5)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < out["usage"]["completion_tokens"] <= 24 and out["choices"][0]["message"]["content"]


def test_thread_counts_past_the_limit_are_refused_by_name(qwen):
    """1..1024 threads: anything else (a bool, a float, past int32) is a
    ValueError naming n_threads and the range before the model loads, not a
    crash or an attempt to start them."""
    path, _ = qwen
    for n_threads in (1025, 10_000, 2**31 - 1, 2**40, 0, -1, 2.0, "8", True):
        with pytest.raises(ValueError, match=r"n_threads must be an int in 1\.\.1024, got"):
            Llama(str(path), n_ctx=32, n_threads=n_threads, verbose=False)
    # the C core checks it too, for callers of the C API
    from kvsink_cpp._native import ffi, lib
    params = lib.kvs_context_default_params()
    params.n_threads = 1025
    with Llama(str(path), n_ctx=32, verbose=False) as llm:
        out = ffi.new("kvs_context **")
        assert lib.kvs_context_create(llm._model, ffi.new("kvs_context_params *", params), out) \
            == lib.KVS_ERR_INVALID_ARGUMENT
        assert "n_threads must be in 1..1024" in ffi.string(lib.kvs_last_error()).decode()


def test_the_largest_thread_count_works(qwen):
    """1024 threads on a machine with a few cores: created, evaluates, decodes,
    and gives the one-thread batch logits."""
    path, _ = qwen
    tokens = list(range(1, 40))
    want = _batch_logits(path, tokens, 1, matmul="f32")
    np.testing.assert_array_equal(_batch_logits(path, tokens, 1024, matmul="f32"), want)
    with Llama(str(path), n_ctx=64, n_threads=1024, verbose=False) as llm:
        llm.eval(tokens)
        for _ in range(4):
            llm.eval([int(llm.last_logits().argmax())])
        assert llm.n_tokens == len(tokens) + 4 and np.isfinite(llm.last_logits()).all()
