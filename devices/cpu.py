"""What the CPU of this machine offers: cores the runtime should use."""

from __future__ import annotations

import os
from pathlib import Path


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 or v1), in cores, if one is set."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def physical_cores(cpuinfo: str | None = None, logical: int | None = None, quota: float | None = -1) -> int:
    """Physical cores available to this process (hyper-threads share a core's matrix units).

    Counts distinct (physical id, core id) pairs in /proc/cpuinfo where it has them,
    bounded by the CPU affinity mask and any cgroup quota; ``os.cpu_count()`` elsewhere.
    ``logical`` and ``quota`` override what this process is allowed (for recorded files).
    """
    if logical is None:
        logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    cores = set()
    phys = core = None
    siblings = 0
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif key == "processor":
            siblings += 1
        elif not line.strip() and core is not None:
            cores.add((phys, core))
            phys = core = None
    count = len(cores) if cores and siblings else logical
    if cores and siblings:
        count = max(1, round(count * logical / siblings))  # scale to the CPUs we may use
    if quota == -1:
        quota = _cgroup_cpus()
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return max(1, min(count, logical))
