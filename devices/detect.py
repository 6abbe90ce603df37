"""Describe the machine this runs on, and find the device profile it matches best.

Everything is read from text files (``/proc/cpuinfo``, ``/proc/meminfo``,
``/proc/device-tree/model``, cgroup limits) under a root directory, so tests can
point it at recorded files of each device.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from jishi.devices.cpu import physical_cores
from jishi.devices.profiles import Profile, load_profiles

_ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve"}
_X86_FLAGS = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512-vnni", "avx_vnni": "avx-vnni", "fma": "fma"}


@dataclass(frozen=True)
class Machine:
    arch: str  # x86_64 | aarch64 | ...
    model: str  # board model (device tree) or CPU model name
    cores: int  # physical cores available to this process
    isa: tuple[str, ...]
    ram_bytes: int  # total memory, bounded by a cgroup limit
    available_bytes: int  # what may still be used now
    cpu_parts: tuple[str, ...] = ()

    def describe(self) -> list[tuple[str, str]]:
        return [
            ("architecture", self.arch),
            ("model", self.model or "unknown"),
            ("cores", str(self.cores)),
            ("ISA features", ", ".join(self.isa) or "none detected"),
            ("memory", f"{self.ram_bytes / 2**30:.1f} GiB ({self.available_bytes / 2**30:.1f} GiB available)"),
        ]


def _read(root: Path, rel: str) -> str:
    try:
        return (root / rel).read_text(errors="replace")
    except OSError:
        return ""


def _normal_arch(machine: str) -> str:
    m = machine.lower()
    return {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}.get(m, m)


def _meminfo(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    return out


def _cgroup_memory(root: Path) -> int | None:
    for rel in ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = _read(root, rel).strip()
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def detect(root: str | Path = "/", arch: str | None = None) -> Machine:
    root = Path(root)
    cpuinfo = _read(root, "proc/cpuinfo")
    isa: list[str] = []
    parts: list[str] = []
    model = _read(root, "proc/device-tree/model").replace("\x00", "").strip()
    cpu_model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "features":
            isa += [_ARM_FEATURES[f] for f in value.split() if f in _ARM_FEATURES]
        elif key == "flags":
            isa += [_X86_FLAGS[f] for f in value.split() if f in _X86_FLAGS]
        elif key == "cpu part":
            parts.append(value.lower())
        elif key == "model name" or (key == "model" and not value.isdigit() and not cpu_model):
            cpu_model = value
    if not arch:
        arch = _normal_arch(platform.machine())
        if parts and arch == "x86_64":  # recorded ARM files read on another machine
            arch = "aarch64"
    mem = _meminfo(_read(root, "proc/meminfo"))
    total = mem.get("MemTotal", 0)
    available = mem.get("MemAvailable", total)
    limit = _cgroup_memory(root)
    if limit is not None:
        total, available = min(total, limit) if total else limit, min(available, limit) if available else limit
    if root == Path("/"):
        cores = physical_cores(cpuinfo)
    else:  # recorded files: count what they describe, not what this process may use
        logical = sum(1 for line in cpuinfo.splitlines() if line.lower().startswith("processor"))
        cores = physical_cores(cpuinfo, logical=max(1, logical), quota=None)
    return Machine(
        arch=arch,
        model=model or cpu_model,
        cores=cores,
        isa=tuple(dict.fromkeys(isa)),
        ram_bytes=total,
        available_bytes=available,
        cpu_parts=tuple(dict.fromkeys(parts)),
    )


def best_profile(machine: Machine, profiles: list[Profile] | None = None) -> Profile | None:
    """The profile of the same architecture that fits best: board or CPU name, CPU parts, ISA, then RAM."""
    best, best_score = None, None
    for p in profiles if profiles is not None else load_profiles():
        if p.arch != machine.arch:
            continue
        named = any(m.lower() in machine.model.lower() for m in p.model_match) if machine.model else False
        part = bool(set(p.cpu_parts) & set(machine.cpu_parts))
        isa = len(set(p.isa) & set(machine.isa)) - len(set(p.isa) - set(machine.isa))
        ram = -abs(p.ram_gb * 2**30 - machine.ram_bytes) / 2**30
        score = (named, part, isa, ram)
        if best_score is None or score > best_score:
            best, best_score = p, score
    return best
