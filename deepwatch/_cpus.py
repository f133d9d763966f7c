"""How many CPUs this process may really use: its CPU affinity, capped by the CPU quota of its
cgroup (what ``docker run --cpus 2`` or a Kubernetes CPU limit sets). ``os.cpu_count()`` gives
the host's cores: 64 on a 64-core host, however small the container's quota, and that many
threads on a 2-CPU quota run many times slower than two.

Only the standard library is used, and nothing here raises: a file that is missing, unreadable
or garbled means no limit from that source.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The CFS period the kernel uses when none can be read (microseconds).
_DEFAULT_PERIOD = 100_000
#: Where cgroup v1 usually mounts the ``cpu`` controller (alone or joined with ``cpuacct``).
_V1_MOUNTS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")
#: Where cgroup v2 is mounted: on its own, or beside v1 in the hybrid layout.
_V2_MOUNTS = ("", "unified")


def usable_cores(root: Path | str = "/") -> int:
    """CPUs this process may use: the smaller of its affinity set (else ``os.cpu_count()``) and
    its cgroup CPU quota rounded up; at least 1. ``root`` is the filesystem root under which
    ``proc/self/cgroup`` and ``sys/fs/cgroup`` are read (tests point it at a fake tree)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def cgroup_cpu_limit(root: Path | str = "/") -> int | None:
    """The smallest CPU quota (rounded up to whole CPUs) set on this process's cgroup or any of
    its parents, cgroup v2 and v1 both; None where no quota is set or none can be read."""
    root = Path(root)
    v1_path, v2_path = _own_cgroups(root / "proc/self/cgroup")
    limits: list[int] = []
    base = root / "sys/fs/cgroup"
    for mount in _V2_MOUNTS:
        for directory in _self_and_parents(base / mount if mount else base, v2_path):
            limit = _v2_limit(directory / "cpu.max")
            if limit is not None:
                limits.append(limit)
    for mount in _V1_MOUNTS:
        for directory in _self_and_parents(base / mount, v1_path):
            limit = _v1_limit(directory)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup paths: under the v1 ``cpu`` controller, and under v2 (``0::``).
    "/" where a line is missing (the usual view from inside a container's namespace)."""
    v1 = v2 = "/"
    try:
        text = proc_cgroup.read_text(errors="replace")
    except (OSError, ValueError):
        return v1, v2
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v1, v2


def _self_and_parents(mount: Path, cgroup: str) -> list[Path]:
    """``mount/cgroup`` and each directory above it, up to ``mount`` itself. A path that leaves
    the namespace (``/../..``, shown for a cgroup outside it) is not followed: only ``mount``.
    Where the container's namespace is not its own, ``mount/cgroup`` may not exist inside it,
    and the quota is found on the way up, at ``mount``."""
    parts = [p for p in cgroup.split("/") if p not in ("", ".")]
    if ".." in parts:
        parts = []
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_words(path: Path) -> list[str] | None:
    try:
        return path.read_text(errors="replace").split()
    except (OSError, ValueError):
        return None


def _whole_cpus(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))  # rounded up: 1.5 CPUs of quota keep 2 threads busy


def _v2_limit(cpu_max: Path) -> int | None:
    """``cpu.max`` holds "QUOTA PERIOD" in microseconds, QUOTA "max" where there is none."""
    words = _read_words(cpu_max)
    if not words or len(words) > 2 or words[0] == "max":
        return None
    try:
        quota = int(words[0])
        period = int(words[1]) if len(words) == 2 else _DEFAULT_PERIOD
    except ValueError:
        return None
    return _whole_cpus(quota, period)


def _v1_limit(directory: Path) -> int | None:
    """``cpu.cfs_quota_us`` (-1 where there is none) over ``cpu.cfs_period_us``."""
    quota_words = _read_words(directory / "cpu.cfs_quota_us")
    period_words = _read_words(directory / "cpu.cfs_period_us")
    if not quota_words or not period_words or len(quota_words) != 1 or len(period_words) != 1:
        return None
    try:
        quota, period = int(quota_words[0]), int(period_words[0])
    except ValueError:
        return None
    return _whole_cpus(quota, period)
