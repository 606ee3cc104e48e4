"""Each sampling step on tiny distributions whose answers are worked out by hand."""
import math

import numpy as np
import pytest

from kvsink_cpp.sampling import (Sampler, SamplingParams, apply_logit_bias, apply_penalties,
                                 min_p, softmax, temperature, top_k, top_p, typical_p)

# Every truncation off: the draw follows softmax(logits / temperature) exactly.
UNTRUNCATED = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)


def logits_of(probs):
    return np.log(np.asarray(probs, dtype=np.float32))


def as_dict(ids, values):
    return {int(i): float(v) for i, v in zip(ids, values)}


# --- softmax / temperature --------------------------------------------------

def test_softmax_of_log_probs_gives_the_probs_back():
    np.testing.assert_allclose(softmax(logits_of([0.1, 0.2, 0.3, 0.4])), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_softmax_gives_banned_tokens_zero():
    logits = np.array([0.0, -np.inf, math.log(3.0)], dtype=np.float32)
    np.testing.assert_allclose(softmax(logits), [0.25, 0.0, 0.75], rtol=1e-6)


def test_temperature_divides_logits():
    ids, scaled = temperature(np.array([7, 8]), np.array([2.0, 1.0], dtype=np.float32), 0.5)
    assert list(ids) == [7, 8]
    np.testing.assert_allclose(scaled, [4.0, 2.0])
    # softmax([4, 2]) = 1 / (1 + e^-2)
    assert softmax(scaled)[0] == pytest.approx(0.880797, abs=1e-6)


def test_temperature_zero_keeps_only_the_best():
    ids, kept = temperature(np.array([7, 8, 9]), np.array([1.0, 3.0, 2.0], dtype=np.float32), 0.0)
    assert list(ids) == [8] and list(kept) == [3.0]


# --- top_k --------------------------------------------------------------------

def test_top_k_keeps_the_k_highest_sorted():
    ids, kept = top_k(np.arange(10, 15), np.array([1, 5, 3, 4, 2], dtype=np.float32), 2)
    assert list(ids) == [11, 13]
    assert list(kept) == [5.0, 4.0]


@pytest.mark.parametrize("k", [0, 5, 100])
def test_top_k_zero_or_large_keeps_everything(k):
    ids, kept = top_k(np.arange(5), np.array([1, 5, 3, 4, 2], dtype=np.float32), k)
    assert sorted(ids) == [0, 1, 2, 3, 4]


# --- top_p --------------------------------------------------------------------
# ids 20..23 with probabilities .15 .5 .1 .25: by probability 21 (.5), 23 (.25), 20 (.15), 22 (.1);
# cumulative .5, .75, .9, 1.0.
TOP_P_IDS = np.array([20, 21, 22, 23])
TOP_P_LOGITS = logits_of([0.15, 0.5, 0.1, 0.25])


@pytest.mark.parametrize("p, expected", [
    (0.4, {21}),            # .5 >= .4 already
    (0.7, {21, 23}),        # .75 >= .7
    (0.8, {21, 23, 20}),    # .9 >= .8
    (0.95, {21, 23, 20, 22}),
    (1.0, {20, 21, 22, 23}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    ids, _ = top_p(TOP_P_IDS, TOP_P_LOGITS, p)
    assert set(ids.tolist()) == expected


def test_top_p_respects_min_keep():
    ids, _ = top_p(TOP_P_IDS, TOP_P_LOGITS, 0.4, min_keep=3)
    assert set(ids.tolist()) == {21, 23, 20}


def test_top_p_on_more_candidates_than_its_first_partial_sort():
    # 3000 equal tokens, 1/3000 each: 900 reach 0.3, so 0.3001 needs 901.
    ids, _ = top_p(np.arange(3000), np.zeros(3000, dtype=np.float32), 0.3001)
    assert ids.size == 901
    assert len(set(ids.tolist())) == 901


# --- min_p --------------------------------------------------------------------
# logits 2, 1, 0, -1: p / p_max = 1, e^-1 = .368, e^-2 = .135, e^-3 = .0498.
MIN_P_LOGITS = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)


@pytest.mark.parametrize("p, expected", [
    (0.0, {0, 1, 2, 3}),
    (0.04, {0, 1, 2, 3}),
    (0.1, {0, 1, 2}),
    (0.2, {0, 1}),
    (0.9, {0}),
])
def test_min_p_keeps_tokens_near_the_top_probability(p, expected):
    ids, _ = min_p(np.arange(4), MIN_P_LOGITS, p)
    assert set(ids.tolist()) == expected


def test_min_p_respects_min_keep():
    ids, _ = min_p(np.arange(4), MIN_P_LOGITS, 0.9, min_keep=3)
    assert set(ids.tolist()) == {0, 1, 2}


# --- typical_p ----------------------------------------------------------------
# probabilities .4 .15 .15 .15 .15: entropy H = .4 ln(1/.4) + .6 ln(1/.15) = 1.5048;
# |surprise - H| is .5885 for the .4 token and .3923 for each .15 token, so the
# .15 tokens are the most typical; their cumulative probability is .15 .30 .45 .60, then 1.0.
TYPICAL_LOGITS = logits_of([0.4, 0.15, 0.15, 0.15, 0.15])


@pytest.mark.parametrize("p, expected", [
    (0.5, {1, 2, 3, 4}),     # .60 > .5: the most probable token is dropped
    (0.65, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_typical_p_keeps_the_most_typical_tokens(p, expected):
    ids, _ = typical_p(np.arange(5), TYPICAL_LOGITS, p)
    assert set(ids.tolist()) == expected


def test_typical_p_with_a_small_p_keeps_tied_typical_tokens_only():
    ids, _ = typical_p(np.arange(5), TYPICAL_LOGITS, 0.2)     # .30 > .2 after two
    assert ids.size == 2 and set(ids.tolist()) <= {1, 2, 3, 4}


# --- penalties ----------------------------------------------------------------
PENALTY_LOGITS = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
PENALTY_HISTORY = [0, 1, 1, 4, 2]     # counts: 0 x1, 1 x2, 2 x1, 4 x1; 3 never seen


def test_repeat_penalty_divides_positive_and_multiplies_non_positive():
    out = apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 2.0, 0.0, 0.0, -1)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.25, 3.0, 0.0])


def test_frequency_penalty_scales_with_count():
    out = apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 1.0, 1.0, 0.0, -1)
    np.testing.assert_allclose(out, [1.0, -3.0, -0.5, 3.0, -1.0])


def test_presence_penalty_is_flat():
    out = apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 1.0, 0.0, 1.0, -1)
    np.testing.assert_allclose(out, [1.0, -2.0, -0.5, 3.0, -1.0])


def test_all_penalties_together():
    # token 0: 2/2 - (.5 + .25); token 1: -1*2 - (2*.5 + .25); token 2: .5/2 - .75; token 4: 0*2 - .75
    out = apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 2.0, 0.5, 0.25, -1)
    np.testing.assert_allclose(out, [0.25, -3.25, -0.5, 3.0, -0.75])


def test_penalty_window_is_the_last_n_tokens():
    out = apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 2.0, 0.5, 0.25, 2)   # window [4, 2]
    np.testing.assert_allclose(out, [2.0, -1.0, -0.5, 3.0, -0.75])


def test_penalty_window_zero_disables():
    out = apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 2.0, 0.5, 0.25, 0)
    np.testing.assert_array_equal(out, PENALTY_LOGITS)


def test_penalties_leave_the_input_alone():
    before = PENALTY_LOGITS.copy()
    apply_penalties(PENALTY_LOGITS, PENALTY_HISTORY, 2.0, 0.5, 0.25, -1)
    np.testing.assert_array_equal(PENALTY_LOGITS, before)


def test_penalty_history_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="history has token id 9"):
        apply_penalties(PENALTY_LOGITS, [9], 2.0, 0.0, 0.0, -1)


# --- logit bias -----------------------------------------------------------------

def test_logit_bias_adds_and_minus_inf_bans():
    out = apply_logit_bias(np.array([0.0, 1.0, 2.0], dtype=np.float32), {1: -math.inf, 2: 1.5})
    assert out[0] == 0.0 and out[1] == -np.inf and out[2] == 3.5


def test_logit_bias_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="logit_bias has token id 3"):
        apply_logit_bias(np.zeros(3, dtype=np.float32), {3: 1.0})


def test_banned_token_is_never_drawn():
    sampler = Sampler(SamplingParams(temperature=1.0, logit_bias={0: -math.inf}, seed=3, **UNTRUNCATED))
    logits = logits_of([0.9, 0.05, 0.05])
    draws = {sampler.sample(logits, []) for _ in range(500)}
    assert draws == {1, 2}


def test_every_token_banned_is_an_error():
    sampler = Sampler(SamplingParams(logit_bias={0: -math.inf, 1: -math.inf}, seed=0))
    with pytest.raises(ValueError, match="no token can be sampled"):
        sampler.sample(np.zeros(2, dtype=np.float32), [])


# --- greedy -----------------------------------------------------------------------

@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_non_positive_temperature_is_greedy(temp):
    sampler = Sampler(SamplingParams(temperature=temp))
    assert all(sampler.sample(np.array([0.1, 2.0, 1.9], dtype=np.float32), []) == 1 for _ in range(20))


def test_greedy_sees_bias_and_penalties():
    logits = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5)).sample(logits, [0]) == 1   # 3/1.5 = 2
    assert Sampler(SamplingParams(temperature=0.0, logit_bias={2: 5.0})).sample(logits, []) == 2


# --- the whole chain -------------------------------------------------------------
# probabilities .4 .3 .2 .06 .04 -> top_k 4 drops id 4 and renormalises to .4167 .3125 .2083 .0625;
# top_p .8 stops at .9375 (3 tokens); min_p .6 drops .2 (.2/.4 = .5) -> ids 0, 1 with .4/.7 and .3/.7.
CHAIN_LOGITS = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])


def test_chain_candidates_match_the_hand_computation():
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.6))
    ids, probs = sampler.candidates(CHAIN_LOGITS, [])
    assert as_dict(ids, probs) == pytest.approx({0: 4 / 7, 1: 3 / 7}, rel=1e-5)


def test_chain_applies_temperature_after_truncation():
    # temperature .5 squares the kept probabilities: .16 and .09 -> .64 and .36
    sampler = Sampler(SamplingParams(temperature=0.5, top_k=4, top_p=0.8, min_p=0.6))
    ids, probs = sampler.candidates(CHAIN_LOGITS, [])
    assert as_dict(ids, probs) == pytest.approx({0: 0.64, 1: 0.36}, rel=1e-5)


def test_sample_leaves_the_logits_alone():
    logits = CHAIN_LOGITS.copy()
    Sampler(SamplingParams(seed=0, repeat_penalty=1.3, logit_bias={1: 2.0})).sample(logits, [0, 1])
    np.testing.assert_array_equal(logits, CHAIN_LOGITS)


# --- seeding and the empirical distribution --------------------------------------
FLAT = np.zeros(100, dtype=np.float32)


def draws(sampler, logits, n):
    return [sampler.sample(logits, []) for _ in range(n)]


def test_same_seed_same_draws():
    a = Sampler(SamplingParams(temperature=1.0, seed=42, **UNTRUNCATED))
    b = Sampler(SamplingParams(temperature=1.0, seed=42, **UNTRUNCATED))
    assert draws(a, FLAT, 50) == draws(b, FLAT, 50)


def test_different_seed_different_draws():
    a = Sampler(SamplingParams(temperature=1.0, seed=1, **UNTRUNCATED))
    b = Sampler(SamplingParams(temperature=1.0, seed=2, **UNTRUNCATED))
    assert draws(a, FLAT, 50) != draws(b, FLAT, 50)


def test_reset_replays_the_draws():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=9, **UNTRUNCATED))
    first = draws(sampler, FLAT, 30)
    sampler.reset()
    assert draws(sampler, FLAT, 30) == first
    sampler.reset(seed=5)
    assert draws(sampler, FLAT, 30) == draws(Sampler(SamplingParams(temperature=1.0, seed=5, **UNTRUNCATED)), FLAT, 30)


@pytest.mark.parametrize("temp, expected", [
    (1.0, [0.5, 0.3, 0.2]),
    # temperature 2 draws with p^(1/2): .7071 .5477 .4472, normalised by 1.7020
    (2.0, [0.4155, 0.3218, 0.2628]),
])
def test_draw_frequencies_follow_the_distribution(temp, expected):
    n = 20_000
    sampler = Sampler(SamplingParams(temperature=temp, seed=1234, **UNTRUNCATED))
    counts = np.bincount(draws(sampler, logits_of([0.5, 0.3, 0.2]), n), minlength=3)
    # one standard deviation is at most sqrt(.25 / 20000) = .0035; allow about four
    np.testing.assert_allclose(counts / n, expected, atol=0.015)


# --- parameters --------------------------------------------------------------------

def test_defaults_are_llama_cpp_python_create_completion_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (p.repeat_penalty, p.frequency_penalty, p.presence_penalty, p.penalty_last_n) == (1.0, 0.0, 0.0, 64)
    assert p.logit_bias is None and p.seed is None


@pytest.mark.parametrize("field, value", [
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.5),
    ("typical_p", 0.0), ("typical_p", 1.2), ("repeat_penalty", 0.0), ("temperature", math.nan),
    ("frequency_penalty", math.inf), ("penalty_last_n", -2), ("seed", -1), ("seed", "7"),
])
def test_bad_parameter_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("bias", [{-1: 1.0}, {1: math.nan}, {"x": 1.0}, [(1, 1.0)]])
def test_bad_logit_bias_is_named(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_keys_may_be_json_strings():
    assert SamplingParams(logit_bias={"5": -1}).logit_bias == {5: -1.0}


@pytest.mark.parametrize("logits", [np.zeros((2, 3)), np.zeros(0)])
def test_logits_must_be_a_non_empty_vector(logits):
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(logits, [])


def test_nan_logits_name_the_model_not_logit_bias():
    logits = np.zeros(10, dtype=np.float32)
    logits[3] = np.nan
    with pytest.raises(ValueError, match="contain NaN"):
        Sampler(SamplingParams(temperature=0.0)).sample(logits, [])
    with pytest.raises(ValueError, match="every logit is -inf"):
        Sampler(SamplingParams(temperature=0.0, logit_bias={i: -np.inf for i in range(10)})).sample(
            np.zeros(10, dtype=np.float32), [])
