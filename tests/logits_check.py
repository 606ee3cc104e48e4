"""Shared by the architecture tests (test_gemma3.py, test_archs.py): the
exact path's settings, running a model on token ids, and comparing logits
with the numpy forward pass's."""
from __future__ import annotations

import numpy as np

from kvsink_cpp import Llama

EXACT = dict(matmul="f32", type_k="f32", type_v="f32", sinks="none")


def max_rel_diff(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def assert_logits_close(got, want, rel=1e-3):
    diff = np.abs(got - want).max()
    tol = rel * np.abs(want).max()
    assert diff <= tol, f"max |logit difference| {diff:.3g} exceeds {tol:.3g}"
    mismatch = np.flatnonzero(got.argmax(-1) != want.argmax(-1))
    assert mismatch.size == 0, f"argmax differs at positions {mismatch.tolist()}"


def run(path, tokens, batched=True, **kw):
    """Logits of every token (exact path unless kw says otherwise), evaluated
    in one batch or one token at a time."""
    opts = {**EXACT, **kw}
    with Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, **opts) as llm:
        if batched:
            llm.eval(tokens)
        else:
            for t in tokens:
                llm.eval([t])
        return llm.scores[: len(tokens)].copy()
