"""`jishi adapter add|list|remove`: the LoRA adapters of a bundle."""

from __future__ import annotations

from .common import named_dir, table


def register(sub) -> None:
    ad = sub.add_parser("adapter", help="add, list or remove the LoRA adapters of a bundle")
    ad_sub = ad.add_subparsers(title="actions", metavar="ACTION")
    a_add = ad_sub.add_parser("add", help="convert a PEFT adapter and add it to a bundle with merge points")
    a_add.add_argument("bundle")
    a_add.add_argument("adapter", metavar="NAME=DIR")
    a_add.set_defaults(func=add)
    a_ls = ad_sub.add_parser("list", help="the bundle's adapters")
    a_ls.add_argument("bundle")
    a_ls.set_defaults(func=list_adapters)
    a_rm = ad_sub.add_parser("remove", help="remove an adapter from a bundle")
    a_rm.add_argument("bundle")
    a_rm.add_argument("name")
    a_rm.set_defaults(func=remove)


def add(args) -> int:
    from jishi.export.adapters import add_adapter

    name, directory = named_dir(args.adapter)
    out = add_adapter(args.bundle, name, directory)
    print(f"added {name} ({out.stat().st_size / 1e6:.1f} MB); the bundle's signature, if any, was removed: sign it again")
    return 0


def list_adapters(args) -> int:
    from jishi.runtime.bundle import open_bundle

    m = open_bundle(args.bundle).manifest
    if not m.adapters:
        print("no adapters" + ("" if m.merge_points else " (and no merge points: build with --merge-points)"))
        return 0
    print(table(["name", "rank", "alpha", "targets", "file"],
                [[a["name"], str(a["rank"]), str(a.get("alpha")), ",".join(a["targets"]), a["file"]] for a in m.adapters]))
    return 0


def remove(args) -> int:
    from jishi.export.adapters import remove_adapter

    remove_adapter(args.bundle, args.name)
    print(f"removed {args.name}")
    return 0
