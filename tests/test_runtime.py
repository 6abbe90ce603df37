"""The runtime's generation loop, streaming, sampling, scoring and chat."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jishi
from jishi.runtime.sampling import SamplingParams, sample
from jishi.runtime.tokenizer import TextStream


@pytest.fixture(scope="module")
def model(tiny_bundles):
    return jishi.load(tiny_bundles["fp32"])


def test_streaming_never_splits_a_multibyte_character(model):
    text = "Grüße 你好 🌾🚜 naïve café — 基石"
    ids = model.tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces: many tokens are partial characters
    stream = TextStream(model.tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_and_generate_agree_and_report_counts(model):
    kw = dict(max_new_tokens=20, temperature=0)
    pieces = list(model.stream("The value of", **kw))
    result = model.generate("The value of", **kw)
    assert "".join(pieces) == result.text == str(result)
    assert result.prompt_tokens == len(model.tokenizer.encode("The value of"))
    assert result.completion_tokens == 20 and result.finish_reason == "length"


def test_stop_string_ends_the_text_before_it(model):
    full = model.generate("The value of", max_new_tokens=30, temperature=0).text
    # a three-character stop string whose first occurrence is at position cut > 0
    cut = next(i for i in range(1, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stop = full[cut:cut + 3]
    result = model.generate("The value of", max_new_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert result.text == full[:cut] and result.finish_reason == "stop"
    streamed = "".join(model.stream("The value of", max_new_tokens=30, temperature=0, stop=stop))
    assert streamed == full[:cut]


def test_eos_ends_generation(tiny_bundles):
    m = jishi.load(tiny_bundles["fp32"])
    # After the prompt, make every token but EOS impossible: the second token is EOS.
    eos = next(iter(m.tokenizer.eos_ids))
    original = m.engine.step

    def eos_only(token):
        logits = original(token)
        logits[:] = -1e9
        logits[eos] = 0.0
        return logits

    m.engine.step = eos_only
    result = m.generate("The value of", max_new_tokens=10, temperature=0)
    assert result.finish_reason == "stop" and result.completion_tokens == 2


def test_seed_makes_sampling_repeatable(model):
    a = model.generate("Once", max_new_tokens=16, temperature=1.0, seed=7).text
    b = model.generate("Once", max_new_tokens=16, temperature=1.0, seed=7).text
    c = model.generate("Once", max_new_tokens=16, temperature=1.0, seed=8).text
    assert a == b and a != c


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 1.0, 0.0, -1.0])
    assert sample(logits, SamplingParams(temperature=0), rng) == 0
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0), rng) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0), rng) for _ in range(100)}
    assert picks == {0}
    # the penalty divides a positive logit: token 0 (5 → 2.5) falls below token 1 when sampling...
    cold = SamplingParams(temperature=0.01, top_k=0, top_p=1.0, repetition_penalty=2.0)
    assert sample(logits.copy(), cold, rng, seen=np.array([0])) == 1
    # ...while temperature 0 is plain greedy: no penalty
    assert sample(logits.copy(), SamplingParams(temperature=0, repetition_penalty=2.0), rng, seen=np.array([0])) == 0
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_score_matches_torch_log_probabilities(model, tiny_dirs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    text = "Assignment statements are used to bind names to values."
    ids = model.tokenizer.encode(text)
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
    expected = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    got = model.score(text)
    assert got.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_special_token_text_typed_in_a_message_stays_plain_text(model):
    tok = model.tokenizer
    end = tok._tok.token_to_id("<|im_end|>")
    ids = tok.encode(model.chat_prompt([{"role": "user", "content": "what is <|im_end|> for?"}]))
    plain = tok.encode(model.chat_prompt([{"role": "user", "content": "what is  for?"}]))
    assert ids.count(end) == plain.count(end) == 1  # only the template's own end of turn
    assert len(ids) > len(plain) and tok.decode(ids, skip_special=False).count("<|im_end|>") == 2


def test_chat_uses_the_models_template_and_reuses_the_cache(model):
    messages = [{"role": "user", "content": "Hello"}]
    prompt = model.chat_prompt(messages)
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    first = model.chat(messages, max_new_tokens=8, temperature=0)
    assert first.prompt_tokens == len(model.tokenizer.encode(prompt))
    # A follow-up starts with the same tokens: only the new ones are fed.
    follow = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More"}]
    fed = []
    original = model.engine.feed
    model.engine.feed = lambda ids, all_logits=False: (fed.append(len(ids)), original(ids, all_logits))[1]
    try:
        again = model.chat(follow, max_new_tokens=8, temperature=0)
    finally:
        model.engine.feed = original
    assert fed and fed[0] < again.prompt_tokens
    # and the answer is the one a cold cache gives
    model.engine.reset()
    assert model.chat(follow, max_new_tokens=8, temperature=0).text == again.text


def test_conversation_drops_old_turns_to_fit(tiny_bundles):
    from jishi.runtime.chat import Conversation

    m = jishi.load(tiny_bundles["fp32"], context=96)
    convo = Conversation(m, system="Be brief.", reserve=16)
    for i in range(6):
        reply = convo.send(f"Question number {i} about the data model of Python?", temperature=0)
        "".join(reply)
    prompt = convo.fit()
    assert m.count_tokens(prompt) <= 96 - 16
    assert convo.messages[0]["role"] == "user" and "Question number 5" in prompt and "Question number 0" not in prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.")


def test_stopping_a_reply_keeps_what_was_said(tiny_bundles):
    from jishi.runtime.chat import Conversation

    m = jishi.load(tiny_bundles["fp32"])
    convo = Conversation(m, reserve=32)
    reply = convo.send("Hello", temperature=0)
    it = iter(reply)
    said = next(it) + next(it)
    reply.close()
    assert convo.messages[-1] == {"role": "assistant", "content": said}
    # the engine is still usable and consistent afterwards
    assert m.generate("Hello", max_new_tokens=3, temperature=0).completion_tokens == 3


def test_runtime_works_where_torch_cannot_be_imported(tiny_bundles):
    script = textwrap.dedent(
        f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnx", "optimum", "peft"):
                    raise ImportError("blocked for the test: " + name)
        sys.meta_path.insert(0, NoTorch())
        import jishi
        m = jishi.load({str(tiny_bundles["int4"])!r})
        r = m.generate("Hello", max_new_tokens=5, temperature=0)
        assert r.completion_tokens == 5, r
        assert not any(k.split(".")[0] in ("torch", "transformers", "onnx") for k in sys.modules), "heavy import"
        print("ok", r.finish_reason)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok length"


def test_chat_prompts_get_no_second_bos(tiny_bundles, tmp_path):
    """A chat template writes its own special tokens: BOS is added to plain prompts only."""
    import json
    import shutil

    copy = tmp_path / "bos"
    shutil.copytree(tiny_bundles["fp32"], copy)
    body = json.loads((copy / "manifest.json").read_text())
    body["tokenizer"].update(add_bos=True, bos_token="<|im_start|>")
    (copy / "manifest.json").write_text(json.dumps(body))
    m = jishi.load(copy)
    bos = m.tokenizer.bos_id
    assert m.tokenizer.encode("Hi")[0] == bos and m.tokenizer.encode("Hi")[1] != bos
    messages = [{"role": "user", "content": "Hi"}]
    prompt_ids = m.tokenizer.encode(m.chat_prompt(messages), bos=False)
    assert prompt_ids[0] == bos and prompt_ids[1] != bos  # the template's own <|im_start|>, once
    assert m.chat(messages, max_new_tokens=2, temperature=0).prompt_tokens == len(prompt_ids)
    assert m.generate("Hi", max_new_tokens=2, temperature=0).prompt_tokens == len(m.tokenizer.encode("Hi", bos=False)) + 1


def test_bad_arguments_fail_before_generation_with_a_clear_error(model):
    from jishi.errors import JishiError

    with pytest.raises(JishiError, match="top_p must be in"):
        model.stream("Hi", top_p=0)
    with pytest.raises(JishiError, match="max_new_tokens must be at least 1"):
        model.generate("Hi", max_new_tokens=0)
    with pytest.raises(JishiError, match="the prompt is empty"):
        model.stream("")


def test_a_message_too_long_keeps_the_conversation(tiny_bundles):
    from jishi.errors import ContextLengthError
    from jishi.runtime.chat import Conversation

    m = jishi.load(tiny_bundles["fp32"], context=64)
    convo = Conversation(m, reserve=8)
    "".join(convo.send("Hello", temperature=0, max_new_tokens=4))
    before = list(convo.messages)
    with pytest.raises(ContextLengthError, match="this message alone does not fit in the context window of 64 tokens"):
        convo.send("word " * 300)
    assert convo.messages == before


def test_result_holds_the_text_and_stays_after_iteration(model):
    stream = model.stream("The value of", max_new_tokens=6, temperature=0)
    text = "".join(stream)
    assert stream.result.text == text and stream.result.completion_tokens == 6
    assert list(stream) == [] and stream.result.text == text


def test_score_of_a_long_text_in_pieces_matches_torch(model, tiny_dirs):
    """Longer than one scoring chunk: the pieces continue the same cache."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jishi.heldout import heldout_text
    from jishi.runtime.model import SCORE_CHUNK

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    ids = model.tokenizer.encode(heldout_text())[:250]
    text = model.tokenizer.decode(ids)
    ids = model.tokenizer.encode(text)
    assert SCORE_CHUNK < len(ids) <= model.context
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
    expected = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(model.score(text), expected, atol=1e-4)
