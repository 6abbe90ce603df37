"""A conversation that stays within the context window, for terminal and web chat."""

from __future__ import annotations

from typing import Iterator

from jishi.errors import ContextLengthError


class Conversation:
    """Messages so far; the oldest turns are dropped (the system prompt kept) when the context fills."""

    def __init__(self, model, system: str | None = None, reserve: int = 256, template_vars: dict | None = None):
        self.model = model
        self.system = system
        self.reserve = reserve  # tokens kept free for the answer
        self.template_vars = dict(template_vars or {})  # passed to the chat template (Qwen3: enable_thinking)
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def fit(self) -> str:
        """The prompt for the current messages, dropping whole old turns until it fits.

        The history is changed only when a prompt that fits is found.
        """
        reserve = min(self.reserve, self.model.context // 2)
        budget = self.model.context - reserve
        messages = list(self.messages)
        while True:
            prompt = self.model.chat_prompt(self._with_system(messages), self.template_vars)
            if self.model.count_tokens(prompt, chat=True) <= budget:
                self.messages = messages
                return prompt
            if len(messages) <= 1:
                what = "the system prompt and this message" if self.system else "this message alone"
                raise ContextLengthError(
                    f"{what} {'do' if self.system else 'does'} not fit in the context window of {self.model.context} tokens "
                    f"(with {reserve} kept for the answer); send a shorter one"
                )
            # Drop the oldest user turn and the replies up to the next user turn.
            drop = 1
            while drop < len(messages) and messages[drop]["role"] != "user":
                drop += 1
            del messages[:drop]

    def send(self, text: str, **kwargs) -> "Reply":
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.fit()
        except ContextLengthError:
            self.messages.pop()
            raise
        kwargs.setdefault("max_new_tokens", self.reserve)
        try:
            stream = self.model.stream(prompt, chat=True, **kwargs)
        except BaseException:
            self.messages.pop()
            raise
        return Reply(self, stream)


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
