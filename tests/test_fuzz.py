"""Fuzzing under ASan+UBSan, for a bounded time each run: the GGUF reader and
model loader (native/fuzz/fuzz_main.c `gguf`), and the session-state loader
(`session`). Mutants of small valid files go through a sanitizer build of
native/src; an out-of-bounds access, undefined behaviour, a leak or a hang
fails the test and keeps the input (tests/fuzz.py has the mutator).

KVSINK_FUZZ_SECONDS (per target, default 30), KVSINK_FUZZ_SEED (default 0)
and KVSINK_FUZZ_CRASH_DIR (default $TMPDIR/kvsink-fuzz-crashes) tune a run."""
from __future__ import annotations

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from kvsink_cpp import GGUFFormatError, Llama
from kvsink_cpp.gguf_file import GGUFFile

import fuzz
import synthetic

LEGACY = {"embd": T.Q8_0, "q": T.Q4_0, "k": T.Q4_1, "v": T.Q5_0, "o": T.Q5_1,
          "gate": T.F16, "up": T.BF16, "down": T.F32, "out": T.Q8_0}
KQUANTS = {"embd": T.Q4_K, "q": T.Q2_K, "k": T.Q3_K, "v": T.Q4_K, "o": T.Q5_K,
           "gate": T.Q6_K, "up": T.Q4_K, "down": T.Q5_K, "out": T.Q6_K}


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    try:
        return fuzz.build_harness(tmp_path_factory.mktemp("fuzz-build"))
    except fuzz.BuildUnavailable as e:
        pytest.skip(f"no sanitizer build: {e}")


def _sink_profile(w):
    """kvsink.* keys, so the profile reader is fuzzed too."""
    w.add_uint32("kvsink.layer", 0)
    w.add_float32("kvsink.threshold", 4.0)
    w.add_key_value("kvsink.channels", [3, 17, 60], V.ARRAY, sub_type=V.UINT32)


def _every_metadata_type(path):
    """No model: each metadata type, string arrays, empty values, a custom
    alignment and tensors of 1 to 4 dimensions, for the reader alone."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)  # before the tensors: their offsets follow it
    for i, vtype in enumerate([V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64,
                               V.INT64, V.FLOAT32, V.FLOAT64, V.BOOL]):
        w.add_key_value(f"t.scalar{i}", 1, vtype)
        w.add_key_value(f"t.array{i}", [1, 0, 1], V.ARRAY, sub_type=vtype)
    w.add_string("t.string", "hé llo")
    w.add_string("t.empty", "")  # (the writer refuses empty arrays: mutants make them)
    w.add_key_value("t.strings", ["<s>", "", "x" * 40], V.ARRAY, sub_type=V.STRING)
    rng = np.random.default_rng(1)
    w.add_tensor("a", rng.normal(size=3).astype(np.float32))
    w.add_tensor("b", rng.normal(size=(2, 32)).astype(np.float16))
    w.add_tensor("c", synthetic.random_blocks(T.Q4_0, 2, 32, rng).reshape(2, 1, 1, 18), raw_dtype=T.Q4_0)
    w.add_tensor("d", synthetic.random_blocks(T.Q4_K, 1, 256, rng), raw_dtype=T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SMALL = dict(n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_layer=1, n_vocab=48)


def _gguf_seeds(tmp) -> list[fuzz.Seed]:
    paths = [
        synthetic.write_model(tmp / "llama.gguf", "llama", LEGACY, extra=_sink_profile, **SMALL),
        # the least alignment GGUF allows: tensor data off the usual 32-byte grid
        synthetic.write_model(tmp / "qwen2.gguf", "qwen2", LEGACY, tied=True, biases=True,
                              extra=lambda w: w.add_custom_alignment(8), **SMALL),
        synthetic.write_model(tmp / "kquants.gguf", "llama", KQUANTS, n_embd=256, n_ff=256, n_head=2,
                              n_head_kv=1, n_layer=1, n_vocab=8, rope_scale=2.0, rope_freqs=True),
        _every_metadata_type(tmp / "types.gguf"),
    ]
    return [fuzz.gguf_seed(p.read_bytes()) for p in paths]


@pytest.mark.slow
def test_fuzz_gguf_reader_and_model_loader(harness, tmp_path):
    seconds, seed, crash_dir = fuzz.settings()
    seeds = _gguf_seeds(tmp_path)
    campaign = fuzz.Campaign("gguf", [str(harness), "gguf"], seeds, seconds, seed, crash_dir)
    n = campaign.run()
    # the mutants must reach past the header, else the run proved little
    opened = sum(" open=0 " in line for line in campaign.lines)
    loaded = sum(" model=0 " in line for line in campaign.lines)
    print(f"gguf: {n} inputs, {opened} opened, {loaded} loaded and evaluated")
    assert n > 0 and opened > n // 20 and loaded > 0


@pytest.mark.slow
def test_fuzz_session_state_loader(harness, tmp_path):
    """States saved at five KV settings and four lengths, mutated with and
    without a recomputed checksum, loaded into a context of each setting: a
    state that loads must save back to the same bytes and take one more token."""
    seconds, seed, crash_dir = fuzz.settings()
    # head_dim 64, so q4 gets its 64-channel groups and rotation; kvsink.* keys for predicted sinks
    model = synthetic.write_model(tmp_path / "model.gguf", "llama", LEGACY, n_embd=128, n_ff=256, n_head=2,
                                  n_head_kv=1, n_layer=2, n_vocab=48, extra=_sink_profile)
    seeds = fuzz.state_seeds(harness, model, tmp_path / "seeds")
    campaign = fuzz.Campaign("session", [str(harness), "session", str(model)], seeds, seconds, seed, crash_dir)
    n = campaign.run()
    # "load=3,1,0,1,1": the status in each preset's context
    loaded = sum("0" in line.split(" load=")[1].split(" ")[0].split(",") for line in campaign.lines)
    past_checksum = sum("checksum" not in line for line in campaign.lines)
    print(f"session: {n} inputs, {past_checksum} past the checksum, {loaded} loaded")
    assert n > 0 and past_checksum > n // 2 and loaded > 0


# ---- inputs the fuzzers found, kept as plain tests (no sanitizer build needed) ----

@pytest.mark.parametrize("alignment", [1, 2, 4])
def test_alignment_below_8_is_refused(tmp_path, alignment):
    """Found by the gguf target from a seed with alignment 1: a Q5_1 weight at
    an odd address, whose fp16 scale the kernels read in place (UBSan:
    misaligned member access in act_q8_avx2.c). GGUF requires a multiple of 8."""
    path = synthetic.write_model(tmp_path / "m.gguf", "qwen2", LEGACY, tied=True, biases=True,
                                 extra=lambda w: w.add_custom_alignment(alignment), **SMALL)
    words = f"general.alignment {alignment} is not a multiple of 8"
    with pytest.raises(GGUFFormatError, match=words):
        GGUFFile(path)
    with pytest.raises(GGUFFormatError, match=words):
        Llama(str(path), n_ctx=16, verbose=False)


def _align_8(w):
    w.add_custom_alignment(8)
    _sink_profile(w)


def test_alignment_8_loads_and_runs(tmp_path):
    path = synthetic.write_model(tmp_path / "m.gguf", "qwen2", LEGACY, tied=True, biases=True,
                                 extra=_align_8, **SMALL)
    with GGUFFile(path) as f:
        assert f.alignment == 8
    with Llama(str(path), n_ctx=16, verbose=False) as llm:
        llm.eval([1, 2, 3])
        assert llm.n_tokens == 3
