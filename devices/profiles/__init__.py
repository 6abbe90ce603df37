"""Device profiles: one TOML data file per device and memory size, with its sources."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    arch: str
    cpu: str
    cores: int
    isa: tuple[str, ...]
    ram_gb: float
    memory: str = ""
    theoretical_bandwidth_gbs: float | None = None
    measured_bandwidth_gbs: float | None = None  # all cores reading, where measured
    single_thread_copy_gbs: float | None = None  # a published one-thread copy rate (understates the above)
    execution_provider: str = "CPUExecutionProvider"
    other_providers: tuple[str, ...] = ()
    model_match: tuple[str, ...] = ()
    cpu_parts: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    notes: str = ""
    runtime: tuple[tuple[str, object], ...] = ()  # the [runtime] table: onnxruntime settings and why (runtime/settings.py)

    @property
    def bandwidth_gbs(self) -> float:
        """Measured all-core bandwidth where known, else 60% of the theoretical (typical of STREAM on LPDDR).

        Published one-thread copy rates are kept in the profiles for reference but not used:
        they count bytes copied (half the traffic) by one core of four or more.
        """
        if self.measured_bandwidth_gbs:
            return self.measured_bandwidth_gbs
        return 0.6 * (self.theoretical_bandwidth_gbs or 0.0)


_TUPLES = {"isa", "other_providers", "model_match", "cpu_parts", "sources"}


def _profile(path: Path) -> Profile:
    body = tomllib.loads(path.read_text())
    known = set(Profile.__dataclass_fields__)
    kwargs = {k: (tuple(v) if k in _TUPLES else v) for k, v in body.items() if k in known}
    kwargs["runtime"] = tuple(sorted(body.get("runtime", {}).items()))
    return Profile(**kwargs)


@lru_cache(maxsize=1)
def load_profiles() -> tuple[Profile, ...]:
    return tuple(sorted((_profile(p) for p in HERE.glob("*.toml")), key=lambda p: p.id))


def get_profile(profile_id: str) -> Profile:
    for p in load_profiles():
        if p.id == profile_id:
            return p
    from jishi.errors import JishiError

    raise JishiError(f"no device profile {profile_id!r}; known: {', '.join(p.id for p in load_profiles())}")
