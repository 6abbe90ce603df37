"""Getting a bundle onto a device: keygen, sign, pack, verify, install, list, remove, wheelhouse."""

from __future__ import annotations

import sys

from .common import table


def register(sub) -> None:
    k = sub.add_parser("keygen", help="write an Ed25519 key pair for signing bundles")
    k.add_argument("-o", "--output", required=True, help="PREFIX: writes PREFIX (private) and PREFIX.pub")
    k.set_defaults(func=keygen)

    s = sub.add_parser("sign", help="sign a bundle directory (again, after it changed)")
    s.add_argument("bundle")
    s.add_argument("--key", required=True, help="private key from `jishi keygen`")
    s.set_defaults(func=sign)

    pk = sub.add_parser("pack", help="pack a bundle (or one of its adapters) into one .jishi archive")
    pk.add_argument("bundle")
    pk.add_argument("-o", "--output", required=True, help="archive to write (FILE.jishi)")
    pk.add_argument("--sign", metavar="KEY", help="sign with this private key first")
    pk.add_argument("--adapter", metavar="NAME",
                    help="pack only this adapter, for installing into the same model where the bundle already is")
    pk.set_defaults(func=pack)

    v = sub.add_parser("verify", help="check every file's hash and the signature of a bundle or archive")
    v.add_argument("path", help="bundle directory or .jishi archive")
    v.add_argument("--key", help="public key the bundle must be signed with")
    v.set_defaults(func=verify)

    ins = sub.add_parser("install", help="verify and install a .jishi archive (a bundle, or an adapter for an installed model)")
    ins.add_argument("path")
    ins.add_argument("--prefix", help="where installed models live (default: the user's data directory)")
    ins.add_argument("--key", help="public key the bundle must be signed with")
    ins.set_defaults(func=install)

    ls = sub.add_parser("list", help="installed models")
    ls.add_argument("--prefix")
    ls.set_defaults(func=list_models)

    rm = sub.add_parser("remove", help="remove an installed model")
    rm.add_argument("name")
    rm.add_argument("--prefix")
    rm.set_defaults(func=remove)

    wh = sub.add_parser("wheelhouse", help="gather the runtime's wheels for an offline install on another machine")
    wh.add_argument("--platform", required=True, choices=["linux-aarch64", "linux-x86_64"])
    wh.add_argument("--python-version", default="3.11", help="the device's Python (default 3.11, as on Raspberry Pi OS)")
    wh.add_argument("-o", "--output", required=True)
    wh.set_defaults(func=wheelhouse)


def keygen(args) -> int:
    from jishi.export.signing import keygen as write_keys

    private, public = write_keys(args.output)
    print(f"private key: {private} (keep it secret)\npublic key:  {public} (copy it to the devices)")
    return 0


def sign(args) -> int:
    from jishi.export.signing import sign_bundle

    print(sign_bundle(args.bundle, args.key))
    return 0


def pack(args) -> int:
    from jishi.export.pack import pack_adapter, pack_bundle

    if args.adapter:
        out = pack_adapter(args.bundle, args.adapter, args.output, sign_key=args.sign)
    else:
        out = pack_bundle(args.bundle, args.output, sign_key=args.sign)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def verify(args) -> int:
    from jishi.runtime.verify import verify_path

    print(verify_path(args.path, key=args.key))
    return 0


def install(args) -> int:
    from jishi.runtime.bundle import open_bundle
    from jishi.runtime.store import install as install_archive

    path = install_archive(args.path, prefix=args.prefix, key=args.key)
    if not args.key:
        print("warning: installed without checking a signature (pass --key PUB to require one)", file=sys.stderr)
    adapters = [a["name"] for a in open_bundle(path, verify_hashes=False).manifest.adapters]
    print(f"installed {path.name.split('@')[0]} → {path}" + (f" (adapters: {', '.join(adapters)})" if adapters else ""))
    return 0


def list_models(args) -> int:
    from jishi.runtime.store import list_installed, models_dir

    rows = list_installed(args.prefix)
    if not rows:
        print(f"no models installed in {models_dir(args.prefix)}")
        return 0
    print(table(["name", "quant", "size", "signed", "adapters", "path"],
                [[r.name, r.quantization, f"{r.size / 1e6:.1f} MB", "yes" if r.signed else "no",
                  ", ".join(r.adapters) or "-", str(r.path)] for r in rows]))
    return 0


def remove(args) -> int:
    from jishi.runtime.store import remove as remove_model

    print(f"removed {remove_model(args.name, args.prefix)}")
    return 0


def wheelhouse(args) -> int:
    from jishi.wheelhouse import build_wheelhouse

    wheels = build_wheelhouse(args.output, args.platform, args.python_version)
    size = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"{len(wheels)} wheels ({size:.0f} MB) in {args.output}; on the device:\n"
          f"  pip install --no-index --find-links {args.output} jishi")
    return 0
