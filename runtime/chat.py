"""A conversation that stays within the context window, for terminal and web chat."""

from __future__ import annotations

from typing import Iterator

from jishi.errors import ContextLengthError


class Conversation:
    """Messages so far; the oldest turns are dropped (the system prompt kept) when the context fills."""

    def __init__(self, model, system: str | None = None, reserve: int = 256):
        self.model = model
        self.system = system
        self.reserve = reserve  # tokens kept free for the answer
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def fit(self) -> str:
        """The prompt for the current messages, dropping whole old turns until it fits."""
        budget = self.model.context - min(self.reserve, self.model.context // 2)
        while True:
            prompt = self.model.chat_prompt(self._with_system(self.messages))
            if self.model.count_tokens(prompt) <= budget:
                return prompt
            if len(self.messages) <= 1:
                raise ContextLengthError(
                    f"this message alone does not fit in the context window of {self.model.context} tokens "
                    f"(with {self.reserve} kept for the answer); send a shorter one"
                )
            # Drop the oldest user turn and the replies up to the next user turn.
            drop = 1
            while drop < len(self.messages) and self.messages[drop]["role"] != "user":
                drop += 1
            del self.messages[:drop]

    def send(self, text: str, **kwargs) -> "Reply":
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.fit()
        except ContextLengthError:
            self.messages.pop()
            raise
        kwargs.setdefault("max_new_tokens", self.reserve)
        return Reply(self, self.model.stream(prompt, **kwargs))


class Reply:
    """The streamed answer; whatever was said (all of it, or up to Ctrl-C) joins the conversation."""

    def __init__(self, convo: Conversation, stream):
        self._convo = convo
        self._stream = stream
        self._parts: list[str] = []
        self._recorded = False

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._stream:
                self._parts.append(piece)
                yield piece
        finally:
            self._record()

    @property
    def result(self):
        return self._stream.result

    def close(self) -> None:
        self._stream.close()
        self._record()

    def _record(self) -> None:
        if not self._recorded:
            self._recorded = True
            self._convo.messages.append({"role": "assistant", "content": "".join(self._parts)})
