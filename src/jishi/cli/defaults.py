"""`jishi defaults BUNDLE`: show or set a model's own defaults (system prompt, sampling, stops, length)."""

from __future__ import annotations

from jishi.errors import JishiError

from .common import key_values


def register(sub) -> None:
    d = sub.add_parser("defaults", help="show or set a model's defaults: system prompt, sampling values, stops")
    d.add_argument("bundle", help="bundle directory or installed model name")
    d.add_argument("--system", help="the system prompt for chats that bring none ('' clears it)")
    d.add_argument("--temperature", type=float, help="0 is plain greedy")
    d.add_argument("--top-k", type=int)
    d.add_argument("--top-p", type=float)
    d.add_argument("--min-p", type=float)
    d.add_argument("--repetition-penalty", type=float)
    d.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeat for more)")
    d.add_argument("--max-tokens", type=int, help="answer length when a request does not say")
    d.add_argument("--reset", action="store_true", help="back to jishi's own defaults before applying the above")
    d.set_defaults(func=defaults)


def defaults(args) -> int:
    from dataclasses import replace

    from jishi.runtime import defaults as D
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.model import resolve_bundle

    path = resolve_bundle(args.bundle)
    bundle = open_bundle(path)
    current = D.BUILTIN if args.reset else D.of(bundle.manifest)
    changes = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                             "max_tokens") if getattr(args, k) is not None}
    if args.system is not None:
        changes["system_prompt"] = args.system or None
    if args.stop:
        changes["stop"] = tuple(args.stop)
    if changes or args.reset:
        new = replace(current, **changes)  # checked: a bad value is a JishiError
        if path.suffix == ".jishi" or not path.is_dir():
            raise JishiError(f"{path} is a packed bundle; install or unpack it to change its defaults")
        dropped = D.write(path, bundle.manifest, new)
        print(f"wrote the defaults of {bundle.manifest.name} into {path / 'manifest.json'}"
              + ("; its signature no longer matches and was removed: sign it again (jishi sign)" if dropped else ""))
        current = new
    print(key_values(D.describe(current)))
    return 0
