"""Sink-profile calibration and the GGUF copy that carries it (kvsink_cpp/profile.py)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from kvsink_cpp import Llama
from kvsink_cpp.gguf_file import GGUFFile
from kvsink_cpp import profile as profile_module
from kvsink_cpp.profile import (NoSinkProfileError, SinkProfile, _best_threshold, _emergence, _label_sinks,
                                add_profile_parser,
                                calibrate, main, read_profile, run_calibration, write_profile)

import synthetic

REPO = Path(__file__).resolve().parent.parent

KVSINK_TYPES = {
    "kvsink.version": ["UINT32"], "kvsink.layer": ["UINT32"], "kvsink.channels": ["ARRAY", "UINT32"],
    "kvsink.threshold": ["FLOAT32"], "kvsink.calibration.tokens": ["UINT32"],
    "kvsink.calibration.text": ["STRING"], "kvsink.calibration.precision": ["FLOAT32"],
    "kvsink.calibration.recall": ["FLOAT32"], "kvsink.calibration.sinks": ["UINT32"],
}
PROFILE = SinkProfile(layer=3, channels=[7, 42], threshold=123.5, n_tokens=1000, text="notes.txt",
                      precision=0.75, recall=1.0, n_sinks=4)
F16 = {k: T.F16 for k in ("embd", "q", "k", "v", "o", "gate", "up", "down", "out")}


# ---- pieces, on made-up numbers ----------------------------------------------

def test_best_threshold_cuts_in_the_log_middle_of_the_gap():
    scores = np.array([30000.0, 20000.0, 100.0, 50.0, 1.0])
    labels = np.array([True, True, False, False, False])
    threshold, f1 = _best_threshold(scores, labels)
    assert f1 == 1.0 and threshold == pytest.approx(np.sqrt(20000.0 * 100.0))


def test_best_threshold_maximizes_f1_when_no_cut_is_clean():
    scores = np.array([900.0, 800.0, 700.0, 10.0, 5.0])
    labels = np.array([True, False, True, True, False])
    threshold, f1 = _best_threshold(scores, labels)   # best: all four top scores, F1 = 2*3 / (4 + 3)
    assert f1 == pytest.approx(6 / 7) and threshold == pytest.approx(np.sqrt(10.0 * 5.0))


def test_ground_truth_is_the_attention_share_far_above_typical():
    n, n_head = 128, 4
    queries = n - np.arange(n)
    special = {0: 0.5, 40: 0.4, 90: 0.15}      # 90: far above typical, but not a sink's share
    share = np.zeros(n)
    share[list(special)] = list(special.values())
    others = share == 0                         # share the rest: every query's attention sums to 1
    share[others] = (n - (share * queries).sum()) / queries[others].sum()
    mass = np.tile(share * n_head * queries, (3, 1))
    is_sink, labelled, got = _label_sinks(mass)
    assert np.flatnonzero(is_sink).tolist() == [0, 40]
    assert labelled[: n - 31].all() and not labelled[n - 31:].any()
    np.testing.assert_allclose(got, share)


def test_emergence_is_the_first_persistent_massive_layer_on_sinks():
    rng = np.random.default_rng(0)
    habs = np.abs(rng.normal(size=(10, 200, 64))).astype(np.float32)
    is_sink = np.zeros(200, bool)
    is_sink[[0, 100]] = True
    habs[1:4, 50, 9] = 5000.0           # short-lived, on a non-sink: not the emergence
    habs[2:4, 0, 11] = 5000.0           # short-lived, on a sink: not the emergence either
    habs[3:, 0, 7] = habs[3:, 100, 7] = 3000.0
    habs[3:, 0, 20] = 900.0             # massive on one sink of two: still an outlier channel
    habs[3:, 100, 30] = 900.0
    assert _emergence(habs, is_sink) == (3, [7, 20, 30])
    assert _emergence(habs[:, :, :7], is_sink) == (None, [])


# ---- metadata, on a small synthetic GGUF -------------------------------------

@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory):
    return synthetic.write_model(tmp_path_factory.mktemp("profile") / "random.gguf", "llama", F16, n_layer=4)


def test_read_profile_round_trips_through_a_gguf(synthetic_path, tmp_path):
    out = tmp_path / "with-profile.gguf"
    write_profile(synthetic_path, out, PROFILE, progress=False)
    with GGUFFile(str(out)) as f:
        assert read_profile(f.metadata) == PROFILE
    with GGUFFile(str(synthetic_path)) as f:
        assert read_profile(f.metadata) is None


def test_writing_again_replaces_the_old_profile(synthetic_path, tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_profile(synthetic_path, first, PROFILE, progress=False)
    newer = SinkProfile(layer=1, channels=[5], threshold=9.0, n_tokens=64, text="builtin",
                        precision=1.0, recall=1.0, n_sinks=1)
    write_profile(first, second, newer, progress=False)
    reader = gguf.GGUFReader(second)
    assert sum(name.startswith("kvsink.") for name in reader.fields) == len(KVSINK_TYPES)
    with GGUFFile(str(second)) as f:
        assert read_profile(f.metadata) == newer


def test_read_profile_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="version 2"):
        read_profile({"kvsink.version": 2})
    with pytest.raises(ValueError, match="kvsink.channels"):
        read_profile({"kvsink.version": 1, "kvsink.layer": 3, "kvsink.threshold": 1.0})


def test_writing_onto_the_source_is_refused(synthetic_path, capsys):
    before = synthetic_path.read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_profile(synthetic_path, synthetic_path, PROFILE, progress=False)
    assert main([str(synthetic_path), str(synthetic_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert synthetic_path.read_bytes() == before


@pytest.mark.parametrize("write", [
    lambda p: synthetic.write_model(p, "llama", F16, n_layer=4),
    synthetic.write_llama_kquants,
], ids=["f16", "kquants"])
def test_random_weights_get_no_profile(tmp_path, write):
    path = write(tmp_path / "random.gguf")
    tokens = np.random.default_rng(0).integers(0, 320, size=512).tolist()
    with pytest.raises(NoSinkProfileError, match="no sink profile"):
        calibrate(path, tokens=tokens, progress=False, n_threads=2)


def test_profile_subcommand_registers():
    parser = argparse.ArgumentParser()
    add_profile_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "in.gguf", "out.gguf", "--text", "t.txt", "--tokens", "500", "-t", "3"])
    assert (args.model, args.output, args.text, args.tokens, args.threads) == ("in.gguf", "out.gguf", "t.txt", 500, 3)
    assert callable(args.func)


def test_command_without_a_profile_writes_nothing(synthetic_path, tmp_path, monkeypatch, capsys):
    def no_profile(*args, **kwargs):
        raise NoSinkProfileError("no attention sinks")
    monkeypatch.setattr(profile_module, "run_calibration", no_profile)
    out = tmp_path / "out.gguf"
    assert main([str(synthetic_path), str(out)]) == 2
    assert "no sink profile" in capsys.readouterr().err and not out.exists()


def test_convert_script_runs():
    out = subprocess.run([sys.executable, str(REPO / "convert" / "kvsink_profile.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--text" in out and "--tokens" in out


# ---- SmolLM2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_calibration(smollm2_path):
    return run_calibration(smollm2_path, progress=False, n_threads=2)


@pytest.fixture(scope="module")
def smollm2_profiled(smollm2_path, smollm2_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiled") / "smollm2-kvsink.gguf"
    write_profile(smollm2_path, out, smollm2_calibration.profile, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_profile_predicts_its_sinks(smollm2_calibration):
    cal = smollm2_calibration
    p = cal.profile
    assert 0 < p.layer < 29 and len(p.channels) >= 1 and all(0 <= c < 576 for c in p.channels)
    assert p.precision >= 0.9 and p.recall >= 0.9
    assert p.text == "builtin" and p.n_tokens > 1000 and p.n_sinks >= cal.n_segments >= 4
    # the first token of every segment is a sink, and the profile says so
    assert {(seg, 0) for seg in range(cal.n_segments)} <= set(cal.predicted)
    assert {(seg, 0) for seg in range(cal.n_segments)} <= {(s, j) for s, j, _, _ in cal.sinks}
    # a wide margin, so that a runtime computing the hidden state less exactly agrees
    assert cal.sink_scores.min() > 4 * p.threshold > 16 * cal.best_other_score


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_profile_rule_on_a_fresh_trace(smollm2_path, smollm2_calibration):
    p = smollm2_calibration.profile
    with Llama(str(smollm2_path), n_ctx=128, n_threads=2, verbose=False) as llm:
        tokens = llm.tokenize(b"A short note: the meeting moves to Friday.\nPlease bring the reports.")
        hidden, _ = llm.trace(tokens)
    assert np.flatnonzero(p.is_sink(hidden[p.layer])).tolist() == [0]


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_copy_keeps_every_key_and_tensor(smollm2_path, smollm2_profiled, smollm2_calibration):
    src, dst = gguf.GGUFReader(smollm2_path), gguf.GGUFReader(smollm2_profiled)
    for name, f in src.fields.items():
        if name.startswith("GGUF."):
            continue
        g = dst.fields[name]
        assert [t.name for t in g.types] == [t.name for t in f.types], name
        assert g.contents() == f.contents(), name
    for name, types in KVSINK_TYPES.items():
        assert [t.name for t in dst.fields[name].types] == types, name
    assert dst.fields["kvsink.channels"].contents() == smollm2_calibration.profile.channels
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, dst.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        assert a.data.tobytes() == b.data.tobytes(), a.name
    with GGUFFile(str(smollm2_profiled)) as f:
        assert read_profile(f.metadata) == smollm2_calibration.profile


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_copy_runs_the_same(smollm2_path, smollm2_profiled):
    tokens = [504, 3458, 282, 4649, 314]
    logits = []
    for path in (smollm2_path, smollm2_profiled):
        with Llama(str(path), n_ctx=32, n_threads=2, verbose=False) as llm:
            llm.eval(tokens)
            logits.append(llm.last_logits().copy())
    np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_command_reports_and_writes(smollm2_path, smollm2_calibration, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profile_module, "run_calibration", lambda *args, **kwargs: smollm2_calibration)
    out = tmp_path / "out.gguf"
    assert main([str(smollm2_path), str(out), "-q"]) == 0
    text = capsys.readouterr().out
    p = smollm2_calibration.profile
    assert f"emergence layer:   {p.layer}" in text and f"precision {p.precision:.3f}" in text
    assert "segment 0 position    0" in text
    with GGUFFile(str(out)) as f:
        assert read_profile(f.metadata) == p
