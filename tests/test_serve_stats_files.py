"""The temporary files behind ``serve --workers`` workers' ``stats/PID.json``: unique to each
write (a worker's stats thread and its last words may write at once), and those of a worker
killed before its rename removed by the parent, never counted by ``/v1/stats``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_healthy
from test_serve_stats_retired import NOW, _raw, _totals, _write

from deepwatch.serve import _workers
from deepwatch.serve._workers import RELOAD, RETIRED, WorkerGroup, retire_gone_stats


def test_a_gone_workers_temporary_files_are_removed_and_never_counted(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    stats.mkdir()
    gone, live = _raw(NOW - 50, 3), _raw(NOW - 40, 7)
    _write(stats, 101, gone)
    _write(stats, 102, live)
    # killed before its rename: 101 mid-write, 105 in its very first write (no 105.json)
    half = stats / ".101.json.101-0123abcd.tmp"
    half.write_text(json.dumps(gone)[:25])
    first = stats / ".105.json.105-4567cdef.tmp"
    first.write_text(json.dumps(_raw(NOW - 10, 100)))
    writing = stats / ".102.json.102-89abcdef.tmp"  # a live worker's, about to be renamed
    writing.write_text(json.dumps(_raw(NOW - 40, 1000)))
    group = WorkerGroup(tmp_path)
    assert _totals(group)["requests"] == 10

    assert retire_gone_stats(stats, {102}, now=NOW) == [101]
    assert sorted(f.name for f in stats.iterdir()) == [writing.name, "102.json", RETIRED]
    assert _totals(group)["requests"] == 10

    # nothing to fold: the temporary files of gone workers are removed all the same
    first.write_text("{")
    assert retire_gone_stats(stats, {102}, now=NOW + 1) == []
    assert not first.exists() and writing.exists()
    assert _totals(group)["requests"] == 10


def test_two_writers_of_one_file_in_one_process_use_two_temporary_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's stats thread and its last words at shutdown publish the same ``PID.json``.
    With one temporary name between them the first rename took the other's file (perhaps
    half-written) and the second failed: the last words were lost."""
    stats = tmp_path / "stats"
    stats.mkdir()
    group = WorkerGroup(tmp_path)
    real_replace = os.replace
    both_written = threading.Barrier(2, timeout=10)
    renamed: list[str] = []

    def replace_together(src: Any, dst: Any) -> None:  # each renames once both have written
        both_written.wait()
        renamed.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_together)
    raws = [_raw(NOW, 1), _raw(NOW, 2)]
    errors: list[BaseException] = []

    def publish(raw: dict[str, Any]) -> None:
        try:
            group.publish_stats(raw)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(raw,)) for raw in raws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []
    assert len(set(renamed)) == 2
    # each names its process, for the parent's sweep
    writers = [found[1] for name in renamed if (found := _workers._TMP_NAME.match(name))]
    assert writers == [str(os.getpid())] * 2
    assert json.loads((stats / f"{os.getpid()}.json").read_text()) in raws
    assert [f.name for f in stats.iterdir()] == [f"{os.getpid()}.json"]


#: Loaded by every Python process started with it on PYTHONPATH. Once $HOLD_ARM exists, the
#: first worker's stats thread to publish stops between writing its temporary file and
#: renaming it, and says which it is in $HOLD_PID: the test kills the worker there.
HOLD_A_STATS_WRITE = '''
import os, threading, time

_replace = os.replace


def _held(src, dst, *args, **kwargs):
    if (threading.current_thread().name == "deepwatch-stats"
            and os.path.exists(os.environ["HOLD_ARM"])):
        try:
            os.close(os.open(os.environ["HOLD_ARM"] + ".taken", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass  # another worker's write: it goes on
        else:
            with open(os.environ["HOLD_PID"] + ".part", "w") as f:
                f.write(f"{os.getpid()} {src}")
            _replace(os.environ["HOLD_PID"] + ".part", os.environ["HOLD_PID"])
            while True:
                time.sleep(60)
    return _replace(src, dst, *args, **kwargs)


os.replace = _held
'''


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds workers in /proc")
def test_a_worker_killed_mid_write_leaves_no_temporary_file_and_its_counts_stay(
        kdd_bundle: Path, small_kdd: Path, tmp_path: Path) -> None:
    """SIGKILL between a worker's stats write and its rename used to leave its hidden temporary
    file in ``stats/`` for good; the parent removes it once the worker is gone."""
    from test_serve_workers import _get, _kill, _score_and_wait_for_stats, _start, _state_of
    from test_workers_reload import _workers_of

    records = small_kdd.read_text().splitlines()[:6]
    sent = 3
    (tmp_path / "sitecustomize.py").write_text(HOLD_A_STATS_WRITE)
    arm, held = tmp_path / "arm", tmp_path / "held"
    env = {**os.environ, "HOLD_ARM": str(arm), "HOLD_PID": str(held),
           "PYTHONPATH": os.pathsep.join(
               [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = tmp_path / "serve.log"
    proc, url = _start(kdd_bundle, log, env)
    try:
        wait_healthy(url, proc)
        state, workers = _state_of(proc, url)
        # a worker killed writing a reload request (a pid that has ended) leaves this behind
        ended = subprocess.Popen(["true"])
        ended.wait()
        reload_tmp = state / f".{RELOAD}.{ended.pid}-0123abcd.tmp"
        reload_tmp.write_text('{"bundle": "/nowhere"}')
        before = _score_and_wait_for_stats(url, records, sent)

        arm.touch()
        deadline = time.monotonic() + 10
        while not held.exists():
            assert time.monotonic() < deadline, "no stats write was held"
            time.sleep(0.1)
        pid_text, tmp_text = held.read_text().split(" ", 1)
        pid, tmp = int(pid_text), Path(tmp_text)
        assert pid in workers and tmp.parent == state / "stats" and tmp.exists()
        assert _get(url, "/v1/stats").json()["totals"] == before["totals"]  # not counted
        os.kill(pid, signal.SIGKILL)

        deadline = time.monotonic() + 15
        while True:  # uvicorn starts a new worker, then the parent sweeps the stats
            live = _workers_of(proc.pid)
            if (len(live) == 2 and pid not in live and not tmp.exists()
                    and not reload_tmp.exists()):
                break
            assert time.monotonic() < deadline, (
                f"live workers {live}, stats/: {sorted(os.listdir(tmp.parent))}, "
                f"state: {sorted(os.listdir(state))}")
            time.sleep(0.2)
        for _ in range(4):  # whichever worker answers
            assert _get(url, "/v1/stats").json()["totals"] == before["totals"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in log.read_text()
    except BaseException as exc:
        _kill(proc)
        raise AssertionError(f"{exc!r}\nserver log:\n{log.read_text()[-4000:]}") from exc
    finally:
        _kill(proc)
