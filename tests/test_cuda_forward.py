"""The forward pass on the GPU (Llama(device="cuda")) against the CPU's exact
path on the same ids: logits within 2e-3 of the largest |logit| (f32
products on both), top-1 agreement >= 99.5%, batched and token by token, with
f32, f16 and quantized caches, sinks on; then the KV cache in GPU memory
against the CPU's cache with the same settings: every block layout, sink
displacement, ring eviction, local windows, saved states and rewinds. Skips, saying why, where CUDA cannot
run (tests/test_device.py checks that asking for it then fails at load)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import kvsink_cpp
import synthetic
from kvsink_cpp import Llama
from test_gemma3 import gemma3_path  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cuda
if kvsink_cpp.cuda_status() != "ok":
    pytest.skip(kvsink_cpp.cuda_status(), allow_module_level=True)

# ids per real-model test; the SIMT emulator (test_cuda_simt.py) runs fewer:
# it executes every GPU thread of every kernel on the CPU
TOKENS = int(os.environ.get("KVSINK_CUDA_TEST_TOKENS", "96"))


def logits(path, tokens, one_by_one=False, **kw) -> np.ndarray:
    with Llama(str(path), n_ctx=len(tokens) + 8, logits_all=True, verbose=False, **kw) as llm:
        if one_by_one:
            for t in tokens:
                llm.eval([t])
        else:
            llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)])


def ids(llm_path, n=TOKENS) -> list:
    with Llama(str(llm_path), vocab_only=True, verbose=False) as llm:
        text = "The quick brown fox jumps over the lazy dog. " * 20
        return llm.tokenize(text.encode())[:n]


def assert_close(gpu: np.ndarray, cpu: np.ndarray) -> None:
    scale = np.abs(cpu).max()
    assert np.abs(gpu - cpu).max() <= 2e-3 * scale, np.abs(gpu - cpu).max() / scale
    assert (gpu.argmax(-1) == cpu.argmax(-1)).mean() >= 0.995


@pytest.mark.parametrize("cache", ["f32", "f16", "q8", "q4"])
@pytest.mark.parametrize("one_by_one", [False, True])
def test_gpu_logits_match_the_cpu_exact_path(smollm2_path, cache, one_by_one):
    tokens = ids(smollm2_path)
    kw = dict(type_k=cache, type_v=cache, sinks="kvsink")
    cpu = logits(smollm2_path, tokens, one_by_one, matmul="f32", **kw)
    gpu = logits(smollm2_path, tokens, one_by_one, device="cuda", **kw)
    assert_close(gpu, cpu)


def test_gemma3_on_the_gpu(gemma3_path):
    tokens = ids(gemma3_path)
    cpu = logits(gemma3_path, tokens, matmul="f32", type_k="f16", type_v="f16")
    gpu = logits(gemma3_path, tokens, n_gpu_layers=-1, type_k="f16", type_v="f16")
    assert_close(gpu, cpu)


def test_gpu_context_reports_its_device(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=64, device="cuda", verbose=False) as llm:
        assert llm.settings()["device"] == "cuda" and llm.settings()["matmul"] == "f32"
        out = llm.create_completion("Hello", max_tokens=4, temperature=0)
        assert out["choices"][0]["text"]


# ---- the KV cache in GPU memory: every layout and rule against the CPU's cache ----
# Small synthetic models with tiny blocks and windows, so that a short run
# commits many blocks, displaces sinks, evicts and slides local windows.

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from numpy_llama import NumpyLlama
    path = synthetic.write_qwen2_legacy(tmp_path_factory.mktemp("cuda-kv") / "qwen2.gguf")
    return path, NumpyLlama(path)


def random_ids(n, seed, vocab=320) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, size=n)]


def stepwise(path, tokens, step, graph_steps=False, **kw) -> np.ndarray:
    """The last logits after each step of `step` tokens (rings have no
    logits_all), with the cache's counters at the end (and the steps that
    ran as CUDA graphs, when asked)."""
    with Llama(str(path), verbose=False, **kw) as llm:
        rows = []
        for i in range(0, len(tokens), step):
            llm.eval(tokens[i:i + step])
            rows.append(llm.last_logits().copy())
        stats = llm.kv_cache_stats()
        dropped = () if graph_steps else ("cuda_graph_steps",)
        return np.array(rows), {k: v for k, v in stats.items() if not k.endswith("seconds") and k not in dropped}


def assert_near(gpu: np.ndarray, cpu: np.ndarray, tol=2e-3) -> None:
    """Random synthetic models have near ties, so no top-1 check here."""
    scale = np.abs(cpu).max()
    assert np.abs(gpu - cpu).max() <= tol * scale, np.abs(gpu - cpu).max() / scale


LAYOUTS = [  # type_k, type_v, sinks, kv_rotate, per-token keys, step
    ("q4", "q4", "pfn:2", "kv", False, 8), ("q3", "q2", "pfn:1", "k", False, 1),
    ("f16", "q4", "none", "v", False, 8), ("q8", "q8", "pfn:3", "none", False, 1),
    ("f32", "f32", "pfn:1", "none", False, 8), ("q4", "q3", "pfn:2", "none", True, 8),
    ("q2", "q4", "pfn:1", "kv", True, 1),
]


@pytest.mark.parametrize("type_k,type_v,sinks,rotate,per_token,step", LAYOUTS)
def test_gpu_cache_layouts_match_the_cpu(qwen, type_k, type_v, sinks, rotate, per_token, step):
    """Blocks of 8 behind a window of 8: 100 tokens commit 11 blocks, each
    quantized on the device and read in place by the CUDA attention."""
    path, _ = qwen
    tokens = random_ids(100, 3)
    kw = dict(n_ctx=128, n_batch=8, type_k=type_k, type_v=type_v, sinks=sinks, kv_rotate=rotate,
              kv_key_per_token=per_token, kv_block=8, kv_recent=8)
    cpu, cpu_stats = stepwise(path, tokens, step, matmul="f32", **kw)
    gpu, gpu_stats = stepwise(path, tokens, step, device="cuda", **kw)
    assert gpu_stats == cpu_stats
    assert_near(gpu, cpu)


def test_gpu_ring_evicts_and_displaces_sinks_as_the_cpu(qwen, tmp_path):
    """kvsink:3 over a profile that predicts a third of the tokens, in a ring
    of n_ctx 32: displaced sinks go back into their blocks (per-channel keys
    quantized again on the device) or are forgotten with evicted ones."""
    from test_kv_cache import _with_profile
    path, ref = qwen
    tokens = random_ids(160, 21)
    profiled, _ = _with_profile(path, tmp_path, ref, tokens[:80], 0, [3, 17], share=0.35)
    kw = dict(n_ctx=32, n_batch=8, type_k="q4", type_v="q4", sinks="kvsink:3", kv_block=8, kv_recent=8,
              kv_ring=True, kv_rotate="none")
    for step in (1, 8):
        cpu, cpu_stats = stepwise(profiled, tokens, step, matmul="f32", **kw)
        gpu, gpu_stats = stepwise(profiled, tokens, step, device="cuda", **kw)
        assert gpu_stats == cpu_stats and cpu_stats["n_sinks_dropped"] > 0 and cpu_stats["n_evicted"] > 100
        assert_near(gpu, cpu)


def test_gpu_decode_steps_replay_as_graphs_exactly(qwen, tmp_path, monkeypatch):
    """One-token steps run as CUDA graphs - captured each step, the
    instantiated graph updated in place (positions, segment counts, grid
    sizes change every step) - and give exactly what the same launches give
    one by one (KVSINK_CUDA_GRAPHS=0), with blocks committed, sinks predicted
    and displaced and tokens evicted between the replays; prompts of several
    tokens run launch by launch either way."""
    from test_kv_cache import _with_profile
    path, ref = qwen
    tokens = random_ids(100, 33)
    profiled, _ = _with_profile(path, tmp_path, ref, tokens[:60], 0, [3, 17], share=0.35)
    kw = dict(n_ctx=32, n_batch=8, type_k="q4", type_v="q4", sinks="kvsink:3", kv_block=8, kv_recent=8,
              kv_ring=True, kv_rotate="kv")
    _, prompt_stats = stepwise(profiled, tokens[:16], 8, graph_steps=True, device="cuda", **kw)
    assert prompt_stats["cuda_graph_steps"] == 0
    graphs, graph_stats = stepwise(profiled, tokens, 1, graph_steps=True, device="cuda", **kw)
    monkeypatch.setenv("KVSINK_CUDA_GRAPHS", "0")
    direct, direct_stats = stepwise(profiled, tokens, 1, graph_steps=True, device="cuda", **kw)
    assert graph_stats.pop("cuda_graph_steps") == len(tokens) and direct_stats.pop("cuda_graph_steps") == 0
    assert graph_stats == direct_stats and direct_stats["n_evicted"] > 50
    np.testing.assert_array_equal(graphs, direct)


@pytest.mark.parametrize("type_kv,step,group,per_token", [("q4", 8, 32, False), ("f16", 1, 32, False),
                                                         ("q3", 1, 128, True)])
def test_gpu_local_layers_keep_only_their_window(tmp_path, type_kv, step, group, per_token):
    """Gemma 3 with a 16-token window: its local layers keep their blocks in a
    ring of their own and mask what left the window. Its 128-dim heads also
    take groups wider than a block (per-token keys in groups of 128)."""
    path = synthetic.write_gemma3(tmp_path / "gemma3.gguf", n_swa=16)
    tokens = random_ids(90, 5)
    kw = dict(n_ctx=128, n_batch=8, type_k=type_kv, type_v=type_kv, sinks="pfn:1", kv_block=8, kv_recent=8,
              kv_group=group, kv_key_per_token=per_token)
    cpu, _ = stepwise(path, tokens, step, matmul="f32", **kw)
    gpu, _ = stepwise(path, tokens, step, device="cuda", **kw)
    assert_near(gpu, cpu)


def test_gpu_state_saves_loads_and_moves_between_devices(qwen):
    """A state saved on the GPU continues there as if never interrupted; one
    saved on the CPU (the same bytes: the layouts are the same) continues on
    the GPU as the CPU would."""
    path, _ = qwen
    tokens = random_ids(90, 8)
    kw = dict(n_ctx=128, n_batch=8, type_k="q4", type_v="q4", sinks="pfn:2", kv_block=8, kv_recent=8,
              verbose=False)
    with Llama(str(path), device="cuda", **kw) as gpu, Llama(str(path), matmul="f32", **kw) as cpu:
        gpu.eval(tokens[:60])
        cpu.eval(tokens[:60])
        saved_gpu, saved_cpu = gpu.save_state(), cpu.save_state()
        gpu.eval(tokens[60:])
        cpu.eval(tokens[60:])
        want_gpu, want_cpu = gpu.last_logits().copy(), cpu.last_logits().copy()
        gpu.load_state(saved_gpu)
        gpu.eval(tokens[60:])
        np.testing.assert_array_equal(gpu.last_logits(), want_gpu)
        gpu.load_state(saved_cpu)
        gpu.eval(tokens[60:])
        assert_near(gpu.last_logits(), want_cpu)


def test_gpu_rewind_inside_committed_blocks(qwen):
    """Going back into committed blocks keeps the blocks before (the cache
    rounds down) and evaluates the rest again, on the GPU as on the CPU."""
    path, _ = qwen
    tokens = random_ids(70, 9)
    kw = dict(n_ctx=128, n_batch=8, type_k="q4", type_v="q8", sinks="pfn:1", kv_block=8, kv_recent=8,
              verbose=False, logits_all=True)
    rows = {}
    for name, extra in (("cpu", dict(matmul="f32")), ("gpu", dict(device="cuda"))):
        with Llama(str(path), **kw, **extra) as llm:
            llm.eval(tokens)
            llm.n_tokens = 29
            llm.eval([5, 6, 7])
            rows[name] = llm.scores[29:32].copy()
    assert_near(rows["gpu"], rows["cpu"])


@pytest.mark.parametrize("type_k,type_v,rotate,per_token", [
    ("q4", "q4", "kv", False), ("q3", "q8", "none", False), ("q2", "q4", "k", True), ("f16", "f16", "none", False)])
def test_gpu_attention_reads_the_cpus_blocks_as_the_cpu_does(qwen, type_k, type_v, rotate, per_token):
    """The same quantized blocks (a state the CPU saved, loaded on the GPU):
    the next tokens' logits then differ only by the attention's and the
    products' arithmetic, so they must agree far closer than after two
    quantizations of slightly different K/V."""
    path, _ = qwen
    tokens = random_ids(84, 11)
    kw = dict(n_ctx=128, n_batch=8, type_k=type_k, type_v=type_v, sinks="pfn:2", kv_rotate=rotate,
              kv_key_per_token=per_token, kv_block=8, kv_recent=16, verbose=False)
    with Llama(str(path), matmul="f32", **kw) as cpu, Llama(str(path), device="cuda", **kw) as gpu:
        cpu.eval(tokens[:80])
        gpu.load_state(cpu.save_state())
        rows = []
        for t in tokens[80:]:  # within the window: no block is committed on either side
            cpu.eval([t])
            gpu.eval([t])
            rows.append((gpu.last_logits().copy(), cpu.last_logits().copy()))
    for got, want in rows:
        assert_near(got, want, tol=2e-4)


def test_gpu_refuses_attention_traces_and_embeds(smollm2_path):
    """Calibration's attention traces need the CPU's attention (the reason is
    said); hidden states alone (embeddings) come from the GPU as from the CPU."""
    tokens = random_ids(20, 12)
    with Llama(str(smollm2_path), n_ctx=64, device="cuda", verbose=False, embedding=True) as gpu, \
            Llama(str(smollm2_path), n_ctx=64, matmul="f32", verbose=False, embedding=True) as cpu:
        with pytest.raises(kvsink_cpp.KvsinkError, match="run on the CPU"):
            gpu.trace(tokens)
        got, want = np.array(gpu.embed("a b c d")), np.array(cpu.embed("a b c d"))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
