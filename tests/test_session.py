"""Saved sessions: save_state/load_state and save_session/load_session.

The oracle is the context that was not saved: a restored context must go on
exactly (bit for bit) as the original does, for every cache kind — and a bad
state (truncated, corrupted, inconsistent, foreign) must be refused with a
clear error and leave the loading context as it was.
"""
import struct
import zlib

import numpy as np
import pytest

from kvsink_cpp import Llama
from kvsink_cpp.session import SessionError

import synthetic


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(synthetic.write_qwen2_legacy(tmp_path_factory.mktemp("session") / "qwen2.gguf"))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return str(synthetic.write_llama_kquants(tmp_path_factory.mktemp("session_other") / "llama.gguf"))


def _ids(n, seed=0, vocab=200):
    return np.random.default_rng(seed).integers(1, vocab, size=n).tolist()


CACHES = {
    "f32": dict(type_k="f32", type_v="f32", matmul="f32"),
    "f16": dict(type_k="f16", type_v="f16"),
    "q8": dict(type_k="q8", type_v="q8"),
    "q4 pfn:3": dict(type_k="q4", type_v="q4", sinks="pfn:3"),
    "q2 per-token keys": dict(type_k="q2", type_v="q4", kv_key_per_token=True, sinks="pfn:2"),
    "q4 ring": dict(type_k="q4", type_v="q4", kv_ring=True, sinks="pfn:1"),
}


def _open(path, **kw):
    kw.setdefault("n_ctx", 256)
    return Llama(path, n_batch=64, n_threads=2, verbose=False, **kw)


@pytest.mark.parametrize("name", list(CACHES))
def test_restored_context_continues_bit_for_bit(tiny_model, tmp_path, name):
    kw = CACHES[name]
    n_prompt = 700 if kw.get("kv_ring") else 150  # the ring evicts blocks: positions past n_ctx
    prompt, follow = _ids(n_prompt), _ids(20, seed=1)
    with _open(tiny_model, **kw) as a, _open(tiny_model, **kw) as b:
        a.eval(prompt)
        size = a.save_session(tmp_path / "s.kvs")
        before = a.last_logits().copy()
        b.load_session(tmp_path / "s.kvs")
        assert b.n_tokens == a.n_tokens == n_prompt
        assert np.array_equal(b.last_logits(), before)
        assert b.kv_cache_stats()["sink_positions"] == a.kv_cache_stats()["sink_positions"]
        assert b.kv_cache_stats()["n_evicted"] == a.kv_cache_stats()["n_evicted"]
        for t in follow:
            a.eval([t])
            b.eval([t])
            assert np.array_equal(a.last_logits(), b.last_logits())
    assert size == (tmp_path / "s.kvs").stat().st_size


def test_state_in_memory_with_logits_all(tiny_model):
    with _open(tiny_model, logits_all=True) as a, _open(tiny_model, logits_all=True) as b:
        a.eval(_ids(40))
        state = a.save_state()
        assert state.scores.shape == (40, a.n_vocab()) and state.llama_state_size == len(state.llama_state)
        b.load_state(state)
        assert np.array_equal(b.scores[:40], a.scores[:40])
        assert b.input_ids[:40].tolist() == a.input_ids[:40].tolist()


def test_state_after_reset_holds_only_the_kept_tokens(tiny_model):
    """n_tokens rules: tokens past it (a reset, a rewind) are not saved."""
    with _open(tiny_model, type_k="q4", type_v="q4") as a, _open(tiny_model, type_k="q4", type_v="q4") as b:
        a.eval(_ids(150))
        a.n_tokens = 100  # rewind inside a quantized block: the cache re-evaluates up to 100
        state = a.save_state()
        assert state.n_tokens == 100
        b.load_state(state)
        a.eval([5])
        b.eval([5])
        assert np.array_equal(a.last_logits(), b.last_logits())


def test_q4_session_is_about_a_third_of_f16(tiny_model, tmp_path):
    sizes = {}
    for kv in ("f16", "q4"):
        with _open(tiny_model, n_ctx=1024, type_k=kv, type_v=kv) as m:
            m.eval(_ids(1000))
            sizes[kv] = m.save_session(tmp_path / f"{kv}.kvs")
    assert sizes["q4"] < 0.45 * sizes["f16"], sizes


def _saved(tiny_model, tmp_path, **kw):
    with _open(tiny_model, type_k="q4", type_v="q4", sinks="pfn:3", **kw) as m:
        m.eval(_ids(150))
        m.save_session(tmp_path / "s.kvs")
        return (tmp_path / "s.kvs").read_bytes(), m.save_state()


def _assert_refused_and_unchanged(path, load, match):
    with _open(path, type_k="q4", type_v="q4", sinks="pfn:3") as m:
        m.eval(_ids(70, seed=3))
        logits = m.last_logits().copy()
        with pytest.raises(SessionError, match=match):
            load(m)
        assert m.n_tokens == 70
        m.eval([7])  # the cache is the one from before the refused load
        with _open(path, type_k="q4", type_v="q4", sinks="pfn:3") as ref:
            ref.eval(_ids(70, seed=3))
            assert np.array_equal(ref.last_logits(), logits)
            ref.eval([7])
            assert np.array_equal(ref.last_logits(), m.last_logits())


@pytest.mark.parametrize("cut", [0, 7, 30, 1000, -1])
def test_truncated_file_is_refused(tiny_model, tmp_path, cut):
    data, _ = _saved(tiny_model, tmp_path)
    bad = tmp_path / "bad.kvs"
    bad.write_bytes(data[:cut])
    _assert_refused_and_unchanged(tiny_model, lambda m: m.load_session(bad), "not a kvsink_cpp session|truncated")


def test_flipped_byte_is_refused(tiny_model, tmp_path):
    data, _ = _saved(tiny_model, tmp_path)
    for at in (20, len(data) // 2, len(data) - 10):
        bad = tmp_path / "bad.kvs"
        bad.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
        _assert_refused_and_unchanged(tiny_model, lambda m: m.load_session(bad), "corrupted|unreadable|malformed")


def test_foreign_file_is_refused(tiny_model, tmp_path):
    bad = tmp_path / "model.kvs"
    bad.write_bytes(open(tiny_model, "rb").read()[:4096])
    _assert_refused_and_unchanged(tiny_model, lambda m: m.load_session(bad), "not a kvsink_cpp session")


def test_state_of_another_model_is_refused(tiny_model, other_model, tmp_path):
    with _open(other_model) as other:
        other.eval(_ids(30))
        state = other.save_state()
    _assert_refused_and_unchanged(tiny_model, lambda m: m.load_state(state), "another model")


def test_state_with_other_kv_settings_is_refused(tiny_model, tmp_path):
    with _open(tiny_model, type_k="q8", type_v="q4", sinks="pfn:3") as m:
        m.eval(_ids(150))
        state = m.save_state()
    _assert_refused_and_unchanged(tiny_model, lambda m: m.load_state(state), "type_k 2, this context has 3")


def _with_crc(blob: bytes) -> bytes:
    """A C state with its payload checksum recomputed (a crafted, not a damaged, state)."""
    return blob[:16] + struct.pack("<I", zlib.crc32(blob[24:])) + blob[20:]


# payload offsets of the counters: after the 24-byte header and 16 geometry fields
COUNTERS = 24 + 16 * 4
N_PAST, WIN_START, N_EVICTED, FRONTIER, N_SINKS, N_DROPPED, N_BLOCKS = range(7)


@pytest.mark.parametrize("field,value", [(N_PAST, 10**6), (N_PAST, -1), (WIN_START, 0), (WIN_START, 128), (N_EVICTED, 5),
                                         (FRONTIER, 32), (N_SINKS, 2), (N_SINKS, 10**5), (N_BLOCKS, 0), (N_BLOCKS, 2),
                                         (N_BLOCKS, 10**6), (N_DROPPED, -3)])
def test_crafted_state_with_valid_checksum_is_refused(tiny_model, tmp_path, field, value):
    _, state = _saved(tiny_model, tmp_path)
    blob = bytearray(state.llama_state)
    struct.pack_into("<i", blob, COUNTERS + 4 * field, value)
    state.llama_state = _with_crc(bytes(blob))
    _assert_refused_and_unchanged(tiny_model, lambda m: m.load_state(state), "inconsistent|payload bytes|holds")


def test_crafted_sink_positions_are_refused(tiny_model, tmp_path):
    _, state = _saved(tiny_model, tmp_path)
    sinks = COUNTERS + 8 * 4
    for pos in (1, 0x7FFFFFFF, -5):  # out of order (row 1 before row 0), past the window, negative
        blob = bytearray(state.llama_state)
        struct.pack_into("<i", blob, sinks, pos)
        state.llama_state = _with_crc(bytes(blob))
        _assert_refused_and_unchanged(tiny_model, lambda m: m.load_state(state), "inconsistent")
