"""`jishi serve` (the OpenAI-compatible API and the chat page) and `jishi service install` (systemd)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jishi.errors import JishiError

from .common import add_load_options, add_speculation_options, load_model


def register(sub) -> None:
    sv = sub.add_parser("serve", help="serve models to a classroom: OpenAI- and Ollama-compatible APIs and a chat page")
    sv.add_argument("bundle", nargs="+", help="bundle directories or installed model names (several: each loads "
                                              "on first use)")
    _serve_options(sv)
    sv.add_argument("--idle-unload", type=float, default=300, metavar="SECONDS",
                    help="with several models: unload one idle this long (default 300)")
    sv.add_argument("--memory-budget", type=int, metavar="MB",
                    help="with several models: unload the least recently used idle ones to stay under this "
                         "(default: 90%% of the memory available at start)")
    add_load_options(sv)
    sv.set_defaults(func=serve)

    svc = sub.add_parser("service", help="start the server at boot (systemd)")
    svc_sub = svc.add_subparsers(title="actions", metavar="ACTION")
    si = svc_sub.add_parser("install", help="write and enable a systemd unit for `jishi serve` (prints it when not root)")
    si.add_argument("bundle", help="bundle directory or installed model name")
    _serve_options(si)
    si.add_argument("--threads", type=int)
    si.add_argument("--context", type=int)
    add_speculation_options(si)
    si.add_argument("--user", help="run the server as this user (default: the one calling, or SUDO_USER)")
    si.add_argument("--unit-dir", help="write the unit into this directory instead of enabling it")
    si.set_defaults(func=service_install)


def _serve_options(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the local network)")
    p.add_argument("--port", type=int, default=8080, help="default 8080")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $JISHI_API_KEY, or none)")
    p.add_argument("--max-concurrent", type=int, default=4, help="answers generated at once (default 4)")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the answers in progress together, one model run per adapter (default); "
                        "--no-batch runs each answer on its own")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for a slot; more get HTTP 429 (default 16)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length when a request does not say (default 512)")
    p.add_argument("--system-prompt", help="system prompt for chats that bring none")
    p.add_argument("--adapter-system", action="append", default=[], metavar="NAME=TEXT",
                   help="system prompt for chats with this adapter (default: the adapter's own, else --system-prompt)")


def server_config(args):
    from jishi.runtime.server.app import ServerConfig

    for name in ("max_concurrent", "max_tokens", "port"):
        if getattr(args, name) < 1:
            raise JishiError(f"--{name.replace('_', '-')} must be at least 1")
    if args.queue < 0:
        raise JishiError("--queue must be 0 or more")
    systems = {}
    for spec in args.adapter_system:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise JishiError(f"expected --adapter-system NAME=TEXT, got {spec!r}")
        systems[name] = text
    return ServerConfig(api_key=args.api_key or os.environ.get("JISHI_API_KEY") or None,
                        max_concurrent=args.max_concurrent, queue=args.queue, system_prompt=args.system_prompt,
                        adapter_system=systems, max_tokens=args.max_tokens, batch=args.batch)


def serve(args) -> int:
    from jishi.runtime.server import require_serve_extra, serve as run_server

    require_serve_extra()  # before loading the model: say what to install at once
    config = server_config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone on the network can use this server "
              "(pass --api-key KEY to require one)", file=sys.stderr)
    if args.draft and len(args.bundle) > 1:
        raise JishiError("--draft applies to one model; serve several models without it")
    if len(args.bundle) == 1:
        args.bundle = args.bundle[0]
        run_server(load_model(args), args.host, args.port, config)
        return 0
    run_server(fleet(args, config), args.host, args.port, config)
    return 0


def fleet(args, config):
    """Several models: their manifests read now, each loaded on its first request."""
    import jishi
    from jishi.runtime.server.fleet import Fleet

    if args.idle_unload <= 0:
        raise JishiError("--idle-unload must be more than 0 seconds")
    budget = args.memory_budget * 2**20 if args.memory_budget else None
    if budget is None:
        from jishi.devices.detect import detect

        available = detect().available_bytes
        budget = int(available * 0.9) if available else None

    def load(path):
        return jishi.load(path, threads=args.threads, context=args.context, force=args.force,
                          speculation=None if args.speculation == "draft" else args.speculation)

    return Fleet.from_paths(args.bundle, config, load, idle_unload=args.idle_unload, budget=budget,
                            context=args.context)


def service_install(args) -> int:
    from jishi.runtime.server.service import install_service

    server_config(args)  # the same checks as `jishi serve`, now rather than at boot
    serve_args = ["--host", args.host, "--port", str(args.port), "--max-concurrent", str(args.max_concurrent),
                  "--queue", str(args.queue), "--max-tokens", str(args.max_tokens)]
    if not args.batch:
        serve_args.append("--no-batch")
    if args.api_key:  # the unit is then written readable by root only
        serve_args += ["--api-key", args.api_key]
    if args.system_prompt:
        serve_args += ["--system-prompt", args.system_prompt]
    for spec in args.adapter_system:
        serve_args += ["--adapter-system", spec]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    if args.speculation:
        serve_args += ["--speculation", args.speculation]
    if args.draft:
        serve_args += ["--draft", str(Path(args.draft).resolve()) if Path(args.draft).exists() else args.draft]
    if args.context:
        serve_args += ["--context", str(args.context)]
    install_service(args.bundle, serve_args, unit_dir=args.unit_dir, user=args.user)
    return 0
