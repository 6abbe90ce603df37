"""The runtime renders Hugging Face chat templates as transformers does, with no torch at run time.

The template below uses what the families' templates use: Qwen3's ``enable_thinking`` switch
and its search for the last user turn (``namespace``, a reversed loop, ``{% break %}``), tools
as JSON (non-ASCII kept), ``raise_exception`` for a bad role, ``strftime_now`` for the date,
and ``bos_token`` (Gemma, Llama 3).
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

TEMPLATE = """{{- bos_token -}}
{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson }}
Today: {{ strftime_now("%Y-%m") }}<|im_end|>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages[::-1] %}
  {%- if message.role == "user" %}{% set ns.last_user = messages|length - 1 - loop.index0 %}{% break %}{% endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role not in ("system", "user", "assistant") %}
    {{- raise_exception("role " ~ message.role ~ " is not one this template knows") }}
  {%- endif %}
  {%- set content = message.content %}
  {%- if message.role == "assistant" and loop.index0 < ns.last_user and "</think>" in content %}
    {%- set content = content.split("</think>")[-1].lstrip("\\n") %}
  {%- endif %}
<|im_start|>{{ message.role }}
{{ content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
{%- endif %}"""

MESSAGES = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "Combien font 2 + 2 ?"},
    {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n4."},
    {"role": "user", "content": "Et 3 × 3 ? 你好"},
]
TOOLS = [{"name": "météo", "description": "le temps qu'il fait à 東京", "parameters": {"ville": "string"}}]


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    from jishi.runtime.manifest import TokenizerInfo
    from jishi.runtime.tokenizer import Tokenizer

    ref = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    ref.chat_template = TEMPLATE
    info = TokenizerInfo(file="tokenizer.json", add_bos=False, bos_token="<|endoftext|>", eos_tokens=["<|im_end|>"],
                         eos_token_ids=[ref.convert_tokens_to_ids("<|im_end|>")], chat_template=TEMPLATE)
    return Tokenizer(None, info, json_text=tiny_tokenizer.to_str()), ref


@pytest.mark.parametrize("variables", [{}, {"enable_thinking": False}, {"enable_thinking": True, "tools": TOOLS}])
def test_template_renders_as_transformers_does(pair, variables):
    ours, ref = pair
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **variables)
    got = ours.apply_chat_template(MESSAGES, add_generation_prompt=True, **variables)
    assert str(got) == expected
    # the earlier turn's thinking is dropped (the last user turn was found), tools keep their non-ASCII text
    assert "simple" not in expected and ("<think>\n\n</think>" in expected) == (variables.get("enable_thinking") is False)
    if "tools" in variables:
        assert '"météo"' in expected and "東京" in expected
    # and the token ids equal transformers' for the same text
    assert ours.encode(got) == ref(expected, add_special_tokens=False)["input_ids"]


def test_raise_exception_in_a_template_is_a_clear_error(pair):
    from jishi.errors import JishiError

    ours, _ = pair
    with pytest.raises(JishiError, match="the chat template refused these messages: role tool is not one this "
                                         "template knows"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_generation_blocks_render_their_contents(tiny_tokenizer):
    """Templates that mark the assistant's text with {% generation %} (transformers' training mask)."""
    from transformers import PreTrainedTokenizerFast

    from jishi.runtime.manifest import TokenizerInfo
    from jishi.runtime.tokenizer import Tokenizer

    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
                "{% endfor %}")
    ref = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer, eos_token="<|im_end|>")
    ref.chat_template = template
    info = TokenizerInfo(file="tokenizer.json", add_bos=False, bos_token=None, eos_tokens=["<|im_end|>"],
                         eos_token_ids=[2], chat_template=template)
    ours = Tokenizer(None, info, json_text=tiny_tokenizer.to_str())
    expected = ref.apply_chat_template(MESSAGES, tokenize=False)
    assert str(ours.apply_chat_template(MESSAGES, add_generation_prompt=False)) == expected
    assert "4.<|im_end|>" in expected
