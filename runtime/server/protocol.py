"""The OpenAI request bodies, checked field by field, and the error object every refusal uses.

No web framework here: a body (already parsed JSON) goes in, a ``Request`` or an
``APIError`` comes out. Fields the API defines but jishi cannot honour are refused
with a message saying so, rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from jishi.runtime.sampling import SamplingParams

# jishi's own sampling defaults (those of `jishi chat`), used where a request says nothing.
DEFAULTS = SamplingParams()
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A refusal: HTTP status and the fields of an OpenAI-style error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Request:
    model: str | None
    messages: list[dict] | None  # chat
    prompt: str | None  # completions
    max_tokens: int | None
    params: SamplingParams
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise bad(f"'{name}' must be {low} and at most {hi:g}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if lo is not None and value < lo:
        raise bad(f"'{name}' must be at least {lo}, got {value}", name)
    return value


def _common(body: dict) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad("only n=1 is supported: send one request per answer", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"'{name}' is not supported; use 'repetition_penalty' (default {DEFAULTS.repetition_penalty})",
                      name, "unsupported")
    for name in ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, 0, [], {}) and not (name == "best_of" and body.get(name) == 1):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise bad("only the text response format is supported", "response_format", "unsupported")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 0, 2, DEFAULTS.temperature),
            top_k=_integer(body, "top_k", 0) if body.get("top_k") is not None else DEFAULTS.top_k,
            top_p=_number(body, "top_p", 0, 1, DEFAULTS.top_p, lo_open=True),
            repetition_penalty=_number(body, "repetition_penalty", 0, 10, DEFAULTS.repetition_penalty, lo_open=True),
        )
    except ValueError as e:  # the ranges above already hold what SamplingParams checks
        raise bad(str(e)) from None
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > 4:
            raise bad(f"'stop' holds at most 4 strings, got {len(stop)}", "stop")
        stops = tuple(s for s in stop if s)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    seed = _integer(body, "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options", "invalid_type")
    return dict(model=model, max_tokens=max_tokens, params=params, stop=stops, seed=seed, stream=stream,
                include_usage=bool(options and options.get("include_usage")))


def parse_chat(body) -> Request:
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                  "invalid_type" if messages is not None else "missing")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), where)})
    return Request(messages=out, prompt=None, **common)


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content may hold only text parts ({{\"type\": \"text\", \"text\": ...}})",
                          f"{where}.content", "unsupported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where}.content must be a string, got {type(content).__name__}", f"{where}.content", "invalid_type")


def parse_completion(body) -> Request:
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (one prompt per request)", "prompt",
                  "missing" if prompt is None else "invalid_type")
    if not prompt:
        raise bad("'prompt' is empty", "prompt")
    return Request(messages=None, prompt=prompt, **common)
