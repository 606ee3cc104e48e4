"""The Python API: llama-cpp-python semantics, and clear errors that lose nothing."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kvsink_cpp
from kvsink_cpp import ContextFullError, GGUFFormatError, KvsinkWarning, Llama, UnsupportedError
from kvsink_cpp._native import ffi, lib

import synthetic

LEGACY = {"embd": T.Q8_0, "q": T.Q4_0, "k": T.Q4_1, "v": T.Q5_0, "o": T.Q5_1,
          "gate": T.Q8_0, "up": T.Q8_0, "down": T.Q8_0, "out": T.Q8_0}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return synthetic.write_llama_kquants(tmp_path_factory.mktemp("api") / "llama.gguf")


@pytest.fixture
def llm(model_path):
    with Llama(str(model_path), n_ctx=64, n_batch=16, n_threads=2, logits_all=True, verbose=False) as m:
        yield m


TOKENS = [5, 17, 300, 2, 99, 45, 12, 8, 250, 31]


def test_sizes_and_metadata(llm):
    assert llm.n_ctx() == 64 and llm.n_vocab() == 320 and llm.n_embd() == 256
    assert llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["llama.block_count"] == "2"          # strings, as llama-cpp-python gives
    assert llm.metadata["llama.rope.scaling.factor"] == "2.000000"


def test_eval_tracks_tokens_and_logits(llm):
    llm.eval(TOKENS[:4])
    llm.eval(TOKENS[4:])
    assert llm.n_tokens == len(TOKENS)
    assert list(llm.eval_tokens) == TOKENS
    assert len(llm.eval_logits) == len(TOKENS)
    np.testing.assert_array_equal(np.array(llm.eval_logits[-1], dtype=np.float32), llm.scores[len(TOKENS) - 1])


def test_batches_larger_than_n_batch_equal_one_call(model_path, llm):
    llm.eval(TOKENS * 3)  # 30 tokens, n_batch 16: two C calls
    with Llama(str(model_path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False) as one:
        one.eval(TOKENS * 3)
        np.testing.assert_allclose(llm.scores[:30], one.scores[:30], rtol=0, atol=1e-4)


@pytest.mark.parametrize("matmul", ["f32", "q8"])
def test_thread_count_does_not_change_a_batch(tmp_path, matmul):
    """The pool hands out parts from a shared counter; whichever thread takes
    a part, each output row is the same dot, so a batch's logits are the same
    bit for bit with 1 thread, 3, and more threads than this machine has
    cores (more parts than some products have rows). Legacy quants: the fast
    path's integer dots and outlier columns run."""
    path = synthetic.write_qwen2_legacy(tmp_path / "model.gguf")
    logits = []
    for n_threads in (1, 3, 9):
        with Llama(str(path), n_ctx=64, n_threads=n_threads, logits_all=True, verbose=False, matmul=matmul) as m:
            m.eval(TOKENS * 3)
            logits.append(m.scores[:30].copy())
    for other in logits[1:]:
        np.testing.assert_array_equal(other, logits[0])


def test_last_logits_without_logits_all(model_path, llm):
    llm.eval(TOKENS)
    with Llama(str(model_path), n_ctx=64, n_threads=2, verbose=False) as last:
        last.eval(TOKENS)
        want = llm.scores[len(TOKENS) - 1]  # one token or a batch: other kernels, same values
        np.testing.assert_allclose(last.last_logits(), want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert len(last.eval_logits) == 1


def test_reset_and_prefix_reuse(llm):
    llm.eval(TOKENS)
    first = llm.scores[: len(TOKENS)].copy()
    llm.reset()
    llm.eval(TOKENS)
    np.testing.assert_array_equal(llm.scores[: len(TOKENS)], first)
    # keep the first 4 tokens cached and continue differently, as chat turns do
    llm.n_tokens = 4
    llm.eval([7, 7, 7])
    reused = llm.scores[:7].copy()
    llm.reset()
    llm.eval(TOKENS[:4] + [7, 7, 7])
    np.testing.assert_allclose(reused, llm.scores[:7], rtol=0, atol=1e-5)


def test_token_out_of_range_is_a_clear_error_and_loses_nothing(llm):
    llm.eval(TOKENS[:3])
    for bad in (320, -1, 2**40, 2**70):
        with pytest.raises(ValueError, match=f"token id {bad} at index 1 is out of range"):
            llm.eval([1, bad])
    for bad in (1.5, True, "7"):  # a cast would truncate or reinterpret them
        with pytest.raises(ValueError, match="token ids must be ints"):
            llm.eval([1, bad])
    assert llm.n_tokens == 3
    llm.eval(TOKENS[3:])
    assert llm.n_tokens == len(TOKENS)


def test_context_overflow_is_a_value_error(llm):
    """llama-cpp-python's callers catch ValueError for a prompt too long."""
    with pytest.raises(ValueError, match="do not fit"):
        llm.eval(TOKENS * 7)
    assert issubclass(ContextFullError, ValueError)


def test_cache_sizes_are_bounded_before_any_arithmetic(model_path):
    """n_ctx (the file's training context when 0), kv_recent and the batch feed
    int32 positions in the cache: absurd values are refused by name, not
    multiplied."""
    with pytest.raises(ValueError, match="n_ctx must be in 1..67108864"):
        Llama(str(model_path), n_ctx=2**27, n_batch=64, verbose=False)
    with pytest.raises(ValueError, match="kv_recent must be in 0..67108864"):
        Llama(str(model_path), n_ctx=64, kv_recent=2**30, verbose=False)


def test_empty_chat_is_refused(model_path):
    with Llama(str(model_path), n_ctx=64, verbose=False, chat_format="chatml") as m:
        with pytest.raises(ValueError, match="messages is empty"):
            m.create_chat_completion([])


def test_no_profile_notice_is_a_filterable_warning(tmp_path):
    import warnings
    path = synthetic.write_llama_kquants(tmp_path / "fresh.gguf")
    with pytest.warns(kvsink_cpp.KvsinkWarning, match="has no sink profile"):
        Llama(str(path), n_ctx=32, verbose=False).close()
    other = synthetic.write_llama_kquants(tmp_path / "other.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # filtered out: nothing is raised, nothing printed
        warnings.filterwarnings("ignore", category=kvsink_cpp.KvsinkWarning)
        Llama(str(other), n_ctx=32, verbose=False).close()


def test_prompt_longer_than_context(llm):
    with pytest.raises(ContextFullError, match="n_ctx 64"):
        llm.eval([1] * 65)
    assert llm.n_tokens == 0


def test_c_core_rejects_bad_eval_arguments(llm):
    ctx = llm._ctx
    tokens = ffi.new("int32_t[]", [1] * 20)
    for n, reason in ((20, "n_batch"), (0, "n_batch")):
        assert lib.kvs_context_eval(ctx, tokens, n, 0, ffi.NULL) == lib.KVS_ERR_INVALID_ARGUMENT
        assert reason in ffi.string(lib.kvs_last_error()).decode()
    tokens[0] = 10**6
    assert lib.kvs_context_eval(ctx, tokens, 1, 0, ffi.NULL) == lib.KVS_ERR_INVALID_ARGUMENT
    assert "token id 1000000" in ffi.string(lib.kvs_last_error()).decode()
    assert lib.kvs_context_set_n_past(ctx, 5) == lib.KVS_ERR_INVALID_ARGUMENT


def test_close_is_idempotent_and_use_after_close_raises(model_path):
    llm = Llama(str(model_path), n_ctx=32, verbose=False)
    llm.close()
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.eval([1])


def test_bad_arguments_raise_before_c(model_path):
    with pytest.raises(FileNotFoundError):
        Llama("/nonexistent/model.gguf", verbose=False)
    with pytest.raises(ValueError, match="n_ctx"):
        Llama(str(model_path), n_ctx=-1, verbose=False)
    with pytest.raises(ValueError, match="type_k"):
        Llama(str(model_path), type_k="q9", verbose=False)
    with pytest.raises(ValueError, match="impl"):
        Llama(str(model_path), impl="cuda", verbose=False)


def test_llama_cpp_python_options_are_accepted_or_refused_by_name(model_path):
    with Llama(str(model_path), n_ctx=32, n_gpu_layers=0, use_mmap=True, n_threads_batch=2, flash_attn=True,
               embedding=True, seed=7, verbose=False) as llm:
        assert llm.seed == 7 and llm.device == "cpu"
    with pytest.raises(TypeError, match="no_such_option"):
        Llama(str(model_path), no_such_option=1, verbose=False)
    # options that would change results are refused unless at their default
    for name, value in (("chat_handler", object()), ("lora_path", "a.gguf"), ("lora_base", "b.gguf"),
                        ("draft_model", object()), ("tokenizer", object()), ("kv_overrides", {"a": 1}),
                        ("rope_scaling_type", 2), ("pooling_type", 2), ("rope_freq_base", 5e5),
                        ("spm_infill", True)):
        with pytest.raises(ValueError, match=f"{name}="):
            Llama(str(model_path), verbose=False, **{name: value})
    for name, value in (("chat_handler", None), ("kv_overrides", {}), ("rope_freq_base", 0.0), ("pooling_type", -1)):
        Llama(str(model_path), n_ctx=32, verbose=False, **{name: value}).close()


def test_unsupported_architecture(tmp_path):
    path = synthetic.write_model(tmp_path / "gpt2.gguf", "gpt2", LEGACY)
    with pytest.raises(UnsupportedError, match="architecture 'gpt2'"):
        Llama(str(path), verbose=False)


def test_missing_tensor_is_named(tmp_path):
    import gguf
    src = synthetic.write_model(tmp_path / "full.gguf", "llama", LEGACY)
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "missing.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama.") and field.name != "llama.vocab_size":
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFFormatError, match="blk.1.ffn_up.weight"):
        Llama(str(tmp_path / "missing.gguf"), verbose=False)


def test_wrong_shape_is_named(tmp_path):
    path = synthetic.write_model(tmp_path / "bad.gguf", "llama", LEGACY, n_vocab=320)
    data = bytearray(path.read_bytes())
    key = b"llama.feed_forward_length"
    at = data.index(key) + len(key) + 4          # skip the u32 type
    data[at:at + 4] = (256).to_bytes(4, "little")  # claim n_ff 256; tensors say 512
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match=r"ffn_gate.weight' has shape \[256, 512"):
        Llama(str(path), verbose=False)


def test_many_models_and_contexts_coexist(model_path):
    models = [Llama(str(model_path), n_ctx=32, verbose=False) for _ in range(3)]
    for m in models:
        m.eval(TOKENS)
    for m in models[1:]:
        np.testing.assert_array_equal(m.last_logits(), models[0].last_logits())
    for m in models:
        m.close()


def test_public_names():
    for name in ("Llama", "KvsinkError", "GGUFFormatError", "pull_default_model", "GGUFFile"):
        assert hasattr(kvsink_cpp, name)
