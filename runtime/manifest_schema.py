"""The manifest's fields checked for type and range when a bundle is read.

One rule per field, in a table a new field is added to (a family that brings a new config
field adds its row): the kinds it may be, and the range its value must lie in. A manifest
that breaks one is refused with the field's name, before any of it reaches onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from jishi.errors import BundleError


@dataclass(frozen=True)
class Rule:
    kinds: tuple[type, ...]  # what the JSON value may be (bool is never an int here)
    check: Callable[[Any], bool] = lambda v: True
    says: str = ""  # the range, in words
    optional: bool = False  # may be null


def _positive(v) -> bool:
    return v > 0


INT, NUM, BOOL, STR = (int,), (int, float), (bool,), (str,)

CONFIG: dict[str, Rule] = {
    "family": Rule(STR, bool, "a family name"),
    "num_layers": Rule(INT, _positive, "at least 1"),
    "hidden_size": Rule(INT, _positive, "at least 1"),
    "num_heads": Rule(INT, _positive, "at least 1"),
    "num_kv_heads": Rule(INT, _positive, "at least 1"),
    "head_dim": Rule(INT, lambda v: v > 0 and v % 2 == 0, "a positive even number (rotary pairs)"),
    "intermediate_size": Rule(INT, _positive, "at least 1"),
    "vocab_size": Rule(INT, _positive, "at least 1"),
    "context_length": Rule(INT, _positive, "at least 1 token"),
    "rope_theta": Rule(NUM, _positive, "positive"),
    "rms_norm_eps": Rule(NUM, lambda v: 0 < v < 1, "between 0 and 1"),
    "tie_word_embeddings": Rule(BOOL),
    "attention_bias": Rule(BOOL),
    "rope_scaling": Rule((dict,), optional=True),
    "sliding_window": Rule(INT, _positive, "at least 1", optional=True),
}

TOKENIZER: dict[str, Rule] = {
    "file": Rule(STR, bool, "a file name"),
    "add_bos": Rule(BOOL),
    "bos_token": Rule(STR, optional=True),
    "eos_tokens": Rule((list,)),
    "eos_token_ids": Rule((list,), lambda v: all(type(i) is int and i >= 0 for i in v), "a list of token ids"),
    "chat_template": Rule(STR, optional=True),
    "pad_token_id": Rule(INT, lambda v: v >= 0, "a token id", optional=True),
}

GRAPH: dict[str, Rule] = {
    "file": Rule(STR, bool, "a file name"),
    "data_file": Rule(STR, bool, "a file name", optional=True),
    "quantization": Rule((dict,), lambda v: isinstance(v.get("name"), str), "an object with a name"),
    "inputs": Rule((list,)),
    "outputs": Rule((list,)),
}


def check_section(section: str, body: Any, rules: dict[str, Rule]) -> None:
    """Each field of ``body`` that has a rule, checked; unknown fields are left to the reader."""
    if not isinstance(body, dict):
        raise BundleError(f"manifest.json: {section} must be a JSON object; the bundle is damaged: rebuild it")
    for name, rule in rules.items():
        if name not in body:
            continue  # a missing required field is reported by the reader
        value = body[name]
        if value is None and rule.optional:
            continue
        kind_ok = isinstance(value, rule.kinds) and not (isinstance(value, bool) and bool not in rule.kinds)
        if not kind_ok or not rule.check(value):
            kinds = " or ".join("integer" if k is int else "number" if k is float else
                                {bool: "true/false", str: "string", dict: "object", list: "list"}[k] for k in rule.kinds)
            want = f"{kinds}{', ' + rule.says if rule.says else ''}{' (or null)' if rule.optional else ''}"
            raise BundleError(f"manifest.json: {section}.{name} must be {want}, found {value!r}; "
                              "the manifest does not describe a model jishi can run: rebuild the bundle")


def check_manifest_body(body: dict) -> None:
    """The schema's checks, then those that join two sections (token ids inside the vocabulary)."""
    check_section("config", body.get("config"), CONFIG)
    check_section("tokenizer", body.get("tokenizer"), TOKENIZER)
    check_section("graph", body.get("graph"), GRAPH)
    config, tok = body["config"], body["tokenizer"]
    vocab = config.get("vocab_size")
    for field in ("eos_token_ids", "pad_token_id"):
        ids = tok.get(field)
        for i in ids if isinstance(ids, list) else [ids] if ids is not None else []:
            if isinstance(vocab, int) and i >= vocab:
                raise BundleError(f"manifest.json: tokenizer.{field} holds {i}, outside the vocabulary of {vocab} "
                                  "(config.vocab_size); rebuild the bundle")
    heads, kv = config.get("num_heads"), config.get("num_kv_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise BundleError(f"manifest.json: config.num_heads ({heads}) is not a multiple of config.num_kv_heads ({kv}); "
                          "rebuild the bundle")
