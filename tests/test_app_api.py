"""What apps reach for (issue 19): structured output, logprobs, OpenAI message
shapes, tools, embeddings, vocab_only, scores[n_tokens - 1], a prompt cache,
suffix. Checked against independent oracles where there is one: json.loads
and the schema, a log-softmax of logits computed apart, the numpy forward."""
import json

import numpy as np
import pytest

from kvsink_cpp import LlamaRAMCache, Llama

from numpy_llama import NumpyLlama

EXACT = dict(matmul="f32", type_k="f32", type_v="f32")


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=1024, n_threads=2, verbose=False) as m:
        yield m


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                         "city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]}}}


def _ask(llm, **kw):
    messages = [{"role": "user", "content": "Describe a French person as JSON with name, age and city."}]
    kw.setdefault("max_tokens", 120)
    return llm.create_chat_completion(messages, temperature=0, **kw)


def test_json_schema_reply_parses_and_follows_the_schema(llm):
    reply = _ask(llm, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    choice = reply["choices"][0]
    data = json.loads(choice["message"]["content"])
    assert set(data) == {"name", "age", "city"}
    assert isinstance(data["name"], str) and isinstance(data["age"], int) and data["city"] in PERSON[
        "properties"]["city"]["enum"]
    assert choice["finish_reason"] == "stop"


def test_json_object_reply_parses_also_streamed(llm):
    fmt = {"type": "json_object"}
    whole = _ask(llm, response_format=fmt)["choices"][0]["message"]["content"]
    assert isinstance(json.loads(whole), dict)
    chunks = list(_ask(llm, response_format=fmt, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    text = llm.create_completion("A JSON object describing a cat:", temperature=0,
                                 response_format=fmt)["choices"][0]["text"]
    assert isinstance(json.loads(text), dict)  # max_tokens' default of 16 does not cut it


def test_bad_response_format_is_refused_before_generating(llm):
    with pytest.raises(ValueError, match="response_format"):
        _ask(llm, response_format={"type": "xml"})
    with pytest.raises(ValueError, match="schema"):
        _ask(llm, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}})


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_completion_logprobs_match_a_log_softmax_of_the_logits(llm, smollm2_path):
    prompt = "The capital of France is"
    out = llm.create_completion(prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and all(len(t) == 3 for t in lp["top_logprobs"])
    with Llama(str(smollm2_path), n_ctx=64, n_threads=2, verbose=False) as ref:  # same settings, apart
        ref.eval(ref.tokenize(prompt.encode()))
        expected = _log_softmax(ref.last_logits())
    first = int(np.argmax(expected))
    assert lp["token_logprobs"][0] == pytest.approx(expected[first], abs=1e-4)
    assert max(lp["top_logprobs"][0].values()) == pytest.approx(expected[first], abs=1e-4)


def test_chat_logprobs_in_the_openai_shape(llm):
    reply = _ask(llm, logprobs=True, top_logprobs=2, max_tokens=8)
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6  # greedy: the top one
    assert "".join(e["token"] for e in content) == reply["choices"][0]["message"]["content"]
    with pytest.raises(ValueError, match="top_logprobs"):
        _ask(llm, top_logprobs=2)
    assert _ask(llm, max_tokens=2)["choices"][0]["logprobs"] is None


def test_message_content_as_parts_or_none(llm):
    text = "What is the capital of France?"
    plain = llm.chat_prompt_tokens([{"role": "user", "content": text}])
    parts = llm.chat_prompt_tokens([{"role": "user", "content": [{"type": "text", "text": text}]}])
    assert parts == plain
    llm.chat_prompt_tokens([{"role": "user", "content": text}, {"role": "assistant", "content": None},
                            {"role": "user", "content": "Thanks"}])
    with pytest.raises(ValueError, match="image_url"):
        llm.chat_prompt_tokens([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_tools_reach_the_template(llm):
    from kvsink_cpp.chat_format import ChatFormatter
    template = ("{% for t in tools or [] %}[tool {{ t['function']['name'] }}]{% endfor %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    llm._chat_formatter, saved = ChatFormatter(template), llm._chat_formatter
    try:
        with_tools, _ = llm.chat_prompt_tokens([{"role": "user", "content": "hi"}], tools=tools)
        assert "[tool get_weather]" in llm.detokenize(with_tools).decode()
    finally:
        llm._chat_formatter = saved
    with pytest.raises(ValueError, match="functions"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], functions=[{"name": "f"}])


def test_embeddings_match_the_numpy_forward(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=128, n_threads=2, verbose=False, **EXACT) as m:
        text = "Attention sinks keep the first tokens exact."
        vector = np.array(m.embed(text))
        ids = m.tokenize(text.encode())
        both = m.embed([text, "Another sentence."])
        response = m.create_embedding(text)
    assert vector.shape == (576,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(both[0], vector, atol=1e-6) and len(both) == 2
    assert response["data"][0]["embedding"] == pytest.approx(vector.tolist(), abs=1e-6)
    assert response["usage"]["prompt_tokens"] == len(ids)
    ref = NumpyLlama(str(smollm2_path))
    trace = {}
    ref.forward(ids, trace=trace)
    pooled = ref._rmsnorm(trace["hidden"][-1], ref.w["output_norm.weight"]).mean(axis=0)
    pooled /= np.linalg.norm(pooled)
    assert float(vector @ pooled) > 0.99999


def test_vocab_only_tokenizes_without_weights(smollm2_path, llm):
    with Llama(str(smollm2_path), vocab_only=True, verbose=False) as vocab:
        text = b"Hello, world! <|im_start|>user"
        assert vocab.tokenize(text, special=True) == llm.tokenize(text, special=True)
        assert vocab.detokenize(vocab.tokenize(text)) == llm.detokenize(llm.tokenize(text))
        assert vocab.n_vocab() == llm.n_vocab() and vocab.metadata["general.architecture"] == "llama"
        with pytest.raises(RuntimeError, match="vocab_only"):
            vocab.eval([1, 2])


def test_scores_row_of_the_last_token_without_logits_all(llm):
    llm.reset()
    llm.eval(llm.tokenize(b"One two three"))
    n = llm.n_tokens
    assert np.array_equal(llm.scores[n - 1], llm.last_logits())
    assert np.array_equal(llm.scores[n - 1, :5], llm.last_logits()[:5])
    assert llm.scores.shape == (llm.n_ctx(), llm.n_vocab())
    with pytest.raises(IndexError, match="logits_all"):
        llm.scores[0]


def test_prompt_cache_resumes_an_earlier_conversation(smollm2_path):
    a = [{"role": "user", "content": "Name three colours."}]
    b = [{"role": "user", "content": "Name three animals."}]
    # exact products: the fast path's one-token logits (16-bit activations)
    # differ slightly from a batch's, so a resumed prompt (its last token
    # evaluated alone) could take another branch at a near-tie
    with Llama(str(smollm2_path), n_ctx=512, n_threads=2, verbose=False, **EXACT) as m:
        plain = m.create_chat_completion(a, temperature=0, max_tokens=12)["choices"][0]["message"]["content"]
        m.reset()
        m.set_cache(LlamaRAMCache(capacity_bytes=64 << 20))
        m.create_chat_completion(a, temperature=0, max_tokens=12)
        m.create_chat_completion(b, temperature=0, max_tokens=12)  # the context now holds b
        again = m.create_chat_completion(a, temperature=0, max_tokens=12)
        assert m.last_timings["prompt_tokens"] <= 1  # a's prompt came back from the cache
        assert again["choices"][0]["message"]["content"] == plain
        assert 0 < m.cache.cache_size <= 64 << 20


def test_suffix_fills_in_the_middle_or_is_appended(llm, monkeypatch):
    fim = llm.tokenizer_.fim_ids()
    out = llm.create_completion("def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))", max_tokens=6,
                                temperature=0)
    text = out["choices"][0]["text"]
    if fim is not None:  # SmolLM2's vocabulary has <fim_prefix>, <fim_suffix>, <fim_middle>
        assert not text.endswith("print(add(1, 2))")
    monkeypatch.setattr(llm.tokenizer_, "fim_ids", lambda: None)
    out = llm.create_completion("Once upon a time", suffix=" THE END", max_tokens=4, temperature=0)
    assert out["choices"][0]["text"].endswith(" THE END")


def test_gbnf_grammar_as_in_llama_cpp_python(llm):
    from kvsink_cpp import LlamaGrammar
    grammar = LlamaGrammar.from_string('root ::= ("yes" | "no") "."')
    for _ in range(2):
        out = llm.create_completion("Is Paris in France? Answer:", grammar=grammar, temperature=0.7, seed=3,
                                    max_tokens=8)
        assert out["choices"][0]["text"] in ("yes.", "no.")
    reply = llm.create_chat_completion([{"role": "user", "content": "Pick a number."}], temperature=0,
                                       grammar='root ::= [0-9] [0-9]?')
    assert reply["choices"][0]["message"]["content"].isdigit()
    schema = LlamaGrammar.from_json_schema(json.dumps(PERSON))
    data = json.loads(_ask(llm, grammar=schema)["choices"][0]["message"]["content"])
    assert set(data) == {"name", "age", "city"}
    with pytest.raises(ValueError, match="grammar"):
        LlamaGrammar.from_string("root ::= (")
