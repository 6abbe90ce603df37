"""Constrained decoding on the tiny model: whatever a random model prefers, the answer matches
the schema, regex or grammar (validated with jsonschema, re and by the grammar's own rules)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import jishi  # noqa: E402
from jishi.errors import ConstraintError, JishiError  # noqa: E402
from jishi.runtime import constraints  # noqa: E402

# Every path through these ends within the token budgets below, so a random model's answer is complete.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["teacher", "farmer", "nurse"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
}


@pytest.fixture(scope="module")
def model(tiny_bundles):
    return jishi.load(tiny_bundles["fp32"], threads=1)


@pytest.mark.parametrize("seed", range(4))
def test_schema_answers_validate_whatever_the_model_prefers(model, seed):
    r = model.generate("The person:", schema=PERSON, temperature=1.0, seed=seed, max_new_tokens=120)
    assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(r.text), PERSON)
    assert set(json.loads(r.text)) <= set(PERSON["properties"])  # objects are closed by default


def test_chat_with_a_pydantic_model_and_greedy(model):
    pydantic = pytest.importorskip("pydantic")

    class Reading(pydantic.BaseModel):
        sensor: str = pydantic.Field(max_length=8)
        celsius: int = pydantic.Field(ge=-40, le=60)
        ok: bool

    r = model.chat([{"role": "user", "content": "The greenhouse reading?"}], schema=Reading, temperature=0,
                   max_new_tokens=80)
    assert r.finish_reason == "stop", r.text
    Reading.model_validate_json(r.text)
    jsonschema.validate(json.loads(r.text), Reading.model_json_schema())


def test_regex_and_lark_grammar(model):
    for seed in range(3):
        r = model.generate("Date:", regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", temperature=1.0, seed=seed,
                           max_new_tokens=30)
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r.text), r.text
        assert r.finish_reason == "stop"
    grammar = 'start: answer " because " reason\nanswer: "yes" | "no"\nreason: /[a-z]{1,8}/'
    for seed in range(3):
        r = model.generate("Is it raining?", grammar=grammar, temperature=1.0, seed=seed, max_new_tokens=30)
        assert re.fullmatch(r"(yes|no) because [a-z]{1,8}", r.text), r.text


def test_streamed_pieces_join_to_the_constrained_text(model):
    stream = model.stream("The person:", schema=PERSON, temperature=0.8, seed=11, max_new_tokens=120)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    jsonschema.validate(json.loads(stream.result.text), PERSON)


def test_json_mode_allows_objects_only(model):
    compiler = constraints.compiler_for(model.tokenizer, model.manifest.config.vocab_size)
    m = compiler.matcher(constraints.any_json())
    allowed = m.allowed()
    starts = [t for t in np.nonzero(allowed)[0] if not model.tokenizer.decode([int(t)]).startswith("{")]
    assert allowed.any() and not starts  # the first token opens an object: no arrays, numbers or text
    for t in model.tokenizer.encode('{"a": [1, true, "x"]}'):
        assert m.allowed()[t]
        m.accept(t)
    assert m.accepting


@pytest.mark.parametrize("kwargs, message", [
    ({"schema": {"type": "wat"}}, "JSON schema cannot be compiled"),
    ({"schema": "{not json"}, "not valid JSON"),
    ({"schema": [1, 2]}, "must be an object"),
    ({"regex": "a(b"}, "regex cannot be compiled: .*unclosed group"),
    ({"grammar": "start: missing_rule"}, "Lark grammar cannot be compiled: .*missing_rule"),
    ({"regex": "a", "grammar": 'start: "a"'}, "at most one constraint"),
])
def test_a_constraint_that_cannot_compile_is_a_clear_error(model, kwargs, message):
    with pytest.raises(JishiError, match=message) as info:
        model.generate("Hi", **kwargs)
    assert isinstance(info.value, ConstraintError) or "at most one" in message


def test_objects_stay_open_where_the_schema_says_so():
    closed = constraints.close_objects({"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
                                        "default": {"properties": {}}})
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["default"]  # a value, not a schema
    kept = constraints.close_objects({"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}})
    assert kept["additionalProperties"] == {"type": "integer"}


def test_a_gguf_style_byte_level_tokenizer_reads_spaces_and_newlines(tiny_tokenizer):
    """transformers writes a GGUF's BPE tokenizer with a decoder chain (ByteFallback, Fuse, Replace,
    ByteLevel) and byte fallback on; the grammar must still see "Ġ" as a space and "Ċ" as a newline."""
    from jishi.runtime.manifest import TokenizerInfo
    from jishi.runtime.tokenizer import Tokenizer

    d = json.loads(tiny_tokenizer.to_str())
    d["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    d["model"]["byte_fallback"] = True
    info = TokenizerInfo(file="tokenizer.json", add_bos=False, bos_token=None, eos_tokens=["<|im_end|>"],
                         eos_token_ids=[2], chat_template=None)
    tok = Tokenizer(None, info, json_text=json.dumps(d))
    m = constraints.compiler_for(tok, 384).matcher(constraints.regex("a b\nc"))
    for t in tok.encode("a b\nc"):
        assert m.allowed()[t], tok.decode([t])
        m.accept(t)
    assert m.accepting


def test_jishi_run_json_schema_and_a_bad_schema_file(tiny_bundles, tmp_path):
    import subprocess
    import sys

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))

    def jishi_run(*args):
        return subprocess.run([sys.executable, "-m", "jishi.cli", "run", str(tiny_bundles["fp32"]), *args],
                              capture_output=True, text=True, timeout=300)

    done = jishi_run("The person:", "--json-schema", str(schema), "--temperature", "1", "--seed", "2",
                     "--max-tokens", "120")
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), PERSON)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "wat"}')
    done = jishi_run("x", "--json-schema", str(bad))
    assert done.returncode != 0 and "JSON schema cannot be compiled" in done.stderr and "Traceback" not in done.stderr
    done = jishi_run("x", "--grammar", str(tmp_path / "missing.lark"))
    assert done.returncode != 0 and "cannot read the grammar file" in done.stderr
    done = jishi_run("x", "--regex", "[0-9]{3}", "--max-tokens", "10")
    assert done.returncode == 0 and re.fullmatch(r"[0-9]{3}\n", done.stdout), done.stdout


def _walk(matcher, tokenizer, text: str) -> int:
    """Feed ``text``'s tokens while the grammar allows them; how many characters it took."""
    ids = tokenizer.encode(text)
    for k, t in enumerate(ids):
        if not matcher.allowed()[t]:
            return len(tokenizer.decode(ids[:k]))
        matcher.accept(t)
    return len(text)


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_allow_several_call_blocks_and_off_exactly_one(model, parallel):
    """OpenAI's ``parallel_tool_calls``: on, an answer may hold up to MAX_CALLS call blocks one after another;
    off, the grammar ends after the first (the newline that would open a second is refused)."""
    from jishi.runtime.server import tools as T

    weather = T.Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                         "required": ["city"]})
    one = T.OPEN + json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}) + T.CLOSE
    two = one + "\n" + one.replace("Paris", "Lima")
    compiler = constraints.compiler_for(model.tokenizer, model.manifest.config.vocab_size)
    m = compiler.matcher(T.constraint([weather], "required", parallel))
    took = _walk(m, model.tokenizer, two)
    if parallel:
        assert took == len(two) and m.accepting and not m.stopped
        assert [c["function"]["arguments"] for c in T.parse_calls(two)] == ['{"city": "Paris"}', '{"city": "Lima"}']
        m = compiler.matcher(T.constraint([weather], "required", parallel))
        assert _walk(m, model.tokenizer, "\n".join([one] * (T.MAX_CALLS + 1))) < len(one) * (T.MAX_CALLS + 1)
    else:
        assert took == len(one) and m.accepting
