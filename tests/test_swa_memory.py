"""Sliding-window layers keep only the blocks their window can reach
(kv_cache.c's local ring) unless swa_full: the logits must be bit for bit
those of a cache that keeps everything, in batches, token by token, with
the ring buffer evicting, after going back (set_n_past) and after a saved
state is restored; and the memory the cache reports must shrink accordingly."""
from __future__ import annotations

import numpy as np
import pytest

from kvsink_cpp import Llama
from kvsink_cpp.session import SessionError

import synthetic

WINDOW = 16
# (type_k, type_v, kv_rotate, sinks): exact, fp16, quantized (rotated, with sinks)
CACHES = [("f32", "f32", "none", "none"), ("f16", "f16", "none", "pfn:1"), ("q4", "q4", "kv", "pfn:2"),
          ("q8", "q2", "none", "pfn:1")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthetic.write_gemma3(tmp_path_factory.mktemp("swa") / "model.gguf", n_swa=WINDOW)


def tokens_of(n, seed=3):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 320, size=n)]


def open_llm(path, cache, swa_full, **kw):
    type_k, type_v, rotate, sinks = cache
    opts = dict(n_ctx=1024, n_batch=64, n_threads=2, verbose=False, matmul="f32", type_k=type_k, type_v=type_v,
                kv_rotate=rotate, sinks=sinks, kv_block=8, kv_recent=8, kv_group=32)
    return Llama(str(path), swa_full=swa_full, **{**opts, **kw})


def logits_of(llm, tokens, batched):
    """Logits after each token (batched: after each batch's last token)."""
    out = []
    if batched:
        for i in range(0, len(tokens), 24):
            llm.eval(tokens[i:i + 24])
            out.append(llm.last_logits().copy())
    else:
        for t in tokens:
            llm.eval([t])
            out.append(llm.last_logits().copy())
    return np.array(out)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "token-by-token"])
@pytest.mark.parametrize("cache", CACHES, ids=lambda c: "/".join(c))
def test_local_layers_keeping_their_window_change_nothing(model, cache, batched):
    tokens = tokens_of(700)  # the local ring (544 tokens) turns over
    with open_llm(model, cache, swa_full=True) as full, open_llm(model, cache, swa_full=False) as trimmed:
        want, got = logits_of(full, tokens, batched), logits_of(trimmed, tokens, batched)
        assert trimmed.kv_cache_memory()["local_block_tokens"] > 0, "the local ring is not in use"
    np.testing.assert_array_equal(got, want)


def test_the_ring_buffer_with_trimmed_local_layers(model):
    """n_ctx 640 and 1,400 tokens: blocks of global layers are evicted while
    the local ring turns over."""
    tokens = tokens_of(1400, seed=5)
    cache = CACHES[2]
    with open_llm(model, cache, True, n_ctx=640, kv_ring=True) as full, \
            open_llm(model, cache, False, n_ctx=640, kv_ring=True) as trimmed:
        want, got = logits_of(full, tokens, False), logits_of(trimmed, tokens, False)
        assert trimmed.kv_cache_stats()["n_evicted"] > 0
    np.testing.assert_array_equal(got, want)


def test_memory_by_kind_of_layer(model):
    """The synthetic model: 7 layers, of which 5 (the sixth) is global, one
    KV head of 128."""
    cache = CACHES[2]
    with open_llm(model, cache, True) as full, open_llm(model, cache, False) as trimmed:
        mf, mt = full.kv_cache_memory(), trimmed.kv_cache_memory()
        per_token = trimmed.kv_cache_bytes_per_token()
    assert (mt["n_local_layers"], mt["n_global_layers"]) == (6, 1)
    assert mt["local_window"] == WINDOW
    # ceil((16 - 1 + 512) / 8) + 2 blocks of 8 tokens: the window, 512 to go back, margins
    assert mt["local_block_tokens"] == 544 and mf["local_block_tokens"] == 0
    assert mt["global_bytes_per_token"] + mt["local_bytes_per_token"] == pytest.approx(per_token)
    assert mt["local_bytes_per_token"] == pytest.approx(per_token * 6 / 7)
    # the local layers' blocks: 1024 tokens' worth kept in full, 544 trimmed
    saved = mf["allocated_bytes"] - mt["allocated_bytes"]
    assert saved == pytest.approx(mt["local_bytes_per_token"] * (1024 - 544), rel=1e-9)


def test_going_back_past_what_local_layers_keep_starts_over(model):
    """Back by less than local layers keep: the same logits as a cache that
    keeps everything doing the same. Back by more: the cache cannot see that
    far for local layers, so it is cleared and the tokens are evaluated
    again, as a fresh context evaluates them."""
    tokens = tokens_of(700, seed=7)
    cache = CACHES[2]
    with open_llm(model, cache, False) as llm, open_llm(model, cache, True) as full, \
            open_llm(model, cache, False) as fresh:
        for a in (llm, full):
            a.eval(tokens)
            a.n_tokens = 579  # back 121 tokens: more than the fp16 window, less than local layers keep
            a.eval([tokens[579]])
        np.testing.assert_array_equal(llm.last_logits(), full.last_logits())

        fresh.eval(tokens[:40])
        llm.n_tokens = 39
        llm.eval([tokens[39]])
        np.testing.assert_array_equal(llm.last_logits(), fresh.last_logits())


def test_set_n_past_reports_what_it_kept(model):
    from kvsink_cpp._native import lib
    tokens = tokens_of(700, seed=8)
    cache = CACHES[2]
    with open_llm(model, cache, False) as trimmed, open_llm(model, cache, True) as full:
        for llm in (trimmed, full):
            llm.eval(tokens)
        for llm in (trimmed, full):
            assert lib.kvs_context_set_n_past(llm._ctx, 697) == 0
            assert lib.kvs_context_n_past(llm._ctx) == 697  # inside the fp16 window
        assert lib.kvs_context_set_n_past(full._ctx, 40) == 0
        assert lib.kvs_context_n_past(full._ctx) == 40  # a block boundary
        assert lib.kvs_context_set_n_past(trimmed._ctx, 40) == 0
        assert lib.kvs_context_n_past(trimmed._ctx) == 0  # local blocks of 25..39 are gone


@pytest.mark.parametrize("cache", CACHES[1:3], ids=lambda c: "/".join(c))
def test_saved_state_with_the_local_ring_continues_bit_for_bit(model, cache):
    tokens = tokens_of(640, seed=9)
    with open_llm(model, cache, False) as a, open_llm(model, cache, False) as b:
        a.eval(tokens[:610])
        state = a.save_state()
        b.load_state(state)
        for t in tokens[610:]:
            a.eval([t])
            b.eval([t])
            np.testing.assert_array_equal(b.last_logits(), a.last_logits())


def test_state_of_a_full_cache_is_refused_by_a_trimmed_one(model):
    cache = CACHES[2]
    with open_llm(model, cache, True) as full, open_llm(model, cache, False) as trimmed:
        full.eval(tokens_of(50))
        state = full.save_state()
        with pytest.raises(SessionError, match="sliding-window layers keeping only their window"):
            trimmed.load_state(state)
