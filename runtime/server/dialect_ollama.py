"""An Ollama-compatible API on the same port: /api/version, /api/tags, /api/show, /api/ps,
/api/chat and /api/generate (NDJSON streaming, on by default as in Ollama), /api/embed.

Names are ``name:tag``: ``NAME:latest`` (or plain ``NAME``) is the bundle, ``NAME:ADAPTER``
one of its adapters. ``format`` is "json" or a JSON schema; ``options`` takes num_predict,
num_ctx, temperature, top_k, top_p, min_p, seed, stop and repeat_penalty (other options
are ignored, as Ollama ignores those a runner lacks). A conversation that outgrows
``num_ctx`` loses its oldest turns, never its system prompt, as in Ollama. Errors are
``{"error": "..."}`` with the HTTP status.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import replace
from datetime import datetime, timezone

from starlette.responses import JSONResponse
from starlette.routing import Route

from jishi.runtime.server import reasoning as R
from jishi.runtime.server import tools as T
from jishi.runtime.server.protocol import DEFAULTS, APIError, Request, bad, check_schema
from jishi.runtime.sampling import SamplingParams

OLLAMA_VERSION = "0.6.8"  # the version of Ollama's API these routes follow


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --- requests --------------------------------------------------------------------------------


def _opt_number(options: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    from jishi.runtime.server.protocol import _number

    try:
        return _number(options, name, lo, hi, default, lo_open)
    except APIError as e:
        raise bad(e.message.replace(f"'{name}'", f"'options.{name}'"), f"options.{name}") from None


def _opt_int(options: dict, name: str, lo: int | None = None, hi: int | None = None):
    from jishi.runtime.server.protocol import _integer

    try:
        return _integer(options, name, lo, hi)
    except APIError as e:
        raise bad(e.message.replace(f"'{name}'", f"'options.{name}'"), f"options.{name}") from None


DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def keep_alive_seconds(value) -> float | None:
    """Ollama's ``keep_alive``: seconds (a number, or a duration such as "5m", "1h30m", "90s"), how long the
    model stays loaded after this request; negative keeps it loaded; 0 unloads it once answered. None if absent."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = float(text)
        except ValueError:
            parts = DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise bad(f"'keep_alive' must be seconds or a duration such as \"5m\", \"1h\" or \"-1\", got "
                          f"{value!r}", "keep_alive") from None
            unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
            seconds = sum(float(n) * unit[u] for n, u in parts)
        seconds *= sign
    else:
        raise bad(f"'keep_alive' must be seconds or a duration such as \"5m\", got {value!r}", "keep_alive")
    return math.inf if seconds < 0 else seconds


def parse(body, chat: bool) -> tuple[Request, dict]:
    """An Ollama chat or generate body as the server's Request, and Ollama's own extras."""
    from jishi.errors import ConstraintError
    from jishi.runtime import constraints

    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a name from /api/tags", "model")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad("'options' must be an object", "options")
    num_predict = _opt_int(options, "num_predict")
    if num_predict is not None and num_predict < -2:
        raise bad("'options.num_predict' must be -1 (no limit), -2 (fill the context) or a positive count",
                  "options.num_predict")
    num_ctx = _opt_int(options, "num_ctx", 1)
    top_k = _opt_int(options, "top_k", 0)
    try:
        params = SamplingParams(
            temperature=_opt_number(options, "temperature", 0, 2, DEFAULTS.temperature),
            top_k=DEFAULTS.top_k if top_k is None else top_k,
            top_p=_opt_number(options, "top_p", 0, 1, DEFAULTS.top_p, lo_open=True),
            repetition_penalty=_opt_number(options, "repeat_penalty", 0, 10, DEFAULTS.repetition_penalty,
                                           lo_open=True),
            min_p=_opt_number(options, "min_p", 0, 1, DEFAULTS.min_p),
        )
    except ValueError as e:
        raise bad(str(e), "options") from None
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}
    given = tuple((ours, getattr(params, ours)) for ours, theirs in names.items() if options.get(theirs) is not None)
    seed = _opt_int(options, "seed", None, 2**64 - 1)
    if seed is not None and seed < 0:  # Ollama's "-1" (and any negative): a random seed
        seed = None
    stop = options.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise bad("'options.stop' must be a string or a list of strings", "options.stop")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    fmt = body.get("format")
    constraint = None
    if fmt == "json":
        constraint = constraints.any_json()
    elif isinstance(fmt, dict):
        check_schema(fmt, "format")
        try:
            constraint = constraints.json_schema(fmt)
        except ConstraintError as e:
            raise bad(str(e), "format") from None
    elif fmt not in (None, ""):
        raise bad("'format' must be \"json\" or a JSON schema object", "format")
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    if chat:
        messages = body.get("messages")
        if messages is None or messages == []:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            return None, {"keep_alive": keep_alive, "model": model}
        if not isinstance(messages, list):
            raise bad("'messages' must be a list of {\"role\", \"content\"} objects", "messages")
        converted = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                    or not isinstance(m.get("content", ""), str):
                raise bad(f"messages[{i}] must be {{\"role\": system|user|assistant|tool, \"content\": \"...\"}}",
                          f"messages[{i}]")
            entry = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("images"):
                raise bad("this model reads text only: leave out 'images'", f"messages[{i}].images")
            if m.get("tool_calls"):
                calls = m["tool_calls"]
                if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                          for c in calls):
                    raise bad(f"messages[{i}].tool_calls must be a list of {{\"function\": {{...}}}}",
                              f"messages[{i}].tool_calls")
                entry["tool_calls"] = [{"id": "", "type": "function", "function": {
                    "name": str(c["function"].get("name", "")), "arguments": c["function"].get("arguments", {})}}
                    for c in calls]
            converted.append(entry)
        from jishi.runtime.server.protocol import _tools

        tools, _ = _tools({"tools": body.get("tools")})
        if tools and constraint is not None:
            raise bad("'format' and 'tools' cannot be combined: a tool call has its own format", "tools")
        prompt = None
    else:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string", "prompt")
        if not prompt:  # an empty generate: load the model (or unload it, keep_alive 0), as Ollama does
            return None, {"keep_alive": keep_alive, "model": model}
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            raise bad("'system' must be a string", "system")
        if body.get("images"):
            raise bad("this model reads text only: leave out 'images'", "images")
        converted, tools = None, ()
        raw = body.get("raw", False)
        if not raw:  # Ollama applies the chat template to a generate prompt unless it is raw
            converted = ([{"role": "system", "content": system}] if system else []) + \
                        [{"role": "user", "content": prompt}]
    req = Request(model=model, messages=converted, prompt=prompt if converted is None else None, max_tokens=None,
                  params=params, stop=stops, seed=seed, stream=stream, include_usage=False, constraint=constraint,
                  constraint_param="format", tools=tools, tool_choice="auto" if tools else "none", given=given)
    return req, {"num_predict": num_predict, "num_ctx": num_ctx, "raw_prompt": prompt, "keep_alive": keep_alive}


# --- answers ---------------------------------------------------------------------------------


class Renderer:
    def __init__(self, model_id: str, chat: bool, prompt_tokens: int, tools_on: bool, context: list[int] | None,
                 thinks: bool = False):
        self.thinks = chat and thinks
        self._splitter = R.Splitter()
        self.model_id = model_id
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.tools_on = tools_on
        self.context = context
        self.jobs = []
        self.started = time.monotonic()
        self._held = ""
        self._shown = False

    def bind(self, jobs) -> None:
        self.jobs = jobs

    def _head(self) -> dict:
        return {"model": self.model_id, "created_at": now_iso()}

    def _body(self, text: str, calls=None, thinking: str | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                       "arguments": _args(c["function"]["arguments"])}}
                                         for c in calls]
            return {"message": message}
        return {"response": text}

    def _final(self, gen, text: str, calls=None) -> dict:
        job = self.jobs[0] if self.jobs else None
        end = time.monotonic()
        first = job.first_token if job and job.first_token else end
        start = job.started if job and job.started else self.started
        out = {**self._head(), **self._body(text, calls), "done": True,
               "done_reason": gen.finish_reason, "total_duration": int((end - self.started) * 1e9),
               "load_duration": 0, "prompt_eval_count": self.prompt_tokens,
               "prompt_eval_duration": int(max(0.0, first - start) * 1e9), "eval_count": gen.completion_tokens,
               "eval_duration": int(max(0.0, end - first) * 1e9)}
        if not self.chat and self.context is not None:
            out["context"] = self.context + gen.tokens
        return out

    def start(self, n: int) -> list:
        return []

    def piece(self, i: int, text: str, gen) -> list:
        if self.tools_on and not self._shown:
            self._held += text
            if T.may_become_call(self._held):
                return []
            text, self._held = self._held, ""
        self._shown = True
        return self._text_lines(text)

    def _text_lines(self, text: str, flush: bool = False) -> list:
        if not self.thinks:
            return [{**self._head(), **self._body(text), "done": False}] if text or not flush else []
        reasoning, content = self._splitter.push(text)
        if flush:
            r2, c2 = self._splitter.flush()
            reasoning, content = reasoning + r2, content + c2
        if not reasoning and not content:
            return []
        return [{**self._head(), **self._body(content, thinking=reasoning or None), "done": False}]

    def done(self, i: int, gen) -> list:
        calls = T.parse_calls(gen.text) if self.tools_on and not self._shown else None
        if calls:
            return [{**self._head(), **self._body("", calls), "done": False}, self._final(gen, "")]
        held, self._held = self._held, ""
        return (self._text_lines(held, flush=True) if (held or self.thinks) else []) + [self._final(gen, "")]

    def end(self, gens) -> list:
        return []

    def whole(self, gens) -> dict:
        gen = gens[0]
        calls = T.parse_calls(gen.text) if self.tools_on else None
        if calls:
            return self._final(gen, "", calls)
        if self.thinks:
            thinking, content = R.split(gen.text)
            out = self._final(gen, content)
            if thinking is not None:
                out["message"]["thinking"] = thinking
            return out
        return self._final(gen, gen.text)

    @staticmethod
    def error_object(err) -> dict:
        return {"error": err.message}

    @staticmethod
    def error_response(err) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def _args(arguments):
    import json

    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return {}


# --- the model list --------------------------------------------------------------------------


def _digest(bundle) -> str:
    return hashlib.sha256(repr(sorted((k, v.sha256) for k, v in bundle.manifest.files.items())).encode()).hexdigest()


def _details(bundle) -> dict:
    c = bundle.manifest.config
    q = bundle.manifest.graph.quantization.get("name", "unknown")
    params = c.vocab_size * c.hidden_size + c.num_layers * (
        c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size)
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    return {"parent_model": "", "format": "onnx", "family": c.family, "families": [c.family],
            "parameter_size": size, "quantization_level": q}


def _names(fleet) -> list[tuple[str, object]]:
    """(Ollama name, fleet entry) of every model: NAME:latest, then NAME:ADAPTER."""
    return [(n, e) for e in fleet.entries.values()
            for n in [f"{e.name}:latest"] + [f"{e.name}:{a}" for a in e.adapters]]


def _entry(bundle, tag_name: str) -> dict:
    prov = bundle.manifest.provenance if isinstance(bundle.manifest.provenance, dict) else {}
    return {"name": tag_name, "model": tag_name, "modified_at": prov.get("built_at") or now_iso(),
            "size": bundle.size, "digest": _digest(bundle), "details": _details(bundle)}


def routes(fleet) -> list[Route]:
    from jishi.runtime.server.app import JobResponse, _plan, check_key, fit_conversation, read_json

    config = fleet.config

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except APIError as e:
                request.scope["state"]["jishi"]["status"] = e.status
                return Renderer.error_response(e)
        return endpoint

    def not_found(name: str) -> APIError:
        return APIError(404, f"model {name!r} not found; /api/tags lists: {', '.join(n for n, _ in _names(fleet))}",
                        param="model")

    async def server_and_adapter(name: str):
        try:
            fleet.entry_for(name)
        except APIError:
            raise not_found(name) from None
        server = await fleet.server_for(name)
        try:
            return server, server.resolve_model(name)
        except APIError:
            raise not_found(name) from None

    async def version(request):
        return JSONResponse({"version": OLLAMA_VERSION})

    async def tags(request):
        check_key(fleet, request)
        return JSONResponse({"models": [_entry(e.bundle, n) for n, e in _names(fleet)]})

    async def ps(request):
        check_key(fleet, request)
        out = []
        for n, e in _names(fleet):
            if e.server is None:
                continue
            expires = "2999-12-31T23:59:59Z"  # a server of one model, or one kept with a negative keep_alive
            left = fleet.expires(e) - time.monotonic()
            if not getattr(fleet, "_preloaded", False) and math.isfinite(left):
                at = time.time() + max(0.0, left)
                expires = datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")
            out.append({**_entry(e.bundle, n), "expires_at": expires, "size_vram": 0,
                        "context_length": e.server.model.context})
        return JSONResponse({"models": out})

    async def show(request):
        check_key(fleet, request)
        body = await read_json(request, config.max_body)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise bad("'model' is required: a name from /api/tags", "model")
        server, adapter = await server_and_adapter(name)
        model = server.model
        m = model.manifest
        d = model.defaults
        system = server.systems.get(adapter) or d.system_prompt
        parameters = "\n".join([f"temperature {d.temperature}", f"top_k {d.top_k}", f"top_p {d.top_p}",
                                f"min_p {d.min_p}", f"repeat_penalty {d.repetition_penalty}",
                                f"num_ctx {model.context}", f"num_predict {d.max_tokens or server.config.max_tokens}",
                                *(f'stop "{t}"' for t in (*m.tokenizer.eos_tokens, *d.stop))])
        prov = m.provenance if isinstance(m.provenance, dict) else {}
        licence = prov.get("license") or (f"see the licence of the base model {prov.get('base', m.name)!r}; "
                                          "this bundle does not record one")
        c = m.config
        info = {"general.architecture": c.family, "general.basename": m.name,
                f"{c.family}.context_length": model.context, f"{c.family}.embedding_length": c.hidden_size,
                f"{c.family}.block_count": c.num_layers, f"{c.family}.attention.head_count": c.num_heads,
                f"{c.family}.attention.head_count_kv": c.num_kv_heads, "tokenizer.vocab_size": c.vocab_size}
        caps = ["completion", "tools"] if m.tokenizer.chat_template else ["completion"]
        modelfile = f"# jishi bundle {m.name}\nFROM {m.name}\n" + "".join(
            f"PARAMETER {line}\n" for line in parameters.splitlines()) + (f'SYSTEM """{system}"""\n' if system else "")
        return JSONResponse({"license": licence, "modelfile": modelfile, "parameters": parameters,
                             "template": m.tokenizer.chat_template or "", "system": system or "",
                             "details": _details(model.bundle), "model_info": info, "capabilities": caps,
                             "modified_at": prov.get("built_at") or now_iso(),
                             "adapter": adapter})

    async def generate_or_chat(request, chat: bool):
        info = request.scope["state"]["jishi"]
        check_key(fleet, request)
        body = await read_json(request, config.max_body)
        req, extra = parse(body, chat)
        if req is None:  # nothing to answer: load the model, or unload it with keep_alive 0
            name = extra["model"]
            empty = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            if extra["keep_alive"] == 0:
                try:
                    fleet.unload(name)
                except APIError:
                    raise not_found(name) from None
                return JSONResponse({"model": name, "created_at": now_iso(), **empty, "done": True,
                                     "done_reason": "unload"})
            await server_and_adapter(name)
            fleet.keep(name, extra["keep_alive"])
            return JSONResponse({"model": name, "created_at": now_iso(), **empty, "done": True, "done_reason": "load"})
        server, adapter = await server_and_adapter(req.model)
        fleet.keep(req.model, extra["keep_alive"])
        model = server.model
        num_ctx = min(extra["num_ctx"] or model.context, model.context)
        np_ = extra["num_predict"]
        if not chat and req.messages is not None and not model.manifest.tokenizer.chat_template:
            req = replace(req, messages=None, prompt=extra["raw_prompt"])  # a model without a template: as it is
        if req.messages is not None:
            reserve = min(np_ if np_ and np_ > 0 else server.config.max_tokens, num_ctx // 2)
            req, ids = fit_conversation(server, req, num_ctx, reserve, adapter)
        else:
            ids = model.tokenizer.encode(req.prompt)
        room = num_ctx - len(ids)
        if room < 1:
            raise bad(f"the prompt is {len(ids)} tokens and num_ctx is {num_ctx}: shorten it", "prompt")
        budget = room if np_ in (-1, -2) else min(np_ or model.defaults.max_tokens or server.config.max_tokens, room)
        req = replace(req, max_tokens=budget)
        jobs_args, prompt_tokens = _plan(server, req, info)
        renderer = Renderer(req.model, chat, prompt_tokens, bool(req.tools), None if chat else ids,
                            thinks=R.thinks(model.manifest.tokenizer.chat_template))
        return JobResponse(server, jobs_args, renderer, req.stream, info, framing="ndjson")

    async def chat(request):
        return await generate_or_chat(request, chat=True)

    async def generate(request):
        return await generate_or_chat(request, chat=False)

    async def embed(request):
        from jishi.runtime.server import embeddings as E

        started = time.monotonic()
        info = request.scope["state"]["jishi"]
        check_key(fleet, request)
        body = await read_json(request, config.max_body)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise bad("'model' is required: a name from /api/tags", "model")
        texts = E.inputs(body)
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise bad("'truncate' must be true or false", "truncate")
        keep = keep_alive_seconds(body.get("keep_alive"))
        server, adapter = await server_and_adapter(body["model"])
        fleet.keep(body["model"], keep)
        info["model"] = body["model"]
        vectors, tokens = await E.embed(server, texts, adapter, truncate=truncate)
        info["prompt_tokens"] = tokens
        return JSONResponse(E.ollama_response(vectors, body["model"], tokens, started))

    return [
        Route("/api/version", version, methods=["GET"]),
        Route("/api/embed", guarded(embed), methods=["POST"]),
        Route("/api/tags", guarded(tags), methods=["GET"]),
        Route("/api/ps", guarded(ps), methods=["GET"]),
        Route("/api/show", guarded(show), methods=["POST"]),
        Route("/api/chat", guarded(chat), methods=["POST"]),
        Route("/api/generate", guarded(generate), methods=["POST"]),
    ]
