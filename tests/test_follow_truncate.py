"""``--follow`` on a file truncated in place and written again past the offset read to before
the follower looked (logrotate's copytruncate with a busy writer): by its size it looks like a
file that grew, and ``tail -F`` reads on from the old offset, in the middle of the new lines
(reproduced with ``deepwatch stream --follow``: 1,000 of 2,000 such lines lost, one garbled).
The bytes read before the offset are read again to tell."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from test_follow import POLL, Follower

from deepwatch.sources.files import InputSpec
from deepwatch.sources.follow import follow_chunks


def _recs(prefix: str, n: int, pad: int = 0) -> list[bytes]:
    return [f"{prefix}{i}{'x' * pad}".encode() for i in range(n)]


def _refill(log: Path, data: bytes) -> None:
    """copytruncate (the copy left out), the writer writing again at once."""
    with log.open("r+b") as fh:
        fh.truncate(0)
        fh.write(data)


def test_refilled_past_the_old_size_is_read_from_its_start(tmp_path: Path) -> None:
    """Every new line read once, numbered from 1; the old file's unfinished last line is
    handed out as it was when the file was cut."""
    log = tmp_path / "live.log"
    old = _recs("a", 20)
    log.write_bytes(b"\n".join(old) + b"\npart")
    f = Follower(log)
    f.wait_for(lambda t: t == old)
    time.sleep(5 * POLL)
    new = _recs("b", 40, pad=10)
    _refill(log, b"\n".join(new) + b"\n")
    f.wait_for(lambda t: t[-1:] == [new[-1]])
    lines = f.finish()
    assert lines == [*enumerate(old, start=1), (21, b"part"), *enumerate(new, start=1)]


def test_the_same_first_bytes_do_not_hide_a_rewrite(tmp_path: Path) -> None:
    """A log that opens with the same header in every file (Zeek's): the bytes just before the
    offset tell, not the first ones."""
    log = tmp_path / "conn.log"
    header = [b"#separator \\x09", b"#fields\tts\tuid\tid.orig_h"]
    old = [*header, *_recs("a", 5)]
    log.write_bytes(b"\n".join(old) + b"\n")
    f = Follower(log)
    f.wait_for(lambda t: t == old)
    time.sleep(5 * POLL)
    new = [*header, *_recs("b", 30)]
    _refill(log, b"\n".join(new) + b"\n")
    f.wait_for(lambda t: t[-1:] == [new[-1]])
    assert f.finish() == [*enumerate(old, start=1), *enumerate(new, start=1)]


def test_rewritten_while_the_reader_holds_a_chunk(tmp_path: Path) -> None:
    """Cut and written again while a chunk of a backlog is being scored (the generator waits at
    its ``yield``): checked before the next read, not only once the end is reached."""
    log = tmp_path / "big.log"
    old = _recs("a", 200)
    log.write_bytes(b"\n".join(old) + b"\n")
    stop = threading.Event()
    chunks = follow_chunks(InputSpec(str(log)), stop, chunk_bytes=64, poll=POLL)
    first = next(chunks)
    new = _recs("b", 300, pad=5)
    _refill(log, b"\n".join(new) + b"\n")
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 10
    for chunk in itertools.chain([first], chunks):
        got += [(chunk.first_line + i, text)
                for i, text in enumerate(chunk.data.removesuffix(b"\n").split(b"\n"))]
        if got[-1][1] == new[-1] or time.monotonic() > deadline:
            stop.set()
    read_old = [x for x in got if x[1].startswith(b"a")]
    # the old lines read before the cut, the one cut by the read handed out as it is
    assert read_old[:-1] == list(enumerate(old, start=1))[: len(read_old) - 1]
    assert old[len(read_old) - 1].startswith(read_old[-1][1])
    assert [x for x in got if not x[1].startswith(b"a")] == list(enumerate(new, start=1))


def test_zeros_left_by_a_writer_that_does_not_append(tmp_path: Path) -> None:
    """copytruncate under a writer that does not append (``prog > log``): it writes on at its
    own offset, leaving zeros (a hole) before it. The lines after the zeros are read once, from
    where the follower was, not as one line of zeros. (The zeros are written here in place of
    the truncation, so that no poll falls between the cut and the writer's next line.)"""
    log = tmp_path / "live.log"
    with log.open("wb", buffering=0) as writer:  # no O_APPEND
        old = _recs("a", 10)
        writer.write(b"\n".join(old) + b"\n")
        f = Follower(log)
        f.wait_for(lambda t: t == old)
        time.sleep(5 * POLL)
        os.pwrite(writer.fileno(), bytes(writer.tell()), 0)
        new = _recs("b", 20)
        writer.write(b"\n".join(new) + b"\n")
        f.wait_for(lambda t: t[-1:] == [new[-1]])
    time.sleep(5 * POLL)
    assert f.finish() == [*enumerate(old, start=1), *enumerate(new, start=1)]
    assert f.rejects == []
