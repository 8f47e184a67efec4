"""How many cores this process may use: the CPUs it is allowed to run on, capped by a cgroup
CPU quota (a Kubernetes pod's CPU limit is one: ``os.cpu_count()`` there is the node's count,
and threads sized by it oversubscribe the pod)."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_cpus(
    cpu_max: str | None = None, cfs_quota_us: str | None = None, cfs_period_us: str | None = None
) -> float | None:
    """CPUs a cgroup quota allows, from cgroup v2's ``cpu.max`` ("max 100000" or
    "200000 100000") or v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None if unlimited
    or unknown."""
    if cpu_max is not None:
        parts = cpu_max.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    if cfs_quota_us is not None and cfs_period_us is not None:
        return _ratio(cfs_quota_us.strip(), cfs_period_us.strip())
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cpus(allowed: int, quota: float | None) -> int:
    """Cores to size thread pools by: the allowed CPUs, capped by the quota rounded up."""
    return max(1, min(allowed, math.ceil(quota)) if quota else allowed)


def node_cpus() -> int:
    """``usable_cpus`` of this process, read from the system."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return usable_cpus(
        allowed or os.cpu_count() or 1,
        quota_cpus(
            _read(CGROUP / "cpu.max"),
            _read(CGROUP / "cpu" / "cpu.cfs_quota_us"),
            _read(CGROUP / "cpu" / "cpu.cfs_period_us"),
        ),
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def owns_its_cores() -> bool:
    """Whether this process may use every core it may run on: no CPU quota (a pod's limit)
    narrower than its affinity. Where there is one, its cores are shared with other work, and
    binding a process to some of them (attention.pin_engine) could leave it on a busy one."""
    if not hasattr(os, "sched_getaffinity"):
        return False
    return node_cpus() >= len(os.sched_getaffinity(0))
