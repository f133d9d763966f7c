"""``stream --follow --position-file``: a followed log is read on, after a restart, from where
the worker before left it. Without it a restarted worker (systemd restart, upgrade, crash) read
the whole file again: every old line scored again, every old alert raised again."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from deepwatch.cli import main


def _records(path: Path, n: int, skip: int = 0) -> list[bytes]:
    return path.read_bytes().split(b"\n")[skip : skip + n]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _source_lines(path: Path) -> list[int]:
    return [x["deepwatch"]["source"]["line"] for x in _lines(path)]


class Worker:
    """A real ``deepwatch stream BUNDLE --follow LOG --position-file POS`` process."""

    def __init__(self, bundle: Path, tmp: Path, log: Path, *extra: str):
        self.tmp = tmp
        self.err = (tmp / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepwatch.cli", "stream", str(bundle), "--format", "kdd",
             str(log), "--follow", "--position-file", str(tmp / "pos.json"),
             "--out", str(tmp / "alerts.jsonl"), "--verdicts", str(tmp / "verdicts.jsonl"),
             "--rejects", str(tmp / "rejects.jsonl"), *extra],
            stdout=subprocess.DEVNULL, stderr=self.err, cwd=ROOT)

    def stop_when(self, line: int, within: float = 60) -> str:
        """SIGTERM once the position kept is before line ``line`` (the lines before it scored
        and written: it is kept after the outputs are flushed); its stderr, after exit 0."""
        deadline = time.monotonic() + within
        while _kept(self.tmp / "pos.json") != line:
            assert self.proc.poll() is None, (self.tmp / "stderr.log").read_text()
            assert time.monotonic() < deadline, "not scored in time"
            time.sleep(0.05)
        time.sleep(0.3)  # (more than it should score would be written meanwhile)
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.err.close()
        err = (self.tmp / "stderr.log").read_text()
        assert rc == 0, err
        return err


def _kept(pos: Path) -> int | None:
    """The line the position in ``pos`` is before (None: no position yet)."""
    return json.loads(pos.read_bytes())["line"] if pos.exists() else None


def _messages(err: str) -> list[str]:
    return [json.loads(x)["message"] for x in err.splitlines() if x.startswith("{")]


def test_a_restart_reads_on_from_the_position(kdd_bundle: Path, small_kdd_test: Path,
                                              tmp_path: Path) -> None:
    """Stopped, the log grown meanwhile, started again: only the new lines are scored, their
    numbers going on (in the verdicts and in the rejects), the outputs appended to. A line
    without its line break at the stop is a reject then, and is read again, whole, after it."""
    recs = _records(small_kdd_test, 160)
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(recs[:100]) + b"\ngarbage one\n" + recs[100][:30])
    first = Worker(kdd_bundle, tmp_path, log)
    err = first.stop_when(102)
    assert "resum" not in err and "from its start" not in err  # (no position yet: no word)
    pos_file = tmp_path / "pos.json"
    assert stat.S_IMODE(pos_file.stat().st_mode) == 0o600
    pos = json.loads(pos_file.read_text())
    st = log.stat()
    # the unfinished line 102 is not in it: it is read again
    assert (pos["version"], pos["device"], pos["inode"], pos["offset"], pos["line"]) == (
        1, st.st_dev, st.st_ino, log.read_bytes().rindex(b"\n") + 1, 102)
    assert pos["head_bytes"] == 64 and len(pos["head_sha256"]) == 64
    alerts_before = (tmp_path / "alerts.jsonl").read_bytes()
    assert alerts_before  # (the kept alerts are checked below)
    with (tmp_path / "alerts.jsonl").open("ab") as fh:  # as a worker killed in a write leaves it
        fh.write(b'{"@timestamp": "2026-')

    with log.open("ab") as fh:  # the unfinished line finished, and 50 more, one of them junk
        fh.write(recs[100][30:] + b"\n" + b"\n".join(recs[101:150]) + b"\ngarbage two\n")
    second = Worker(kdd_bundle, tmp_path, log)
    err = second.stop_when(153)
    assert _source_lines(tmp_path / "verdicts.jsonl") == [*range(1, 101), *range(102, 152)]
    assert f"resuming {log} at line 102 (byte" in " ".join(_messages(err))
    assert (f"--out {tmp_path / 'alerts.jsonl'} ended in an unfinished line (21 bytes, from a "
            "run that was killed while it wrote): cut off") in " ".join(_messages(err))
    rejects = _lines(tmp_path / "rejects.jsonl")
    assert [r["deepwatch"]["source"]["line"] for r in rejects] == [101, 102, 152]
    assert [r["raw"] for r in rejects] == ["garbage one", recs[100][:30].decode(), "garbage two"]
    alerts = (tmp_path / "alerts.jsonl").read_bytes()
    assert alerts.startswith(alerts_before) and len(alerts) > len(alerts_before)
    assert all(x["deepwatch"]["source"]["line"] > 101 for x in _lines(tmp_path / "alerts.jsonl")
               [alerts_before.count(b"\n"):])
    pos = json.loads(pos_file.read_text())
    assert (pos["offset"], pos["line"]) == (log.stat().st_size, 153)


def test_another_file_or_a_truncated_one_is_read_from_its_start(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """The path names another file (rotated while the worker was down: a new inode), or the
    same one cut shorter than the position: read from its start, one log line saying why."""
    recs = _records(small_kdd_test, 60)
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(recs[:40]) + b"\n")
    Worker(kdd_bundle, tmp_path, log).stop_when(41)
    (tmp_path / "verdicts.jsonl").unlink()

    log.rename(tmp_path / "live.csv.1")  # logrotate's create: a new file in its place
    log.write_bytes(b"\n".join(recs[40:60]) + b"\n")
    err = Worker(kdd_bundle, tmp_path, log).stop_when(21)
    said = [m for m in _messages(err) if "from its start" in m]
    assert len(said) == 1 and "it is not the file the position was kept for" in said[0], err
    assert "rotated or replaced" in said[0]
    assert _source_lines(tmp_path / "verdicts.jsonl") == list(range(1, 21))
    assert json.loads((tmp_path / "pos.json").read_text())["inode"] == log.stat().st_ino
    (tmp_path / "verdicts.jsonl").unlink()

    os.truncate(log, 0)  # copytruncate while the worker was down, then fewer lines written
    with log.open("ab") as fh:
        fh.write(b"\n".join(recs[:5]) + b"\n")
    err = Worker(kdd_bundle, tmp_path, log).stop_when(6)
    said = [m for m in _messages(err) if "from its start" in m]
    assert len(said) == 1 and "it was truncated: it holds" in said[0], err
    assert _source_lines(tmp_path / "verdicts.jsonl") == list(range(1, 6))
    (tmp_path / "verdicts.jsonl").unlink()

    with log.open("r+b") as fh:  # cut and written again, past the position, while it was down
        fh.truncate(0)
        fh.write(b"\n".join(recs[10:20]) + b"\n")
    err = Worker(kdd_bundle, tmp_path, log).stop_when(11)
    said = [m for m in _messages(err) if "from its start" in m]
    assert len(said) == 1 and "its first bytes are not those of the file" in said[0], err
    assert _source_lines(tmp_path / "verdicts.jsonl") == list(range(1, 11))


def test_rotation_while_running_moves_the_position_to_the_new_file(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """Rotated while the worker runs: the rotated file's lines are scored as before (no
    position is kept in it), and the position follows the new file."""
    recs = _records(small_kdd_test, 50)
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(recs[:30]) + b"\n")
    worker = Worker(kdd_bundle, tmp_path, log)
    deadline = time.monotonic() + 60
    while _kept(tmp_path / "pos.json") != 31:
        assert time.monotonic() < deadline and worker.proc.poll() is None
        time.sleep(0.05)
    log.rename(tmp_path / "live.csv.1")
    log.write_bytes(b"\n".join(recs[30:50]) + b"\n")
    worker.stop_when(21)
    assert _source_lines(tmp_path / "verdicts.jsonl") == [*range(1, 31), *range(1, 21)]
    pos = json.loads((tmp_path / "pos.json").read_text())
    assert (pos["inode"], pos["offset"], pos["line"]) == (
        log.stat().st_ino, log.stat().st_size, 21)


def test_a_position_file_that_cannot_be_read_stops_the_start(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], json_stderr: None) -> None:
    """A damaged position file is one error line, exit 2, nothing read or written: reading
    the log again from its start would raise every old alert again. It is never evaluated or
    unpickled, only parsed as JSON."""
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(_records(small_kdd_test, 5)) + b"\n")
    pos = tmp_path / "pos.json"
    alerts = tmp_path / "alerts.jsonl"
    alerts.write_text("yesterday's alert\n")
    for text, says in [
        ("", "it is not JSON"),
        ("__import__('os').system('false')", "it is not JSON"),
        ('{"version": 1, "device": 1, "inode": 2, "offset": -1, "line": 1}',
         "its 'offset' is -1, not a whole number from 0"),
        ('{"version": 7}', "its version is 7, not 1"),
        ("[1, 2]", "it is not a JSON object"),
        ('{"version": 1, "device": 1, "inode": 2, "offset": 9, "line": 1, "head_bytes": 9, '
         '"head_sha256": "x"}', "its 'head_sha256' is 'x', not 64 hex digits"),
        ("{}" + " " * 5000, "it is over 4,096 bytes long"),
    ]:
        pos.write_text(text)
        rc = main(["stream", str(kdd_bundle), "--format", "kdd", str(log), "--follow",
                   "--position-file", str(pos), "--out", str(alerts)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert f"--position-file {pos} holds no position deepwatch can read: {says}" in err, err
        assert alerts.read_text() == "yesterday's alert\n" and pos.read_text() == text


@pytest.mark.parametrize("args, message", [
    (["{log}"], "--position-file keeps the place reached in a file read with --follow"),
    (["--follow", "-"], "--follow tails a file"),
    (["--follow", "{log}", "{log}"], "--follow tails exactly one file"),
    (["--brokers", "127.0.0.1:1", "--input-topic", "t", "--output-topic", "a"],
     "--position-file keeps the place in a followed file; with --brokers the consumer group"),
    (["--follow", "{log}", "--out", "{pos}"], "is the same file as --out"),
    (["--follow", "{fifo}"], "is not one (a named pipe or device cannot be read again)"),
    (["--follow", "{log}", "--position-file", "/dev/null"],
     "--position-file /dev/null is not a regular file"),
])
def test_the_option_is_refused_where_it_does_not_apply(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path, args: list[str], message: str,
        capsys: pytest.CaptureFixture[str], json_stderr: None) -> None:
    # (json_stderr: the worker's log set up in this process is put back after, as a later
    # in-process serve test would otherwise see its own warnings through it)
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(_records(small_kdd_test, 5)) + b"\n")
    fifo = tmp_path / "live.fifo"
    os.mkfifo(fifo)
    pos = tmp_path / "pos.json"
    given = [a.format(log=log, pos=pos, fifo=fifo) for a in args]
    if "--position-file" not in given:
        given += ["--position-file", str(pos)]
    rc = main(["stream", str(kdd_bundle), "--format", "kdd", *given])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not pos.exists()


def test_a_position_that_cannot_be_written_does_not_stop_the_scoring(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """The position file cannot be replaced for a while (here a directory is in its place):
    one warning, the lines are scored on, and the position is kept again once it can be."""
    recs = _records(small_kdd_test, 30)
    log = tmp_path / "live.csv"
    log.write_bytes(b"\n".join(recs[:10]) + b"\n")
    pos = tmp_path / "pos.json"
    worker = Worker(kdd_bundle, tmp_path, log)
    deadline = time.monotonic() + 60
    while _kept(pos) != 11:
        assert time.monotonic() < deadline and worker.proc.poll() is None
        time.sleep(0.05)
    pos.unlink()
    pos.mkdir()
    for n in (20, 30):
        with log.open("ab") as fh:
            fh.write(b"\n".join(recs[n - 10 : n]) + b"\n")
        while len(_lines(tmp_path / "verdicts.jsonl")) < n:
            assert time.monotonic() < deadline and worker.proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.2)
        if n == 20:
            pos.rmdir()
    err = worker.stop_when(31)
    said = [m for m in _messages(err) if "position-file" in m]
    assert said == [f"cannot write --position-file {pos}: Is a directory; a restart would read "
                    "again from the last position written",
                    f"--position-file {pos} is written again"], err
    assert _source_lines(tmp_path / "verdicts.jsonl") == list(range(1, 31))
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


def test_every_batch_of_a_chunk_ends_at_its_own_position(tmp_path: Path) -> None:
    """A chunk cut into batches (``--batch-size``): each batch, once committed, keeps the place
    just past its own last line, so that a worker killed between two of them reads on from
    there, not from the chunk's start or past lines it never wrote."""
    import threading

    from deepwatch.serve._stream_io import FileSource

    log = tmp_path / "live.log"
    data = b"".join(b"line %d %s\n" % (i, b"x" * (i % 13)) for i in range(1, 51))
    log.write_bytes(data)
    pos = tmp_path / "pos.json"
    stop = threading.Event()
    source = FileSource([str(log)], follow=True, batch_size=7, position_file=str(pos))
    kept = []
    for batch in source.batches(stop):
        source.commit(batch)
        kept.append(json.loads(pos.read_text()))
        if kept[-1]["line"] == 51:
            stop.set()
    assert [k["line"] for k in kept] == [*range(8, 51, 7), 51]
    for k in kept:  # just past the line before it
        assert data[: k["offset"]].count(b"\n") == k["line"] - 1
        assert data[k["offset"] - 1 : k["offset"]] == b"\n"
