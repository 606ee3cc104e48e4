"""Structured output: OpenAI-style `response_format` (JSON object / JSON schema) as a token mask.

The grammar work is llguidance's (https://github.com/guidance-ai/llguidance): it compiles the
JSON schema and computes, before every sampled token, which vocabulary entries keep the output
a valid prefix of a document matching it. This module only adapts our GGUF Tokenizer to it and
wraps one matcher per generation:

    constraint = constraint_for(tokenizer, response_format)   # None: no constraint
    token = constrained_sample(logits, constraint, sample_fn)  # mask, sample, accept
    if constraint is not None and constraint.is_finished: stop # the document is complete

The end-of-generation tokens (and any `end_ids` given) are allowed exactly when the document
is complete, so a masked sampler can only stop on valid JSON; once nothing can follow, only
those tokens are allowed and `is_finished` is True.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Callable, Iterable, Optional

import numpy as np

from .tokenizer import TokenAttr, Tokenizer

try:
    import llguidance
except ImportError:  # a dependency, but keep `import kvsink_cpp` working without it
    llguidance = None

__all__ = ["LlamaGrammar", "ResponseFormatConstraint", "constraint_for", "constrained_sample",
           "parse_response_format", "lltokenizer"]

# JSON whitespace a small model may write between tokens: nothing, one space, or a line break
# with an indent. llguidance matches the pattern at most once per gap, so the bound stops a
# model from looping on whitespace, while keeping `{"a": 1}` and pretty-printed styles.
# A schema's own top-level "x-guidance" options override these.
_JSON_DEFAULTS = {"whitespace_pattern": r"(?:\x20|\n{1,2}[\x20\t]{0,20})"}

_ANY_OBJECT = {"type": "object"}

_ACCEPTED = ("response_format must be None, {'type': 'text'}, {'type': 'json_object'}, "
             "{'type': 'json_object', 'schema': {...}} or "
             "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}, 'strict': ...}}")


def _require_llguidance():
    if llguidance is None:
        raise ImportError("response_format needs the llguidance package: pip install llguidance")
    return llguidance


# ---- response_format -> JSON schema ---------------------------------------------------------

def parse_response_format(response_format) -> Optional[dict]:
    """The JSON schema a response_format asks for, or None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"{_ACCEPTED}; got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # llama-cpp-python's extension: an optional "schema"
        return _schema_of(response_format.get("schema", _ANY_OBJECT), "response_format['schema']")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError(f"{_ACCEPTED}; 'json_schema' must be a dict, got {spec!r:.80}")
        # OpenAI makes "schema" optional; without one any JSON object is accepted
        return _schema_of(spec.get("schema", _ANY_OBJECT), "response_format['json_schema']['schema']")
    raise ValueError(f"{_ACCEPTED}; got type {kind!r}")


def _schema_of(schema, where: str) -> dict:
    if schema is True:  # JSON Schema's "anything"; false (nothing) cannot be generated
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema dict, got {type(schema).__name__}")
    return schema


# ---- Tokenizer -> llguidance.LLTokenizer -----------------------------------------------------

_cache: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def lltokenizer(tokenizer: Tokenizer, end_ids: Iterable[int] = ()) -> "llguidance.LLTokenizer":
    """The llguidance view of a vocabulary, built once per Tokenizer and end set (about
    0.4 s for a 49k vocabulary, 4 s for 256k; later calls are a dict lookup).
    Its EOS set is the vocab's end-of-generation tokens plus `end_ids`."""
    ends = frozenset(int(i) for i in end_ids) | tokenizer.eog_ids
    with _cache_lock:
        per_tok = _cache.setdefault(tokenizer, {})
        if ends not in per_tok:
            per_tok[ends] = _build_lltokenizer(tokenizer, sorted(ends))
        return per_tok[ends]


class _Wrapper:
    """The duck type llguidance.TokenizerWrapper reads: token bytes, eos/bos ids, encode()."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [_token_bytes(tokenizer, i) for i in range(tokenizer.n_vocab)]
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t[:1] == b"\xff"]
        self._tokenizer = tokenizer
        self._by_bytes: Optional[dict[bytes, int]] = None  # built on first need
        self._longest = 0

    def __call__(self, text) -> list[int]:
        """Tokens whose bytes are exactly `text`: llguidance allows the tokens of the bytes
        a grammar forces, so an extra byte (SentencePiece's space prefix, WordPiece's word
        start) would let a token through that the grammar then rejects."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._tokenizer.encode(data, add_bos=False)
        if b"".join(self.tokens[i] for i in ids) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        """Longest-match tokenization on token bytes (rarely needed: short forced strings)."""
        if self._by_bytes is None:
            self._by_bytes = {}
            for i, piece in enumerate(self.tokens):
                if piece and piece[:1] != b"\xff":
                    self._by_bytes.setdefault(piece, i)
            self._longest = max(map(len, self._by_bytes))
        ids, pos = [], 0
        while pos < len(data):
            for end in range(min(len(data), pos + self._longest), pos, -1):
                if data[pos:end] in self._by_bytes:
                    ids.append(self._by_bytes[data[pos:end]])
                    pos = end
                    break
            else:  # a byte no token spells (WordPiece has no byte fallback): skip it
                pos += 1
        return ids


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """llguidance's convention (as in its llama.cpp adapter): special tokens are their text
    behind a 0xFF byte, which no UTF-8 text contains, so a grammar never emits them as text."""
    piece = tokenizer.token_bytes(token_id, special=True)
    attr = tokenizer.token_attr(token_id)
    special = attr & (TokenAttr.CONTROL | TokenAttr.UNKNOWN) or (
        attr & TokenAttr.USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">"))
    if special:
        return b"\xff" + piece
    if piece[:1] == b"\xff":
        # a raw 0xFF byte token (SentencePiece's <0xFF>) would read as a nameless special
        # token, which llguidance rejects; 0xFF never occurs in UTF-8 text, so naming it a
        # special token loses nothing
        return b"\xff" + tokenizer.token_text(token_id).encode("utf-8")
    return piece


def _build_lltokenizer(tokenizer: Tokenizer, ends: list[int]) -> "llguidance.LLTokenizer":
    llg = _require_llguidance()
    if not ends:
        raise ValueError("the vocabulary has no end-of-generation token to end a JSON reply with")
    eos = tokenizer.eos_id if tokenizer.eos_id in ends else ends[0]
    wrapper = llg.TokenizerWrapper(_Wrapper(tokenizer, eos))
    # json_slices: the mask-time optimisation tuned for JSON grammars, the only ones built here
    return llg.LLTokenizer(wrapper, n_vocab=tokenizer.n_vocab, eos_token=ends,
                           slices=llg.LLTokenizer.json_slices())


# ---- the per-generation constraint -----------------------------------------------------------

class ResponseFormatConstraint:
    """One generation's JSON constraint: mask the logits, accept the sampled token, repeat
    until `is_finished`. Not thread-safe; make one per request."""

    def __init__(self, tokenizer: Tokenizer, schema: Optional[dict], end_ids: Iterable[int] = (),
                 grammar: Optional[str] = None):
        """From a JSON schema, or (schema None) an llguidance grammar text."""
        llg = _require_llguidance()
        self._lltok = lltokenizer(tokenizer, end_ids)
        self.end_ids = frozenset(self._lltok.eos_tokens)
        self.n_vocab = tokenizer.n_vocab
        self._matcher = llg.LLMatcher(self._lltok, _grammar(llg, schema) if grammar is None else grammar,
                                      log_level=0)
        if self._matcher.is_error():
            what = "JSON schema" if grammar is None else "grammar"
            raise ValueError(f"unsupported or invalid {what}: {self._matcher.get_error()}")
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self._allowed: Optional[np.ndarray] = None  # the mask for the current position

    @property
    def is_finished(self) -> bool:
        """The document is complete and nothing may follow (or an end token was accepted):
        stop generating, finish_reason "stop"."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete document (an end token would be allowed now)."""
        return self._matcher.is_accepting()

    def allowed(self) -> np.ndarray:
        """Bool array over the vocabulary: the tokens that may come next."""
        if self._allowed is None:
            self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._check()
            bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
            self._allowed = bits[:self.n_vocab].astype(bool)
            if not self._allowed.any():
                raise RuntimeError("the JSON constraint allows no token (llguidance: "
                                   f"{self._matcher.stop_reason()})")
        return self._allowed

    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with the disallowed tokens at -inf. Entries past the vocabulary
        (a padded output layer) are disallowed too."""
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size < self.n_vocab:
            raise ValueError(f"logits must be 1-D with at least {self.n_vocab} entries, "
                             f"got shape {logits.shape}")
        masked = np.full(logits.shape, -np.inf, dtype=np.result_type(logits.dtype, np.float32))
        allowed = self.allowed()
        masked[:self.n_vocab][allowed] = logits[:self.n_vocab][allowed]
        return masked

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; a token the mask forbade raises ValueError."""
        self._allowed = None
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"token {int(token_id)} breaks the JSON constraint: "
                             f"{self._matcher.get_error()}")

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"JSON constraint failed: {self._matcher.get_error()}")


def _grammar(llg, schema: dict) -> str:
    """The llguidance grammar text; whether llguidance supports the schema is only known
    when a matcher compiles it (ResponseFormatConstraint checks)."""
    options = schema.get("x-guidance")
    # whitespace_pattern beats whitespace_flexible, so a schema that sets either keeps its choice
    own_ws = isinstance(options, dict) and ({"whitespace_flexible", "whitespace_pattern"} & options.keys())
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                      defaults=None if own_ws else _JSON_DEFAULTS)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid JSON schema: {e}") from None


# ---- the two calls a sampling loop makes ---------------------------------------------------

class LlamaGrammar:
    """llama-cpp-python's grammar object for `create_completion(..., grammar=)`:
    a GBNF grammar (llama.cpp's format; Lark syntax is accepted too) or a JSON
    schema, compiled by llguidance when a generation starts."""

    def __init__(self, grammar: str):
        llg = _require_llguidance()
        from llguidance.gbnf_to_lark import any_to_lark
        try:
            self._grammar = llg.LLMatcher.grammar_from_lark(any_to_lark(grammar))
        except Exception as e:  # llguidance's parse errors have several types
            raise ValueError(f"invalid grammar: {e}") from None

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        return cls(grammar)

    @classmethod
    def from_file(cls, file, verbose: bool = True) -> "LlamaGrammar":
        with open(file, encoding="utf-8") as f:
            return cls(f.read())

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> "LlamaGrammar":
        grammar = cls.__new__(cls)
        grammar._grammar = _grammar(_require_llguidance(), _schema_of(json.loads(json_schema), "json_schema"))
        return grammar


def constraint_for(tokenizer: Tokenizer, response_format, end_ids: Iterable[int] = (),
                   grammar: Optional[LlamaGrammar] = None) -> Optional[ResponseFormatConstraint]:
    """A fresh constraint for one generation, or None when response_format asks for text.
    end_ids: extra tokens that end the reply (a chat template's stop tokens), allowed
    like EOS only once the JSON is complete. Raises ValueError for a bad response_format
    or a schema llguidance cannot compile."""
    schema = parse_response_format(response_format)
    if grammar is not None:
        if schema is not None:
            raise ValueError("give either grammar or a JSON response_format, not both")
        if isinstance(grammar, str):
            grammar = LlamaGrammar(grammar)
        if not isinstance(grammar, LlamaGrammar):
            raise TypeError(f"grammar must be a LlamaGrammar or GBNF text, got {type(grammar).__name__}")
        return ResponseFormatConstraint(tokenizer, None, end_ids, grammar=grammar._grammar)
    if schema is None:
        return None
    return ResponseFormatConstraint(tokenizer, schema, end_ids)


def constrained_sample(logits: np.ndarray, constraint: Optional[ResponseFormatConstraint],
                       sample_fn: Callable[[np.ndarray], int]) -> int:
    """sample_fn over the logits masked by the constraint, then the constraint accepts the
    token. Without a constraint: sample_fn(logits). The logits are not modified."""
    if constraint is None:
        return sample_fn(logits)
    token = int(sample_fn(constraint.mask_logits(logits)))
    constraint.accept(token)
    return token
