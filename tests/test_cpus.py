"""The CPUs a process may use: affinity capped by the cgroup CPU quota, read from fake trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepwatch import _cpus
from deepwatch._cpus import cgroup_cpu_limit, usable_cores


@pytest.fixture(autouse=True)
def sixty_four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host seen through affinity: 64 cores, unless a test says otherwise."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(root: Path, own: str = "/", **cpu_max: str) -> Path:
    """cgroup v2: ``own`` is the process's cgroup; ``cpu_max`` maps a cgroup path (``_`` for
    ``/``, ``a__b`` for ``a/b``) to the text of its cpu.max."""
    write(root, "proc/self/cgroup", f"0::{own}\n")
    (root / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
    for key, text in cpu_max.items():
        where = "" if key == "_" else key.replace("__", "/") + "/"
        write(root, f"sys/fs/cgroup/{where}cpu.max", text)
    return root


def v1_tree(root: Path, quota: str, period: str = "100000\n", own: str = "/",
            mount: str = "cpu,cpuacct", at: str = "") -> Path:
    write(root, "proc/self/cgroup",
          f"12:memory:/x\n4:{mount}:{own}\n1:name=systemd:/init.scope\n0::/\n")
    base = f"sys/fs/cgroup/{mount}/{at}".rstrip("/")
    write(root, f"{base}/cpu.cfs_quota_us", quota)
    write(root, f"{base}/cpu.cfs_period_us", period)
    return root


def test_v2_quota_is_rounded_up(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, _="150000 100000\n")
    assert cgroup_cpu_limit(root) == 2
    assert usable_cores(root) == 2


def test_v2_whole_and_fractional_quotas(tmp_path: Path) -> None:
    assert usable_cores(v2_tree(tmp_path / "a", _="200000 100000\n")) == 2
    assert usable_cores(v2_tree(tmp_path / "b", _="50000 100000\n")) == 1  # half a CPU: 1
    assert usable_cores(v2_tree(tmp_path / "c", _="400000 50000\n")) == 8  # period not 100 ms


def test_v2_max_is_no_limit(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, _="max 100000\n")
    assert cgroup_cpu_limit(root) is None
    assert usable_cores(root) == 64


def test_v2_limit_set_on_a_parent(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, own="/kubepods/pod1/ctr", kubepods__pod1="300000 100000\n",
                   kubepods__pod1__ctr="max 100000\n", kubepods="max 100000\n")
    assert cgroup_cpu_limit(root) == 3
    assert usable_cores(root) == 3


def test_v2_smallest_limit_on_the_way_up_wins(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, own="/a/b", a__b="600000 100000\n", a="250000 100000\n",
                   _="800000 100000\n")
    assert usable_cores(root) == 3


def test_v2_own_cgroup_missing_from_the_mount_reads_the_mount_root(tmp_path: Path) -> None:
    # a container without its own cgroup namespace: /proc/self/cgroup names the host's path,
    # while the container sees its own cgroup mounted at /sys/fs/cgroup
    root = v2_tree(tmp_path, own="/system.slice/docker-abc.scope", _="200000 100000\n")
    assert usable_cores(root) == 2


def test_v2_path_outside_the_namespace_is_not_followed(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, own="/../../escape", _="400000 100000\n")
    write(tmp_path, "sys/escape/cpu.max", "100000 100000\n")
    assert usable_cores(root) == 4


def test_v1_quota(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, "250000\n")
    assert cgroup_cpu_limit(root) == 3
    assert usable_cores(root) == 3


def test_v1_cpu_only_mount_and_nested_cgroup(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, "200000\n", period="50000\n", own="/docker/abc", mount="cpu",
                   at="docker/abc")
    assert usable_cores(root) == 4


def test_v1_minus_one_is_no_limit(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, "-1\n")
    assert cgroup_cpu_limit(root) is None
    assert usable_cores(root) == 64


def test_v1_and_v2_together_take_the_smaller(tmp_path: Path) -> None:
    root = v1_tree(tmp_path, "500000\n")
    write(tmp_path, "sys/fs/cgroup/unified/cpu.max", "300000 100000\n")
    assert usable_cores(root) == 3


@pytest.mark.parametrize("text", ["", "banana", "100000 100000 7", "0 100000", "-5 100000",
                                  "200000 0", "200000 x", "1e5 100000", "\x00\xff"])
def test_garbled_v2_file_is_no_limit(tmp_path: Path, text: str) -> None:
    root = v2_tree(tmp_path, _=text)
    assert cgroup_cpu_limit(root) is None
    assert usable_cores(root) == 64


def test_garbled_v2_file_does_not_hide_a_good_parent(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, own="/a", a="nonsense", _="200000 100000\n")
    assert usable_cores(root) == 2


@pytest.mark.parametrize(("quota", "period"), [("abc", "100000"), ("200000", ""),
                                               ("200000", "0"), ("1 2", "100000"),
                                               ("0", "100000")])
def test_garbled_v1_files_are_no_limit(tmp_path: Path, quota: str, period: str) -> None:
    root = v1_tree(tmp_path, quota, period)
    assert cgroup_cpu_limit(root) is None
    assert usable_cores(root) == 64


def test_unreadable_file_is_no_limit(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    (root / "sys/fs/cgroup/cpu.max").mkdir()  # reading a directory fails
    assert cgroup_cpu_limit(root) is None
    assert usable_cores(root) == 64


def test_missing_files_are_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None  # no proc, no sys at all
    assert usable_cores(tmp_path) == 64
    write(tmp_path, "proc/self/cgroup", "0::/a/b\n")  # cgroup named, no cpu.max anywhere
    assert usable_cores(tmp_path) == 64


def test_garbled_proc_cgroup_still_reads_the_mount_root(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "garbage\n::\n\x00\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert usable_cores(tmp_path) == 2


def test_never_more_than_the_affinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert usable_cores(v2_tree(tmp_path / "a", _="800000 100000\n")) == 3
    assert usable_cores(v2_tree(tmp_path / "b", _="200000 100000\n")) == 2
    assert usable_cores(v2_tree(tmp_path / "c", _="max 100000\n")) == 3


def test_without_affinity_the_cpu_count_is_the_ceiling(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cores(tmp_path) == 6
    assert usable_cores(v2_tree(tmp_path, _="400000 100000\n")) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores(tmp_path / "nothing") == 1


def test_runtime_keeps_the_name() -> None:
    from deepwatch import runtime

    assert runtime.usable_cores is _cpus.usable_cores
