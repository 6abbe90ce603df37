"""Speculative decoding gives the tokens plain decoding gives: exactly on fp32 (greedy and seeded
sampling, both drafters, rollback across chunk and cache-growth boundaries), under the margin rule on int4."""

from __future__ import annotations

import numpy as np
import pytest
from margins import assert_greedy_agrees

import jishi
from jishi.errors import JishiError
from jishi.runtime import engine as engine_module
from jishi.runtime.speculative import PromptLookup

# A prompt that repeats itself, so the lookup finds n-grams to guess from (the tiny random model's
# answers repeat too, which is what its guesses then follow).
REPEATING = "The value of a list is a list of values. The value of a list is"
PROMPTS = [REPEATING, "def f(x): return x + 1\ndef g(x): return x + 1\ndef h(x):", "A list is a sequence of items that"]


@pytest.fixture(scope="module")
def fp32(tiny_bundles):
    return jishi.load(tiny_bundles["fp32"], threads=1)


def run(model, prompt, speculation, **kw):
    kw.setdefault("max_new_tokens", 60)
    kw.setdefault("temperature", 0)
    model.engine.reset()
    return model.generate(prompt, speculation=speculation, **kw)


def tokens_of(result):
    return [t.token for t in result.logprobs]


def test_prompt_lookup_guesses_what_followed_the_latest_longest_match():
    p = PromptLookup(max_ngram=3, min_ngram=2, max_draft=4)
    p.start([5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 3, 4, 6, 7])
    assert p.propose(10) == [3, 4, 6, 7]  # "6 7" last occurred before "3 4"; the longer "5 6 7" no longer ends here
    p.extend([3])
    assert p.propose(10) == [4, 6, 7, 3]  # "6 7 3" (3-gram) matches where it occurred, and wins over "7 3"
    assert p.propose(2) == [4, 6]
    p.start([1, 2, 3, 4])
    assert p.propose(4) == []  # nothing repeats
    p.extend([1, 2])
    assert p.propose(4) == [3, 4, 1, 2]
    p = PromptLookup(max_draft=8)
    p.start([9, 7, 7, 7])  # a loop: the latest match leaves one token, and the guess carries on from it
    assert p.propose(5) == [7, 7, 7, 7, 7]
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_lookup_gives_the_plain_greedy_tokens_on_fp32(fp32, prompt):
    plain = run(fp32, prompt, "off")
    fast = run(fp32, prompt, "lookup")
    assert fast.text == plain.text and fast.finish_reason == plain.finish_reason
    assert fast.completion_tokens == plain.completion_tokens
    assert plain.speculation is None
    stats = fast.speculation
    assert stats["steps"] + stats["verify_runs"] + 1 <= fast.completion_tokens  # every run yields >= 1 token


def test_lookup_guesses_are_kept_on_a_repeating_answer(fp32):
    fast = run(fp32, REPEATING, "lookup", max_new_tokens=80)
    stats = fast.speculation
    assert stats["accepted"] > 10, stats  # the tiny model's answer loops: guesses from it hold
    # fewer runs than tokens: the point of it
    assert stats["steps"] + stats["verify_runs"] < fast.completion_tokens - 10, stats


def test_rollback_across_prefill_chunks_and_cache_growth(fp32, monkeypatch):
    """Drafts checked in chunks split across several runs, and the cache growing under a draft: with
    3-token prefill chunks and an 8-position growth step, most verify runs straddle both."""
    plain = run(fp32, REPEATING, "off", max_new_tokens=100, logprobs=0)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 3)
    monkeypatch.setattr(engine_module, "KV_STEP", 8)
    m = jishi.load(fp32.bundle.root, threads=1)
    assert m.engine.capacity == 8
    fast = run(m, REPEATING, "lookup", max_new_tokens=100, logprobs=0)
    assert fast.text == plain.text
    assert fast.speculation["accepted"] > 10 and fast.speculation["drafted"] > fast.speculation["accepted"]
    # the cache holds the prompt and the answer less its last token, as after plain decoding, and what it
    # holds there is right: rejected guesses were overwritten, not left behind
    ids, answer = m.tokenizer.encode(REPEATING), tokens_of(fast)
    assert m.engine.tokens == ids + answer[:-1]
    after = m.engine.feed([answer[-1]])
    fp32.engine.reset()
    np.testing.assert_allclose(after, fp32.engine.feed(ids + answer), atol=1e-4, rtol=0)


def test_sampling_with_a_seed_draws_the_same_tokens(fp32):
    """Each kept row's token is drawn from the model's own distribution with the same random draws in the
    same order, so a seeded answer is the one plain decoding samples."""
    kw = dict(temperature=0.8, top_k=20, seed=7, max_new_tokens=60)
    for prompt in PROMPTS:
        assert run(fp32, prompt, "lookup", **kw).text == run(fp32, prompt, "off", **kw).text


def test_logprobs_and_stops_are_the_plain_ones(fp32):
    plain = run(fp32, REPEATING, "off", logprobs=3)
    fast = run(fp32, REPEATING, "lookup", logprobs=3)
    assert [t.token for t in fast.logprobs] == [t.token for t in plain.logprobs]
    np.testing.assert_allclose([t.logprob for t in fast.logprobs], [t.logprob for t in plain.logprobs], atol=1e-5)
    stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 4]
    cut = plain.text.find(stop)
    fast = run(fp32, REPEATING, "lookup", stop=stop)
    assert fast.text == plain.text[:cut] and fast.finish_reason == "stop"


def test_a_draft_model_gives_the_plain_tokens(tiny_bundles, fp32):
    same = jishi.load(tiny_bundles["fp32"], threads=1, draft=tiny_bundles["fp32"])
    other = jishi.load(tiny_bundles["fp32"], threads=1, draft=jishi.load(tiny_bundles["int4"], threads=1))
    assert same.speculation.kind == "draft"
    for prompt in PROMPTS:
        plain = run(fp32, prompt, "off")
        by_itself = run(same, prompt, None)
        assert by_itself.text == plain.text
        # the model drafting for itself: every guess is kept but where the answer's budget cuts the draft
        s = by_itself.speculation
        assert s["accepted"] == s["drafted"] and s["verify_runs"] > 0, s
        assert run(other, prompt, None).text == plain.text
        assert run(other, prompt, "lookup").text == plain.text


def test_a_draft_with_another_vocabulary_is_refused(tiny_bundles, tmp_path, tiny_tokenizer):
    from conftest import VOCAB, make_tiny

    from jishi.pipeline import build

    wider = build(str(make_tiny("llama", tmp_path / "wider", tiny_tokenizer, vocab_size=VOCAB + 8)), "fp32",
                  tmp_path / "wider-fp32", context=256, evaluate=False, quiet=True)
    with pytest.raises(JishiError, match="does not share .* tokenizer"):
        jishi.load(tiny_bundles["fp32"], draft=wider)
    with pytest.raises(JishiError, match="needs a draft model"):
        jishi.load(tiny_bundles["fp32"], speculation="draft")
    m = jishi.load(tiny_bundles["fp32"])
    with pytest.raises(JishiError, match="needs a draft model"):
        m.generate("x", speculation="draft")
    with pytest.raises(JishiError, match="unknown speculation 'fast'"):
        m.generate("x", speculation="fast")


def test_closing_the_stream_mid_answer_leaves_the_cache_consistent(fp32):
    prompt = PROMPTS[1]  # an answer of one piece a token
    plain = run(fp32, prompt, "off", max_new_tokens=40, logprobs=0)
    fp32.engine.reset()
    stream = fp32.stream(prompt, max_new_tokens=40, temperature=0, speculation="lookup")
    for _ in range(5):
        next(stream)
    stream.close()
    ids, held = fp32.tokenizer.encode(prompt), list(fp32.engine.tokens)
    assert len(held) > len(ids) and held == ids + tokens_of(plain)[:len(held) - len(ids)]
    assert len(held) - len(ids) < 30  # closed before the end
    # the next answer reuses that cache and is the plain one
    assert fp32.generate(prompt, max_new_tokens=40, temperature=0).text == plain.text


def test_lookup_on_int4_follows_plain_decoding_under_the_margin_rule(tiny_bundles):
    """A verify run computes several rows at once, which MatMulNBits' int8 kernels round differently from
    one row: tokens may part only where plain decoding was within the batched-rows bound of a tie (the same
    bound as tests/test_batch.py: a tenth of what int4 moves the logits from fp32, doubled for a gap)."""
    m = jishi.load(tiny_bundles["int4"], threads=1)
    m32 = jishi.load(tiny_bundles["fp32"], threads=1)
    for prompt in PROMPTS:
        plain = run(m, prompt, "off", logprobs=2)
        fast = run(m, prompt, "lookup", logprobs=0)
        ref = tokens_of(plain)
        margins = [t.top[0][1] - t.top[1][1] for t in plain.logprobs]
        ids = m.tokenizer.encode(prompt)
        m32.engine.reset()
        exact = m32.engine.feed(ids + ref[:-1], all_logits=True)[len(ids) - 1:]
        m.engine.reset()
        quant = m.engine.feed(ids + ref[:-1], all_logits=True)[len(ids) - 1:]
        bound = float(np.abs(exact - quant).max()) / 10
        assert_greedy_agrees(tokens_of(fast)[:len(ref)], ref[:len(tokens_of(fast))], margins, 2 * bound)
