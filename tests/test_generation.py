"""Text generation through the app API and the CLI, on SmolLM2."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from kvsink_cpp import ContextFullError, Llama
from kvsink_cpp.completion import StopMatcher

from numpy_llama import NumpyLlama

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # the exact path: the greedy answers below are compared with the numpy
    # reference or named ("Paris"); the fast default's greedy answers are
    # measured against the exact ones in bench/greedy_agreement.py
    with Llama(str(smollm2_path), n_ctx=512, n_threads=2, verbose=False, matmul="f32") as m:
        yield m


def greedy(llm, prompt=PROMPT, **kw):
    return llm.create_completion(prompt, temperature=0, **kw)


def test_greedy_tokens_are_the_numpy_reference_argmax(llm, smollm2_path):
    prompt = llm.tokenize(PROMPT.encode())
    generated = list(_take(llm.generate(prompt, temp=0), 32))
    # teacher forcing: each generated token must be the reference's argmax after its prefix
    logits = NumpyLlama(smollm2_path).forward(prompt + generated[:-1])
    want = logits[len(prompt) - 1:].argmax(-1).tolist()
    assert generated == want


def _take(iterator, n):
    for _, token in zip(range(n), iterator):
        yield token


def test_same_seed_same_text(llm):
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = llm.create_completion(PROMPT, seed=1234, **kw)["choices"][0]["text"]
    b = llm.create_completion(PROMPT, seed=1234, **kw)["choices"][0]["text"]
    assert a == b and a


def test_stream_equals_one_shot(llm):
    whole = greedy(llm, max_tokens=24)
    chunks = list(greedy(llm, max_tokens=24, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 24
    assert whole["object"] == "text_completion"


def test_stop_string_split_across_tokens_is_never_printed(llm):
    text = greedy(llm, max_tokens=24)["choices"][0]["text"]
    # a stop string that starts inside one token and ends inside a later one
    start = text.index(" Paris") + 3
    stop = text[start:start + 6]
    result = greedy(llm, max_tokens=24, stop=[stop])
    assert result["choices"][0]["text"] == text[:start]
    assert result["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in greedy(llm, max_tokens=24, stop=stop, stream=True))
    assert streamed == text[:start]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["</end>"])
    assert m.push("hello </") == ("hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("x and") == ("</enx and", False)
    assert m.push(" </end> more") == (" ", True)


def test_chat_completion_and_prefix_reuse(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = llm.create_chat_completion(messages, temperature=0, max_tokens=32)
    answer = first["choices"][0]["message"]["content"]
    assert "Paris" in answer and first["choices"][0]["finish_reason"] == "stop"
    assert first["object"] == "chat.completion"
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    second = llm.create_chat_completion(messages, temperature=0, max_tokens=32)
    evaluated = llm.last_timings["prompt_tokens"]
    assert evaluated < second["usage"]["prompt_tokens"] - 20, "the shared prefix must not be evaluated again"
    chunks = list(llm.create_chat_completion(messages, temperature=0, max_tokens=32, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == second["choices"][0]["message"]["content"]


def test_cancel_from_another_thread(llm):
    stream = llm.create_completion(PROMPT, max_tokens=-1, temperature=0, stream=True)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 5:
            threading.Thread(target=llm.cancel).start()
    assert chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
    assert len(chunks) < 100
    # the next generation is not affected
    assert greedy(llm, max_tokens=4)["choices"][0]["finish_reason"] == "length"


def test_prompt_longer_than_context_is_refused_up_front(llm):
    with pytest.raises(ContextFullError, match="n_ctx is 512"):
        llm.create_completion("word " * 600, max_tokens=4)
    assert greedy(llm, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_generation_stops_at_a_full_context(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=32, n_threads=2, verbose=False) as small:
        result = small.create_completion(PROMPT, max_tokens=-1, temperature=0)
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["usage"]["total_tokens"] == 32


def test_chat_cli_answers_through_a_pipe_and_exits_on_eof(smollm2_path):
    # exact products: the greedy answer is then known (the fast default's
    # first token is a near tie on this question, 0.08 logits apart)
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "chat", str(smollm2_path), "--temp", "0",
                          "-n", "48", "-c", "512", "--matmul", "f32"],
                         input="What is the capital of France?\n/stats\n", capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    assert "tokens/s" in run.stderr and "matmul f32 (exact)" in run.stderr


def test_chat_cli_defaults_state_themselves(smollm2_path):
    """No options: the fast products, the default KV cache and kvsink, and
    /stats says so."""
    from kvsink_cpp.llama import DEFAULT_KV_TYPE
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "chat", str(smollm2_path), "-n", "16", "-c", "512"],
                         input="Name a fruit.\n/stats\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    settings = next(line for line in run.stderr.splitlines() if line.startswith("settings:"))
    assert "matmul q8" in settings and f"KV {DEFAULT_KV_TYPE}/{DEFAULT_KV_TYPE}" in settings
    assert "sinks kvsink" in settings and "KV bytes/token" in settings


def test_generate_cli_streams_a_completion(smollm2_path):
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "generate", "-m", str(smollm2_path),
                          "-p", PROMPT, "-n", "8", "--temp", "0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(PROMPT + " Paris")


def test_generate_cli_exact_matmul(smollm2_path):
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "generate", "-m", str(smollm2_path),
                          "-p", PROMPT, "-n", "8", "--temp", "0", "--matmul", "f32"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(PROMPT + " Paris")


def test_chat_runs_far_past_n_ctx(smollm2_path):
    """A conversation several times the context: the ring buffer and the dropped
    turns keep it going, nothing fails."""
    questions = "".join(f"Tell me one fact about the number {n}.\n" for n in range(6))
    run = subprocess.run([sys.executable, "-m", "kvsink_cpp", "chat", str(smollm2_path), "--temp", "0",
                          "-n", "48", "-c", "96", "-ctk", "q4", "-ctv", "q4"],
                         input=questions + "/stats\n", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert len([line for line in run.stdout.splitlines() if line.strip()]) >= 6
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("flags, message", [
    (["-n", "0"], "-n must be -1"), (["-n", "-5"], "-n must be -1"), (["--top-p", "5"], "--top-p must be"),
    (["--top-k", "-4"], "--top-k must be"), (["--temp", "-1"], "--temp must be"), (["-t", "0"], "-t must be"),
])
def test_cli_flags_are_checked_before_the_model_loads(tmp_path, capsys, flags, message):
    """A bad flag is named at once: the model path does not even exist."""
    from kvsink_cpp.__main__ import main
    missing = str(tmp_path / "missing.gguf")
    for command in (["chat", missing], ["generate", "-m", missing, "-p", "hi"]):
        assert main(command + flags) == 1
        err = capsys.readouterr().err
        assert message in err and "missing.gguf" not in err


def test_chat_message_longer_than_the_context_is_refused_by_name(smollm2_path):
    """Not cut to its tail without a word: the message is refused, the
    conversation is as it was, and the next message works."""
    import io
    from kvsink_cpp.chat_cli import ChatSession
    with Llama(str(smollm2_path), n_ctx=64, n_threads=2, verbose=False, kv_ring=True) as small:
        session = ChatSession(small, None, {"temperature": 0}, 4, out=io.StringIO())
        with pytest.raises(ValueError, match="has no room for it"):
            session.reply("word " * 200)
        assert session.messages == []
        assert session.reply("Hi")
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
