"""Token sampling: a chain of small steps in llama.cpp's order, seeded.

The chain is the one llama-cpp-python's `Llama._init_sampler` builds for
`create_completion` (logit bias is its first, custom sampler):

    logit bias -> penalties -> top_k -> typical_p -> top_p -> min_p -> temperature -> dist

Each step mirrors the sampler of the same name in llama.cpp's
`src/llama-sampling.cpp`. Bias and penalties act on the full-vocabulary
logits vector (indexed by token id), because in the chain they always run
before anything is cut; the other steps act on a candidate set, a pair of
arrays `(ids, logits)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# top_p sorts only the best 256 candidates first (llama.cpp's heuristic), growing 8x while short of p.
_TOP_P_FIRST_GUESS = 256
_TOP_P_GROWTH = 8


@dataclass
class SamplingParams:
    """Sampling settings; the defaults are llama-cpp-python's `create_completion` ones."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    def __post_init__(self):
        self.temperature = _finite_float("temperature", self.temperature)
        self.top_k = _int_at_least("top_k", self.top_k, 0)
        self.top_p = _in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.min_p = _in_range("min_p", self.min_p, 0.0, 1.0)
        self.typical_p = _in_range("typical_p", self.typical_p, 0.0, 1.0, low_open=True)
        self.repeat_penalty = _finite_float("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0.0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")
        self.frequency_penalty = _finite_float("frequency_penalty", self.frequency_penalty)
        self.presence_penalty = _finite_float("presence_penalty", self.presence_penalty)
        self.penalty_last_n = _int_at_least("penalty_last_n", self.penalty_last_n, -1)
        self.logit_bias = _checked_bias(self.logit_bias)
        if self.seed is not None:
            self.seed = _int_at_least("seed", self.seed, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _in_range(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    value = _finite_float(name, value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return value


def _int_at_least(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _checked_bias(bias) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    checked = {}
    for token, value in bias.items():
        # JSON (OpenAI-style requests) can only carry the ids as strings.
        if isinstance(token, str) and token.strip().isdigit():
            token = int(token)
        token = _int_at_least("logit_bias token id", token, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"logit_bias[{token}] must be a number, got {value!r}")
        checked[token] = float(value)
    return checked


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of the candidates; -inf logits get probability 0."""
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float] | None) -> np.ndarray:
    """Add `bias[token]` to the full-vocabulary logits (-inf bans a token); returns a new array."""
    if not bias:
        return logits
    tokens = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    _check_token_ids(tokens, logits.size, "logit_bias")
    biased = logits.copy()
    biased[tokens] += np.fromiter(bias.values(), dtype=biased.dtype, count=len(bias))
    return biased


def apply_penalties(logits: np.ndarray, history: Sequence[int], repeat: float,
                    frequency: float, presence: float, last_n: int) -> np.ndarray:
    """llama.cpp's repeat/frequency/presence penalties over the last `last_n` history tokens.

    last_n = -1 looks at the whole history, 0 disables. Returns a new array when it changes anything.
    """
    if last_n == 0 or (repeat == 1.0 and frequency == 0.0 and presence == 0.0):
        return logits
    window = history if last_n == -1 else history[-last_n:]
    if len(window) == 0:
        return logits
    tokens, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    _check_token_ids(tokens, logits.size, "history")
    penalized = logits.copy()
    seen = penalized[tokens]
    # Dividing a negative logit would make the token more likely, so those are multiplied.
    seen = np.where(seen <= 0, seen * repeat, seen / repeat)
    penalized[tokens] = seen - (counts * frequency + presence)
    return penalized


def _check_token_ids(tokens: np.ndarray, n_vocab: int, what: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= n_vocab):
        bad = tokens[(tokens < 0) | (tokens >= n_vocab)][0]
        raise ValueError(f"{what} has token id {int(bad)} outside the vocabulary [0, {n_vocab})")


def _largest_first(logits: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest logits, largest first, without sorting the rest."""
    if n >= logits.size:
        return np.argsort(-logits)
    top = np.argpartition(logits, logits.size - n)[logits.size - n:]
    return top[np.argsort(-logits[top])]


def top_k(ids: np.ndarray, logits: np.ndarray, k: int):
    """Keep the k highest logits, sorted descending; k <= 0 keeps everything."""
    if k <= 0 or k >= ids.size:
        return ids, logits
    keep = _largest_first(logits, k)
    return ids[keep], logits[keep]


def typical_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy."""
    if p >= 1.0:
        return ids, logits
    probs = softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        surprise = -np.log(probs)
        entropy = -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0))
    order = np.argsort(np.abs(surprise - entropy))
    cumulative = np.cumsum(probs[order])
    # llama.cpp stops at the first token that takes the sum strictly above p.
    n_keep = int(np.searchsorted(cumulative, p, side="right")) + 1
    keep = order[:min(max(n_keep, min_keep), ids.size)]
    return ids[keep], logits[keep]


def top_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Nucleus sampling: keep the smallest most-probable set whose probability is >= p."""
    if p >= 1.0:
        return ids, logits
    probs = softmax(logits)
    n_sorted = min(_TOP_P_FIRST_GUESS, ids.size)
    while True:
        order = _largest_first(logits, n_sorted)
        cumulative = np.cumsum(probs[order])
        if cumulative[-1] >= p or n_sorted == ids.size:
            break
        n_sorted = min(n_sorted * _TOP_P_GROWTH, ids.size)
    n_keep = int(np.searchsorted(cumulative, p, side="left")) + 1
    keep = order[:min(max(n_keep, min_keep), ids.size)]
    return ids[keep], logits[keep]


def min_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Keep the tokens whose probability is >= p times the top probability."""
    if p <= 0.0 or ids.size == 0:
        return ids, logits
    # p_i >= p * p_max  <=>  logit_i >= max_logit + log(p): no softmax needed.
    keep = logits >= np.max(logits) + math.log(p)
    if np.count_nonzero(keep) >= min_keep:
        return ids[keep], logits[keep]
    top = _largest_first(logits, min(min_keep, ids.size))
    return ids[top], logits[top]


def temperature(ids: np.ndarray, logits: np.ndarray, temp: float):
    """Scale the logits by 1/temp; temp <= 0 keeps only the highest (greedy)."""
    if temp <= 0.0:
        best = int(np.argmax(logits))
        return ids[best:best + 1], logits[best:best + 1]
    return ids, logits / logits.dtype.type(temp)


def draw(ids: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> int:
    """Pick one candidate with probability softmax(logits)."""
    cumulative = np.cumsum(softmax(logits))
    target = rng.random() * cumulative[-1]
    # side="right" never lands on a zero-probability candidate.
    index = int(np.searchsorted(cumulative, target, side="right"))
    return int(ids[min(index, ids.size - 1)])


class Sampler:
    """Picks the next token from a logits vector with `params`, drawing from a seeded generator."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams()
        self._all_ids = np.arange(0, dtype=np.int64)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Restart the generator from `seed`, else from params.seed (None: fresh entropy)."""
        if seed is not None:
            _int_at_least("seed", seed, 0)
        self._rng = np.random.default_rng(seed if seed is not None else self.params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token id. `history` holds the tokens the penalties count (llama.cpp: generated ones)."""
        adjusted = self._biased_and_penalized(logits, history)
        if self.params.greedy:
            best = int(np.argmax(adjusted))
            _check_drawable(adjusted[best])
            return best
        ids, cut = self._truncated(adjusted)
        return draw(ids, cut, self._rng)

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()):
        """The (ids, probabilities) the next draw chooses from, after every step of the chain."""
        adjusted = self._biased_and_penalized(logits, history)
        if self.params.greedy:
            best = int(np.argmax(adjusted))
            _check_drawable(adjusted[best])
            return np.array([best], dtype=np.int64), np.ones(1)
        ids, cut = self._truncated(adjusted)
        return ids, softmax(cut)

    def _biased_and_penalized(self, logits, history) -> np.ndarray:
        logits = _as_logits(logits)
        if np.isnan(logits).any():
            raise ValueError(f"the model's logits contain NaN ({int(np.isnan(logits).sum())} of {logits.size}): its "
                             f"weights or activations overflowed (a damaged or mis-converted model file?)")
        p = self.params
        logits = apply_logit_bias(logits, p.logit_bias)
        return apply_penalties(logits, history, p.repeat_penalty, p.frequency_penalty,
                               p.presence_penalty, p.penalty_last_n)

    def _truncated(self, logits: np.ndarray):
        p = self.params
        ids, cut = top_k(self._ids_for(logits.size), logits, p.top_k)
        _check_drawable(np.max(cut))
        ids, cut = typical_p(ids, cut, p.typical_p)
        ids, cut = top_p(ids, cut, p.top_p)
        ids, cut = min_p(ids, cut, p.min_p)
        return temperature(ids, cut, p.temperature)

    def _ids_for(self, n_vocab: int) -> np.ndarray:
        # Reused across calls: allocating arange(n_vocab) every token is measurable.
        if self._all_ids.size != n_vocab:
            self._all_ids = np.arange(n_vocab, dtype=np.int64)
        return self._all_ids


def _as_logits(logits) -> np.ndarray:
    array = np.asarray(logits)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {array.shape}")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)
    return array


def _check_drawable(best_logit) -> None:
    if not best_logit > -np.inf:
        raise ValueError("no token can be sampled: every logit is -inf (after logit_bias, if one was given)")
