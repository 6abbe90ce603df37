"""The families from the command line: the default context, the architecture `jishi info` shows,
and chat template variables (Qwen3's enable_thinking)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from test_chat_templates import TEMPLATE  # noqa: E402
from test_cli import jishi  # noqa: E402


@pytest.fixture(scope="module")
def qwen3_bundle(tmp_path_factory, tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny

    root = tmp_path_factory.mktemp("qwen3-cli")
    base = make_tiny("qwen3", root / "hf", tiny_tokenizer)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    tok.chat_template = TEMPLATE  # a Qwen3-style template with the thinking switch
    tok.save_pretrained(base)
    out = root / "b"
    done = jishi("build", "--base", str(base), "--quant", "fp32", "--no-eval", "-o", str(out))  # no --context
    assert done.returncode == 0, done.stderr
    return out


def test_build_takes_the_models_positions_and_info_shows_the_architecture(qwen3_bundle):
    info = jishi("info", str(qwen3_bundle))
    assert info.returncode == 0, info.stderr
    assert "context       512 tokens" in info.stdout  # the tiny model's positions: min(2048, 512)
    assert "architecture  qwen3, RMSNorm, QK-norm, SwiGLU, tied head" in info.stdout


def test_run_passes_template_variables(qwen3_bundle):
    import jishi as api

    m = api.load(qwen3_bundle)
    messages = [{"role": "user", "content": "Hello"}]
    assert "<think>" in m.chat_prompt(messages, {"enable_thinking": False}) and "<think>" not in m.chat_prompt(messages)
    run = jishi("run", str(qwen3_bundle), "Hello", "--temperature", "0", "--max-tokens", "5",
                "--template-var", "enable_thinking=false")
    assert run.returncode == 0, run.stderr
    expected = m.chat(messages, {"enable_thinking": False}, max_new_tokens=5, temperature=0).text
    assert run.stdout == expected + "\n"
    bad = jishi("run", str(qwen3_bundle), "Hello", "--template-var", "enable_thinking")
    assert bad.returncode != 0 and "--template-var 'enable_thinking': write NAME=VALUE" in bad.stderr


def test_gemma_turn_end_is_an_end_token(tmp_path, tiny_tokenizer):
    """A Gemma-style chat template ends a turn with <end_of_turn>: generation stops there."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny
    from jishi.distill.base import load_base

    base = make_tiny("gemma3", tmp_path / "g", tiny_tokenizer)
    tok = PreTrainedTokenizerFast.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<end_of_turn>", special=True)]})
    tok.chat_template = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
                         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    tok.save_pretrained(base)
    loaded = load_base(base)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in loaded.eos_token_ids
