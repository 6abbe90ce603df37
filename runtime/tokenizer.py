"""Tokenization, chat templates and streaming detokenization, with no torch."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from jishi.errors import BundleError, JishiError
from jishi.runtime.manifest import TokenizerInfo


NO_TEMPLATE = ('this bundle has no chat template (its base is a pretrained model, not a chat model): send plain prompts (`jishi run --raw`, generate()), or give a template: `jishi build --chat-template FILE`, `jishi chat/serve --chat-template FILE`, or jishi.load(..., chat_template=TEXT)')


def compact_merges(tokenizer_json: str) -> str:
    """The same tokenizer with its BPE merges written as ``"a b"`` strings instead of ``["a", "b"]`` pairs,
    where no merge part holds a space (the pair form exists for those).

    tokenizers parses the string form with far less memory: loading Gemma 3's (514,906 merges) alone peaks
    at 181 MB against 355 as pairs and leaves 144 MB resident against 294; SmolLM2's 37 against 56. In a whole
    process (load and a 128-token answer) Gemma 3's bundle peaks at 714 MB against 746, SmolLM2's the same
    (bench/tokenizer_memory.py).
    Encoding is the same (tested). Anything else is returned unchanged."""
    d = json.loads(tokenizer_json)
    model = d.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return tokenizer_json
    merges = model.get("merges") or []
    if not merges or not all(isinstance(m, list) and len(m) == 2 for m in merges):
        return tokenizer_json
    if any(" " in part for m in merges for part in m):
        return tokenizer_json
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(d, ensure_ascii=False)


class Tokenizer:
    """The bundle's tokenizer: encoding adds BOS only where the model was trained with it."""

    def __init__(self, path: Path | None, info: TokenizerInfo, json_text: str | None = None):
        try:
            self._tok = _HFTokenizer.from_str(json_text) if json_text is not None else _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise BundleError(f"cannot read the tokenizer {path.name if path else ''}: {e}") from None
        self.info = info
        self._plain_copy = None  # made when a message first holds special-token text (see _plain)
        specials = sorted((t.content for t in self._tok.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.bos_id = self._tok.token_to_id(info.bos_token) if info.bos_token else None
        self.eos_ids = frozenset(info.eos_token_ids)
        self._template = None
        if info.chat_template:
            # The environment Hugging Face chat templates are written for: {% break %} / {% continue %},
            # raise_exception, strftime_now, and a tojson that keeps non-ASCII text as it is.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols, _GenerationBlock])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(info.chat_template)
            except TemplateError as e:
                raise BundleError(f"the bundle's chat template does not parse: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def to_json(self) -> str:
        """The tokenizer in the tokenizers JSON format (what a constrained decoder reads)."""
        return self._tok.to_str()

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` list itself (else a caller writes one into the prompt)."""
        return bool(self.info.chat_template) and "tools" in self.info.chat_template

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token text in it becomes those tokens, except inside the
        messages of a prompt made by ``apply_chat_template``, where it stays plain text."""
        if isinstance(text, ChatPrompt):
            ids = self._encode_chat(text)
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.info.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **variables) -> "ChatPrompt":
        """The prompt text for these messages. It is a ``ChatPrompt``: a str that remembers which
        of its special tokens the template wrote, so that ``encode`` does not turn text such as
        "<|im_end|>" typed in a message into a control token. ``variables`` are passed to the
        template as they are (e.g. Qwen3's ``enable_thinking=False``)."""
        if self._template is None:
            raise JishiError(NO_TEMPLATE)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        table: list[str] = []  # the special-token text found in messages, each replaced by a marker

        def mark(match: re.Match) -> str:
            table.append(match.group(0))
            return f"{_MARK}{len(table) - 1}{_END}"

        pattern = re.compile(f"{self._specials.pattern}|{_MARK}" if self._specials else _MARK)
        escaped = [{**m, "content": pattern.sub(mark, m["content"])} for m in messages]
        rendered = self._render(escaped, add_generation_prompt, variables, tools)
        # Split at the special tokens the template wrote; put the typed text back in between.
        chunks: list[tuple[str, bool]] = []
        at = 0
        for match in (self._specials.finditer(rendered) if self._specials else ()):
            if match.start() > at:
                chunks.append((rendered[at:match.start()], False))
            chunks.append((match.group(0), True))
            at = match.end()
        if at < len(rendered):
            chunks.append((rendered[at:], False))
        unmark = lambda text: _MARKED.sub(lambda m: table[int(m.group(1))], text)
        chunks = [(text if special else unmark(text), special) for text, special in chunks]
        return ChatPrompt("".join(text for text, _ in chunks), chunks)

    def _encode_chat(self, prompt: "ChatPrompt") -> list[int]:
        ids: list[int] = []
        for text, special in prompt.chunks:
            if special:
                ids.append(self._tok.token_to_id(text))
            else:
                # Text with no special-token text in it encodes the same either way.
                tok = self._plain if self._specials is not None and self._specials.search(text) else self._tok
                ids.extend(tok.encode(text, add_special_tokens=False).ids)
        return ids

    @property
    def _plain(self) -> _HFTokenizer:
        """The same tokenizer with special-token text read as plain text: for what people typed.
        Made on first need (reading a tokenizer costs a good part of a load)."""
        if self._plain_copy is None:
            plain = _HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_copy = plain
        return self._plain_copy

    def _render(self, messages: list[dict], add_generation_prompt: bool, variables: dict | None = None,
                tools: list[dict] | None = None) -> str:
        extra = {**(variables or {}), **({"tools": tools} if tools else {})}
        try:
            return self._template.render(
                **extra,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_tokens[0] if self.info.eos_tokens else "",
            )
        except TemplateError as e:
            raise JishiError(f"the chat template refused these messages: {e}") from None


_MARK, _END = "\ue000", "\ue001"  # private-use characters around a marker's number
_MARKED = re.compile(f"{_MARK}(\\d+){_END}")


class ChatPrompt(str):
    """A prompt rendered by the chat template, with its chunks: (text, is a special token the
    template wrote). Joined, the chunks are the string itself."""

    def __new__(cls, text: str, chunks: list[tuple[str, bool]]):
        self = super().__new__(cls, text)
        self.chunks = tuple(chunks)
        return self

    def after(self, start: int) -> "ChatPrompt":
        """The prompt from character ``start`` on, its chunks kept (a special token is never cut)."""
        out: list[tuple[str, bool]] = []
        at = 0
        for text, special in self.chunks:
            end = at + len(text)
            if end > start:
                if at < start and special:
                    raise ValueError(f"offset {start} cuts the special token {text!r}")
                out.append((text[max(0, start - at):], special))
            at = end
        return ChatPrompt(str(self)[start:], out)


class _GenerationBlock(Extension):
    """``{% generation %}…{% endgeneration %}``, which some templates put around the assistant's text
    (transformers uses it to mark tokens for training): rendered as its contents."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class TextStream:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Byte-level tokenizers may emit half a UTF-8 character per token; a piece is
    released only once it decodes without a replacement character at its end.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._start = 0  # first id of the window still being decoded
        self._emitted = 0  # characters of that window already released

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids[self._start:])
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted:]
        # Keep the window short: restart it at this token, remembering its text length.
        if len(self._ids) - self._start > 8:
            self._start = len(self._ids) - 1
            self._emitted = len(self._tok.decode(self._ids[self._start:]))
        else:
            self._emitted = len(text)
        return piece

    def flush(self) -> str:
        text = self._tok.decode(self._ids[self._start:])
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece
