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
