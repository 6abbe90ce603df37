"""Constrained decoding: a JSON schema, a regex, a Lark grammar or any JSON, enforced token by token.

llguidance (a Rust engine with a Python binding and numpy token masks, no torch) compiles
the grammar against the bundle's own tokenizer (its tokenizers JSON) and, before every
token, says which tokens may come next; the others get a logit of -inf. So the answer
matches the grammar whatever the model would have preferred, and it ends (EOS is allowed)
only where the grammar may end.

    c = json_schema({"type": "object", ...})      # or regex(...), lark(...), any_json()
    matcher = compiler_for(tokenizer, vocab_size).matcher(c)
    matcher.apply(logits)                           # before sampling
    matcher.accept(token)                           # after

JSON is written as json.dumps writes it (", " and ": ", no other whitespace): a small model
given free whitespace may write newlines until its length limit.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from jishi.errors import ConstraintError, JishiError

JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What the answer must match: ``kind`` is one of KINDS, ``source`` its text (a schema as JSON)."""

    kind: str
    source: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; use one of {', '.join(KINDS)}")


def close_objects(schema):
    """The schema with ``additionalProperties: false`` on every object schema that lists its
    properties and says nothing about others. What it accepts is a subset of the original's
    (so an answer still validates against the original); a small model left free to add
    properties tends to add them until its length limit."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("const", "enum", "default", "examples") else close_objects(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out \
            and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema(schema, closed: bool = True) -> Constraint:
    """A constraint from a JSON schema: a dict, its JSON text, or a Pydantic model class.
    ``closed``: objects with listed properties take no others unless the schema allows them."""
    if hasattr(schema, "model_json_schema"):  # a Pydantic model (v2), without importing pydantic
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"the JSON schema is not valid JSON ({e})") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object (a dict), got {type(schema).__name__}")
    return Constraint("json_schema", json.dumps(close_objects(schema) if closed else schema))


def any_json() -> Constraint:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return Constraint("json", json.dumps({"type": "object"}))


def regex(pattern: str) -> Constraint:
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("a regex constraint needs a non-empty pattern string")
    return Constraint("regex", pattern)


def lark(grammar: str) -> Constraint:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ConstraintError("a grammar constraint needs the text of a Lark grammar")
    return Constraint("lark", grammar)


def _llg():
    try:
        import llguidance
    except ImportError:
        raise JishiError("constrained decoding (a JSON schema, regex or grammar) needs llguidance, one of jishi's "
                         "dependencies, which is missing here: pip install 'llguidance>=1.6'") from None
    return llguidance


def _schema_grammar(source: str) -> str:
    return _llg().LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)


# How each kind becomes an llguidance grammar.
KINDS = {
    "json_schema": _schema_grammar,
    "json": _schema_grammar,
    "regex": lambda source: _llg().LLMatcher.grammar_from_regex(source),
    "lark": lambda source: _llg().LLMatcher.grammar_from_lark(source),
}
WHAT = {"json_schema": "JSON schema", "json": "JSON mode", "regex": "regex", "lark": "Lark grammar"}


def token_table_json(tokenizer_json: str) -> str:
    """The tokenizer as llguidance should read it. A byte-level BPE tokenizer converted from
    GGUF (transformers writes it so) may carry a decoder chain (ByteFallback, Fuse, Replace,
    ByteLevel) under which llguidance takes "Ġ" and "Ċ" for text instead of a space and a
    newline; with its pre-tokenizer byte-level, the plain ByteLevel decoder says the same
    bytes and llguidance reads it right."""
    d = json.loads(tokenizer_json)
    pre = d.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    decoder = d.get("decoder") or {}
    if any(p.get("type") == "ByteLevel" for p in pres) and decoder.get("type") != "ByteLevel":
        d["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
        if isinstance(d.get("model"), dict):
            d["model"]["byte_fallback"] = False
        return json.dumps(d)
    return tokenizer_json


class Compiler:
    """Grammars compiled for one tokenizer: the token table is built once (it is the costly part)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids):
        llg = _llg()
        self.vocab_size = vocab_size
        table, eos = token_table_json(tokenizer_json), sorted(eos_ids)
        try:
            self.tokenizer = llg.LLTokenizer(table, n_vocab=vocab_size, eos_token=eos or None)
        except TypeError:  # an older llguidance (1.6, the newest with aarch64 wheels we found) takes one EOS id
            self.tokenizer = llg.LLTokenizer(table, n_vocab=vocab_size, eos_token=eos[0] if eos else None)
        self._grammars = lru_cache(maxsize=64)(self._compile)

    def _compile(self, c: Constraint) -> str:
        llg = _llg()
        try:
            grammar = KINDS[c.kind](c.source)
        except ValueError as e:
            raise ConstraintError(f"the {WHAT[c.kind]} cannot be compiled: {e}") from None
        message = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if message:
            lines = [ln.strip() for ln in message.splitlines()]
            lines = lines[:next((i for i, ln in enumerate(lines) if re.match(r"\d+ \|", ln)), len(lines))]
            raise ConstraintError(f"the {WHAT[c.kind]} cannot be compiled: {' '.join(ln for ln in lines if ln)}")
        return grammar

    def check(self, c: Constraint) -> None:
        """Raise ConstraintError now if ``c`` does not compile (a server checks before queueing)."""
        self._grammars(c)

    def matcher(self, c: Constraint) -> "Matcher":
        return Matcher(_llg().LLMatcher(self.tokenizer, self._grammars(c), log_level=0), self.vocab_size)


class Matcher:
    """One answer's position in its grammar."""

    def __init__(self, inner, vocab_size: int):
        self._m = inner
        self._vocab = vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, np.int32)  # llguidance's bitmask, written in place
        if inner.is_error():
            raise ConstraintError(f"the constraint cannot be used: {inner.get_error()}")

    def allowed(self) -> np.ndarray:
        """A bool array over the vocabulary: the tokens that may come next."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        return bits[:self._vocab].view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Set the logits of tokens the grammar forbids to -inf (in place)."""
        allowed = self.allowed()
        n = min(logits.size, allowed.size)
        np.putmask(logits[:n], ~allowed[:n], -np.inf)
        if logits.size > n:
            logits[n:] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise ConstraintError(f"the constrained decoder refused token {token}: {self._m.get_error()}")

    @property
    def stopped(self) -> bool:
        """The grammar is complete and nothing may follow."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()


_COMPILERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def compiler_for(tokenizer, vocab_size: int) -> Compiler:
    """The compiler of a runtime ``Tokenizer`` (built on first use, kept while the tokenizer lives)."""
    with _LOCK:
        c = _COMPILERS.get(tokenizer)
        if c is None or c.vocab_size != vocab_size:
            c = _COMPILERS[tokenizer] = Compiler(tokenizer.to_json(), vocab_size, tokenizer.eos_ids)
        return c
