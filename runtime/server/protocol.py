"""The OpenAI request bodies, checked field by field, and the error object every refusal uses.

No web framework here: a body (already parsed JSON) goes in, a ``Request`` or an
``APIError`` comes out. Fields the API defines but jishi cannot honour are refused
with a message saying so, rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jishi.runtime.sampling import SamplingParams

# jishi's own sampling defaults (those of `jishi chat`), used where a request says nothing.
DEFAULTS = SamplingParams()
ROLES = ("system", "developer", "user", "assistant", "tool")


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


MAX_N = 8
SAMPLING_FIELDS = (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                   ("repetition_penalty", "repetition_penalty"))  # (SamplingParams field, body field)
MAX_SEED = 2**64 - 1


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
    n: int = 1
    logprobs: int | None = None  # None: off; else how many alternatives per token (0..20)
    constraint: object | None = None  # a constraints.Constraint (response_format or grammar)
    constraint_param: str | None = None  # the field it came from, for errors
    tools: tuple = ()  # tools.Tool
    tool_choice: object = "auto"  # "auto", "none", "required" or a tool name
    parallel_tool_calls: bool = True  # an answer may make several calls (up to tools.MAX_CALLS)
    given: tuple = ()  # (name, value) of the sampling values the request set: the rest are the model's defaults
    truncate: bool = False  # chat: drop the oldest turns (never a system message) to fit, instead of a 400


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    if not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number, got {value}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise bad(f"'{name}' must be {low} and at most {hi:g}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if lo is not None and value < lo:
        raise bad(f"'{name}' must be at least {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad(f"'{name}' must be at most {hi}, got {value}", name)
    return value


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers from -100 to 100", "logit_bias",
                  "invalid_type")
    if len(bias) > 1024:
        raise bad(f"'logit_bias' holds at most 1024 tokens, got {len(bias)}", "logit_bias")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad(f"'logit_bias' keys must be token ids (strings of digits), got {key!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not -100 <= value <= 100:
            raise bad(f"'logit_bias' values must be numbers from -100 to 100, got {value!r} for token {key}",
                      "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def check_schema(schema, param: str) -> None:
    """400 unless ``schema`` is a JSON Schema (an object or a boolean, valid for its draft)."""
    if not isinstance(schema, (dict, bool)):
        raise bad(f"'{param}' must be a JSON Schema object, got {type(schema).__name__}", param, "invalid_type")
    try:
        import jsonschema
    except ImportError:  # the engine's own compile check still runs
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise bad(f"'{param}' is not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else ""),
                  param, "invalid_schema") from None


def _constraint(body: dict):
    from jishi.errors import ConstraintError
    from jishi.runtime import constraints

    fmt, grammar = body.get("response_format"), body.get("grammar")
    found = None
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                      "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                      "response_format")
        if fmt["type"] == "json_object":
            found = (constraints.any_json(), "response_format")
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
                raise bad("'response_format.json_schema' must be an object with 'name' and 'schema'",
                          "response_format.json_schema", "invalid_type")
            strict = spec.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise bad("'response_format.json_schema.strict' must be true or false",
                          "response_format.json_schema.strict", "invalid_type")
            schema = spec.get("schema", {})
            check_schema(schema, "response_format.json_schema.schema")
            try:
                found = (constraints.json_schema(schema), "response_format.json_schema.schema")
            except ConstraintError as e:
                raise bad(str(e), "response_format.json_schema.schema", "invalid_schema") from None
    if grammar is not None:
        if found is not None:
            raise bad("give either 'response_format' or 'grammar', not both", "grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise bad("'grammar' must be the text of a Lark grammar", "grammar", "invalid_type")
        found = (constraints.lark(grammar), "grammar")
    return found or (None, None)


def _tools(body: dict):
    from jishi.runtime.server.tools import NAME, Tool

    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None:
        raise bad("'functions' is the old form of 'tools': send 'tools': [{\"type\": \"function\", "
                  "\"function\": {...}}]", "functions", "unsupported")
    out = []
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools",
                      "invalid_type")
        if len(tools) > 64:
            raise bad(f"'tools' holds at most 64 functions, got {len(tools)}", "tools")
        for i, t in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
                raise bad(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", where,
                          "invalid_type")
            fn = t["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                raise bad(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                          f"{where}.function.name")
            if any(o.name == name for o in out):
                raise bad(f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
            desc = fn.get("description", "")
            if not isinstance(desc, str):
                raise bad(f"{where}.function.description must be a string", f"{where}.function.description",
                          "invalid_type")
            params = fn.get("parameters", {"type": "object", "properties": {}})
            check_schema(params, f"{where}.function.parameters")
            out.append(Tool(name, desc, params if isinstance(params, dict) else {}))
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        choice = fn["name"]
        if not any(t.name == choice for t in out):
            raise bad(f"'tool_choice' names the function {choice!r}, which is not in 'tools' "
                      f"({', '.join(t.name for t in out) or 'none given'})", "tool_choice")
    elif choice not in ("auto", "none", "required"):
        raise bad(f"'tool_choice' must be \"auto\", \"none\", \"required\" or a function object, got {choice!r}",
                  "tool_choice")
    if choice == "required" and not out:
        raise bad("'tool_choice' is \"required\" but no 'tools' are given", "tool_choice")
    return tuple(out), choice


def _common(body: dict, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    n = _integer(body, "n", 1, MAX_N) or 1
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"'{name}' is not supported; use 'repetition_penalty' (default {DEFAULTS.repetition_penalty})",
                      name, "unsupported")
    for name in ("echo", "best_of", "suffix"):
        if body.get(name) not in (None, False, 0, [], {}, "") and not (name == "best_of" and body.get(name) == 1):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported")
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise bad("'logprobs' must be true or false", "logprobs", "invalid_type")
        top = _integer(body, "top_logprobs", 0, 20)
        if top is not None and not lp:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if lp else None
    else:
        logprobs = _integer(body, "logprobs", 0, 20)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 0, 2, DEFAULTS.temperature),
            top_k=_integer(body, "top_k", 0) if body.get("top_k") is not None else DEFAULTS.top_k,
            top_p=_number(body, "top_p", 0, 1, DEFAULTS.top_p, lo_open=True),
            repetition_penalty=_number(body, "repetition_penalty", 0, 10, DEFAULTS.repetition_penalty, lo_open=True),
            min_p=_number(body, "min_p", 0, 1, DEFAULTS.min_p),
            logit_bias=_logit_bias(body),
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
    seed = _integer(body, "seed", 0, MAX_SEED)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options", "invalid_type")
    constraint, param = _constraint(body)
    given = tuple((name, getattr(params, name)) for name, key in SAMPLING_FIELDS if body.get(key) is not None)
    return dict(model=model, max_tokens=max_tokens, params=params, stop=stops, seed=seed, stream=stream, given=given,
                include_usage=bool(options and options.get("include_usage")), n=n, logprobs=logprobs,
                constraint=constraint, constraint_param=param)


def parse_chat(body) -> Request:
    common = _common(body, chat=True)
    tools, choice = _tools(body)
    if tools and choice != "none" and common["constraint"] is not None:
        raise bad(f"'{common['constraint_param'].split('.')[0]}' and 'tools' cannot be combined: a tool call has its "
                  "own format; leave one out (or send tool_choice \"none\")", "tools")
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
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise bad(f"{where}.tool_calls is for assistant messages only", f"{where}.tool_calls")
            calls = _tool_calls(calls, f"{where}.tool_calls")
        content = m.get("content")
        if content is None and (calls or role == "assistant"):
            content = ""
        entry = {"role": "system" if role == "developer" else role, "content": _content(content, where)}
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise bad(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id", "invalid_type")
            entry["tool_call_id"] = call_id or ""
        out.append(entry)
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise bad("'truncate' must be true or false", "truncate", "invalid_type")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls", "invalid_type")
    return Request(messages=out, prompt=None, tools=tools, tool_choice=choice, truncate=truncate,
                   parallel_tool_calls=parallel, **common)


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list of tool calls", where, "invalid_type")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise bad(f"{where}[{j}] must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                      f"{{\"name\": ..., \"arguments\": \"...\"}}}}", f"{where}[{j}]", "invalid_type")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "{}")}})
    return out


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
    common = _common(body, chat=False)
    for name in ("tools", "tool_choice", "functions"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is for /v1/chat/completions", name, "unsupported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (one prompt per request)", "prompt",
                  "missing" if prompt is None else "invalid_type")
    if not prompt:
        raise bad("'prompt' is empty", "prompt")
    return Request(messages=None, prompt=prompt, **common)
