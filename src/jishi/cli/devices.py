"""`jishi devices [list|detect]` and `jishi plan`: which device this is, and what fits on one."""

from __future__ import annotations

from .common import key_values, settings_text, table


def register(sub) -> None:
    d = sub.add_parser("devices", help="known device profiles; `jishi devices detect` describes this machine")
    d.add_argument("action", nargs="?", choices=["list", "detect"], default="list")
    d.set_defaults(func=devices)

    pl = sub.add_parser("plan", help="estimate memory and speed of each quantization on a device")
    pl.add_argument("model", help="bundle, installed name, Hugging Face directory, GGUF file or known base")
    pl.add_argument("--device", default="detect", help="profile id (see `jishi devices`) or 'detect' (default)")
    pl.add_argument("--context", type=int, default=2048)
    pl.set_defaults(func=plan)


def devices(args) -> int:
    from jishi.devices.detect import best_profile, detect
    from jishi.devices.profiles import load_profiles
    from jishi.runtime.settings import choose

    if args.action == "detect":
        machine = detect()
        rows = machine.describe()
        match = best_profile(machine)
        rows.append(("closest profile", f"{match.id} ({match.name})" if match else "none of this architecture"))
        print(key_values(rows))
        print("\nruntime settings (onnxruntime):")
        print("\n".join("  " + line for line in settings_text(choose(match, machine.cores)).splitlines()))
        return 0
    rows = [[p.id, p.arch, str(p.cores), f"{p.ram_gb:g} GB", f"{p.bandwidth_gbs:.0f} GB/s", ", ".join(p.isa), p.name]
            for p in load_profiles()]
    print(table(["id", "arch", "cores", "RAM", "bandwidth", "ISA", "device"], rows))
    return 0


def plan(args) -> int:
    from jishi.devices.plan import plan as plan_model
    from jishi.planning import model_shape, profile_for

    profile = profile_for(args.device)
    shape = model_shape(args.model)
    rows, best, why = plan_model(shape, profile, args.context)
    print(f"{shape.name} on {profile.name} ({profile.id}): {profile.ram_gb:g} GB, "
          f"{profile.bandwidth_gbs:.0f} GB/s, context {args.context}\n")
    cells = [[r.quant, f"{r.weights_bytes / 2**20:.0f} MB", f"{r.kv_bytes / 2**20:.0f} MB", f"{r.memory_bytes / 2**20:.0f} MB",
              f"{r.tokens_per_s:.0f}", "yes" if r.fits else "NO"] for r in rows]
    print(table(["quant", "weights", "KV cache", "total", "decode tok/s", "fits"], cells))
    print(f"\nrecommended: {why}" if best else f"\n{why}")
    return 0 if best else 1
