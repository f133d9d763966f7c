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

Where the whole lines handed out end can be kept (:class:`Position`, ``stream --position-file``)
and reading resumed there by a later run, when the path still names that file, as long and with
the same first bytes (:class:`SavedPosition`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from ..errors import InputError
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
#: The version of the JSON a :class:`Position` is kept in.
POSITION_VERSION = 1
#: The most bytes a position file is read to (it holds one small JSON object).
POSITION_MAX_BYTES = 4096
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where the whole lines handed out of a followed file end: its identity (device, inode),
    the byte ``offset`` just past the last whole line, the ``line`` number of the line that
    starts there, and the file's first bytes (``head``, at least ``min(offset, SEEN_BYTES)``
    of them), which tell the file from another one that took its inode or its place."""

    dev: int
    ino: int
    offset: int
    line: int
    head: bytes = b""

    def at(self, offset: int, line: int) -> Position:
        """The same file, read to ``offset`` (line ``line`` starting there)."""
        return replace(self, offset=offset, line=line)

    def to_json(self, path: str) -> bytes:
        """The position as one JSON object (``path``: the followed path, for the reader)."""
        n = min(self.offset, SEEN_BYTES)
        return json.dumps({
            "version": POSITION_VERSION, "path": path, "device": self.dev, "inode": self.ino,
            "offset": self.offset, "line": self.line, "head_bytes": n,
            "head_sha256": hashlib.sha256(self.head[:n]).hexdigest()}).encode() + b"\n"


@dataclass(frozen=True)
class SavedPosition:
    """A :class:`Position` read back from its JSON: the first bytes as their length and
    SHA-256."""

    dev: int
    ino: int
    offset: int
    line: int
    head_bytes: int
    head_sha256: str

    @classmethod
    def from_json(cls, data: bytes) -> SavedPosition:
        """The position ``data`` holds; ValueError (saying what is wrong) when it holds none."""
        try:
            doc: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"it is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError("it is not a JSON object")
        if doc.get("version") != POSITION_VERSION:
            raise ValueError(f"its version is {doc.get('version')!r}, not {POSITION_VERSION}")

        def number(key: str, least: int, most: int | None = None) -> int:
            value = doc.get(key)
            if type(value) is not int or value < least or (most is not None and value > most):
                raise ValueError(f"its {key!r} is {value!r}, not a whole number from {least}"
                                 + (f" to {most}" if most is not None else ""))
            return value

        offset = number("offset", 0)
        dev, ino, line = number("device", 0), number("inode", 0), number("line", 1)
        head_bytes = number("head_bytes", min(offset, SEEN_BYTES), min(offset, SEEN_BYTES))
        digest = doc.get("head_sha256")
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"its 'head_sha256' is {digest!r}, not 64 hex digits")
        return cls(dev, ino, offset, line, head_bytes, digest)

    def mismatch(self, fd: int) -> str | None:
        """Why the open file ``fd`` cannot be read on from this position (None: it can)."""
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return (f"it is not the file the position was kept for (device {st.st_dev}, inode "
                    f"{st.st_ino}, not {self.dev}, {self.ino}): it was rotated or replaced")
        if st.st_size < self.offset:
            return (f"it was truncated: it holds {st.st_size:,} bytes, the position is at byte "
                    f"{self.offset:,}")
        head = os.pread(fd, self.head_bytes, 0)
        if hashlib.sha256(head).hexdigest() != self.head_sha256:
            return ("its first bytes are not those of the file the position was kept for: it "
                    "was truncated and written again, or its inode was given to another file")
        return None


def read_position(path: str) -> SavedPosition | None:
    """The position kept in ``path`` (None: there is no such file yet). One that cannot be read
    or holds no position is an :class:`~deepwatch.errors.InputError`: reading the followed file
    again from its start would raise every old alert again, so it is not done unasked."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(POSITION_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read --position-file {path}: {exc.strerror or exc}") from None
    try:
        if len(data) > POSITION_MAX_BYTES:
            raise ValueError(f"it is over {POSITION_MAX_BYTES:,} bytes long")
        return SavedPosition.from_json(data)
    except ValueError as exc:
        raise InputError(f"--position-file {path} holds no position deepwatch can read: {exc}; "
                         "remove it to read the followed file from its start") from None


def write_position(path: str, position: Position, followed: str) -> None:
    """Keep ``position`` (of the file at ``followed``) in ``path`` at once: written to a file
    beside it (mode 0600), synced to disk, then put in its place, so that ``path`` always holds
    a whole position, the last or the one before."""
    import tempfile

    data = position.to_json(followed)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def _identity(position: SavedPosition) -> os.stat_result:
    """A stat result that names the file ``position`` was kept for (for ``samestat``)."""
    return os.stat_result((0, position.ino, position.dev, 0, 0, 0, 0, 0, 0, 0))


def _rotated_at(spec: InputSpec, position: SavedPosition, wait: float) -> _Rotated | None:
    """The file ``position`` was kept for, found by its identity in the directory of
    ``spec.path`` (logrotate's ``access.log.1``, ``access.log-20261125``), opened at the
    position to be read on as a rotated file; None where no file there is it, as long and with
    the same first bytes."""
    folder = os.path.dirname(os.path.abspath(spec.path))
    try:
        with os.scandir(folder) as entries:
            names = [e.path for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return None
    for name in names:
        try:
            if not os.path.samestat(os.stat(name, follow_symlinks=False), _identity(position)):
                continue
            fh = open(name, "rb", buffering=0)  # noqa: SIM115 - closed with the _Rotated
        except OSError:
            continue
        try:
            if position.mismatch(fh.fileno()) is None:
                fh.seek(position.offset)
                lines = LineBuffer(spec)
                lines.line, lines.at_start = position.line, position.offset == 0
                return _Rotated(fh, lines, wait)
        except OSError:
            pass
        fh.close()
    return None


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
    with contextlib.closing(follow_positions(spec, stop, chunk_bytes, poll, rotate_wait)) as it:
        for chunk, _position in it:
            yield chunk


def _last_at(chunks: list[Chunk], position: Position) -> Iterator[tuple[Chunk, Position | None]]:
    """``chunks`` of one read, the last one with ``position`` (where they all end)."""
    for n, chunk in enumerate(chunks, start=1):
        yield chunk, position if n == len(chunks) else None


def _unplaced(chunks: list[Chunk]) -> Iterator[tuple[Chunk, Position | None]]:
    for chunk in chunks:
        yield chunk, None


#: Reads the format's context (a Zeek ``#fields`` header) out of whole lines: the context in
#: force after them, given the one before (:meth:`deepwatch.formats.Format.context_after`).
ContextAfter = Callable[[bytes, str | None], str | None]


def _context_before(fd: int, offset: int, context_after: ContextAfter,
                    block: int = 8 << 20) -> str | None:
    """The context in force at ``offset`` of the file ``fd`` (a line's start): read from its
    first bytes, as a run reading the file from its start had it there. A byte order mark
    opening the file is no part of its first line."""
    context: str | None = None
    carry = b""
    at = 0
    while at < offset:
        data = os.pread(fd, min(block, offset - at), at)
        if not data:
            break
        if at == 0:
            data = data.removeprefix(b"\xef\xbb\xbf")
        at += len(data)
        data = carry + data
        cut = data.rfind(b"\n") + 1
        if cut:
            context = context_after(data[:cut], context)
        carry = data[cut:]
    return context_after(carry, context) if carry else context


def follow_positions(spec: InputSpec, stop: threading.Event, chunk_bytes: int = 4 << 20,
                     poll: float = POLL_SECONDS, rotate_wait: float = ROTATE_WAIT_SECONDS,
                     resume: SavedPosition | None = None, placed: bool = False,
                     context_after: ContextAfter | None = None
                     ) -> Generator[tuple[Chunk, Position | None]]:
    """:func:`follow_chunks`, each chunk with the :class:`Position` its last line ends at in the
    file the path names, where it ends one: None for the lines of a rotated file, and for the
    unfinished last line a stop hands out (read again when the run resumes).

    ``resume``: a position kept by an earlier run. Where the file first opened is the one it was
    kept for (:meth:`SavedPosition.mismatch`), it is read on from there, its lines numbered on;
    else it is read from its start, and one log line says why. ``placed``: positions are
    wanted, so a named pipe, which has none, is refused (:class:`~deepwatch.errors.InputError`).
    ``context_after`` (a format with a context: Zeek's ``#fields`` header): the first chunk
    read on from ``resume`` carries the context in force there, read from the file's start
    (:attr:`Chunk.context`): a restarted run read the lines after it in the standard order.
    """
    opened = _open(spec.path, stop, poll)
    if opened is None:
        return
    fh, inode = opened
    if waits_for_data(fh):
        try:
            if placed:
                raise InputError(f"{spec.display} is a named pipe: no position can be kept in "
                                 "it (--position-file follows a regular file)")
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

            for chunk in chunks_from_reads(read, spec, stop.is_set):
                yield chunk, None
        finally:
            fh.close()
        return
    lines = LineBuffer(spec)
    seen = _Seen()
    rotated: _Rotated | None = None
    dev = os.fstat(fh.fileno()).st_dev
    handed = 0  # where the last whole line handed out of the file the path names ends

    def here() -> Position:
        return Position(dev, inode, handed, lines.line, seen.head)

    # the context where reading the file the path names resumes (see context_after), for its
    # first chunk
    resumed: tuple[str | None] | None = None
    if resume is not None:
        why = resume.mismatch(fh.fileno())
        if why is None:
            if context_after is not None and resume.offset:
                resumed = (_context_before(fh.fileno(), resume.offset, context_after),)
            fh.seek(resume.offset)
            handed, lines.line = resume.offset, resume.line
            lines.at_start = resume.offset == 0  # (a byte order mark only opens the file)
            seen = _Seen.of(fh.fileno(), resume.offset)
            log.info(f"resuming {spec.display} at line {resume.line:,} (byte "
                     f"{resume.offset:,})", extra={"event": "resume", "line": resume.line,
                                                   "offset": resume.offset})
        elif os.path.samestat(os.fstat(fh.fileno()), _identity(resume)):
            log.info(f"reading {spec.display} from its start: {why}",
                     extra={"event": "resume", "line": 1, "offset": 0})
        else:
            # rotated while the worker was stopped: the lines written to the file the position
            # was kept for after it are read first, where it is still beside the path (they
            # were lost: the new file was read from its start, and nothing read the old one)
            rotated = _rotated_at(spec, resume, rotate_wait)
            if rotated is not None:
                log.info(f"reading {spec.display} from its start: {why}; the lines written to "
                         f"that file after the position are read first, from "
                         f"{rotated.fh.name} at line {resume.line:,} (byte {resume.offset:,})",
                         extra={"event": "resume", "line": 1, "offset": 0,
                                "rotated": rotated.fh.name, "rotated_line": resume.line,
                                "rotated_offset": resume.offset})
            else:
                log.warning(f"reading {spec.display} from its start: {why}, and that file is "
                            "no longer beside it (compressed, moved or removed): lines written "
                            f"to it after line {resume.line - 1:,} (byte {resume.offset:,}), "
                            "if any, are not scored",
                            extra={"event": "resume", "line": 1, "offset": 0})
    try:
        if rotated is not None and resume is not None:
            # its rest first, at positions in it: a restart meanwhile reads on there
            rfd = rotated.fh.fileno()
            rst = os.fstat(rfd)
            at = Position(rst.st_dev, rst.st_ino, resume.offset, resume.line,
                          os.pread(rfd, SEEN_BYTES, 0))
            old_context = None if context_after is None else (
                _context_before(rfd, resume.offset, context_after),)
            while block := rotated.fh.read(chunk_bytes):
                rotated.quiet_since = time.monotonic()
                chunks = rotated.lines.feed(block)
                if (cut := block.rfind(b"\n")) >= 0:
                    at = at.at(rotated.fh.tell() - len(block) + cut + 1, rotated.lines.line)
                if chunks and old_context is not None:
                    chunks[0].context, old_context = old_context, None
                yield from _last_at(chunks, at)
                if stop.is_set():  # the rest stays in it, where the position kept still is
                    return
        while True:
            # before each read: the bytes read so far still those in the file, and no more than
            # it holds (checked after a poll's wait, and after the reader was handed a chunk)
            if (change := _change(fh, seen)) is not None:
                last = lines.finish()
                if change == "hole":  # zeros up to the offset: what follows them is new
                    seen = _Seen.of(fh.fileno(), fh.tell())
                else:
                    fh.seek(0)
                    seen = _Seen()
                handed = fh.tell()
                if last is not None:
                    yield last, here()
            block = fh.read(chunk_bytes)
            if block:
                seen.add(block)
                chunks = lines.feed(block)
                if (cut := block.rfind(b"\n")) >= 0:
                    handed = fh.tell() - len(block) + cut + 1
                if chunks and resumed is not None:
                    chunks[0].context, resumed = resumed, None
                yield from _last_at(chunks, here())
                if not stop.is_set():
                    continue
                # stopped while the file holds more (a backlog, a busy log): the whole lines
                # read are out; the rest, from the line this read cut, stays in the file and is
                # not handed out in half. A rotated file still read is let go to its end.
                if rotated is not None:
                    old, rotated = rotated, None
                    yield from _unplaced(old.let_go(chunk_bytes))
                return
            if rotated is not None:
                yield from _unplaced(rotated.read(chunk_bytes))
                if stop.is_set() or rotated.expired():
                    old, rotated = rotated, None
                    yield from _unplaced(old.let_go(chunk_bytes))
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
                dev, handed = os.fstat(fh.fileno()).st_dev, 0
                if older is not None:  # rotated twice within the wait: let the older go
                    yield from _unplaced(older.let_go(chunk_bytes))
                yield from _unplaced(rotated.read(chunk_bytes))  # what came before the switch
            else:
                stop.wait(poll)
        last = lines.finish(stopped=True)  # (only a stop ends the loop)
        if last is not None:
            yield last, None  # (unfinished: read again, whole, by a resumed run)
        if rotated is not None:  # stopped while the new file was missing again
            old, rotated = rotated, None
            yield from _unplaced(old.let_go(chunk_bytes))
    finally:
        fh.close()
        if rotated is not None:
            rotated.fh.close()
