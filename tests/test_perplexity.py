"""Perplexity by llama.cpp's rules (kvsink_cpp/perplexity.py), checked against
the numpy forward pass and an NLL computed here independently."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from kvsink_cpp import Llama
from kvsink_cpp import perplexity as ppl_mod
from kvsink_cpp.perplexity import (PerplexityStats, log_softmax, open_llama, perplexity,
                                   perplexity_of_tokens, vocab_bos)

from numpy_llama import NumpyLlama
import synthetic

# Over 128 SmolLM2 tokens: two chunks of 64.
PARAGRAPH = (
    "The lighthouse stood on a low island at the mouth of the bay, and for nearly two hundred "
    "years its keepers wrote down the weather every morning and every evening. Their notebooks "
    "record storms that sank fishing boats, winters when the sea froze as far as the harbour wall, "
    "and long summers when nothing happened at all except the slow turning of the lamp. In 1911 "
    "the light was converted from oil to electricity, and the keeper of that time complained that "
    "the new bulb was too bright for the birds, which flew into the glass at night. The last keeper "
    "left in 1987, when the light became automatic; the island is now a nature reserve, visited by "
    "students who count the seals on the rocks and by families who come on the ferry in August. "
    "The notebooks are kept in the town museum, where a volunteer is slowly copying them into a "
    "computer so that scientists can compare the old observations with the climate of today."
)
FINAL_LINE = re.compile(r"^Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})$")
F32_TYPES = {role: T.F32 for role in ("embd", "q", "k", "v", "o", "gate", "up", "down", "out")}


def reference_perplexity(chunks, logits_per_chunk):
    """PPL and its uncertainty from float64 logits, written out from llama.cpp's
    perplexity(): score token j+1 from row j for j in [n/2, n-1)."""
    nll = []
    for chunk, logits in zip(chunks, logits_per_chunk):
        n = len(chunk)
        for j in range(n // 2, n - 1):
            row = np.asarray(logits[j], dtype=np.float64)
            nll.append(np.logaddexp.reduce(row) - row[chunk[j + 1]])
    nll = np.array(nll)
    mean = nll.mean()
    var = (nll * nll).mean() - mean * mean
    return math.exp(mean), math.exp(mean) * math.sqrt(var / (len(nll) - 1)), len(nll)


class Recorder:
    """A Llama whose resets and evaluated token lists are recorded."""

    def __init__(self, llm):
        self.llm = llm
        self.log = []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def reset(self):
        self.log.append("reset")
        self.llm.reset()

    def eval(self, tokens):
        self.log.append([int(t) for t in tokens])
        self.llm.eval(tokens)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "tiny.gguf"
    return synthetic.write_model(path, "llama", F32_TYPES, n_embd=64, n_ff=128, n_vocab=96, seed=3)


@pytest.fixture(scope="module")
def tiny_tokens():
    return np.random.default_rng(7).integers(1, 96, size=3 * 16 + 5).tolist()


@pytest.fixture(scope="module")
def smollm2_numpy(smollm2_path):
    return NumpyLlama(smollm2_path)


@pytest.fixture(scope="module")
def paragraph_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "paragraph.txt"
    path.write_text(PARAGRAPH, encoding="utf-8")
    return path


# ---- against the numpy forward pass ---------------------------------------

@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_smollm2_perplexity_matches_numpy(smollm2_path, smollm2_numpy, kv):
    with open_llama(smollm2_path, 64, n_threads=2, type_k=kv, type_v=kv, matmul="f32") as llm:
        tokens = llm.tokenize(PARAGRAPH.encode(), add_bos=True)
        assert vocab_bos(llm) is None, "SmolLM2's vocab adds no BOS: chunks are used as they are"
        got = perplexity_of_tokens(llm, tokens, 64, n_chunks=2, bos_id=vocab_bos(llm))
    chunks = [tokens[0:64], tokens[64:128]]
    kv_dtype = np.float16 if kv == "f16" else None
    want_ppl, want_err, count = reference_perplexity(
        chunks, [smollm2_numpy.forward(c, kv_dtype=kv_dtype) for c in chunks])
    assert got["n_chunks"] == 2 and got["n_tokens_scored"] == count == 62
    assert got["ppl"] == pytest.approx(want_ppl, rel=1e-3)
    assert got["ppl_error"] == pytest.approx(want_err, rel=1e-2)
    assert got["nll_mean"] == pytest.approx(math.log(want_ppl), rel=1e-3)


# ---- chunking, BOS and scoring rules on a synthetic model ------------------

def test_chunks_bos_and_scoring_rules(tiny_model, tiny_tokens):
    bos = 0
    with open_llama(tiny_model, 16) as llm:
        spy = Recorder(llm)
        got = perplexity_of_tokens(spy, tiny_tokens, 16, bos_id=bos)
    # 53 tokens: three full chunks of 16, the last 5 tokens unused; every chunk
    # from an empty cache with its first token replaced by BOS
    chunks = [[bos] + tiny_tokens[16 * i + 1:16 * (i + 1)] for i in range(3)]
    assert spy.log == ["reset", chunks[0], "reset", chunks[1], "reset", chunks[2]]
    assert got["n_chunks"] == 3 and got["n_tokens"] == 53
    assert got["n_tokens_scored"] == 3 * (16 - 1 - 8)
    numpy_model = NumpyLlama(tiny_model)
    want_ppl, want_err, _ = reference_perplexity(chunks, [numpy_model.forward(c) for c in chunks])
    assert got["ppl"] == pytest.approx(want_ppl, rel=1e-3)
    assert got["ppl_error"] == pytest.approx(want_err, rel=1e-2)


def test_without_bos_chunks_are_unchanged(tiny_model, tiny_tokens):
    with open_llama(tiny_model, 16) as llm:
        spy = Recorder(llm)
        perplexity_of_tokens(spy, tiny_tokens, 16, n_chunks=2)
    assert spy.log == ["reset", tiny_tokens[0:16], "reset", tiny_tokens[16:32]]


@pytest.mark.parametrize("n_chunks, expected", [(1, 1), (2, 2), (10, 3)])
def test_chunks_option_caps_the_count(tiny_model, tiny_tokens, n_chunks, expected):
    with open_llama(tiny_model, 16) as llm:
        got = perplexity_of_tokens(llm, tiny_tokens, 16, n_chunks=n_chunks)
    assert got["n_chunks"] == expected and got["n_tokens_scored"] == 7 * expected


def test_too_few_tokens_says_how_many(tiny_model, tiny_tokens):
    with open_llama(tiny_model, 16) as llm:
        with pytest.raises(ValueError, match=r"only 31 tokens.*at least 32"):
            perplexity_of_tokens(llm, tiny_tokens[:31], 16)


def test_needs_logits_of_every_position(tiny_model, tiny_tokens):
    with Llama(str(tiny_model), n_ctx=16, verbose=False) as llm:
        with pytest.raises(ValueError, match="logits_all"):
            perplexity_of_tokens(llm, tiny_tokens, 16)


def test_short_text_is_refused(smollm2_path):
    with pytest.raises(ValueError, match=r"tokenizes to only \d+ tokens.*needs at least 1024"):
        perplexity(smollm2_path, PARAGRAPH, n_ctx=512, progress=False)


# ---- KL-divergence and top-1 agreement --------------------------------------

def test_stats_kl_and_top1_follow_the_definitions():
    rng = np.random.default_rng(1)
    ref_logits, test_logits = rng.normal(size=(20, 50)), rng.normal(size=(20, 50))
    targets = rng.integers(0, 50, size=20)
    stats = PerplexityStats()
    stats.add(log_softmax(test_logits), targets, log_softmax(ref_logits))
    p = np.exp(ref_logits) / np.exp(ref_logits).sum(-1, keepdims=True)
    q = np.exp(test_logits) / np.exp(test_logits).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)
    summary = stats.summary()
    assert summary["kl_mean"] == pytest.approx(kl.mean(), rel=1e-12)
    assert summary["kl_error"] == pytest.approx(kl.std() / math.sqrt(len(kl) - 1), rel=1e-9)
    assert summary["top1_agreement"] == np.mean(p.argmax(-1) == q.argmax(-1))
    assert summary["ppl"] == pytest.approx(math.exp(-np.log(q[np.arange(20), targets]).mean()), rel=1e-12)


def test_kl_error_needs_more_than_ten_tokens():
    # llama.cpp reports no uncertainty on 10 values or fewer
    rng = np.random.default_rng(2)
    stats = PerplexityStats()
    stats.add(log_softmax(rng.normal(size=(10, 8))), np.zeros(10, dtype=int), log_softmax(rng.normal(size=(10, 8))))
    assert stats.summary()["kl_error"] == 0.0


def test_kl_of_a_setting_against_itself_is_zero(tiny_model, tiny_tokens):
    with open_llama(tiny_model, 16, type_k="f16", type_v="f16") as llm, \
            open_llama(tiny_model, 16, **ppl_mod.REFERENCE_KV) as ref:
        got = perplexity_of_tokens(llm, tiny_tokens, 16, reference=ref)
    assert got["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert got["top1_agreement"] == 1.0
    assert got["ref_ppl"] == pytest.approx(got["ppl"], rel=1e-12)


def test_f32_cache_is_close_to_the_f16_reference(tiny_model, tiny_tokens):
    with open_llama(tiny_model, 16, type_k="f32", type_v="f32") as llm, \
            open_llama(tiny_model, 16, **ppl_mod.REFERENCE_KV) as ref:
        got = perplexity_of_tokens(llm, tiny_tokens, 16, reference=ref)
    assert 0.0 < got["kl_mean"] < 1e-4
    assert got["top1_agreement"] > 0.9


def test_quantized_cache_options(smollm2_path):
    f16 = perplexity(smollm2_path, PARAGRAPH, n_ctx=64, n_chunks=2, n_threads=2, progress=False,
                     type_k="f16", type_v="f16", sinks="none")
    # no fp16 recent window, so that the scored positions read quantized blocks
    q4 = perplexity(smollm2_path, PARAGRAPH, n_ctx=64, n_chunks=2, n_threads=2, progress=False,
                    kl_divergence=True, type_k="q4", type_v="q4", sinks="pfn:1", kv_block=32, kv_recent=0)
    assert q4["sinks"] == "pfn:1" and q4["kv_block"] == 32 and q4["kv_recent"] == 0
    assert math.isfinite(q4["ppl"]) and q4["kl_mean"] > 0 and 0 < q4["top1_agreement"] <= 1
    assert q4["ref_ppl"] == pytest.approx(f16["ppl"], rel=1e-9)
    assert q4["kv_bytes_per_token"] < f16["kv_bytes_per_token"]


# ---- command line ------------------------------------------------------------

def test_cli_final_line_is_llama_cpp_format(smollm2_path, paragraph_file, capsys):
    rc = ppl_mod.main(["-m", str(smollm2_path), "-f", str(paragraph_file), "-c", "64", "--chunks", "2", "-t", "2"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = FINAL_LINE.match(last)
    assert match, last
    want = perplexity(smollm2_path, PARAGRAPH, n_ctx=64, n_chunks=2, n_threads=2, progress=False)
    assert float(match.group(1)) == pytest.approx(want["ppl"], abs=1e-4)
    assert float(match.group(2)) == pytest.approx(want["ppl_error"], abs=1e-5)


def test_cli_json_with_kl_divergence(smollm2_path, paragraph_file, capsys):
    rc = ppl_mod.main([str(smollm2_path), "-f", str(paragraph_file), "-c", "64", "-t", "2",
                       "-ctk", "f16", "-ctv", "f16", "--kl-divergence", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_chunks"] == 2 and result["n_ctx"] == 64 and result["n_tokens_scored"] == 62
    assert result["type_k"] == result["type_v"] == "f16"
    # the f16 cache against the f16 reference: the same distributions
    assert result["kl_mean"] == pytest.approx(0.0, abs=1e-12) and result["top1_agreement"] == 1.0
    for key in ("ppl", "ppl_error", "nll_mean", "kl_error", "kv_bytes_per_token", "model", "file", "sinks"):
        assert key in result


def test_cli_fast_matmul_kl_is_against_the_same_path(smollm2_path, paragraph_file, capsys):
    """--matmul q8 (the default): the f16 cache against an f16 reference with
    the same matrix products is the same distribution (KL measures the cache
    alone), and the perplexity moves only a little from the exact path's."""
    args = [str(smollm2_path), "-f", str(paragraph_file), "-c", "64", "-t", "2", "-ctk", "f16", "-ctv", "f16",
            "--kl-divergence", "--json"]
    assert ppl_mod.main(args) == 0
    fast = json.loads(capsys.readouterr().out)
    assert ppl_mod.main(args + ["--matmul", "f32"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert fast["matmul"] is None and exact["matmul"] == "f32"
    assert fast["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert fast["ppl"] != exact["ppl"] and abs(fast["ppl"] / exact["ppl"] - 1) < 0.05


def test_cli_errors_are_clear(smollm2_path, paragraph_file, tmp_path, capsys):
    assert ppl_mod.main(["-m", str(smollm2_path), "-f", str(tmp_path / "missing.txt")]) == 1
    assert "text file not found" in capsys.readouterr().err
    assert ppl_mod.main(["-m", str(smollm2_path), "-f", str(paragraph_file), "-c", "512"]) == 1
    assert "needs at least 1024" in capsys.readouterr().err
    assert ppl_mod.main(["-m", str(smollm2_path), "-f", str(paragraph_file), "-c", "0"]) == 1
    assert "-c (the chunk length in tokens) must be at least 2" in capsys.readouterr().err
    assert ppl_mod.main(["-m", str(smollm2_path), "-f", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_subcommand_of_the_package(smollm2_path, paragraph_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvsink_cpp", "perplexity", "-m", str(smollm2_path),
                           "-f", str(paragraph_file), "-c", "64", "-t", "2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert FINAL_LINE.match(proc.stdout.strip().splitlines()[-1])
