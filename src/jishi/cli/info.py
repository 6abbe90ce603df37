"""`jishi info`: what a bundle holds, how it was made and how good it measured."""

from __future__ import annotations


def register(sub) -> None:
    i = sub.add_parser("info", help="summarise a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=info)


def info(args) -> int:
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.describe import describe
    from jishi.runtime.model import resolve_bundle

    bundle = open_bundle(resolve_bundle(args.bundle))
    print(bundle.manifest_bytes.decode() if args.json else describe(bundle))
    return 0
