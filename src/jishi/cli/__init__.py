"""The ``jishi`` command line: one module per command group, each a thin layer over library functions.

| module      | commands                                                  |
| ----------- | --------------------------------------------------------- |
| ``make``    | build, distill, finetune, eval                            |
| ``generate``| run, chat                                                 |
| ``serve``   | serve, service install                                    |
| ``adapter`` | adapter add / list / remove                               |
| ``delivery``| keygen, sign, pack, verify, install, list, remove, wheelhouse |
| ``devices`` | devices, plan                                             |
| ``info``    | info                                                      |
| ``defaults``| defaults                                                  |
"""

from __future__ import annotations

import argparse
import os
import sys

from jishi import __version__
from jishi.errors import JishiError, MissingExtraError

from . import adapter, defaults, delivery, devices, generate, info, make, serve

GROUPS = (make, generate, serve, adapter, delivery, devices, info, defaults)
# A command that reaches a package of an extra that is not installed says which extra to install.
EXTRA_OF = {name: "build" for name in ("torch", "transformers", "onnx", "optimum", "peft", "accelerate", "gguf",
                                       "safetensors", "sentencepiece")} | {"starlette": "serve", "uvicorn": "serve"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # model text on a console that cannot show it: never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        try:
            return args.func(args) or 0
        except ModuleNotFoundError as e:
            extra = EXTRA_OF.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            given = argv if argv is not None else sys.argv[1:]
            command = next((a for a in given if not a.startswith("-")), "")
            raise MissingExtraError(extra, f"`jishi {command}` ({e.name})") from None
    except JishiError as e:
        if args.debug:
            raise
        print(f"jishi: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `jishi run ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jishi", description="Shrink, export and run a language model offline.")
    p.add_argument("--version", action="version", version=f"jishi {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


def describe(bundle) -> str:
    """The text of `jishi info` for an open bundle (kept here for callers of the older API)."""
    from jishi.runtime.describe import describe as describe_bundle

    return describe_bundle(bundle)
