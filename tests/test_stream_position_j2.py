"""``stream --follow --position-file`` as an operator runs it: two workers given one position
file, and a log rotated while the worker was stopped (found by a review with real runs)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT
from test_follow_position_h2 import Worker, _kept, _messages, _records, _source_lines

from deepwatch.serve._stream_core import RawBatch
from deepwatch.serve._stream_io import FileSource


def _first_worker(bundle: Path, source: Path, tmp_path: Path, name: str, other_name: str
                  ) -> tuple[Path, Path, Worker]:
    """A log of 20 records and another of 10; a worker following the first, once it has kept
    its position past them (tmp_path/pos.json)."""
    recs = _records(source, 30)
    log, other = tmp_path / name, tmp_path / other_name
    log.write_bytes(b"\n".join(recs[:20]) + b"\n")
    other.write_bytes(b"\n".join(recs[20:30]) + b"\n")
    first = Worker(bundle, tmp_path, log)
    deadline = time.monotonic() + 60
    while _kept(tmp_path / "pos.json") != 21:
        assert first.proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return log, other, first


def test_a_second_worker_with_the_same_position_file_is_refused(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """Two workers given one position file (a unit copied for a second log) each overwrote the
    other's position, so that a restart found the other log named in it and read its own from
    the start, every old alert raised again. The second is refused before it reads or writes
    anything; the first goes on, and a restart after it takes the lock over."""
    log, other, first = _first_worker(kdd_bundle, small_kdd_test, tmp_path, "a.csv", "b.csv")
    pos = tmp_path / "pos.json"
    kept = pos.read_bytes()
    second = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
         str(other), "--follow", "--position-file", str(pos), "--out",
         str(tmp_path / "b-alerts.jsonl"), "--verdicts", str(tmp_path / "b-verdicts.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    # (run on, it kept its own place in the first's position file)
    err = _ended(second, first, lambda: json.loads(pos.read_bytes())["path"] == str(other),
                 "a second worker given the same --position-file was not refused")
    assert second.returncode == 2 and "Traceback" not in err, err
    assert (f"error: --position-file {pos} is being used by another run (pid "
            f"{first.proc.pid}): two workers must not keep their places in one file") in err
    assert not (tmp_path / "b-alerts.jsonl").exists()
    assert not (tmp_path / "b-verdicts.jsonl").exists()
    first.stop_when(21)
    assert pos.read_bytes() == kept  # (the first's, untouched by the second)
    with log.open("ab") as fh:
        fh.write(b"\n".join(_records(small_kdd_test, 30)[20:25]) + b"\n")
    err = Worker(kdd_bundle, tmp_path, log).stop_when(26)  # the lock let go with the first
    assert f"resuming {log} at line 21" in " ".join(_messages(err))
    assert _source_lines(tmp_path / "verdicts.jsonl") == list(range(1, 26))


def test_lines_written_before_a_rotation_while_stopped_are_read(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """Stopped at line 31, 20 lines written, then the log rotated (renamed to live.csv.1, a new
    live.csv) before the worker started again: those 20 lines were never scored (the new file
    was read from its start; an info line said it was rotated). They are read first now, from
    the rotated file found beside the path by its identity, numbered on from the position."""
    recs = _records(small_kdd_test, 60)
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(recs[:30]) + b"\n")
    Worker(kdd_bundle, tmp_path, log).stop_when(31)
    with log.open("ab") as fh:
        fh.write(b"\n".join(recs[30:50]) + b"\n")
    log.rename(tmp_path / "live.csv.1")
    log.write_bytes(b"\n".join(recs[50:60]) + b"\n")
    err = Worker(kdd_bundle, tmp_path, log).stop_when(11)
    assert _source_lines(tmp_path / "verdicts.jsonl") == [*range(1, 51), *range(1, 11)]
    said = [m for m in _messages(err) if "from its start" in m]
    assert len(said) == 1 and "rotated or replaced; the lines written to that file after the " \
        f"position are read first, from {tmp_path / 'live.csv.1'} at line 31 (byte " in said[0]
    pos = json.loads((tmp_path / "pos.json").read_text())
    assert (pos["inode"], pos["line"]) == (log.stat().st_ino, 11)


def _ended(second: subprocess.Popen[str], first: Worker, went_on: Callable[[], bool],
           failure: str, shown: Callable[[], str] = lambda: "") -> str:
    """The stderr of ``second`` once it has exited; the test fails (both workers killed) where
    ``went_on`` shows it running on, or it is still running 30 s on."""
    deadline = time.monotonic() + 30
    while second.poll() is None:
        if went_on() or time.monotonic() > deadline:
            detail = shown()
            second.kill()
            second.communicate()
            first.proc.kill()
            pytest.fail(failure + detail)
        time.sleep(0.05)
    return str(second.communicate()[1])


def read_batches(source: FileSource, lines: int) -> list[RawBatch]:
    """The batches ``source`` hands out, each committed, until they hold at least ``lines``
    lines (then it is stopped: the batches of the chunk in hand still come), or for at most
    5 s."""
    stop = threading.Event()
    batches: list[RawBatch] = []
    timer = threading.Timer(5, stop.set)
    timer.start()
    try:
        for batch in source.batches(stop):
            batches.append(batch)
            source.commit(batch)
            if sum(b.count for b in batches) >= lines:
                stop.set()
    finally:
        timer.cancel()
        source.close()
    return batches


def _read(source: FileSource, lines: int) -> list[int]:
    """The line numbers of :func:`read_batches`."""
    return [n for b in read_batches(source, lines) for n in b.origin["line"].to_list()]


def test_a_stop_while_the_rotated_file_is_read_keeps_the_place_in_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The rest of a file rotated while stopped is read at positions in it: a worker stopped
    (or killed) while it reads a long rest reads on from there, not the whole rest again, and
    skips none of it for the new file. A rotated file that is gone (compressed) is a warning
    that says from which line lines may be lost."""
    log = tmp_path / "live.log"
    pos = tmp_path / "pos.json"
    log.write_bytes(b"".join(b"old %d\n" % i for i in range(1, 11)))

    def source() -> FileSource:
        return FileSource([str(log)], follow=True, chunk_bytes=64, batch_size=3,
                          position_file=str(pos))

    assert _read(source(), 10) == list(range(1, 11))
    with log.open("ab") as fh:
        fh.write(b"".join(b"old %d\n" % i for i in range(11, 41)))
    rotated = tmp_path / "live.log.1"
    log.rename(rotated)
    log.write_bytes(b"".join(b"new %d\n" % i for i in range(1, 6)))
    first = _read(source(), 6)
    assert first[0] == 11 and 6 <= len(first) < 30
    kept = json.loads(pos.read_text())
    assert (kept["inode"], kept["line"]) == (rotated.stat().st_ino, first[-1] + 1)
    assert rotated.read_bytes()[: kept["offset"]].endswith(b"old %d\n" % first[-1])
    rest = 40 - first[-1] + 5
    assert _read(source(), rest) == [*range(first[-1] + 1, 41), *range(1, 6)]

    with log.open("ab") as fh:  # 3 more, then rotated and compressed while stopped
        fh.write(b"new 6\nnew 7\nnew 8\n")
    os.replace(log, rotated)
    rotated.unlink()
    log.write_bytes(b"newer 1\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepwatch.sources.follow"):
        assert _read(source(), 1) == [1]
    said = [r for r in caplog.records if "from its start" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert ("and that file is no longer beside it (compressed, moved or removed): lines "
            "written to it after line 5 (byte 30), if any, are not scored") in said[0].getMessage()


def test_a_second_worker_writing_the_same_output_is_refused(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """A second worker given an output the first writes (a test run by hand beside the
    service) truncated it and wrote over it: the first's verdicts became a run of NUL bytes and
    the second's lines, and both exited 0. It is refused as score refuses it, exit 2."""
    log, other, first = _first_worker(kdd_bundle, small_kdd_test, tmp_path, "live.csv",
                                      "other.csv")
    verdicts = tmp_path / "verdicts.jsonl"
    written = verdicts.read_bytes()
    second = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
         str(other), "--follow", "--out", str(tmp_path / "b-alerts.jsonl"),
         "--verdicts", str(verdicts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    err = _ended(second, first, lambda: not verdicts.read_bytes().startswith(written),
                 "a second worker given the same --verdicts was not refused",
                 lambda: f": {verdicts.read_bytes()[:80]!r}")
    assert second.returncode == 2 and "Traceback" not in err, err
    assert (f"error: --verdicts {verdicts} is being written by another run (pid "
            f"{first.proc.pid}); wait for it to end or give another path") in err
    assert not (tmp_path / "b-alerts.jsonl").exists()
    first.stop_when(21)
    assert _source_lines(verdicts) == list(range(1, 21))
