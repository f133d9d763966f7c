"""Sources and sinks of ``deepwatch stream`` without a broker: the interfaces, in-memory versions
(for tests) and the embedded default (files, ``--follow`` or stdin in, JSON lines out)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, Protocol

import numpy as np
import polars as pl

from ..errors import DeepwatchError, UsageError
from ..formats._base import count_lines
from ..sources.files import (
    Chunk,
    InputSpec,
    StopCut,
    cannot_be_read_again,
    iter_chunks,
    parse_input_spec,
)
from ..sources.follow import (
    ContextAfter,
    Position,
    SavedPosition,
    follow_positions,
    read_position,
    write_position,
)
from ._stream_core import ALERT, DEAD_LETTER, VERDICT, Output, RawBatch, join_messages

CHUNK_BYTES = 4 << 20
#: Once a stop (SIGTERM, SIGINT) is heard, the JSONL sink's writes may go on for at most this
#: long, in all: an output that takes nothing more (a pipe whose reader stopped reading) is then
#: given up, and the worker exits 1 saying so. (It waited in the write for ever, deaf to every
#: further SIGTERM and Ctrl-C: only SIGKILL ended it.)
STOP_WRITE_S = 5.0
#: How often an output that is a named pipe without a reader is opened again (a stop is heard
#: between the tries)
PIPE_READER_POLL_S = 0.1
log = logging.getLogger("deepwatch.stream")


class DeliveryError(DeepwatchError):
    """A sink could not get its messages acknowledged; nothing of the batch may be committed."""


class Source(Protocol):
    def batches(self, stop: threading.Event) -> Iterator[RawBatch]:
        """Micro-batches until the input ends or ``stop`` is set."""
        ...

    def commit(self, batch: RawBatch) -> None:
        """Everything ``batch`` produced is acknowledged: it need not be read again."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    def write(self, out: Output) -> None: ...

    def flush(self) -> None:
        """Block until every message written is acknowledged; raise DeliveryError otherwise."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------- in memory


class MemorySource:
    """Records given as a list of message values, handed out ``batch_size`` at a time with
    origin ``{topic, partition: 0, offset}``; ``committed`` is the next offset to read."""

    def __init__(self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None,
                 batch_size: int = 1000, topic: str = "memory"):
        self.values = list(values)
        self.keys = list(keys) if keys is not None else None
        self.batch_size = batch_size
        self.topic = topic
        self.committed = 0

    def batches(self, stop: threading.Event) -> Iterator[RawBatch]:
        for start in range(self.committed, len(self.values), self.batch_size):
            if stop.is_set():
                return
            part = self.values[start:start + self.batch_size]
            n = len(part)
            origin = pl.DataFrame({"topic": [self.topic] * n, "partition": np.zeros(n, np.int32),
                                   "offset": np.arange(start, start + n, dtype=np.int64)})
            keys = self.keys[start:start + n] if self.keys is not None else None
            data, broken = join_messages(part)
            yield RawBatch(data, n, origin, keys, {(self.topic, 0): start + n}, broken=broken)

    def commit(self, batch: RawBatch) -> None:
        self.committed = max(self.committed, *batch.positions.values())

    def close(self) -> None:
        pass


class MemorySink:
    """Keeps every acknowledged message: ``messages[kind]`` is a list of ``(key, value)``."""

    def __init__(self, fail_flush: bool = False):
        self.pending: dict[str, list[tuple[bytes | None, bytes]]] = {}
        self.messages: dict[str, list[tuple[bytes | None, bytes]]] = {
            ALERT: [], VERDICT: [], DEAD_LETTER: []}
        self.fail_flush = fail_flush

    def write(self, out: Output) -> None:
        for kind, msgs in out.messages.items():
            keys: Iterable[bytes | None] = msgs.keys if msgs.keys is not None else [None] * len(
                msgs)
            self.pending.setdefault(kind, []).extend(zip(keys, msgs.values, strict=True))

    def flush(self) -> None:
        if self.fail_flush:
            raise DeliveryError("the in-memory sink was told to fail")
        for kind, msgs in self.pending.items():
            self.messages.setdefault(kind, []).extend(msgs)
        self.pending.clear()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------- embedded


def _at_most(data: bytes, count: int, most: int | None) -> list[tuple[bytes, int]]:
    """``data`` (``count`` lines) cut after every ``most``-th line break: the pieces and their
    line counts (the last piece keeps a last line without its break)."""
    if most is None or count <= most:
        return [(data, count)]
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)[most - 1::most] + 1
    cuts = [0, *(int(e) for e in ends if e < len(data)), len(data)]
    return [(data[a:b], min(most, count - i * most))
            for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))]


class FileSource:
    """Files (plain, .gz, .bz2 or .xz; globs) or stdin (``-``); ``follow`` tails plain files like
    ``tail -F``. Origin of a record: ``{file, line}``.

    After the batches: ``cuts`` says what a stop left unscored of a compressed named pipe (the
    text of the gzip member or xz stream it cut short, which could not be verified)."""

    def __init__(self, inputs: Sequence[str], follow: bool = False,
                 chunk_bytes: int = CHUNK_BYTES, batch_size: int | None = None,
                 position_file: str | None = None, context_after: ContextAfter | None = None):
        """``batch_size``: the most records in one batch (``--batch-size``); None: a chunk's.
        ``position_file`` (``--position-file``, with ``follow``): where the followed file was
        read to is kept there as each batch is committed, and a run started again reads on from
        there (see :func:`~deepwatch.sources.follow.follow_positions`). ``context_after``: the
        format's (one with a context: Zeek's ``#fields`` header), so that a run started again
        reads on under the header in force there (``RawBatch.context``)."""
        self.specs: list[InputSpec] = []
        for text in inputs or ["-"]:
            for spec in parse_input_spec(text):
                if spec.label is not None:
                    raise UsageError(f"stream reads unlabelled traffic; drop the label of {text!r}")
                if follow and spec.compression is not None:
                    raise UsageError(f"--follow cannot tail a compressed file: {spec.path}")
                self.specs.append(spec)
        if follow and len(self.specs) != 1:
            raise UsageError("--follow tails exactly one file")
        self.follow = follow
        self.chunk_bytes = chunk_bytes
        self.batch_size = batch_size
        self.cuts: list[StopCut] = []
        #: what a stop left unread of regular files (each a sentence; empty after a run that
        #: read every input to its end)
        self.unread: list[str] = []
        self.position_file = position_file
        self.context_after = context_after
        #: the batches written but not yet committed that end at a position, in order
        self._placed: deque[tuple[RawBatch, Position]] = deque()
        self._position_failed = False
        self._resume: SavedPosition | None = None
        self._lock: int | None = None  # the descriptor holding the position file's lock
        if position_file is not None:
            self._resume = self._check_position_file(position_file)

    def _check_position_file(self, path: str) -> SavedPosition | None:
        """The position kept in ``path`` (None: none yet), once ``--position-file`` is found to
        apply: one followed regular file (or one not made yet), and a regular file to keep it in
        where the run may write."""
        from ..sinks import writable_file

        if not self.follow or self.specs[0].path == "-":
            raise UsageError("--position-file keeps the place reached in a file read with "
                             "--follow: give --follow and one file")
        followed = self.specs[0].path
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.stat(followed).st_mode):
                raise UsageError(f"--position-file keeps a place in a regular file; {followed} "
                                 "is not one (a named pipe or device cannot be read again)")
        writable_file(path, "--position-file")
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise UsageError(f"--position-file {path} is not a regular file: give the path "
                                 "of a file the worker may replace")
        self._lock = _lock_position_file(path)
        try:
            return read_position(path)
        except BaseException:
            self.close()
            raise

    def _chunks(self, spec: InputSpec, stop: threading.Event
                ) -> Iterator[tuple[Chunk, Position | None]]:
        if self.follow and spec.path != "-":
            return follow_positions(spec, stop, self.chunk_bytes, resume=self._resume,
                                    placed=self.position_file is not None,
                                    context_after=self.context_after)
        # stdin and a named pipe of text hand out their lines as soon as they arrive (a pipe
        # given by path waited for 4 MiB or its writer's close); their first bytes are looked
        # at as score does (compressed stdin was read as text: dead letters, not an error)
        return _unplaced(iter_chunks(spec, self.chunk_bytes, stop=stop,
                                     on_cut=self.cuts.append, promptly=True))

    def batches(self, stop: threading.Event) -> Iterator[RawBatch]:
        for number, spec in enumerate(self.specs):
            chunks = self._chunks(spec, stop)
            # stdin, a named pipe and a followed file end by themselves on stop, after the lines
            # they have read (a last one without its line break is a dead letter): they are not cut
            # short here. (What is read of a pipe cannot be read again: the lines after the
            # first chunk of a .gz pipe, which is read whole at the stop, were dropped unsaid.)
            ends_on_stop = self.follow or cannot_be_read_again(spec.path) or spec.path == "-"
            handed = 0  # bytes of a plain file handed out
            try:
                for chunk, position in chunks:
                    handed += len(chunk.data)
                    # the unreadable rest of a damaged input: one dead letter says why
                    n = 1 if chunk.damage is not None else count_lines(chunk.data)
                    # (--batch-size was ignored here: a chunk of 4 MiB was one batch)
                    pieces = ([(chunk.data, n)] if chunk.damage is not None
                              else _at_most(chunk.data, n, self.batch_size))
                    first = chunk.first_line
                    after = len(chunk.data)  # bytes of the chunk from this piece on
                    context = chunk.context  # (for its first piece: the others follow it)
                    for data, count in pieces:
                        origin = pl.DataFrame({
                            "file": pl.repeat(spec.display, count, eager=True, dtype=pl.String),
                            "line": np.arange(first, first + count, dtype=np.int64),
                        })
                        first += count
                        after -= len(data)
                        batch = RawBatch(data, count, origin, stream=f"{number}:{spec.display}",
                                         damage=chunk.damage, lost=chunk.lost, context=context)
                        context = None
                        placed = False  # (the piece ends at a position kept)
                        if position is not None and self.position_file is not None:
                            placed = True
                            # a piece before the chunk's last ends where its bytes do (a chunk
                            # that ends at a position is a run of the file's bytes up to it)
                            self._placed.append((batch, position if not after else
                                                 position.at(position.offset - after, first)))
                        yield batch
                        if after and stop.is_set() and (placed or not ends_on_stop):
                            # stopped with more of the chunk read (up to 4 MiB: tens of
                            # thousands of records, one --batch-size batch after another): the
                            # rest stays in the file, read again at the next start from the
                            # place kept, or said unread (a file not followed). (It was all
                            # scored first: a SIGTERM that came on a backlog went on for
                            # minutes with --batch-size 1, or ended 5 s later as a write given
                            # up, exit 1, blaming the output.)
                            if not placed:
                                self._note_unread(spec, first, handed - after,
                                                  self.specs[number + 1:])
                            return
                    if stop.is_set() and not ends_on_stop:
                        self._note_unread(spec, first, handed, self.specs[number + 1:])
                        return
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

    def _note_unread(self, spec: InputSpec, next_line: int, handed: int,
                     later: Sequence[InputSpec]) -> None:
        """Says (``unread``) what a stop left unread: the rest of ``spec``, a regular file read
        up to line ``next_line - 1`` (``handed`` bytes of it, where it is not compressed), and
        the inputs after it. (A stop while a file was read was said only as the records
        counted: the lines after them went unscored, the run exited 0, and nothing said so.)"""
        rest = True
        size = None
        if spec.compression is None:
            try:
                size = os.stat(spec.path).st_size
            except OSError:
                size = None
            rest = size is None or handed < size
        if rest:
            of = f" ({handed:,} of {size:,} bytes)" if size is not None else ""
            self.unread.append(f"{spec.display} was read up to line {next_line - 1:,}{of}: "
                               "the lines after it were not scored")
        if later:
            names = ", ".join(s.display for s in later[:3]) + (", ..." if len(later) > 3 else "")
            self.unread.append(f"{len(later):,} more input{'s' if len(later) > 1 else ''} "
                               f"({names}) {'were' if len(later) > 1 else 'was'} not read")

    def commit(self, batch: RawBatch) -> None:
        """With ``position_file``: where ``batch`` ends, if it ends at a position, is kept
        there (the sink has flushed what it produced, and what the batches before it did)."""
        if not any(placed is batch for placed, _ in self._placed):
            return
        while True:
            placed, position = self._placed.popleft()
            if placed is batch:
                break
        assert self.position_file is not None
        try:
            write_position(self.position_file, position, self.specs[0].path)
        except OSError as exc:
            # scoring goes on: a position left behind costs only lines scored again at the
            # next start. Said once, and once more when it can be written again.
            if not self._position_failed:
                self._position_failed = True
                log.warning(f"cannot write --position-file {self.position_file}: "
                            f"{exc.strerror or exc}; a restart would read again from the last "
                            "position written", extra={"event": "position_error"})
            return
        if self._position_failed:
            self._position_failed = False
            log.info(f"--position-file {self.position_file} is written again",
                     extra={"event": "position_written"})

    def close(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)


def _lock_position_file(path: str) -> int | None:
    """An advisory lock (``flock``) held for the run on ``.NAME.lock`` beside the position
    file ``path`` (the position file itself is replaced at every commit, so a lock on it would
    not last): the descriptor holding it; None where there is no ``flock`` (Windows, a file
    system without it). A second worker given the same position file is refused
    (:class:`~deepwatch.errors.UsageError`) before it reads or writes anything: it accepted
    one, and each overwrote the other's position, so that a restart read its log again from
    the start (another worker's file named in it) and raised every old alert again. The lock
    file stays (removing it while another run may be opening it would let both hold a lock);
    the kernel lets go of the lock however the process ends."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    from ..sinks import _lock_holder

    folder, name = os.path.split(os.path.abspath(path))
    lock = os.path.join(folder, f".{name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write --position-file {path}: cannot make its lock file "
                         f"{lock}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(os.fstat(fd))
        os.close(fd)
        raise UsageError(f"--position-file {path} is being used by another run"
                         f"{f' (pid {holder})' if holder else ''}: two workers must not keep "
                         "their places in one file; stop the other or give another path"
                         ) from None
    except OSError:  # a file system without flock: unlocked, as outputs are there
        os.close(fd)
        return None
    return fd


def _unplaced(chunks: Iterator[Chunk]) -> Iterator[tuple[Chunk, Position | None]]:
    """``chunks``, each at no position (closed with it, when it is a generator)."""
    try:
        for chunk in chunks:
            yield chunk, None
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


class _WriteGivenUp(Exception):
    """Raised (by SIGALRM) in a write still under way ``STOP_WRITE_S`` after a stop."""


class JsonlSink:
    """Alerts to ``alerts`` (``-`` is stdout), every verdict to ``verdicts`` and dead letters to
    ``dead_letters`` when named: one JSON object a line.

    ``stop``: the worker's stop event. Once it is set, writes (and flushes) may go on for
    ``STOP_WRITE_S`` in all (on the main thread, where a SIGALRM can end a blocked write): one
    still blocked then is a DeliveryError. The stop's signal handler calls :meth:`on_stop`, so
    that a write blocked when the stop comes is bounded too.

    ``resumed`` (``--position-file``): the outputs go on from where a run before left them
    (appended to, not truncated; an unfinished last line, which a killed run may leave, cut
    off: the batch it was written for is scored again), and a flush syncs them to disk, so
    that a position kept after it never runs ahead of what they hold."""

    def __init__(self, alerts: str = "-", verdicts: str | None = None,
                 dead_letters: str | None = None, stop: threading.Event | None = None,
                 resumed: bool = False):
        from ..sinks import OutputLock, writable_file

        self._files: dict[str, IO[bytes]] = {}
        #: held until closed: a second run given the same output is refused (see OutputLock)
        self._locks: list[OutputLock] = []
        self._names: dict[str, str] = {}
        self._own: list[IO[bytes]] = []
        self._failed = False
        self._stop = stop
        self._resumed = resumed
        self._synced: list[IO[bytes]] = []  # the outputs a flush syncs to disk
        self._writing = False  # in a write or flush (what a stop bounds)
        self._alarm: Any = None  # the SIGALRM handler found, while ours is in
        self._deadline: float | None = None  # STOP_WRITE_S after the stop was first seen
        #: the output (flag and path) a stop came while it waited for a reader of (a named
        #: pipe): the outputs after it are not opened, and nothing may be read
        self.unopened: str | None = None
        named = [(kind, flag, path) for kind, flag, path in (
            (ALERT, "--out", alerts), (VERDICT, "--verdicts", verdicts),
            (DEAD_LETTER, "--rejects", dead_letters)) if path is not None]
        # every file is checked before any is opened: opening truncates, so an output that
        # cannot be written must not cost the user an earlier one's previous contents
        for _kind, flag, path in named:
            if path != "-":
                writable_file(path, flag)
        try:
            # (a second worker given one of them truncated the first's output, which then
            # wrote on at its own offset: a run of NUL bytes, the first's lines lost, exit 0)
            for _kind, flag, path in named:
                if path != "-":
                    self._locks.append(OutputLock(path, flag))
            for kind, flag, path in named:
                self._names[kind] = f"{flag} (stdout)" if path == "-" else f"{flag} {path}"
                if path == "-":
                    self._files[kind] = sys.stdout.buffer
                    continue
                try:
                    fh = (self._open_pipe(path, self._names[kind]) if _is_fifo(path)
                          else self._open_file(path, self._names[kind]))
                except OSError as exc:
                    raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
                if fh is None:  # stopped while the named pipe had no reader
                    self.unopened = self._names[kind]
                    break
                self._files[kind] = fh
                self._own.append(fh)
        except BaseException:
            for opened in self._own:
                opened.close()
            self._release()
            raise

    def _release(self) -> None:
        locks, self._locks = self._locks, []
        for lock in locks:
            lock.release()

    def _open_file(self, path: str, name: str) -> IO[bytes]:
        if not self._resumed:
            return open(path, "wb")  # noqa: SIM115 - closed in close()
        fh = open(path, "a+b")  # noqa: SIM115 - closed in close() (read: its last line)
        try:
            if stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                _cut_unfinished(fh, name)
                self._synced.append(fh)
        except BaseException:
            fh.close()
            raise
        return fh

    def _open_pipe(self, path: str, name: str) -> IO[bytes] | None:
        """A named pipe opened for writing once a reader opens it, or None when the stop came
        first. (``open`` waited in the kernel until a reader came, for ever, every SIGTERM and
        Ctrl-C meanwhile logged and ignored.)"""
        said = False
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
            else:
                os.set_blocking(fd, True)
                return os.fdopen(fd, "wb")
            if self._stop is not None and self._stop.is_set():
                return None
            if not said:
                said = True
                log.info(f"waiting for a reader of {name} (a named pipe)",
                         extra={"event": "output_wait", "output": name})
            time.sleep(PIPE_READER_POLL_S)

    @property
    def kinds(self) -> set[str]:
        return set(self._files)

    def _failure(self, kind: str, exc: OSError) -> DeliveryError:
        self._failed = True
        if self._files[kind] is sys.stdout.buffer:
            _drop_stdout()  # the reader is gone: no second error when Python exits
        return DeliveryError(f"cannot write {self._names[kind]}: {exc.strerror or exc}")

    def _given_up(self, kind: str) -> DeliveryError:
        """A write to ``kind``'s output still blocked ``STOP_WRITE_S`` after the stop."""
        self._failed = True
        fh = self._files[kind]
        if fh is sys.stdout.buffer:
            _drop_stdout()
        else:  # closing it would flush what it holds, and wait again
            _drop_fd(fh)
        return DeliveryError(
            f"cannot write {self._names[kind]}: it had not taken the batch in hand "
            f"{STOP_WRITE_S:g}s after the stop (is its reader reading?): the rest of the "
            "batch's lines were not written, and the last one written may be cut short")

    def on_stop(self) -> None:
        """Called by the stop's signal handler: a write blocked now is given ``STOP_WRITE_S``."""
        if self._writing:
            self._arm()

    def _arm(self) -> None:
        """SIGALRM ends a write still under way ``STOP_WRITE_S`` after the stop was seen."""
        if self._alarm is not None or threading.current_thread() is not threading.main_thread():
            return
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + STOP_WRITE_S
        self._alarm = signal.signal(signal.SIGALRM, self._give_up) or signal.SIG_DFL
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self._deadline - now))

    def _disarm(self) -> None:
        if self._alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._alarm)
            self._alarm = None

    def _give_up(self, _signum: int, _frame: Any) -> None:
        if self._writing:
            raise _WriteGivenUp

    @contextlib.contextmanager
    def _bounded(self) -> Iterator[None]:
        """A write or flush: bounded by ``STOP_WRITE_S`` once the stop is set."""
        self._writing = True
        try:
            if self._stop is not None and self._stop.is_set():
                self._arm()
            yield
        finally:
            self._writing = False
            self._disarm()

    def write(self, out: Output) -> None:
        from ..sinks import write_all

        for kind, msgs in out.messages.items():
            fh = self._files.get(kind)
            if fh is None or not len(msgs):
                continue
            try:
                with self._bounded():
                    # (a pipe whose reader went away can take part of a write and report no
                    # error)
                    write_all(fh, b"\n".join(msgs.values) + b"\n")
            except OSError as exc:
                raise self._failure(kind, exc) from None
            except _WriteGivenUp:
                raise self._given_up(kind) from None

    def flush(self) -> None:
        for kind, fh in self._files.items():
            try:
                with self._bounded():
                    fh.flush()
                    if fh in self._synced:
                        os.fsync(fh.fileno())
            except OSError as exc:
                raise self._failure(kind, exc) from None
            except _WriteGivenUp:
                raise self._given_up(kind) from None

    def close(self) -> None:
        try:
            if not self._failed:  # after a failure there is nothing more to say: it was said
                self.flush()
        finally:
            for fh in self._own:
                with contextlib.suppress(OSError):
                    fh.close()
            self._release()


def _cut_unfinished(fh: IO[bytes], name: str) -> None:
    """Cut off an output's unfinished last line (a run killed in the middle of a write leaves
    one), so that what is appended starts a line of its own."""
    size = os.fstat(fh.fileno()).st_size
    if not size or os.pread(fh.fileno(), 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        at = os.pread(fh.fileno(), end - start, start).rfind(b"\n")
        if at >= 0:
            end = start + at + 1
            break
        end = start
    os.ftruncate(fh.fileno(), end)
    log.warning(f"{name} ended in an unfinished line ({size - end:,} bytes, from a run that was "
                "killed while it wrote): cut off, its batch is scored again",
                extra={"event": "output_cut", "bytes": size - end})


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _drop_fd(fh: IO[bytes]) -> None:
    """Point ``fh``'s descriptor at /dev/null: what it still holds goes nowhere when closed."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fh.fileno())
        os.close(devnull)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that Python's own flush of it at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
