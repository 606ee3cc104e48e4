"""Threads: a Llama serialises its own calls, Llamas sharing one model run
concurrently, and either way every result equals the same work done serially."""
import threading
import time

import numpy as np
import pytest

from kvsink_cpp import CancelledError, Llama

import synthetic

N_THREADS, N_CONTEXTS, N_JOBS, N_NEW = 4, 2, 200, 6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # a vocabulary large enough that every job's prompt starts with its own
    # token: no job reuses another's cached prefix, so each is deterministic
    # whatever ran before it on its context
    return str(synthetic.write_model(tmp_path_factory.mktemp("threads") / "m.gguf", "llama",
                                     {k: synthetic.T.Q4_0 for k in ("q", "k", "v", "o", "gate", "up", "down")}
                                     | {"embd": synthetic.T.F16, "out": synthetic.T.Q8_0},
                                     n_vocab=2048, n_layer=2))


def _open(path):
    return Llama(path, n_ctx=64, n_batch=16, n_threads=2, verbose=False, sinks="pfn:1")


def _prompt(thread, job):
    first = 1 + thread * N_JOBS + job  # distinct for all 800 jobs
    rng = np.random.default_rng(first)
    return [first] + rng.integers(1, 2048, size=5).tolist()


def _run(llm, prompt):
    tokens = llm.generate(prompt, temp=0.0)
    try:
        return [next(tokens) for _ in range(N_NEW)]
    finally:
        tokens.close()


def test_threads_on_shared_contexts_match_serial_runs(model_path):
    """4 threads x 2 contexts (one model) x 200 generations: each thread
    alternates contexts, so two threads contend for each Llama at any time."""
    llms = [_open(model_path) for _ in range(N_CONTEXTS)]
    assert llms[0]._loaded is llms[1]._loaded  # one model, two contexts
    results, errors = {}, []

    def worker(thread):
        try:
            for job in range(N_JOBS):
                results[thread, job] = _run(llms[(thread + job) % N_CONTEXTS], _prompt(thread, job))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with _open(model_path) as serial:
        for (thread, job), got in results.items():
            assert got == _run(serial, _prompt(thread, job)), (thread, job)
    for llm in llms:
        llm.close()


def test_same_thread_cannot_interleave_a_stream(model_path):
    with _open(model_path) as llm:
        tokens = llm.generate(_prompt(0, 0), temp=0.0)
        next(tokens)
        with pytest.raises(RuntimeError, match="unfinished stream"):
            llm.eval([1])
        tokens.close()
        llm.eval([1])  # free again once closed


def test_cancel_from_another_thread_stops_a_long_prompt(model_path, monkeypatch):
    """cancel() from another thread while a generation evaluates its prompt:
    the C core sees the request (the second C call starts with it standing)
    and stops; what was evaluated is kept and generate() ends quietly."""
    import kvsink_cpp.llama as llama_module
    real = llama_module.lib
    calls = []

    class CancellingLib:
        def __getattr__(self, name):
            return getattr(real, name)

        def kvs_context_eval(self, *args):
            calls.append(args[2])
            if len(calls) == 2:  # cancel from another thread, as an app's stop button would
                canceller = threading.Thread(target=llm.cancel)
                canceller.start()
                canceller.join()
            return real.kvs_context_eval(*args)

    with Llama(model_path, n_ctx=4096, n_batch=512, n_threads=1, verbose=False, sinks="pfn:1",
               type_k="q4", type_v="q4") as llm:
        prompt = np.random.default_rng(0).integers(1, 2048, size=4000).tolist()
        monkeypatch.setattr(llama_module, "lib", CancellingLib())
        assert list(llm.generate(prompt, temp=0.0)) == []  # ended inside the prompt
        monkeypatch.setattr(llama_module, "lib", real)
        assert calls == [64, 64]
        assert llm.n_tokens == 64  # the C core refused the second step before evaluating any of it
        assert llm.input_ids[:64].tolist() == prompt[:64]
        llm.eval([])  # the cache holds exactly the kept tokens, and the request was withdrawn
        assert llm.n_tokens == 64
        llm.eval(prompt[64:100])
        assert llm.n_tokens == 100


def test_c_cancel_request_stops_before_the_next_forward_pass(model_path):
    from kvsink_cpp._native import lib
    with Llama(model_path, n_ctx=256, n_batch=128, n_threads=1, verbose=False, type_k="q4", type_v="q4") as llm:
        llm.eval([1, 2, 3])
        lib.kvs_context_set_cancel(llm._ctx, 1)
        with pytest.raises(CancelledError, match="cancelled after 0 of 100 tokens"):
            llm.eval(list(range(1, 101)))
        assert llm.n_tokens == 3
        lib.kvs_context_set_cancel(llm._ctx, 0)
        llm.eval(list(range(1, 101)))
        assert llm.n_tokens == 103


def test_ctrl_c_during_a_long_prompt_keeps_what_was_evaluated(model_path, monkeypatch):
    """SIGINT as a C call of a long prompt returns: KeyboardInterrupt comes
    within a step of 64 tokens, not after the whole prompt, and the tokens the
    cache appended stay (the next turn does not redo them). The signal is
    raised from inside the second C call's wrapper, so the interrupt lands
    between the C core's return and the Python bookkeeping, deterministically."""
    import signal
    import kvsink_cpp.llama as llama_module
    real = llama_module.lib
    calls = []

    class InterruptingLib:
        def __getattr__(self, name):
            return getattr(real, name)

        def kvs_context_eval(self, *args):
            status = real.kvs_context_eval(*args)
            calls.append(args[2])
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)
            return status

    with Llama(model_path, n_ctx=4096, n_batch=512, n_threads=1, verbose=False, sinks="pfn:1",
               type_k="q4", type_v="q4") as llm:
        prompt = np.random.default_rng(1).integers(1, 2048, size=4000).tolist()
        monkeypatch.setattr(llama_module, "lib", InterruptingLib())
        # Python's own Ctrl-C handler, even where the process started with SIGINT
        # ignored (a background job of a non-interactive shell, as CI may run)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in llm.generate(prompt, temp=0.0):
                    pass
        finally:
            signal.signal(signal.SIGINT, previous)
        monkeypatch.setattr(llama_module, "lib", real)
        assert calls == [64, 64]  # the prompt went in steps of 64 and stopped after the second
        assert llm.n_tokens == 128
        assert llm.input_ids[:128].tolist() == prompt[:128]
        llm.eval([])
        assert llm.n_tokens == 128  # the C cache holds the same tokens
