"""Ingests killed outright and ingests side by side, as real processes, with readers beside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from deepwatch.lake import STALE_TMP_S, lake_days, read_lake

LINE = ('{ip} - - [{day}/May/2024:12:{min:02d}:{sec:02d} +0000] "GET /{tag}/{i} HTTP/1.1" 200 10 '
        '"-" "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"')
EXE = str(Path(sys.executable).with_name("deepwatch"))
ENV = {**os.environ, "DEEPWATCH_PROGRESS": "0"}


def _log(path: Path, days: list[int], tag: str) -> Path:
    path.write_text("".join(LINE.format(ip=f"9.9.9.{i % 5}", day=d, min=i // 60 % 60,
                                        sec=i % 60, tag=tag, i=i) + "\n"
                            for i, d in enumerate(days)))
    return path


def _ingest(lake: Path, *inputs: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([EXE, "ingest", "--format", "access", "--lake", str(lake), *inputs],
                          capture_output=True, timeout=120, env=ENV)


def _held_open(lake: Path, log: Path) -> Any:
    """An ingest of ``log`` then stdin, which is left open: the run cannot end before it
    is closed (or the run is killed)."""
    return subprocess.Popen([EXE, "ingest", "--format", "access", "--lake", str(lake),
                             str(log), "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)


def _kill_when_written(lake: Path, log: Path, parts: int) -> None:
    """Hold an ingest of ``log`` open and kill it with SIGKILL once ``parts`` parts are
    written anywhere in the lake (staged or not)."""
    from conftest import signal_when

    proc = _held_open(lake, log)
    try:
        signal_when(proc, lambda: _parts_anywhere(lake) >= parts, signal.SIGKILL)
    finally:
        proc.kill()
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _parts_anywhere(lake: Path) -> int:
    """Parts the ingests have written, whether readers see them yet or not."""
    return len(list(lake.rglob("part-*.parquet")))


def _seen(lake: Path) -> tuple[int, int, int]:
    """The records three readers see: deepwatch's own, pyarrow's dataset with hive partitions
    and polars scanning the records directory (as docs/web.md tells)."""
    import polars as pl

    records = lake / "records"
    ours = read_lake(lake).num_rows if records.exists() else 0
    if not records.exists():
        return ours, 0, 0
    arrow = ds.dataset(records, format="parquet", partitioning="hive").count_rows()
    polars = pl.scan_parquet(records, hive_partitioning=True).select(pl.len()).collect().item()
    return ours, arrow, polars


def test_an_ingest_killed_outright_leaves_nothing_to_store_twice(tmp_path: Path) -> None:
    # a run killed with SIGKILL (the OOM killer) left the parts it had finished in the lake:
    # readers took the half run for data, and running it again stored that half twice
    lake = tmp_path / "lake"
    assert _ingest(lake, str(_log(tmp_path / "first.log", [13] * 5, "first"))).returncode == 0
    log = _log(tmp_path / "day.log", [14] * 200 + [15] * 100, "day")
    # killed once day.log is written (two parts, one a day), stdin still open
    _kill_when_written(lake, log, 3)
    assert _seen(lake) == (5, 5, 5)  # the killed run's parts are nowhere a reader looks

    again = _ingest(lake, str(log))  # simply run again
    assert again.returncode == 0, again.stderr.decode()
    assert b"already ingested" not in again.stderr
    assert _seen(lake) == (305, 305, 305)
    assert not list(lake.glob(".*"))  # the killed run's leftovers were cleared
    paths = read_lake(lake).column("path").to_pylist()
    assert len(set(paths)) == len(paths)


def test_two_ingests_at_once_with_readers_beside(tmp_path: Path) -> None:
    """Two ingests into one lake at the same time, each held open until both have written
    parts: readers meanwhile see neither run's records (no half run is taken for data); once
    both end, every record is there once, and both inputs are noted as ingested."""
    lake = tmp_path / "lake"
    assert _ingest(lake, str(_log(tmp_path / "first.log", [13] * 7, "first"))).returncode == 0
    logs = [_log(tmp_path / f"{tag}.log", days, tag)
            for tag, days in (("a", [14] * 300 + [15] * 300), ("b", [15] * 250 + [16] * 250))]
    procs = [_held_open(lake, log) for log in logs]
    try:
        deadline = time.monotonic() + 120
        while _parts_anywhere(lake) < 1 + 2 + 2:  # both runs' parts written
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.05)
        assert _seen(lake) == (7, 7, 7)
        errs = []
        for proc in procs:
            assert proc.stdin is not None and proc.stderr is not None
            proc.stdin.close()
        for proc in procs:
            assert proc.stderr is not None
            errs.append(proc.stderr.read().decode())
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            assert proc.stderr is not None
            proc.stderr.close()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert _seen(lake) == (1107, 1107, 1107)
    table = read_lake(lake)
    paths = table.column("path").to_pylist()
    assert len(set(paths)) == len(paths)
    for part in (lake / "records").rglob("*"):  # nothing in the records but whole parts
        assert part.is_dir() or pq.read_metadata(part).num_rows > 0, part
    noted = [json.loads(line)["path"]
             for line in (lake / "_ingested.jsonl").read_text().splitlines()]
    assert sorted(noted) == sorted([str(tmp_path / "first.log"), *map(str, logs)])
    assert not list(lake.glob(".*"))


def test_a_commit_cut_short_is_finished_by_the_next_ingest(tmp_path: Path) -> None:
    """A run killed among the moves of its commit (after writing their list, ``commit.json``,
    with the first part moved into place) is neither half in the lake nor dropped: the next
    ingest finishes the moves and notes its input."""
    lake = tmp_path / "lake"
    log = _log(tmp_path / "day.log", [14] * 200 + [15] * 100, "day")
    _kill_when_written(lake, log, 2)
    [staging] = lake.glob(".ingest-*")
    staged = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("part-*.parquet"))
    assert len(staged) == 2
    ingest = staged[0].split("part-", 1)[1].rsplit("-", 1)[0]
    line = json.dumps({"path": str(log), "size": log.stat().st_size, "sha256": "0" * 64,
                       "ingest": ingest}) + "\n"
    (staging / "commit.json").write_text(json.dumps({"parts": staged, "ingested": [line]}))
    (lake / staged[0]).parent.mkdir(parents=True)
    os.replace(staging / staged[0], lake / staged[0])
    assert read_lake(lake).num_rows == 200  # half a run in: what the next ingest must finish

    other = _log(tmp_path / "other.log", [16] * 10, "other")
    assert _ingest(lake, str(other)).returncode == 0
    assert _seen(lake) == (310, 310, 310)
    assert not list(lake.glob(".*"))
    noted = [json.loads(x)["path"] for x in (lake / "_ingested.jsonl").read_text().splitlines()]
    assert sorted(noted) == sorted([str(log), str(other)])


#: Installed in an ingest (``sitecustomize``): at a point of its run (``HOLD_AT``: "noting",
#: just after its commit appended its entries to ``_ingested.jsonl``; "moving", just after it
#: moved its first part into ``records/``; "locking", when its new staging directory's lock
#: file is about to get its name), it says so (``HOLD_FLAG``) and waits for the test's signal.
_HOLD_IN_COMMIT = '''
import os, time

_open, _write, _replace = os.open, os.write, os.replace
_appending = set()
_at = os.environ["HOLD_AT"]


def _hold():
    open(os.environ["HOLD_FLAG"], "w").close()
    while True:
        time.sleep(60)


def _opened(path, flags, *args, **kwargs):
    fd = _open(path, flags, *args, **kwargs)
    if os.fspath(path).endswith("_ingested.jsonl") and flags & os.O_APPEND:
        _appending.add(fd)
    return fd


def _written(fd, data):
    n = _write(fd, data)
    if fd in _appending and _at == "noting":
        _hold()
    return n


def _replaced(src, dst, *args, **kwargs):
    if _at == "locking" and os.fspath(src).endswith(".lock.tmp"):
        _hold()
    _replace(src, dst, *args, **kwargs)
    dst = os.fspath(dst)
    if _at == "moving" and f"{os.sep}records{os.sep}" in dst \
            and os.path.basename(dst).startswith("part-"):
        _hold()


os.open, os.write, os.replace = _opened, _written, _replaced
'''


def _stopped_in_commit(tmp_path: Path, lake: Path, log: Path, at: str, sig: int) -> str:
    """Ingest ``log``, hold it where ``at`` says (see :data:`_HOLD_IN_COMMIT`), send it
    ``sig``; its stderr (it exits as the signal says)."""
    from conftest import signal_when

    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_HOLD_IN_COMMIT)
    flag = tmp_path / f"held-{at}"
    env = {**ENV, "HOLD_AT": at, "HOLD_FLAG": str(flag),
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [ENV.get("PYTHONPATH")])])}
    proc = subprocess.Popen([EXE, "ingest", "--format", "access", "--lake", str(lake),
                             str(log)], stderr=subprocess.PIPE, env=env)
    try:
        signal_when(proc, flag.exists, sig, within=60)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}.get(sig, -sig), err
    return err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_once_the_inputs_are_noted_keeps_the_run(tmp_path: Path, sig: int) -> None:
    """A Ctrl-C or SIGTERM landing just after the commit noted its input in _ingested.jsonl
    rolled the records back but left the entry: the lake said the file was ingested while
    none of its records were in it, and ingesting it again warned of a repeat that was not
    there. Noting the inputs is the commit's point of no return: the run is kept whole."""
    lake = tmp_path / "lake"
    assert _ingest(lake, str(_log(tmp_path / "first.log", [13] * 5, "first"))).returncode == 0
    log = _log(tmp_path / "day.log", [14] * 200 + [15] * 100, "day")
    err = _stopped_in_commit(tmp_path, lake, log, "noting", sig)
    assert "300 records are in" in err and "nothing from this run was kept" not in err, err
    assert _seen(lake) == (305, 305, 305)  # the run is in whole, as _ingested.jsonl says
    noted = [json.loads(x)["path"] for x in (lake / "_ingested.jsonl").read_text().splitlines()]
    assert noted == [str(tmp_path / "first.log"), str(log)]
    assert not list(lake.glob(".*"))  # its staging directory was cleared all the same

    again = _ingest(lake, str(log))  # the warning is true: the records are there
    assert again.returncode == 0 and again.stdout == b"", again.stderr.decode()
    assert b"already ingested" in again.stderr


def test_a_stop_just_after_a_part_is_moved_removes_that_part_too(tmp_path: Path) -> None:
    """A Ctrl-C landing just after a part was moved into records/, before the commit had
    listed it as moved, left that part in the lake (half the run, taken for data by every
    reader) while the run said nothing of it was kept, and ingesting it again stored that
    half twice."""
    lake = tmp_path / "lake"
    assert _ingest(lake, str(_log(tmp_path / "first.log", [13] * 5, "first"))).returncode == 0
    log = _log(tmp_path / "day.log", [14] * 200 + [15] * 100, "day")
    err = _stopped_in_commit(tmp_path, lake, log, "moving", signal.SIGINT)
    assert "nothing from this run was kept" in err, err
    assert _seen(lake) == (5, 5, 5)
    assert not list(lake.glob(".*"))
    # the day folder the move made stays (another ingest may be moving a part into it), but
    # holds no records: it is no day of the lake's
    assert (lake / "records" / "day=2024-05-14").is_dir()
    assert lake_days(lake) == ["2024-05-13"]
    again = _ingest(lake, str(log))
    assert again.returncode == 0 and b"already ingested" not in again.stderr
    assert _seen(lake) == (305, 305, 305)


def test_a_staging_directory_killed_before_its_lock_is_removed_once_old(tmp_path: Path) -> None:
    """An ingest killed outright while making its staging directory, before the lock file had
    its name, left a directory no later ingest would ever remove (one without a lock file was
    taken to be in the making by a running ingest, however old)."""
    lake = tmp_path / "lake"
    assert _ingest(lake, str(_log(tmp_path / "first.log", [13] * 5, "first"))).returncode == 0
    log = _log(tmp_path / "day.log", [14] * 20, "day")
    _stopped_in_commit(tmp_path, lake, log, "locking", signal.SIGKILL)
    [left] = lake.glob(".ingest-*")
    assert not (left / "lock").exists()
    other = _log(tmp_path / "other.log", [15] * 3, "other")
    assert _ingest(lake, str(other)).returncode == 0
    assert left.exists()  # young: it may be a running ingest's, about to be locked
    old = time.time() - 2 * STALE_TMP_S
    os.utime(left, (old, old))  # as it is an hour or more later
    assert _ingest(lake, str(other)).returncode == 0
    assert not list(lake.glob(".*"))
    assert _seen(lake) == (11, 11, 11)
