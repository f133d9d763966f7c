"""Following a growing log the way ``tail -F`` does: whole lines as they are written, across
truncation and rotation (the path reopened when it points to a new file).

A file truncated in place (logrotate's copytruncate) and written again past the offset read to
before the next poll looks, by its size, like one that grew: ``tail -F`` reads on from the old
offset, in the middle of the new lines, and loses those before it. So the first bytes read and
the last ones before the offset are kept and read again before each read: where they changed, the
file was rewritten and is read again from its start.

A rotated file is still read for a while after the path moved on: a writer goes on writing to
the file it has open until it is told to reopen the path (nginx's USR1 in logrotate's
postrotate), and those lines must not be lost.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from .files import (
    Chunk,
    InputSpec,
    LineBuffer,
    _refuse_compressed,
    _refuse_utf16,
    _starts_a_magic,
    chunks_from_reads,
    open_input,
    read_when_ready,
    waits_for_data,
)

POLL_SECONDS = 0.2
#: How long a rotated file is still read after it last grew (Fluent Bit's Rotate_Wait).
ROTATE_WAIT_SECONDS = 5.0
#: How many of the first bytes read, and of the last ones, are read again before each read.
SEEN_BYTES = 64


class _Seen:
    """The first and the last bytes read from a followed file (at most :data:`SEEN_BYTES` of
    each), to tell a file that grew from one truncated and written again in place."""

    def __init__(self) -> None:
        self.head = b""
        self.tail = b""

    def add(self, block: bytes) -> None:
        if len(self.head) < SEEN_BYTES:
            self.head += block[: SEEN_BYTES - len(self.head)]
        self.tail = (block if len(block) >= SEEN_BYTES else self.tail + block)[-SEEN_BYTES:]

    def check(self, fd: int, offset: int) -> str | None:
        """How the bytes read up to ``offset`` changed in the file: None (they did not: it grew,
        or was written again with the same bytes, which reads on as well), ``"rewritten"``
        (truncated and written again: read it from its start), or ``"hole"`` (truncated, and
        a writer that does not append wrote on at its own offset, leaving zeros before it: the
        lines after them are new, read on from ``offset``)."""
        if not self.tail:
            return None
        tail = os.pread(fd, len(self.tail), offset - len(self.tail))
        if tail == self.tail and os.pread(fd, len(self.head), 0) == self.head:
            return None
        if tail.count(0) == len(self.tail):
            return "hole"
        return "rewritten"

    @classmethod
    def of(cls, fd: int, offset: int) -> _Seen:
        """What the file holds now before ``offset``."""
        seen = cls()
        seen.head = os.pread(fd, min(offset, SEEN_BYTES), 0)
        start = max(0, offset - SEEN_BYTES)
        seen.tail = os.pread(fd, offset - start, start)
        return seen


def _open(path: str, stop: threading.Event, poll: float) -> tuple[BinaryIO, int] | None:
    """The file and its inode, waiting for it to appear (``tail -F`` retries too); a named pipe
    is waited on until its writer comes, in ``select`` rather than ``open`` (see
    :func:`~deepwatch.sources.files.open_input`), so that a stop ends the wait."""
    while not stop.is_set():
        try:
            fh = open_input(path, stop, buffering=0)  # read as it is now, not from a buffer
        except FileNotFoundError:
            stop.wait(poll)
            continue
        if fh is None:
            return None
        return fh, os.fstat(fh.fileno()).st_ino
    return None


def _change(fh: BinaryIO, seen: _Seen) -> str | None:
    """Whether the followed file was truncated in place since it was read to ``fh``'s offset:
    ``"truncated"`` (it is shorter now: read it from its start), or as :meth:`_Seen.check`."""
    offset = fh.tell()
    if offset == 0:
        return None
    if os.fstat(fh.fileno()).st_size < offset:
        return "truncated"
    return seen.check(fh.fileno(), offset)


class _Rotated:
    """A file the path no longer names, read until it has been quiet for ``wait`` seconds;
    its lines keep their numbers in it."""

    def __init__(self, fh: BinaryIO, lines: LineBuffer, wait: float):
        self.fh, self.lines, self.wait = fh, lines, wait
        self.quiet_since = time.monotonic()

    def read(self, chunk_bytes: int) -> list[Chunk]:
        out: list[Chunk] = []
        while block := self.fh.read(chunk_bytes):
            out += self.lines.feed(block)
            self.quiet_since = time.monotonic()
        return out

    def expired(self) -> bool:
        return time.monotonic() - self.quiet_since >= self.wait

    def let_go(self, chunk_bytes: int) -> list[Chunk]:
        """What is left of it, its unfinished last line too; the file is closed."""
        out = self.read(chunk_bytes)
        self.fh.close()
        last = self.lines.finish()
        return out if last is None else [*out, last]


def follow_chunks(spec: InputSpec, stop: threading.Event, chunk_bytes: int = 4 << 20,
                  poll: float = POLL_SECONDS, rotate_wait: float = ROTATE_WAIT_SECONDS
                  ) -> Iterator[Chunk]:
    """Chunks of whole lines from ``spec.path`` until ``stop`` is set.

    Line numbers restart at 1 when the file is truncated or replaced. A last line without a line
    break is held back until it is finished, or handed out when the file is truncated or when a
    rotated file is let go; on stop it is a reject (:data:`STOP_CUT`), its writer may not have
    finished it. A rotated file is read until it has not grown for
    ``rotate_wait`` seconds, its lines between those of the new file.

    A named pipe neither grows nor rotates: it is read as stdin is, its lines as they come,
    until its writer closes it or ``stop`` is set, waiting in ``select`` (a buffered read would
    wait for a whole chunk, deaf to the stop). Its first bytes are looked at as stdin's are
    (:func:`~deepwatch.sources.files.iter_chunks`): compressed data or UTF-16 text is refused
    with one line (:class:`~deepwatch.errors.InputError`), not read as lines of junk.
    """
    opened = _open(spec.path, stop, poll)
    if opened is None:
        return
    fh, inode = opened
    if waits_for_data(fh):
        try:
            fd = fh.fileno()
            first = True

            def read() -> bytes:
                nonlocal first
                block = read_when_ready(fd, chunk_bytes, stop)
                if first:  # (not while they may be half a magic: a writer's first write cut)
                    first = False
                    while _starts_a_magic(block) and (
                            more := read_when_ready(fd, chunk_bytes - len(block), stop)):
                        block += more
                    _refuse_compressed(spec, block)
                    _refuse_utf16(spec, block)
                return block

            yield from chunks_from_reads(read, spec, stop.is_set)
        finally:
            fh.close()
        return
    lines = LineBuffer(spec)
    seen = _Seen()
    rotated: _Rotated | None = None
    try:
        while True:
            # before each read: the bytes read so far still those in the file, and no more than
            # it holds (checked after a poll's wait, and after the reader was handed a chunk)
            if (change := _change(fh, seen)) is not None:
                last = lines.finish()
                if last is not None:
                    yield last
                if change == "hole":  # zeros up to the offset: what follows them is new
                    seen = _Seen.of(fh.fileno(), fh.tell())
                else:
                    fh.seek(0)
                    seen = _Seen()
            block = fh.read(chunk_bytes)
            if block:
                seen.add(block)
                yield from lines.feed(block)
                if not stop.is_set():
                    continue
                # stopped while the file holds more (a backlog, a busy log): the whole lines
                # read are out; the rest, from the line this read cut, stays in the file and is
                # not handed out in half. A rotated file still read is let go to its end.
                if rotated is not None:
                    old, rotated = rotated, None
                    yield from old.let_go(chunk_bytes)
                return
            if rotated is not None:
                yield from rotated.read(chunk_bytes)
                if stop.is_set() or rotated.expired():
                    old, rotated = rotated, None
                    yield from old.let_go(chunk_bytes)
            if stop.is_set():
                break
            try:
                st = os.stat(spec.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino != inode:  # rotated: open the new, keep the old
                opened = _open(spec.path, stop, poll)
                if opened is None:
                    break
                older, rotated = rotated, _Rotated(fh, lines, rotate_wait)
                (fh, inode), lines, seen = opened, LineBuffer(spec), _Seen()
                if older is not None:  # rotated twice within the wait: let the older go
                    yield from older.let_go(chunk_bytes)
                yield from rotated.read(chunk_bytes)  # what came before the switch
            else:
                stop.wait(poll)
        last = lines.finish(stopped=True)  # (only a stop ends the loop)
        if last is not None:
            yield last
        if rotated is not None:  # stopped while the new file was missing again
            old, rotated = rotated, None
            yield from old.let_go(chunk_bytes)
    finally:
        fh.close()
        if rotated is not None:
            rotated.fh.close()
