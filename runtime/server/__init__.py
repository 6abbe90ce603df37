"""The classroom server: an OpenAI-compatible API and a chat page, for many users on one machine.

Needs the ``[serve]`` extra (starlette, uvicorn); this module imports neither until asked.
"""

from __future__ import annotations

from jishi.errors import MissingExtraError


def require_serve_extra() -> None:
    """Raise MissingExtraError (saying what to install) when the web stack is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingExtraError("serve", "jishi serve") from None


def serve(model, host: str = "127.0.0.1", port: int = 8080, config=None) -> None:
    """Serve ``model`` until interrupted (the CLI's `jishi serve`)."""
    require_serve_extra()
    import logging
    import sys

    import uvicorn

    from jishi.runtime.server.app import Server, ServerConfig, build_app

    from jishi.runtime.server.fleet import Fleet

    config = config or ServerConfig()
    if isinstance(model, Fleet):
        server = model
        names = ", ".join(model.entries)
        what = f"{len(model.entries)} models ({names}; each loads on first use)"
    else:
        server = Server(model, config)
        what = f"{model.name} (context {model.context}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log = logging.getLogger("jishi.server")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    detail = f"{config.max_concurrent} at once{' batched' if config.batch else ''}, {config.queue} queued"
    what = f"{what}, {detail})" if not isinstance(model, Fleet) else f"{what}; {detail} per model"
    print(f"jishi: serving {what} on http://{shown}:{port}/  (chat page; OpenAI API under /v1, Ollama's under /api). "
          "Ctrl-C stops.", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(build_app(server), host=host, port=port, log_level="warning", access_log=False,
                                  timeout_graceful_shutdown=3)).run()
