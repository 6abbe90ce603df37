"""The web side: an OpenAI-compatible API, the chat page, one log line per request.

Requests are checked and tokenized here, on the event loop; the scheduler thread
does the model work and hands text back through ``loop.call_soon_threadsafe``.
Answers are sent as JSON or as server-sent events. A response watches for the
client leaving and cancels its job, which frees the slot.

Why one module of ~520 lines: it is the request path from body to response (checks, prompt,
plan, streaming), read in order; the dialects (OpenAI, Ollama), tools and the scheduler are
modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field, replace
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jishi.errors import JishiError
from jishi.runtime.server.protocol import APIError, Request, bad, parse_chat, parse_completion
from jishi.runtime.server.scheduler import Job, QueueFull, Scheduler

log = logging.getLogger("jishi.server")


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_concurrent: int = 4
    queue: int = 16
    system_prompt: str | None = None
    adapter_system: dict[str, str] = field(default_factory=dict)  # adapter name -> its default system prompt
    max_tokens: int = 512  # the answer's length when a request does not say
    max_body: int = 1 << 20  # bytes
    batch: bool = True  # decode the active answers in one run (per adapter) instead of one run each
    release_after: float = 30.0  # idle seconds after which the KV caches are dropped and shrunk


class Server:
    """The model, its scheduler and the settings, shared by every request."""

    def __init__(self, model, config: ServerConfig):
        self.model = model
        self.config = config
        self.scheduler = Scheduler(model, config.max_concurrent, config.queue, batch=config.batch,
                                   release_after=config.release_after)
        self.created = int(time.time())
        unknown = set(config.adapter_system) - set(model.adapters)
        if unknown:
            raise JishiError(f"--adapter-system names no adapter {', '.join(sorted(unknown))} in this bundle; it has: "
                             f"{', '.join(model.adapters) or 'none'}")
        self.systems = {None: config.system_prompt}
        for entry in model.manifest.adapters:  # a manifest may carry an adapter's own system prompt
            name = entry["name"]
            self.systems[name] = config.adapter_system.get(name) or entry.get("system_prompt") or config.system_prompt

    def model_ids(self) -> list[str]:
        return [self.model.name] + [f"{self.model.name}:{a}" for a in self.model.adapters]

    def resolve_model(self, model_id: str | None) -> str | None:
        """The adapter a model id asks for (None: the base)."""
        if model_id is None or model_id in (self.model.name, f"{self.model.name}:latest"):
            return None
        base, sep, adapter = model_id.partition(":")
        if sep and base == self.model.name and adapter in self.model.adapters:
            return adapter
        if sep and base == self.model.name:
            raise APIError(404, f"this server's model has no adapter {adapter!r}; GET /v1/models lists the models "
                           f"({', '.join(self.model_ids())})", param="model", code="model_not_found")
        raise APIError(404, f"the model {model_id!r} does not exist here; GET /v1/models lists the models "
                       f"({', '.join(self.model_ids())})", param="model", code="model_not_found")


# --- the log line ----------------------------------------------------------------------


class LogRequests:
    """ASGI middleware: one line per HTTP request, with the generation's figures when there is one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        seen = {"status": 500}
        info = scope.setdefault("state", {}).setdefault("jishi", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "-"
            parts = [who, f'"{scope["method"]} {scope["path"]}"', str(info.get("status", seen["status"]))]
            if "model" in info:
                ttft = info.get("ttft")
                parts += [f"model={info['model']}", f"prompt={info.get('prompt_tokens', 0)}",
                          f"completion={info.get('completion_tokens', 0)}",
                          f"ttft={ttft * 1000:.0f}ms" if ttft is not None else "ttft=-"]
                if info.get("finish"):
                    parts.append(f"finish={info['finish']}")
            parts.append(f"total={(time.monotonic() - start) * 1000:.0f}ms")
            log.info(" ".join(parts))


# --- answers -------------------------------------------------------------------------------


# Characters JSON may leave as they are but that str.splitlines() (and clients built on it,
# such as httpx's aiter_lines) takes for line ends: escaped, an event stays one line.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_json(obj) -> str:
    """``obj`` as JSON on one line for a server-sent event (UTF-8 text kept as it is)."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class JobResponse(Response):
    """Runs a request's jobs (one per answer) and answers with the renderer's JSON, or
    (``stream``) with its objects as server-sent events or NDJSON lines (``framing``).

    While it waits it listens to the client: a disconnect cancels the jobs.
    """

    def __init__(self, server: Server, jobs_args: list[dict], renderer, stream: bool, info: dict,
                 framing: str = "sse"):
        self.server = server
        self.jobs_args = jobs_args
        self.renderer = renderer
        self.stream = stream
        self.info = info
        self.framing = framing
        self.background = None

    async def __call__(self, scope, receive, send):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(i):
            return lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))

        jobs = []
        for i, args in enumerate(self.jobs_args):
            job = Job(sink=sink_for(i), index=i, leader=jobs[0] if jobs else None, **args)
            jobs.append(job)
        jobs[0].followers = len(jobs) - 1
        if hasattr(self.renderer, "bind"):
            self.renderer.bind(jobs)  # a renderer that reports timings reads them from the jobs
        scheduler = self.server.scheduler
        try:
            scheduler.submit_all(jobs)
        except QueueFull as e:
            err = APIError(429, f"all {len(scheduler.slots)} answer slots are busy and {scheduler.queue_limit} requests "
                           f"are waiting; retry in {e.retry_after} s", type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(e.retry_after)})
            self.info["status"] = 429
            return await self.renderer.error_response(err)(scope, receive, send)

        async def watch():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    for job in jobs:
                        scheduler.cancel(job)
                    return

        watcher = asyncio.create_task(watch())
        try:
            if self.stream:
                await self._stream(jobs, events, send)
            else:
                await self._whole(jobs, events, scope, receive, send)
        finally:
            watcher.cancel()
            for job in jobs:
                scheduler.cancel(job)  # no-op once it is over
            firsts = [j.first_token - j.arrived for j in jobs if j.first_token]
            self.info["ttft"] = min(firsts) if firsts else None
            gens = [j.gen for j in jobs if j.gen is not None]
            if gens:
                self.info["completion_tokens"] = sum(g.completion_tokens for g in gens)
                self.info["finish"] = ",".join(g.finish_reason if g.done else "cancelled" for g in gens)

    def _failed(self, value) -> APIError:
        from jishi.errors import ConstraintError

        if isinstance(value, ConstraintError):  # the grammar met a state it cannot leave: not a server fault
            return APIError(400, f"the constraint could not be followed: {value}".splitlines()[0],
                            code="constraint_failed")
        log.error("generation failed: %r", value)
        self.info["status"] = 500
        return APIError(500, f"the model failed on this request: {value}", type="server_error", code="internal_error")

    async def _whole(self, jobs, events, scope, receive, send):
        done: dict[int, object] = {}
        while len(done) < len(jobs):
            i, kind, value = await events.get()
            if kind == "piece":
                continue
            if kind == "done":
                done[i] = value
                continue
            if kind == "error":
                err = self._failed(value)
                self.info["status"] = err.status
                return await self.renderer.error_response(err)(scope, receive, send)
            self.info["status"] = 499  # the client left
            return
        return await JSONResponse(self.renderer.whole([done[i] for i in range(len(jobs))]))(scope, receive, send)

    async def _stream(self, jobs, events, send):
        media = b"text/event-stream; charset=utf-8" if self.framing == "sse" else b"application/x-ndjson"
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", media), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async def emit(objects, more=True):
            if self.framing == "sse":
                data = "".join(f"data: {sse_json(o)}\n\n" for o in objects)
            else:
                data = "".join(sse_json(o) + "\n" for o in objects)
            await send({"type": "http.response.body", "body": data.encode(), "more_body": more})

        await emit(self.renderer.start(len(jobs)))
        done: dict[int, object] = {}
        while len(done) < len(jobs):
            i, kind, value = await events.get()
            if kind == "piece":
                out = self.renderer.piece(i, value, jobs[i].gen)
                if out:
                    await emit(out)
                continue
            if kind == "done":
                done[i] = value
                await emit(self.renderer.done(i, value))
                continue
            if kind == "error":
                await emit([self.renderer.error_object(self._failed(value))])
                break
            self.info["status"] = 499
            return
        else:
            await emit(self.renderer.end([done[i] for i in range(len(jobs))]))
        if self.framing == "sse":
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- the routes ----------------------------------------------------------------------------


async def read_json(request: HTTPRequest, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes, the most this server takes",
                           code="body_too_large")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}); send a JSON object", None, "invalid_json") from None
    except ValueError as e:
        raise bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:
        raise bad("the request body nests too deeply", None, "invalid_json") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def check_key(server: Server, request: HTTPRequest) -> None:
    key = server.config.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        message = ("the API key is wrong: use the key the server was started with" if given else
                   "a valid API key is needed: send the header 'Authorization: Bearer KEY' (the server's --api-key)")
        raise APIError(401, message, type="authentication_error", code="invalid_api_key")


def prompt_ids(server: Server, req, adapter: str | None, param: str = "messages") -> list[int]:
    """The prompt's token ids: chat messages through the template (tools and all), or the plain prompt."""
    model = server.model
    if req.messages is None:
        return model.tokenizer.encode(req.prompt)
    from jishi.runtime.server import tools as T

    messages = req.messages
    system = server.systems.get(adapter)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    if not model.manifest.tokenizer.chat_template:
        raise bad("this model has no chat template: use /v1/completions, or start the server with "
                  "--chat-template FILE", param, "unsupported")
    offered = list(getattr(req, "tools", ()) or ()) if getattr(req, "tool_choice", "none") != "none" else []
    messages, spec = T.render(messages, offered, model.tokenizer.template_takes_tools)
    try:
        return model.tokenizer.encode(model.chat_prompt(messages, tools=spec), bos=False)
    except Exception as e:  # the template's own refusal (e.g. roles out of order)
        raise bad(f"the chat template refused these messages: {e}", param) from None


def fit_conversation(server, req: Request, num_ctx: int, reserve: int, adapter) -> tuple[Request, list[int]]:
    """Drop the oldest turns (never a system message) until the prompt leaves ``reserve``
    tokens of ``num_ctx`` for the answer, as Ollama does."""
    messages = list(req.messages)
    while True:
        trial = replace(req, messages=messages)
        ids = prompt_ids(server, trial, adapter)
        if len(ids) + reserve <= num_ctx:
            return trial, ids
        rest = [i for i, m in enumerate(messages) if m["role"] != "system"]
        if len(rest) <= 1:
            return trial, ids  # the last message alone: the context check says what to do
        drop = rest[0]
        nxt = next((i for i in rest[1:] if messages[i]["role"] == "user"), rest[1])  # up to the next user turn
        del messages[drop:nxt]


def check_constraint(server: Server, constraint, param: str) -> None:
    """400 naming ``param`` when the engine cannot compile the constraint."""
    if constraint is None:
        return
    from jishi.errors import ConstraintError, JishiError
    from jishi.runtime.constraints import compiler_for

    model = server.model
    try:
        compiler_for(model.tokenizer, model.manifest.config.vocab_size).check(constraint)
    except ConstraintError as e:
        raise bad(str(e), param, "invalid_schema") from None
    except JishiError as e:  # llguidance missing from this install
        raise APIError(501, str(e), type="server_error", param=param, code="unsupported") from None


def _plan(server: Server, req: Request, info: dict) -> tuple[list[dict], int]:
    """Tokenize the request and check it against the context: the arguments of its jobs."""
    from jishi.runtime.server import tools as T

    model = server.model
    adapter = server.resolve_model(req.model)
    info["model"] = req.model or model.name
    ids = prompt_ids(server, req, adapter)
    info["prompt_tokens"] = len(ids)
    room = model.context - len(ids)
    if room < 1:
        raise bad(f"the prompt is {len(ids)} tokens and the context window is {model.context}: shorten it "
                  "(or drop old turns of the conversation)", "messages" if req.messages is not None else "prompt",
                  "context_length_exceeded")
    if req.max_tokens is not None and req.max_tokens > room:
        raise bad(f"max_tokens is {req.max_tokens} but only {room} tokens are left in the context window of "
                  f"{model.context} after the {len(ids)}-token prompt: ask for at most {room}", "max_tokens",
                  "context_length_exceeded")
    constraint, param = req.constraint, req.constraint_param
    if req.tools and req.tool_choice != "none":
        constraint, param = T.constraint(list(req.tools), req.tool_choice, req.parallel_tool_calls), "tools"
    check_constraint(server, constraint, param)
    try:
        req.params.check_vocab(model.manifest.config.vocab_size)
    except ValueError as e:
        raise bad(str(e), "logit_bias") from None
    d = model.defaults
    params = replace(d.sampling(**dict(req.given)), logit_bias=req.params.logit_bias)  # unset: the model's own
    budget = req.max_tokens or min(d.max_tokens or server.config.max_tokens, room)
    one = dict(prompt_ids=ids, budget=budget, params=params, stops=req.stop or d.stop, seed=req.seed, adapter=adapter,
               constraint=constraint, logprobs=req.logprobs)
    return [dict(one) for _ in range(req.n)], len(ids)


def build_app(server) -> Starlette:
    """The app for one ``Server`` or a ``fleet.Fleet`` of several models."""
    from jishi.runtime.server.fleet import Fleet

    fleet = server if isinstance(server, Fleet) else Fleet.single(server)
    config = fleet.config
    created = int(time.time())
    static = {name: resources.files("jishi.runtime.server").joinpath("static", name).read_bytes()
              for name in ("index.html", "app.js", "style.css")}

    def guarded(handler):
        async def endpoint(request: HTTPRequest):
            try:
                return await handler(request)
            except APIError as e:
                request.scope["state"]["jishi"]["status"] = e.status
                return error_response(e)
        return endpoint

    async def generate(request: HTTPRequest, chat: bool):
        from jishi.runtime.server.dialect_openai import Renderer

        info = request.scope["state"]["jishi"]
        check_key(fleet, request)
        body = await read_json(request, config.max_body)
        req = parse_chat(body) if chat else parse_completion(body)
        server = await fleet.server_for(req.model)
        if req.truncate:  # the request opts into losing its oldest turns rather than a 400
            model = server.model
            reserve = min(req.max_tokens or model.defaults.max_tokens or config.max_tokens, model.context // 2)
            req, _ = fit_conversation(server, req, model.context, reserve, server.resolve_model(req.model))
        jobs_args, prompt_tokens = _plan(server, req, info)
        renderer = Renderer(server.model.tokenizer, chat, req.model or server.model.name, prompt_tokens, req.stream,
                            req.include_usage, tools_on=bool(req.tools) and req.tool_choice != "none")
        return JobResponse(server, jobs_args, renderer, req.stream, info)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def completions(request):
        return await generate(request, chat=False)

    async def embeddings(request):
        from jishi.runtime.server import embeddings as E

        info = request.scope["state"]["jishi"]
        check_key(fleet, request)
        body = await read_json(request, config.max_body)
        texts, fmt = E.openai_body(body)
        model_id = body.get("model") if isinstance(body.get("model"), str) else None
        server = await fleet.server_for(model_id)
        adapter = server.resolve_model(model_id)
        info["model"] = model_id or server.model.name
        vectors, tokens = await E.embed(server, texts, adapter, truncate=False)
        info["prompt_tokens"] = tokens
        return JSONResponse(E.openai_response(vectors, fmt, model_id or server.model.name, tokens))

    async def models(request):
        check_key(fleet, request)
        data = [{"id": mid, "object": "model", "created": created, "owned_by": "jishi"} for mid in fleet.ids()]
        return JSONResponse({"object": "list", "data": data})

    async def health(request):
        loaded = fleet.loaded()
        first = fleet.default.server
        body = {"status": "ok", "model": fleet.default.name, "models": {
            e.name: ({"loaded": True, "context": e.server.model.context, **e.server.scheduler.status()}
                     if e.server is not None else {"loaded": False}) for e in fleet.entries.values()}}
        if first is not None:  # the first model's figures at the top, as before
            body.update(context=first.model.context, **first.scheduler.status())
        body["loaded"] = [e.name for e in loaded]
        return JSONResponse(body)

    def page(name, media):
        async def endpoint(request):
            return Response(static[name], media_type=media, headers={
                "cache-control": "no-cache",
                # Everything the page uses comes from this server: nothing else may load.
                "content-security-policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
                "x-content-type-options": "nosniff"})
        return endpoint

    async def not_found(request, exc: HTTPException):
        status = exc.status_code
        message = (f"no route {request.method} {request.url.path}; this server has POST /v1/chat/completions, "
                   "POST /v1/completions, POST /v1/embeddings, GET /v1/models, the Ollama API under /api, GET /health and the chat page at /") \
            if status in (404, 405) \
            else str(exc.detail)
        request.scope.setdefault("state", {}).setdefault("jishi", {})["status"] = status
        return error_response(APIError(status, message, code="not_found" if status == 404 else "method_not_allowed"))

    async def crashed(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, "the server failed on this request; see its log", type="server_error",
                                       code="internal_error"))

    from jishi.runtime.server.dialect_ollama import routes as ollama_routes

    routes = [
        *ollama_routes(fleet),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/", page("index.html", "text/html; charset=utf-8"), methods=["GET"]),
        Route("/static/app.js", page("app.js", "text/javascript; charset=utf-8"), methods=["GET"]),
        Route("/static/style.css", page("style.css", "text/css; charset=utf-8"), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for e in fleet.loaded():
            e.server.scheduler.start()
        yield
        fleet.close()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, Exception: crashed})
    app.add_middleware(LogRequests)
    return app
