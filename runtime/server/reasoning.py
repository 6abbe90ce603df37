"""Thinking, for templates that think (Qwen3): ``<think>…</think>`` at the start of an answer is
its reasoning, not its content. OpenAI-style APIs return it as ``reasoning_content`` (Ollama:
``message.thinking``); the rest is the content."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def thinks(chat_template: str | None) -> bool:
    return bool(chat_template) and OPEN in chat_template


def split(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer."""
    head = text.lstrip()
    if not head.startswith(OPEN):
        return None, text
    body = head[len(OPEN):]
    end = body.find(CLOSE)
    if end < 0:  # cut before it finished thinking
        return body.strip(), ""
    return body[:end].strip(), body[end + len(CLOSE):].lstrip()


class Splitter:
    """The same for a stream: ``push(piece)`` returns (reasoning piece, content piece)."""

    def __init__(self):
        self.state = "start"  # start -> thinking -> after -> content, or start -> content
        self.held = ""

    def push(self, piece: str) -> tuple[str, str]:
        self.held += piece
        if self.state == "start":
            head = self.held.lstrip()
            if OPEN.startswith(head):
                return "", ""  # may still become <think>
            if not head.startswith(OPEN):
                self.state, out, self.held = "content", self.held, ""
                return "", out
            self.state, self.held = "thinking", head[len(OPEN):].lstrip("\n")
        if self.state == "thinking":
            end = self.held.find(CLOSE)
            if end >= 0:
                reasoning, rest = self.held[:end], self.held[end + len(CLOSE):].lstrip()
                self.state, self.held = ("content" if rest else "after"), ""
                return reasoning, rest
            keep = _partial_suffix(self.held, CLOSE)  # the start of a closing tag stays held
            out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
            return out, ""
        if self.state == "after":  # the whitespace after </think> is not content
            self.held = self.held.lstrip()
            if not self.held:
                return "", ""
            self.state = "content"
        out, self.held = self.held, ""
        return "", out

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "thinking":
            return held, ""
        return "", held


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` are a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
