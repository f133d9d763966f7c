"""Named pipes (FIFOs) given as paths, with real processes and real signals.

``open`` of a FIFO blocks until a writer opens it, in a system call that a signal does not end
(Python retries it once its handler has run): ``stream ... FIFO``, whose handler only asks the
run to stop, waited for ever on SIGTERM or Ctrl-C while nobody wrote to the FIFO. The reader now
waits for the writer in ``select``, so these also check that score still stops as it should
there and that a FIFO is still read whole once its writer comes.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, signal_when

from deepwatch.sources.files import STOP_CUT, InputSpec, iter_chunks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="Linux FIFO semantics, and /proc to see the wait")

QUIET = {**os.environ, "DEEPWATCH_PROGRESS": "0"}
#: how long a stop may take once the signal is sent (a wait wakes every 0.2 s)
PROMPT = 5.0


@pytest.fixture(scope="module")
def records(small_kdd_test: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("fifo") / "records.csv"
    p.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:400]))
    return p


def _waits_on(proc: subprocess.Popen[bytes], fifo: Path) -> Callable[[], bool]:
    """Whether ``proc`` is waiting for ``fifo``'s writer: blocked opening it (the kernel's
    wait for a FIFO's partner, as ``/proc/PID/wchan`` names it), or holding it open."""
    def waiting() -> bool:
        try:
            if Path(f"/proc/{proc.pid}/wchan").read_text() in ("wait_for_partner", "fifo_open"):
                return True
            fds = Path(f"/proc/{proc.pid}/fd")
            return any(os.readlink(fd) == str(fifo) for fd in fds.iterdir())
        except OSError:  # (a descriptor closed while it was looked at)
            return False
    return waiting


def _until(proc: subprocess.Popen[bytes], ready: Callable[[], bool], within: float = 120) -> None:
    """Wait until ``ready()`` holds, ``proc`` still running."""
    deadline = time.monotonic() + within
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)


def _unread(fd: int) -> int:
    """The bytes in the pipe of ``fd`` (its writing end) that its reader has not read yet."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


@contextmanager
def _deepwatch(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch", *args], cwd=ROOT, env=QUIET,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def _stop(proc: subprocess.Popen[bytes], ready: Callable[[], bool], sig: int,
          then: int | None = None) -> str:
    """Send ``sig`` once ``ready()`` holds, and ``then`` right after it (a user pressing Ctrl-C
    on a stop under way: both pending together); check that ``proc`` ended within PROMPT seconds
    of it. Its stderr."""
    sent = 0.0

    def when() -> bool:
        nonlocal sent
        sent = time.monotonic()
        if not ready():
            return False
        if then is not None:
            proc.send_signal(sig)  # (signal_when sends ``then`` at once after it)
        return True

    signal_when(proc, when, sig if then is None else then, within=120)
    assert time.monotonic() - sent < PROMPT
    assert proc.stderr is not None
    return proc.stderr.read().decode()


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_score_waiting_for_a_named_pipes_writer_stops_on_a_signal(
        kdd_bundle: Path, records: Path, tmp_path: Path, sig: signal.Signals, code: int,
        word: str) -> None:
    """``score MODEL FILE FIFO``, nobody writing to the FIFO: the file's rows are kept, the one
    line says so, and the exit status is the signal's (Ctrl-C used to wait for ever)."""
    fifo, out = tmp_path / "live", tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    with _deepwatch("score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                    str(records), str(fifo)) as proc:
        err = _stop(proc, _waits_on(proc, fifo), sig)
        assert proc.returncode == code, err
    rows = out.read_text().splitlines()
    assert len(rows) == 400, err
    assert err.strip() == (f"{word}: the 400 rows scored before it are kept in {out}, which is "
                           "incomplete"), err


@pytest.mark.parametrize(("sig", "follow"), [(signal.SIGTERM, False), (signal.SIGINT, False),
                                             (signal.SIGTERM, True)])
def test_stream_waiting_for_a_named_pipes_writer_stops_on_a_signal(
        kdd_bundle: Path, tmp_path: Path, sig: signal.Signals, follow: bool) -> None:
    """``stream MODEL FIFO`` (``--follow`` too) logged "stopping after the batch in hand" and
    then waited for the FIFO's writer for ever. Now it stops as on stdin: exit 0, nothing
    scored."""
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    with _deepwatch("stream", str(kdd_bundle), "--format", "kdd", "--out",
                    str(tmp_path / "alerts.jsonl"), *(["--follow"] if follow else []),
                    str(fifo)) as proc:
        err = _stop(proc, _waits_on(proc, fifo), sig)
        assert proc.returncode == 0, err
    logs = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert [x["signal"] for x in logs if x.get("event") == "signal"] == [sig.name]
    stop = [x for x in logs if x.get("event") == "stop"]
    assert len(stop) == 1 and (stop[0]["scored"], stop[0]["rejected"]) == (0, 0), err


def test_stream_of_a_compressed_named_pipe_whose_writer_is_idle_stops_on_sigterm(
        kdd_bundle: Path, records: Path, tmp_path: Path) -> None:
    """A ``.gz`` FIFO is copied aside before it is decompressed: the copy waited in ``read``
    while the writer kept the pipe open and idle, and SIGTERM did not end it. Now the stream
    stops, every record of the gzip members that arrived whole is scored, and the stop line says
    how much text of the member the stop cut short was read but not scored (it could not be
    verified, its CRC still to come). Before, the first 4 MiB of text were scored, the cut
    member's unverified text among them, the rest was dropped, and nothing was said."""
    fifo, verdicts = tmp_path / "live.gz", tmp_path / "verdicts.jsonl"
    os.mkfifo(fifo)
    text = records.read_bytes()
    whole = gzip.compress(text * 85)  # 34,000 records, over 4 MiB of text: several chunks
    cut = gzip.compress(text)
    cut = cut[: len(cut) // 2]
    dec = zlib.decompressobj(wbits=31)
    unverified = dec.decompress(cut) + dec.flush()  # what zlib gives of the half member
    assert 0 < len(unverified) < len(text)
    lines = unverified.count(b"\n") + (not unverified.endswith(b"\n"))
    with _deepwatch("stream", str(kdd_bundle), "--format", "kdd", "--out",
                    str(tmp_path / "alerts.jsonl"), "--verdicts", str(verdicts),
                    str(fifo)) as proc:
        _until(proc, _waits_on(proc, fifo))
        writer = os.open(fifo, os.O_WRONLY)
        try:
            os.write(writer, whole + cut)
            err = _stop(proc, lambda: _unread(writer) == 0, signal.SIGTERM)
        finally:
            os.close(writer)
        assert proc.returncode == 0, err
    logs = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert [x["signal"] for x in logs if x.get("event") == "signal"] == ["SIGTERM"]
    (stop,) = [x for x in logs if x.get("event") == "stop"]
    assert (stop["records"], stop["scored"] + stop["rejected"]) == (34_000, 34_000), err
    assert len(verdicts.read_text().splitlines()) == stop["scored"]
    assert (stop["unscored_lines"], stop["unscored_bytes"]) == (lines, len(unverified)), err
    assert stop["log.level"] == "warning"
    assert stop["message"].endswith(
        f"; terminated: {fifo} was cut at the stop: {len(unverified):,} bytes decompressed from "
        f"its last gzip member (lines 34,001-{34_000 + lines:,}) were read but not scored, "
        "since they could not be verified (the checksum comes at the end)"), err


def test_stream_of_a_named_pipe_scores_all_it_read_on_sigterm(
        kdd_bundle: Path, records: Path, tmp_path: Path) -> None:
    """What was read of a FIFO cannot be read again: on SIGTERM every line read is a record, a
    last one without its line break included (a reject here), as on stdin. It was dropped
    unsaid: the stream stopped after the chunk in hand, as for a file that keeps the rest."""
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    with _deepwatch("stream", str(kdd_bundle), "--format", "kdd", "--out",
                    str(tmp_path / "alerts.jsonl"), str(fifo)) as proc:
        _until(proc, _waits_on(proc, fifo))
        writer = os.open(fifo, os.O_WRONLY)
        try:
            os.write(writer, records.read_bytes() + b"0,tcp,http,SF,2")
            err = _stop(proc, lambda: _unread(writer) == 0, signal.SIGTERM)
        finally:
            os.close(writer)
        assert proc.returncode == 0, err
    assert _stop_counts(err) == (401, 400, 1), err


def _stop_counts(err: str) -> tuple[int, int, int]:
    """(records, scored, rejected) of the one stop line a stream worker logged on ``err``."""
    logs = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    (stop,) = [x for x in logs if x.get("event") == "stop"]
    return stop["records"], stop["scored"], stop["rejected"]


def _rows(path: Path, count: int, within: float) -> list[dict] | None:
    """The first ``count`` JSON lines of ``path`` once it has them, or None after ``within``
    seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        lines = path.read_bytes().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(x) for x in lines[:count]]
        time.sleep(0.01)
    return None


def test_stream_of_a_named_pipe_scores_lines_as_they_arrive(
        kdd_bundle: Path, records: Path, tmp_path: Path) -> None:
    """``stream MODEL FIFO``, a writer (a syslog daemon) that keeps the FIFO open: its lines are
    scored as they arrive, as on stdin (a few hundredths of a second). They were read 4 MiB at a
    time, so a few lines waited unscored until 4 MiB more came or the writer closed the FIFO.
    Their origins go on line by line across the reads, a line that is no record is a dead
    letter, and SIGTERM still scores all that was read."""
    fifo = tmp_path / "live"
    verdicts, rejects = tmp_path / "verdicts.jsonl", tmp_path / "rejects.jsonl"
    os.mkfifo(fifo)
    lines = records.read_bytes().splitlines(keepends=True)
    with _deepwatch("stream", str(kdd_bundle), "--format", "kdd", "--out",
                    str(tmp_path / "alerts.jsonl"), "--verdicts", str(verdicts), "--rejects",
                    str(rejects), str(fifo)) as proc:
        _until(proc, _waits_on(proc, fifo))
        writer = os.open(fifo, os.O_WRONLY)
        try:
            # twice 10 lines, one of them no record
            for done, (first, bad) in enumerate(((1, 4), (11, 20))):
                sent = lines[first - 1:first + 9]
                sent[bad - first] = b"not a record\n"
                start = time.monotonic()
                os.write(writer, b"".join(sent))
                got = _rows(verdicts, 9 * (done + 1), within=PROMPT)
                assert got is not None, f"lines {first}-{first + 9} unscored after {PROMPT} s"
                assert time.monotonic() - start < PROMPT
                assert [r["deepwatch"]["source"] for r in got[9 * done:]] == [
                    {"file": str(fifo), "line": n} for n in range(first, first + 10) if n != bad]
                dead = _rows(rejects, done + 1, within=PROMPT)
                assert dead is not None and dead[-1]["deepwatch"]["source"] == {
                    "file": str(fifo), "line": bad}
            # a busy writer's lines are not scored in reads of the 64 KiB a pipe holds by
            # default (twice as slow as 4 MiB chunks): the pipe is let hold 1 MiB
            if int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= 1 << 20:
                assert fcntl.fcntl(writer, fcntl.F_GETPIPE_SZ) == 1 << 20
            err = _stop(proc, lambda: True, signal.SIGTERM)  # the writer still there
        finally:
            os.close(writer)
        assert proc.returncode == 0, err
    assert _stop_counts(err) == (20, 18, 2), err


@pytest.mark.parametrize("name", ["live", "live.gz"])
def test_a_named_pipe_is_scored_whole_once_its_writer_comes(
        kdd_bundle: Path, records: Path, tmp_path: Path, name: str) -> None:
    """The reader waits for a writer that comes late (the silence before it is not the end of
    the input), the FIFO is opened once (nothing read ahead and lost), and every record the
    writer sends before it closes the FIFO is scored."""
    fifo, out = tmp_path / name, tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    data = records.read_bytes()
    with _deepwatch("score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                    str(fifo)) as proc:
        _until(proc, _waits_on(proc, fifo))
        with open(fifo, "wb") as writer:
            writer.write(gzip.compress(data) if name.endswith(".gz") else data)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == data.count(b"\n") == 400
    assert all(r["verdict"] in ("normal", "malicious") for r in rows)


@pytest.mark.parametrize(("via", "sig", "code", "word"),
                         [("fifo", signal.SIGINT, 130, "interrupted"),
                          ("stdin", signal.SIGINT, 130, "interrupted"),
                          ("fifo.gz", signal.SIGTERM, 143, "terminated")])
def test_score_of_a_pipe_scores_all_it_read_on_a_signal(
        kdd_bundle: Path, records: Path, tmp_path: Path, via: str, sig: signal.Signals,
        code: int, word: str) -> None:
    """``score`` reads a pipe (a FIFO, stdin) 8 MiB at a time: stopped while the writer kept it
    open, the lines it had read but not yet scored were dropped unsaid (a bare "terminated",
    nothing written), and a pipe cannot be read again. Now, as ``stream`` does, every line read
    is scored before it stops, and the one line says the output holds them, incomplete. The
    last line, without its line break, may be one the writer had not finished: it is a reject
    that says so (it was scored, a whole record here). A ``.gz`` FIFO: the whole members
    read are scored, and the text of the member the stop cut short, which could not be
    verified, is counted in a line of its own. The plain FIFO is sent SIGTERM too, at once after
    Ctrl-C (both pending, Ctrl-C is taken first): held with it, it said nothing; one line now
    says the stop is under way."""
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    source = tmp_path / ("live.gz" if via == "fifo.gz" else "live") if via != "stdin" else None
    if source is not None:
        os.mkfifo(source)
    whole = records.read_bytes().split(b"\n")[0]  # a whole record, its line break not yet come
    data = records.read_bytes() + whole
    cut_note, kept = "", f" and the 1 rejected record read before it in {rejects}, which are"
    if via == "fifo.gz":
        half = gzip.compress(records.read_bytes())
        half = half[: len(half) // 2]
        dec = zlib.decompressobj(wbits=31)
        unverified = dec.decompress(half) + dec.flush()
        lines = unverified.count(b"\n") + (not unverified.endswith(b"\n"))
        cut_note = (f"{source} was cut at the stop: {len(unverified):,} bytes decompressed from "
                    f"its last gzip member (lines 401-{400 + lines:,}) were read but not scored, "
                    "since they could not be verified (the checksum comes at the end)\n")
        data, kept = gzip.compress(records.read_bytes()) + half, ", which is"
    args = [sys.executable, "-m", "deepwatch", "score", str(kdd_bundle), "--format", "kdd",
            "--out", str(out), "--rejects", str(rejects), str(source or "-")]
    proc = subprocess.Popen(args, cwd=ROOT, env=QUIET, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if source is None else subprocess.DEVNULL)
    writer = -1
    try:
        if source is not None:
            _until(proc, _waits_on(proc, source))
            writer = os.open(source, os.O_WRONLY)
        else:
            assert proc.stdin is not None
            writer = proc.stdin.fileno()
        os.write(writer, data)
        err = _stop(proc, lambda: _unread(writer) == 0, sig,
                    signal.SIGTERM if via == "fifo" else None)
    finally:
        proc.kill()
        proc.wait()
        if source is not None and writer != -1:
            os.close(writer)
        for pipe in (proc.stdin, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == code, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 400, err
    assert all(r["verdict"] in ("normal", "malicious") for r in rows)
    if not cut_note:
        (bad,) = [json.loads(x) for x in rejects.read_text().splitlines()]
        assert (bad["line"], bad["raw"], bad["reason"]) == (401, whole.decode(), STOP_CUT), err
    if via == "fifo":
        cut_note = f"already stopping: the lines read of {source} are scored first\n"
    assert err.strip() == (f"{cut_note}{word}: the 400 rows scored before it are kept in {out}"
                           f"{kept} incomplete"), err


@pytest.mark.parametrize("name", ["live", "live.gz"])
def test_a_line_a_stop_leaves_unfinished_is_a_reject_not_a_record(tmp_path: Path,
                                                                   name: str) -> None:
    """A stop while the writer of a named pipe keeps it open: the last line read, without its
    line break, may be one the writer had not finished (an access-log line cut inside its size
    still parses, as a wrong record). It was handed out as a record; it is now a reject that
    says so, its text kept. A ``.gz`` pipe whose whole members end inside a line (a shipper
    that compresses block by block) leaves the same unfinished line at a stop between two."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    text = b"a,1\nb,2\nc,3"
    data = gzip.compress(text) if name.endswith(".gz") else text
    stop = threading.Event()
    writer = threading.Thread(target=_write_then_stop, args=(fifo, data, stop))
    writer.start()
    try:
        chunks = list(iter_chunks(InputSpec(str(fifo)), stop=stop))
    finally:
        stop.set()
        writer.join(10)
    assert b"".join(c.data for c in chunks) == b"a,1\nb,2\n"
    (last,) = [c for c in chunks if c.damage is not None]
    assert (last.first_line, last.lost, last.damage) == (3, b"c,3", STOP_CUT)


def _write_then_stop(fifo: Path, data: bytes, stop: threading.Event) -> None:
    """Write ``data`` to ``fifo`` and, its reader having taken it all, set ``stop`` while the
    pipe is still open; close it after."""
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, data)
        deadline = time.monotonic() + 10
        while _unread(fd) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        stop.set()
        time.sleep(0.3)
    finally:
        os.close(fd)
