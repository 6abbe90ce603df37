"""Sampling values: validation, plain greedy at temperature 0, min_p, logit_bias, seeds and
log-probabilities compared with score()."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jishi
from jishi.errors import JishiError
from jishi.runtime.generation import make_rng
from jishi.runtime.sampling import SamplingParams, sample

PROMPT = "Assignment statements are used to"


@pytest.fixture(scope="module")
def model(tiny_bundles):
    return jishi.load(tiny_bundles["fp32"], threads=1)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", math.nan, "temperature must be a finite number"),
    ("temperature", math.inf, "temperature must be a finite number"),
    ("top_p", math.nan, "top_p must be a finite number"),
    ("repetition_penalty", math.nan, "repetition_penalty must be a finite number"),
    ("min_p", 1.5, "min_p must be in"),
    ("min_p", -0.1, "min_p must be in"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("logit_bias", ((3, math.nan),), "logit_bias\\[3\\] must be a finite number"),
    ("logit_bias", ((3, 101.0),), "between -100 and 100"),
    ("logit_bias", ((-1, 1.0),), "token ids"),
])
def test_every_sampling_value_is_checked_before_the_sampler(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_bad_values_reach_the_user_as_jishi_errors(model):
    with pytest.raises(JishiError, match="temperature must be a finite number"):
        model.generate(PROMPT, temperature=float("nan"))
    with pytest.raises(JishiError, match="seed must be an integer >= 0"):
        model.generate(PROMPT, seed=-1)
    with pytest.raises(JishiError, match="vocabulary has 384 tokens"):
        model.generate(PROMPT, logit_bias={384: 5.0})
    with pytest.raises(JishiError, match="logprobs must be an integer from 0 to 20"):
        model.generate(PROMPT, logprobs=21)


def greedy_by_hand(model, prompt, n):
    """Argmax of the raw logits, step by step, straight from the engine."""
    ids = model.tokenizer.encode(prompt)
    model.engine.reset()
    logits = model.engine.feed(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = model.engine.step(t)
    return out


def test_temperature_zero_is_plain_greedy_whatever_the_penalty(model):
    expected = greedy_by_hand(model, PROMPT, 20)
    for penalty in (1.0, 1.1, 1.5):
        r = model.generate(PROMPT, max_new_tokens=20, temperature=0, repetition_penalty=penalty, logprobs=0)
        assert [e.token for e in r.logprobs] == expected


def test_min_p_one_keeps_only_the_most_likely_token(model):
    greedy = model.generate(PROMPT, max_new_tokens=16, temperature=0).text
    for seed in range(3):
        hot = model.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0,
                             min_p=1.0, seed=seed)
        assert hot.text == greedy


def test_min_p_cuts_unlikely_tokens():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, min_p=0.5)
    assert {sample(logits.copy(), p, rng) for _ in range(300)} == {0, 1}  # 0.15 < 0.5 × 0.5


def test_logit_bias_forces_and_bans_tokens(model):
    forced = model.generate(PROMPT, max_new_tokens=6, temperature=0, logit_bias={65: 100.0}, logprobs=0)
    assert [e.token for e in forced.logprobs] == [65] * 6
    first = greedy_by_hand(model, PROMPT, 1)[0]
    banned = model.generate(PROMPT, max_new_tokens=1, temperature=0, logit_bias={first: -100.0}, logprobs=0)
    assert banned.logprobs[0].token != first


def test_a_seed_repeats_and_each_answer_of_a_request_has_its_own_stream():
    assert make_rng(5).integers(1 << 30) == make_rng(5).integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)
    assert make_rng(5, 1).integers(1 << 30) == make_rng(5, 1).integers(1 << 30)
    assert make_rng(5, 1).integers(1 << 30) != make_rng(5, 0).integers(1 << 30)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        make_rng(-3)


@pytest.mark.parametrize("temperature, penalty", [(0, 1.0), (1.0, 1.5)])
def test_logprobs_are_the_raw_log_softmax_equal_to_score(model, temperature, penalty):
    """fp32: within 1e-4 of score() on the same tokens, even with a penalty that changed the sampling."""
    r = model.generate(PROMPT, max_new_tokens=24, temperature=temperature, repetition_penalty=penalty, seed=3,
                       logprobs=5)
    tokens = [e.token for e in r.logprobs]
    prompt_ids = model.tokenizer.encode(PROMPT)
    scored = model.score(prompt_ids + tokens)[len(prompt_ids) - 1:]
    np.testing.assert_allclose([e.logprob for e in r.logprobs], scored, atol=1e-4)
    for e in r.logprobs:
        assert len(e.top) == 5
        values = [lp for _, lp in e.top]
        assert values == sorted(values, reverse=True)
        assert e.logprob <= values[0] + 1e-12
    if temperature == 0:  # greedy picks the top alternative
        assert all(e.token == e.top[0][0] for e in r.logprobs)


@pytest.mark.parametrize("n", [49152, 262144, 50257, 32000, 151936, 384])
@pytest.mark.parametrize("k", [1, 8, 40, 100])
def test_top_k_picks_the_same_tokens_as_a_full_partition(n, k):
    from jishi.runtime.sampling import top_k_indices

    rng = np.random.default_rng(n + k)
    logits = (rng.standard_normal(n) * 3).astype(np.float32)
    expected = set(np.argpartition(logits, -k)[-k:].tolist())
    assert set(top_k_indices(logits, k).tolist()) == expected
    # logits of a realistic shape: a few far above a long tail
    logits[rng.choice(n, 5, replace=False)] += 25.0
    got = top_k_indices(logits, k)
    assert got.size == k and set(got.tolist()) == set(np.argpartition(logits, -k)[-k:].tolist())


def test_top_k_with_masked_tokens_and_ties_keeps_k_of_the_largest():
    from jishi.runtime.sampling import top_k_indices

    rng = np.random.default_rng(1)
    logits = np.full(49152, -np.inf, np.float32)  # a constraint allows only a few tokens
    allowed = rng.choice(49152, 12, replace=False)
    logits[allowed] = rng.standard_normal(12).astype(np.float32)
    got = top_k_indices(logits, 40)
    assert got.size == 40 and set(allowed.tolist()) <= set(got.tolist())
    tied = np.zeros(49152, np.float32)  # every logit equal: any 40 distinct tokens
    got = top_k_indices(tied, 40)
    assert got.size == 40 and len(set(got.tolist())) == 40
    with_nan = rng.standard_normal(49152).astype(np.float32)
    with_nan[7] = np.nan
    assert top_k_indices(with_nan, 40).size == 40


def test_seeded_sampling_draws_what_a_full_partition_would():
    """The default sampler (top-k 40, top-p, repetition penalty) on a vocabulary of 49,152: the same
    tokens, seed for seed, as the same steps written with a full argpartition."""
    def by_full_partition(logits, params, rng, seen):
        logits = logits.copy()
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
        candidates = np.argpartition(logits, -params.top_k)[-params.top_k:]
        order = candidates[np.argsort(-logits[candidates], kind="stable")]
        scaled = logits[order].astype(np.float64) / params.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(order.size, p=probs)])

    params = SamplingParams()
    data = np.random.default_rng(9)
    seen = np.arange(100, 300)
    for seed in range(30):
        logits = (data.standard_normal(49152) * 2).astype(np.float32)
        logits[data.choice(49152, 30, replace=False)] += data.uniform(4, 9, 30).astype(np.float32)
        expected = by_full_partition(logits, params, np.random.default_rng(seed), seen)
        assert sample(logits.copy(), params, np.random.default_rng(seed), seen) == expected
