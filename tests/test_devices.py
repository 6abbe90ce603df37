"""What the runtime reads of the machine."""

from __future__ import annotations

from jishi.devices import cpu


def cpuinfo(sockets: int, cores: int, threads: int) -> str:
    blocks, n = [], 0
    for s in range(sockets):
        for c in range(cores):
            for _ in range(threads):
                blocks.append(f"processor\t: {n}\nphysical id\t: {s}\ncore id\t\t: {c}\n")
                n += 1
    return "\n".join(blocks) + "\n"


def test_hyperthreads_count_once(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpu, "_cgroup_cpus", lambda: None)
    assert cpu.physical_cores(cpuinfo(2, 4, 2)) == 8


def test_affinity_and_quota_bound_the_count(monkeypatch):
    monkeypatch.setattr(cpu, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cpu.physical_cores(cpuinfo(1, 8, 2)) == 2  # 4 of 16 logical CPUs: 2 cores' worth
    monkeypatch.setattr(cpu, "_cgroup_cpus", lambda: 1.5)
    assert cpu.physical_cores(cpuinfo(1, 8, 1)) == 1


def test_arm_cpuinfo_without_core_ids_uses_logical_cpus(monkeypatch):
    """Raspberry Pi OS lists processors without core ids: each is a core."""
    monkeypatch.setattr(cpu, "_cgroup_cpus", lambda: None)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    pi = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd\n\n" for i in range(4))
    assert cpu.physical_cores(pi) == 4


from pathlib import Path

import pytest

from jishi.devices.detect import best_profile, detect
from jishi.devices.plan import ModelShape, estimate, plan
from jishi.devices.profiles import get_profile, load_profiles

FIXTURES = Path(__file__).parent / "fixtures" / "devices"


def test_detect_raspberry_pi_4_from_recorded_files():
    m = detect(FIXTURES / "rpi4-4gb")
    assert m.arch == "aarch64" and m.model == "Raspberry Pi 4 Model B Rev 1.4"
    assert m.cores == 4 and m.isa == ("neon",) and m.cpu_parts == ("0xd08",)
    assert 3.6 < m.ram_bytes / 2**30 < 3.8
    assert best_profile(m).id == "rpi4-4gb"


def test_detect_raspberry_pi_5_with_dotprod():
    m = detect(FIXTURES / "rpi5-8gb")
    assert m.isa == ("neon", "dotprod") and m.cpu_parts == ("0xd0b",)
    assert best_profile(m).id == "rpi5-8gb"


def test_detect_x86_laptop_counts_cores_and_honours_the_cgroup_limit():
    m = detect(FIXTURES / "laptop-x86", arch="x86_64")
    assert m.cores == 8  # 16 hyper-threads on 8 cores
    assert set(m.isa) == {"avx2", "fma", "avx512", "avx512-vnni"}
    assert m.ram_bytes == 4 * 2**30  # the container's limit, not the 15 GiB of the machine
    assert best_profile(m).id == "laptop-avx512vnni-16gb"


def test_detect_this_machine():
    import os

    m = detect()
    assert m.cores >= 1 and m.ram_bytes > 0 and m.arch in ("x86_64", "aarch64", os.uname().machine)


def test_every_profile_names_its_sources_and_the_required_devices_exist():
    ids = {p.id for p in load_profiles()}
    for needed in ("rpi4-4gb", "rpi4-8gb", "rpi5-4gb", "rpi5-8gb", "rpi5-16gb", "rk3588-16gb", "jetson-orin-nano-8gb",
                   "laptop-avx2-8gb", "laptop-avx512vnni-16gb", "apple-m1-8gb"):
        assert needed in ids
    for p in load_profiles():
        assert p.sources and p.bandwidth_gbs > 0 and p.cores > 0 and p.ram_gb > 0, p.id


SMOL = ModelShape("smollm2-135m", layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)


def test_planner_arithmetic_by_hand():
    p = get_profile("rpi5-8gb")
    e = estimate(SMOL, p, "int4", context=2048)
    linear = 30 * (576 * (9 + 6) * 64 + 9 * 64 * 576 + 3 * 576 * 1536)
    assert SMOL.linear_params == linear == 106_168_320
    per_linear = 0.5 + 4 / 32 + 0.5 / 32 + 4 / 32
    assert e.weights_bytes == int(linear * per_linear + 2 * 49152 * 576 * (1 + 4 / 32))
    assert e.kv_bytes == 2 * 30 * 3 * 64 * 2048 * 4 == 94_371_840
    seconds = e.read_per_token / (p.bandwidth_gbs * 1e9) + 30 * 0.245e-3 / 0.5
    assert e.tokens_per_s == pytest.approx(1 / seconds)


def test_a_model_that_does_not_fit_is_refused_with_what_would_fit():
    big = ModelShape("8b", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False)
    rows, best, why = plan(big, get_profile("rpi4-4gb"), context=2048)
    assert best is None and not any(r.fits for r in rows)
    assert why.startswith("nothing fits in 4 GB: the smallest build (int4) needs")
    rows, best, why = plan(SMOL, get_profile("rpi4-4gb"))
    assert best.quant == "int4" and all(r.fits for r in rows)


def test_loading_a_bundle_too_big_for_free_memory_is_refused_unless_forced(tiny_bundles, monkeypatch):
    import jishi
    from jishi.devices import detect as detect_mod
    from jishi.errors import DeviceFitError

    real = detect_mod.detect()
    tiny = type(real)(real.arch, real.model, real.cores, real.isa, real.ram_bytes, available_bytes=64 * 2**20)
    monkeypatch.setattr(detect_mod, "detect", lambda *a, **k: tiny)
    with pytest.raises(DeviceFitError, match="needs about .* MB at context 256 but only 64 MB are available.*force"):
        jishi.load(tiny_bundles["fp32"])
    assert jishi.load(tiny_bundles["fp32"], force=True).generate("Hi", max_new_tokens=2, temperature=0).completion_tokens == 2
