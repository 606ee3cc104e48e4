"""Structured output (kvsink_cpp.structured): response_format -> llguidance token masks.

The constraint is driven with the real SmolLM2 vocabulary (no weights needed) by stand-in
samplers -- random allowed tokens, and greedy over random logits -- and what they write must
parse as JSON and satisfy the schema (checked by a small validator below, for the keywords used).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="structured output needs llguidance (pip install llguidance)")

from kvsink_cpp import structured  # noqa: E402
from kvsink_cpp.gguf_file import GGUFFile  # noqa: E402
from kvsink_cpp.structured import constrained_sample, constraint_for, parse_response_format  # noqa: E402
from kvsink_cpp.tokenizer import Tokenizer  # noqa: E402

SPM_VOCAB = Path(__file__).resolve().parent.parent.parent / "shared/data/vocab/ggml-vocab-llama-spm.gguf"

MAX_STEPS = 400
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["name", "age", "member", "role", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "address": {"type": "object",
                            "properties": {"city": {"type": "string"},
                                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                            "required": ["city", "zip"]},
            },
            "required": ["name", "address"],
        },
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
        "note": {"type": ["string", "null"]},
    },
    "required": ["id", "owner", "scores"],
}
FORMATS = {
    "person": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    "nested": {"type": "json_object", "schema": NESTED},
    "any_object": {"type": "json_object"},
    "integer": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}},
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "any_object": {"type": "object"},
           "integer": {"type": "integer"}}


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    with GGUFFile(smollm2_path) as f:
        return Tokenizer.from_metadata(f.metadata)


@pytest.fixture(scope="module")
def closing(tok) -> np.ndarray:
    """Tokens that close a string, array or object: the samplers lean on them more and more
    so that a run ends (uniform choice would write strings forever)."""
    return np.array([any(c in tok.token_bytes(i) for c in b'"]}') for i in range(tok.n_vocab)])


# ---- a validator for the keywords the schemas above use ------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def conforms(value, schema: dict) -> bool:
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_is_type(value, k) for k in kinds):
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(conforms(v, props[k]) for k, v in value.items() if k in props)
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(conforms(v, schema.get("items", {})) for v in value)
    if isinstance(value, str):
        return len(value) <= schema.get("maxLength", len(value))
    if _is_type(value, "number"):
        return schema.get("minimum", value) <= value <= schema.get("maximum", value)
    return True


def _is_type(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


# ---- stand-in samplers ---------------------------------------------------------------------

def run(tok, constraint, pick, max_steps: int = MAX_STEPS) -> bytes:
    """Sample with pick(masked_logits, step) until the constraint is finished; the text."""
    out = []
    for step in range(max_steps):
        logits = np.zeros(tok.n_vocab, dtype=np.float32)
        token = constrained_sample(logits, constraint, lambda masked: pick(masked, step))
        if token not in constraint.end_ids:
            out.append(token)
        if constraint.is_finished:
            return tok.decode(out)
    raise AssertionError(f"not finished after {max_steps} tokens: {tok.decode(out)[:200]!r}")


def random_allowed(rng, closing):
    """A uniformly random allowed token; with a probability rising to 1 by step 100, a
    random allowed closing token (or end token) instead."""
    def pick(masked, step):
        allowed = np.isfinite(masked)
        lean = allowed & closing
        if lean.any() and rng.random() < step / 100:
            allowed = lean
        return int(rng.choice(np.flatnonzero(allowed)))
    return pick


def greedy_random_logits(rng, closing):
    """argmax over fresh random logits; closing tokens gain a bonus that grows with the step."""
    def pick(masked, step):
        noise = rng.normal(size=masked.size).astype(np.float32)
        return int(np.argmax(masked + noise + closing[:masked.size] * (step / 25)))
    return pick


def with_ends(closing, constraint):
    ends = closing.copy()
    ends[list(constraint.end_ids)] = True
    return ends


# ---- response_format shapes ------------------------------------------------------------------

def test_response_format_shapes():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == {"type": "object"}
    assert parse_response_format({"type": "json_object", "schema": PERSON}) is PERSON
    assert parse_response_format({"type": "json_schema",
                                  "json_schema": {"name": "p", "schema": PERSON, "strict": True}}) is PERSON
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "p"}}) == {"type": "object"}


@pytest.mark.parametrize("bad", [
    "json_object", {"type": "json"}, {}, {"type": "json_schema"},
    {"type": "json_schema", "json_schema": "{}"},
    {"type": "json_schema", "json_schema": {"name": "p", "schema": "{}"}},
    {"type": "json_object", "schema": [1]}, {"type": "json_object", "schema": False},
])
def test_bad_response_format_says_what_is_accepted(bad):
    with pytest.raises(ValueError, match="json_object|json_schema|JSON schema"):
        parse_response_format(bad)


@pytest.mark.parametrize("schema, reason", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    ({"type": "string", "pattern": "(?<=a)b"}, ""),
])
def test_invalid_schema_is_a_value_error_with_llguidance_reason(tok, schema, reason):
    with pytest.raises(ValueError, match="JSON schema") as info:
        constraint_for(tok, {"type": "json_object", "schema": schema})
    assert reason in str(info.value)


def test_text_needs_no_constraint(tok):
    assert constraint_for(tok, None) is None
    assert constraint_for(tok, {"type": "text"}) is None
    logits = np.arange(tok.n_vocab, dtype=np.float32)
    assert constrained_sample(logits, None, lambda l: int(np.argmax(l))) == tok.n_vocab - 1


# ---- generation under the constraint -------------------------------------------------------

@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sampler", ["random", "greedy"])
def test_output_parses_and_matches_schema(tok, closing, name, seed, sampler):
    constraint = constraint_for(tok, FORMATS[name])
    rng = np.random.default_rng(seed)
    make = random_allowed if sampler == "random" else greedy_random_logits
    text = run(tok, constraint, make(rng, with_ends(closing, constraint)))
    value = json.loads(text)
    assert conforms(value, SCHEMAS[name]), text


def test_mask_is_exact_on_samples_and_never_allows_control_tokens(tok, closing):
    """Every sampled allowed token is one llguidance's matcher accepts, sampled disallowed
    tokens are ones it rejects, and control tokens other than the end set never appear."""
    constraint = constraint_for(tok, FORMATS["nested"])
    matcher = constraint._matcher
    control = np.array([tok.is_control(i) for i in range(tok.n_vocab)])
    control[list(constraint.end_ids)] = False
    rng = np.random.default_rng(7)
    pick = random_allowed(rng, with_ends(closing, constraint))
    for step in range(MAX_STEPS):
        allowed = constraint.allowed()
        assert not (allowed & control).any()
        yes, no = np.flatnonzero(allowed), np.flatnonzero(~allowed)
        for t in rng.choice(yes, min(20, yes.size), replace=False):
            assert matcher.validate_tokens([int(t)]) == 1, (step, tok.token_bytes(int(t)))
        for t in rng.choice(no, min(20, no.size), replace=False):
            assert matcher.validate_tokens([int(t)]) == 0, (step, tok.token_bytes(int(t)))
        constraint.accept(pick(np.where(allowed, 0.0, -np.inf), step))
        if constraint.is_finished:
            break
    assert constraint.is_finished


def test_a_forbidden_token_is_refused(tok):
    constraint = constraint_for(tok, FORMATS["person"])
    x = tok.encode("x", add_bos=False)[0]
    assert not constraint.allowed()[x]
    with pytest.raises(ValueError, match="breaks the JSON constraint"):
        constraint.accept(x)


def test_end_tokens_allowed_exactly_when_the_json_is_complete(tok):
    im_start = tok.encode("<|im_start|>", add_bos=False, special=True)[0]
    assert not tok.is_eog(im_start)
    constraint = constraint_for(tok, FORMATS["person"], end_ids=[im_start])
    ends = sorted(constraint.end_ids)
    assert set(ends) == set(tok.eog_ids) | {im_start}
    assert not constraint.allowed()[ends].any()
    text = '{"name": "Ann", "age": 31, "member": true, "role": "user", "tags": ["a"]'
    for token in tok.encode(text, add_bos=False):
        assert not constraint.allowed()[ends].any()
        constraint.accept(token)
    assert not constraint.is_accepting and not constraint.is_finished
    constraint.accept(tok.encode("}", add_bos=False)[0])
    # nothing may follow the object: only the end tokens are left, and the caller stops
    assert constraint.is_finished and constraint.is_accepting
    assert set(np.flatnonzero(constraint.allowed())) == set(ends)


def test_eos_ends_an_open_ended_document(tok):
    constraint = constraint_for(tok, FORMATS["integer"])
    constraint.accept(tok.encode("42", add_bos=False)[0])
    allowed = constraint.allowed()
    assert allowed[tok.eos_id] and allowed[tok.encode("7", add_bos=False)[0]]
    assert constraint.is_accepting and not constraint.is_finished
    constraint.accept(tok.eos_id)
    assert constraint.is_finished


def test_whitespace_is_bounded_by_default_and_schema_options_win(tok):
    """A model cannot loop on whitespace: one gap takes a space or a line break and an indent."""
    space = tok.encode(" ", add_bos=False)[0]
    constraint = constraint_for(tok, FORMATS["any_object"])
    constraint.accept(tok.encode("{", add_bos=False)[0])
    constraint.accept(space)
    assert not constraint.allowed()[space]
    compact = dict(PERSON, **{"x-guidance": {"whitespace_flexible": False}})
    constraint = constraint_for(tok, {"type": "json_object", "schema": compact})
    constraint.accept(tok.encode("{", add_bos=False)[0])
    assert not constraint.allowed()[space]


def test_mask_logits_copies_and_covers_a_padded_output_layer(tok):
    constraint = constraint_for(tok, FORMATS["person"])
    logits = np.ones(tok.n_vocab + 13, dtype=np.float32)
    masked = constraint.mask_logits(logits)
    assert (logits == 1).all()
    assert np.isneginf(masked[tok.n_vocab:]).all()
    assert np.array_equal(np.isfinite(masked[:tok.n_vocab]), constraint.allowed())
    with pytest.raises(ValueError, match="at least"):
        constraint.mask_logits(np.ones(10, dtype=np.float32))


def test_lltokenizer_is_cached_and_fast(tok):
    t0 = time.perf_counter()
    first = structured.lltokenizer(tok, end_ids=[5])
    built = time.perf_counter() - t0
    assert structured.lltokenizer(tok, end_ids=[5]) is first
    assert built < 5.0, f"building the llguidance tokenizer took {built:.2f} s"


def test_mask_time_per_token(tok, closing):
    constraint = constraint_for(tok, FORMATS["nested"])
    pick = random_allowed(np.random.default_rng(3), with_ends(closing, constraint))
    times = []
    while not constraint.is_finished:
        t0 = time.perf_counter()
        allowed = constraint.allowed()
        times.append(time.perf_counter() - t0)
        constraint.accept(pick(np.where(allowed, 0.0, -np.inf), len(times)))
    # about 0.05 ms on a 49k vocabulary; the bound leaves room for a loaded CI machine
    assert np.mean(times) < 0.02, f"mean mask time {np.mean(times) * 1e3:.2f} ms"


def test_sentencepiece_vocab_byte_tokens():
    """A SentencePiece vocab ('▁' for spaces, <0xNN> byte tokens) gives valid JSON too."""
    if not SPM_VOCAB.is_file():
        pytest.skip(f"{SPM_VOCAB} is absent (../shared is not checked out beside the repo)")
    with GGUFFile(SPM_VOCAB) as f:
        spm = Tokenizer.from_metadata(f.metadata)
    ends = np.array([any(c in spm.token_bytes(i) for c in b'"]}') for i in range(spm.n_vocab)])
    for seed in range(3):
        constraint = constraint_for(spm, FORMATS["person"])
        text = run(spm, constraint, random_allowed(np.random.default_rng(seed), with_ends(ends, constraint)))
        assert conforms(json.loads(text), PERSON), text
