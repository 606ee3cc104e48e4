"""Pieces of text generation that are independent of the model: stop strings
that are never printed (even when split across tokens) and the OpenAI-style
response dicts that llama-cpp-python returns."""
from __future__ import annotations

import time
import uuid
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class StopMatcher:
    """Holds back text that may be the start of a stop string.

    push(text) returns (text safe to show, stopped); once a stop string is
    complete, the text before it is returned and the rest is dropped.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> Tuple[str, bool]:
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(pos for pos, _ in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = self._longest_partial_stop()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of pending that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class TokenLogprob(NamedTuple):
    """A sampled token's log-probability under the model (log-softmax of its
    raw logits: before penalties, bias, temperature or a response_format
    mask) and the n most likely tokens' at that step."""
    text: str
    data: bytes
    logprob: float
    top: List[Tuple[str, bytes, float]]


def token_logprob(tokenizer, logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    x = logits.astype(np.float64)
    m = float(x.max())
    logp = x - (m + float(np.log(np.exp(x - m).sum())))
    top = np.argsort(-logp)[:max(n_top, 0)] if n_top else []
    def piece(t):
        data = tokenizer.token_bytes(int(t))
        return data.decode("utf-8", errors="replace"), data
    text, data = piece(token)
    return TokenLogprob(text, data, float(logp[token]),
                        [(*piece(t), float(logp[t])) for t in top])


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions format (tokens, text_offset, token_logprobs, top_logprobs)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "text_offset": offsets,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text: lp for text, _, lp in e.top} for e in entries]}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """The chat completions format: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.data),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(d)} for t, d, lp in e.top]}
                        for e in entries], "refusal": None}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def completion_chunk(cid: str, model: str, created: int, text: str, finish_reason: Optional[str],
                     logprobs: Optional[dict] = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_response(cid: str, model: str, created: int, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int, logprobs: Optional[dict] = None) -> dict:
    response = completion_chunk(cid, model, created, text, finish_reason, logprobs)
    response["usage"] = _usage(prompt_tokens, completion_tokens)
    return response


def chat_chunk(cid: str, model: str, created: int, delta: dict, finish_reason: Optional[str],
               logprobs: Optional[dict] = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_response(cid: str, model: str, created: int, content: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int, logprobs: Optional[dict] = None) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": _usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())


def normalize_stop(stop) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise TypeError("stop must be a string or a list of strings")
    return list(stop)
