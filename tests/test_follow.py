"""``--follow`` on real files: the ways logs are rotated (rename then create, with or without a
gap, copy then truncate), a writer that goes on writing to the rotated file until it reopens
the path (nginx until its USR1), and lines left without a line break. Every line written is
read exactly once, numbered within its file."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deepwatch.sources.files import STOP_CUT, InputSpec
from deepwatch.sources.follow import follow_chunks

POLL = 0.02


class Follower:
    """``follow_chunks`` in a thread: the (line number, text) of every line it hands out."""

    def __init__(self, path: Path, rotate_wait: float = 1.0):
        self.stop = threading.Event()
        self.lines: list[tuple[int, bytes]] = []
        self.rejects: list[tuple[int, bytes, str]] = []  # (line, text kept, why)
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        chunks = follow_chunks(InputSpec(str(path)), self.stop, chunk_bytes=64, poll=POLL,
                               rotate_wait=rotate_wait)

        def run() -> None:
            try:
                for chunk in chunks:
                    if chunk.damage is not None:
                        self.rejects.append((chunk.first_line, chunk.lost, chunk.damage))
                        continue
                    body = chunk.data[:-1] if chunk.data.endswith(b"\n") else chunk.data
                    with self._lock:
                        self.lines += [(chunk.first_line + i, text)
                                       for i, text in enumerate(body.split(b"\n"))]
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def texts(self) -> list[bytes]:
        with self._lock:
            return [text for _, text in self.lines]

    def wait_for(self, what: Callable[[list[bytes]], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not what(self.texts()):
            assert self.error is None, self.error
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; read so far: {self.texts()}")
            time.sleep(POLL)

    def finish(self) -> list[tuple[int, bytes]]:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.lines


def _recs(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def test_copytruncate_starts_over_at_line_one(tmp_path: Path) -> None:
    """logrotate's copytruncate: the file is cut to nothing in place and written again; a line
    left unfinished when it was cut is handed out as it is."""
    log = tmp_path / "live.log"
    log.write_bytes(b"a0\na1\na2\npart")
    f = Follower(log)
    f.wait_for(lambda t: t == [b"a0", b"a1", b"a2"])
    time.sleep(5 * POLL)
    with log.open("r+b") as fh:
        fh.truncate(0)
    f.wait_for(lambda t: b"part" in t)
    with log.open("ab") as fh:
        fh.write(b"b0\nb1\n")
    f.wait_for(lambda t: t[-1] == b"b1")
    assert f.finish() == [(1, b"a0"), (2, b"a1"), (3, b"a2"), (4, b"part"),
                          (1, b"b0"), (2, b"b1")]


def test_rename_with_a_gap_before_the_new_file(tmp_path: Path) -> None:
    """Renamed, and for a while no file at the path: what the writer still writes to the renamed
    file is read; its unfinished last line is handed out once the writer has let it be."""
    log = tmp_path / "live.log"
    with log.open("ab", buffering=0) as writer:
        writer.write(b"a0\na1\n")
        f = Follower(log, rotate_wait=0.3)
        f.wait_for(lambda t: t == [b"a0", b"a1"])
        log.rename(tmp_path / "live.log.1")
        time.sleep(10 * POLL)  # the follower polls a missing path
        writer.write(b"a2\na3\nunfinished")
        f.wait_for(lambda t: t[-1] == b"a3")
        log.write_bytes(b"b0\n")
        f.wait_for(lambda t: b"b0" in t and b"unfinished" in t)
    lines = f.finish()
    assert [x for x in lines if x[1].startswith(b"b")] == [(1, b"b0")]
    assert [x for x in lines if not x[1].startswith(b"b")] == [
        (1, b"a0"), (2, b"a1"), (3, b"a2"), (4, b"a3"), (5, b"unfinished")]


def test_a_writer_that_reopens_late_loses_nothing(tmp_path: Path) -> None:
    """Rename then create (logrotate's default), the writer told to reopen only afterwards
    (nginx's postrotate USR1): what it writes to the renamed file in between is read too, with
    the old file's line numbers, as are the new file's lines."""
    log = tmp_path / "live.log"
    with log.open("ab", buffering=0) as writer:
        writer.write(b"\n".join(_recs("a", 50)) + b"\n")
        f = Follower(log, rotate_wait=1.0)
        f.wait_for(lambda t: len(t) == 50)
        log.rename(tmp_path / "live.log.1")
        log.write_bytes(b"b0\n")  # created by logrotate (empty in practice; one line here)
        f.wait_for(lambda t: b"b0" in t)  # the follower has moved to the new file
        writer.write(b"\n".join(_recs("late", 30)) + b"\n")  # still to the old one
        time.sleep(10 * POLL)
        writer.write(b"late30\n")
    with log.open("ab", buffering=0) as new:  # the writer reopens the path
        new.write(b"b1\nb2\n")
        f.wait_for(lambda t: b"late30" in t and b"b2" in t)
    lines = f.finish()
    old = [x for x in lines if not x[1].startswith(b"b")]
    assert old == list(enumerate(_recs("a", 50) + _recs("late", 31), start=1))
    assert [x for x in lines if x[1].startswith(b"b")] == [(1, b"b0"), (2, b"b1"), (3, b"b2")]


def test_the_rotated_file_is_let_go_once_quiet(tmp_path: Path) -> None:
    """A rotated file is read for ``rotate_wait`` seconds after it last grew, then closed: a
    line written to it later is not read (nor is a handle kept open for every rotation)."""
    log = tmp_path / "live.log"
    rotated = tmp_path / "live.log.1"
    with log.open("ab", buffering=0) as writer:
        writer.write(b"a0\n")
        f = Follower(log, rotate_wait=0.3)
        f.wait_for(lambda t: t == [b"a0"])
        log.rename(rotated)
        log.write_bytes(b"b0\n")
        f.wait_for(lambda t: t == [b"a0", b"b0"])
        time.sleep(1.0)
        assert not _open_in_this_process(rotated)
        writer.write(b"too-late\n")
    with log.open("ab") as fh:
        fh.write(b"b1\n")
    f.wait_for(lambda t: t[-1] == b"b1")
    time.sleep(10 * POLL)
    assert f.finish() == [(1, b"a0"), (1, b"b0"), (2, b"b1")]


def _open_in_this_process(path: Path) -> bool:
    """Whether a file descriptor of this process (other than a writer's) reads ``path``."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found += 1
        except OSError:
            continue
    return found > 1  # the test's own writer is one


def test_two_rotations_within_the_wait_lose_nothing(tmp_path: Path) -> None:
    """Rotated again before the first rotated file was let go (size-based rotation under load):
    the older one is read to its end, its unfinished line too, then let go."""
    log = tmp_path / "live.log"
    with log.open("ab", buffering=0) as first:
        first.write(b"a0\n")
        f = Follower(log, rotate_wait=30)
        f.wait_for(lambda t: t == [b"a0"])
        log.rename(tmp_path / "live.log.1")
        log.write_bytes(b"b0\n")
        f.wait_for(lambda t: b"b0" in t)
        first.write(b"a1\na2-unfinished")  # the first writer, late
        with log.open("ab", buffering=0) as second:
            log.rename(tmp_path / "live.log.2")
            second.write(b"b1\n")
            log.write_bytes(b"c0\n")
            f.wait_for(lambda t: {b"a2-unfinished", b"b1", b"c0"} <= set(t))
            second.write(b"b2\n")  # the second rotated file is still read
            f.wait_for(lambda t: b"b2" in t)
    lines = f.finish()
    for prefix, expected in ((b"a", [b"a0", b"a1", b"a2-unfinished"]),
                             (b"b", [b"b0", b"b1", b"b2"]), (b"c", [b"c0"])):
        assert [x for x in lines if x[1][:1] == prefix] == list(enumerate(expected, start=1))


def test_an_unfinished_last_line_is_a_reject_on_stop(tmp_path: Path) -> None:
    """A line without its line break when the stop comes may be one its writer has not
    finished: it was handed out as a record (an access-log line cut inside its size still
    parses, wrongly). It is now a reject that says so, its text kept."""
    log = tmp_path / "live.log"
    log.write_bytes(b"a0\na1\nno line break")
    f = Follower(log)
    f.wait_for(lambda t: t == [b"a0", b"a1"])
    time.sleep(5 * POLL)
    assert f.texts() == [b"a0", b"a1"], "held back while it may still be written"
    assert f.finish() == [(1, b"a0"), (2, b"a1")]
    assert f.rejects == [(3, b"no line break", STOP_CUT)]


def test_a_stop_while_the_file_holds_more_ends_at_a_whole_line(tmp_path: Path) -> None:
    """Stopped with a backlog still in the file (started on a large log, or behind a busy
    one): whole lines only, the first few, in order; the line the last read cut is left in the
    file with the rest, not handed out in half (as the unfinished line at the end is, which the
    writer may never finish)."""
    log = tmp_path / "big.log"
    recs = _recs("line-", 5000)
    log.write_bytes(b"\n".join(recs) + b"\n")
    stop = threading.Event()
    got: list[bytes] = []
    for chunk in follow_chunks(InputSpec(str(log)), stop, chunk_bytes=64, poll=POLL):
        got += chunk.data.rstrip(b"\n").split(b"\n")
        stop.set()  # after the first chunk
    assert 0 < len(got) < 20
    assert got == recs[: len(got)], got
