"""OpenAI's answer shapes: chat completions and completions, whole or as chunks, with
logprobs, several choices (``n``) and tool calls.

A renderer turns the scheduler's events into JSON objects; ``app.JobResponse`` frames and
sends them. In a stream, text that may still become a tool call ("<tool_call>…") is held
back: a call goes out as one ``tool_calls`` delta when its answer ends.
"""

from __future__ import annotations

import time
import uuid

from starlette.responses import JSONResponse

from jishi.runtime.server import reasoning as R
from jishi.runtime.server import tools as T


def usage(prompt: int, gens) -> dict:
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Renderer:
    def __init__(self, tokenizer, chat: bool, model_id: str, prompt_tokens: int, stream: bool, include_usage: bool,
                 tools_on: bool):
        self.tok = tokenizer
        self.thinks = chat and R.thinks(tokenizer.info.chat_template)
        self._split: dict[int, R.Splitter] = {}
        self.chat = chat
        self.model_id = model_id
        self.prompt_tokens = prompt_tokens
        self.stream = stream
        self.include_usage = include_usage
        self.tools_on = tools_on
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and stream else "")
        self._held: dict[int, str] = {}  # streamed text held back while it may become a tool call
        self._shown: dict[int, bool] = {}  # whether a choice has let text out (then it is not a call)

    # --- logprobs ------------------------------------------------------------------------

    def _token(self, t: int) -> dict:
        text = self.tok.decode([t], skip_special=False)
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    def chat_logprobs(self, entries) -> dict | None:
        if entries is None:
            return None
        return {"content": [{**self._token(e.token), "logprob": e.logprob,
                             "top_logprobs": [{**self._token(t), "logprob": lp} for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion_logprobs(self, entries, offset: int = 0) -> dict | None:
        if entries is None:
            return None
        tokens = [self._token(e.token)["token"] for e in entries]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t)["token"]: lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _lp(self, gen, entries=None):
        if gen.top_logprobs is None:
            return None
        entries = gen.take_logprobs() if entries is None else entries
        return self.chat_logprobs(entries) if self.chat else self.completion_logprobs(entries)

    # --- whole answers -------------------------------------------------------------------

    def choice(self, i: int, gen) -> dict:
        lp = self._lp(gen, gen.logprobs)
        if not self.chat:
            return {"index": i, "text": gen.text, "logprobs": lp, "finish_reason": gen.finish_reason}
        calls = T.parse_calls(gen.text) if self.tools_on else None
        if calls:
            return {"index": i, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                    "logprobs": lp, "finish_reason": "tool_calls"}
        message = {"role": "assistant", "content": gen.text}
        if self.thinks:
            reasoning, message["content"] = R.split(gen.text)
            if reasoning is not None:
                message["reasoning_content"] = reasoning
        return {"index": i, "message": message, "logprobs": lp, "finish_reason": gen.finish_reason}

    def whole(self, gens) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": [self.choice(i, g) for i, g in enumerate(gens)],
                "usage": usage(self.prompt_tokens, gens), "system_fingerprint": None}

    # --- streams -------------------------------------------------------------------------

    def _chunk(self, i: int, body: dict, finish=None, lp=None) -> dict:
        choice = ({"index": i, "delta": body, "logprobs": lp, "finish_reason": finish} if self.chat
                  else {"index": i, "text": body, "logprobs": lp, "finish_reason": finish})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": [choice]}

    def start(self, n: int) -> list:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(n)] if self.chat else []

    def piece(self, i: int, text: str, gen) -> list:
        if not self.chat:
            return [self._chunk(i, text, lp=self._lp(gen))]
        if self.tools_on and not self._shown.get(i):
            held = self._held.get(i, "") + text
            if T.may_become_call(held):
                self._held[i] = held
                return []
            self._held[i], text = "", held
        self._shown[i] = True
        return self._text_chunks(i, text, gen)

    def _text_chunks(self, i: int, text: str, gen, flush: bool = False) -> list:
        if not self.thinks:
            return [self._chunk(i, {"content": text}, lp=self._lp(gen))] if text or not flush else []
        splitter = self._split.setdefault(i, R.Splitter())
        reasoning, content = splitter.push(text)
        if flush:
            r2, c2 = splitter.flush()
            reasoning, content = reasoning + r2, content + c2
        out = []
        if reasoning:
            out.append(self._chunk(i, {"reasoning_content": reasoning}))
        if content:
            out.append(self._chunk(i, {"content": content}))
        if out and gen.top_logprobs is not None:
            out[-1]["choices"][0]["logprobs"] = self._lp(gen)
        return out

    def done(self, i: int, gen) -> list:
        if not self.chat:
            return [self._chunk(i, "", gen.finish_reason, self._lp(gen))]
        held = self._held.pop(i, "")
        calls = T.parse_calls(gen.text) if self.tools_on and not self._shown.get(i) else None
        if calls:
            deltas = [{"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                       "function": {"name": c["function"]["name"], "arguments": ""}}]}
                      for k, c in enumerate(calls)]
            deltas += [{"tool_calls": [{"index": k, "function": {"arguments": c["function"]["arguments"]}}]}
                       for k, c in enumerate(calls)]
            out = [self._chunk(i, d) for d in deltas]
            return out + [self._chunk(i, {}, "tool_calls", self._lp(gen))]
        out = self._text_chunks(i, held, gen, flush=True) if (held or self.thinks) else []
        return out + [self._chunk(i, {}, gen.finish_reason, self._lp(gen))]

    def end(self, gens) -> list:
        if not self.include_usage:
            return []
        return [{"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                 "choices": [], "usage": usage(self.prompt_tokens, gens)}]

    # --- errors --------------------------------------------------------------------------

    @staticmethod
    def error_object(err) -> dict:
        return err.body()

    @staticmethod
    def error_response(err) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
