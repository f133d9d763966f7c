"""Where scored records go: Parquet or JSONL files (by extension), rejects as JSONL."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from .errors import InputError, Interrupted, OutputError, UsageError, sigterm_stops_cleanly


def _not_a_directory(p: Path, what: str) -> None:
    """One clear error when a directory ``p`` would need is a file (or a device ...): making
    the directory would fail with "File exists" or "Not a directory", which say neither which
    path is in the way nor why."""
    for above in reversed(p.parents):  # from the top down: the first in the way
        try:
            mode = os.stat(above).st_mode
        except OSError:
            return  # missing from here down (made later) or unreadable (mkdir says so)
        if not stat.S_ISDIR(mode):
            kind = ("a file" if stat.S_ISREG(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a pipe" if stat.S_ISFIFO(mode) else "a special file")
            raise OutputError(f"cannot write {what} {p}: {above} is {kind}, not a directory")


def writable_file(path: str | Path, what: str = "the output") -> Path:
    """``path`` as a file that can be written: its directory is made if missing; a directory
    in its place, a file where its directory should be, or a directory that cannot be written
    is one clear error, before any work. ``-`` is refused: no option that calls this writes to
    standard output, and ``open("-")`` would make a file of that name. A path that exists and is
    no regular file (``/dev/stdout``, a named pipe) is written as it is: only it need be
    writable, not its directory (``/dev``)."""
    if str(path) == "-":
        raise UsageError(f"{what} takes a file path, not '-' (for standard output, give "
                         "/dev/stdout)")
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {p} is a directory; give a file path")
    try:
        special = not stat.S_ISREG(os.stat(p).st_mode)
    except OSError:  # missing (made by the write) or unreadable (the checks below say which)
        special = False
    if special:
        if not os.access(p, os.W_OK):
            raise OutputError(f"cannot write {what} {p}: permission denied")
        return p
    _not_a_directory(p, what)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the directory of {what} {p}: "
                          f"{exc.strerror or exc}") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"cannot write {what} {p}: permission denied")
    return p


def replace_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a file beside it, moved into place
    once complete, so a full disk or a Ctrl-C part-way leaves the older file (a report, metrics
    JSON) as it was, not a truncated one that reads as this run's, and no temporary file. The
    new file gets the mode a plain write would give: the older file's, else what the umask
    allows. A path that is no regular file (``/dev/stdout``, a pipe) is written as it is; a
    symbolic link, through. A failure is the ``OSError``, for the caller to name the output.
    """
    real = Path(os.path.realpath(path))
    st, there = _stat(path, real)
    if st is not None and not stat.S_ISREG(st.st_mode):
        Path(there).write_bytes(data)
        return
    tmp = _tmp_beside(real)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if st is not None:
                os.fchmod(fh.fileno(), st.st_mode & 0o7777)
            fh.write(data)
        os.replace(tmp, real)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: A temporary output file (see :func:`_tmp_beside`) older than this was left by a run killed
#: outright (SIGKILL, the OOM killer); the next run writing that output removes it. The lake's
#: writers (:mod:`deepwatch.lake`) take the same age for their own temporary files.
STALE_TMP_S = 3600.0


def _tmp_beside(real: str | Path) -> Path:
    """A hidden, unique name beside ``real`` for its contents until they are whole. Those
    that runs killed outright left beside it are removed first once older than
    :data:`STALE_TMP_S`: nothing could read them (a Parquet file without its footer), and they
    took the disk space of a whole output each."""
    real = Path(real)
    now = time.time()
    pattern = re.compile(rf"\.{re.escape(real.name)}\.[0-9a-f]{{8}}\.tmp")
    for old in real.parent.glob(f".{glob.escape(real.name)}.*.tmp"):
        if pattern.fullmatch(old.name):
            with contextlib.suppress(OSError):
                st = old.lstat()
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_TMP_S:
                    old.unlink()
    return real.with_name(f".{real.name}.{os.urandom(4).hex()}.tmp")


def _stat(path: str | Path, real: str | Path) -> tuple[os.stat_result | None, str | Path]:
    """What ``path`` names, through its links (None where nothing is there yet), and the path
    that reached it. Asked of the path as given first: /dev/stdout on a pipe is a link to
    ``pipe:[N]``, which ``realpath`` turns into a path that does not exist; then of ``real``,
    its resolved path (``sub/../x`` is ``x`` even where ``sub`` is missing)."""
    for p in (path, real):
        try:
            return os.stat(p), p
        except OSError:
            pass
    return None, real


def _file_key(path: str | Path) -> tuple[object, ...] | None:
    """What tells files apart: device and inode of an existing regular file (hard links and
    symbolic links alike), the resolved path of one yet to be made; None for what many may
    share without harm (``/dev/null``, a pipe, a terminal) or what is no file at all."""
    real = os.path.realpath(path)  # `sub/../x` is x even where sub is not (yet) there
    st, _there = _stat(path, real)
    if st is None:
        return ("path", real)
    if not stat.S_ISREG(st.st_mode):
        return None
    return ("file", st.st_dev, st.st_ino)


def check_distinct_outputs(outputs: Sequence[tuple[str, str | None]],
                           inputs: Sequence[str] = (),
                           input_dirs: Sequence[tuple[str, str | None]] = ()) -> None:
    """Refuse, before any work, an output that would overwrite what the run reads, or another
    output: writing it would truncate the input while it is read, or mix two outputs in one.

    ``outputs`` are (option, path) pairs, path None where not given or stdout; ``inputs`` the
    file arguments as given (globs, ``PATH=LABEL``, ``-``); ``input_dirs`` (what, directory)
    pairs no output may be written into (the bundle, lakes).
    """
    from .sources.files import parse_input_spec

    read: dict[tuple[object, ...], str] = {}
    for text in inputs:
        try:
            specs = parse_input_spec(text)
        except InputError:
            continue  # a missing input is the reader's to report, in its turn
        for spec in specs:
            key = _file_key(spec.path) if spec.path != "-" else None
            if key is not None:
                read.setdefault(key, spec.path)
    dirs = [(what, os.path.realpath(d)) for what, d in input_dirs if d and os.path.isdir(d)]
    written: dict[tuple[object, ...], str] = {}
    for what, path in outputs:
        if not path:
            continue
        key = _file_key(path)
        if key is None:
            continue
        if key in read:
            raise UsageError(f"{what} {path} is also an input ({read[key]}); writing it would "
                             "destroy the input: give another path")
        if key in written:
            raise UsageError(f"{what} {path} is the same file as {written[key]}; give each "
                             "output its own path")
        written[key] = what
        real = Path(os.path.realpath(path))
        for dir_what, d in dirs:
            if real.is_relative_to(d):
                raise UsageError(f"{what} {path} is inside {dir_what} {d}, which this run "
                                 "reads: write it elsewhere")


def writable_dir(path: str | Path, what: str = "the output") -> Path:
    """``path`` as a directory that can be written (made if missing), or one clear error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} is a file; give a directory")
    _not_a_directory(p, what)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {p}: {exc.strerror or exc}") from None
    if not os.access(p, os.W_OK):
        raise OutputError(f"cannot write into {what} {p}: permission denied")
    return p


class OutputLock:
    """An advisory lock (``flock``) on an output for the length of the run that writes it, so
    that a second run given the same path (in another terminal, from cron) is refused at once,
    before it scores anything, rather than write the file as well: two runs writing one JSONL
    file truncated each other's lines and left holes of NUL bytes, each saying it had written
    all its rows; two writing one Parquet file each moved a whole file into place, the last
    one's, and the other's rows were lost without a word.

    An output already there is locked itself (nothing is added beside it). One yet to be made
    (it is made by the run's first row) is locked through a hidden file beside it,
    ``.NAME.lock``, removed when the lock is let go; every run checks that file too, so a run
    that finds the output made meanwhile by another still sees the other's lock. A lock file
    left by a run killed outright holds no lock (the kernel lets go of it however the process
    ends): the next run takes it over. A path that is no regular file (``/dev/stdout``, a pipe)
    is not locked, nor is anything where there is no ``flock`` (Windows) or where the lock
    cannot be taken (a file system without it): the run writes as it did before.
    """

    def __init__(self, path: str | Path, what: str):
        self._fds: list[int] = []
        self._made: Path | None = None  # the lock file this run made or took over
        self._refusal = f"{what} {path} is being written by another run"
        real = Path(os.path.realpath(path))
        st, _there = _stat(path, real)
        if st is not None and not stat.S_ISREG(st.st_mode):
            return
        try:
            import fcntl  # noqa: F401
        except ImportError:  # pragma: no cover - Windows
            return
        try:
            self._take(real, real.with_name(f".{real.name}.lock"))
        except BaseException:
            self.release()
            raise

    def _take(self, real: Path, lock: Path) -> None:
        fd = _open_quietly(real, os.O_RDONLY)
        if fd is not None:  # the output is there: it is the lock, and a lock file if any
            self._hold(fd)
            fd = _open_quietly(lock, os.O_RDONLY)
            if fd is not None:
                self._hold(fd)
                self._made = lock if self._same(fd, lock) else None  # (a killed run's)
            return
        while True:  # the output is not there yet: its lock file, made if missing
            fd = _open_quietly(lock, os.O_RDWR | os.O_CREAT)
            if fd is None:
                return  # (a directory that cannot be written is the write's to report)
            self._hold(fd)
            # the holder before us may have removed the file as it let go: that name is no
            # longer the lock (a run opening it now makes a new one), so take that instead
            if self._same(fd, lock):
                self._made = lock
                return
            self._fds.remove(fd)
            os.close(fd)

    def _hold(self, fd: int) -> None:
        import fcntl

        self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(os.fstat(fd))
            raise OutputError(f"{self._refusal}{f' (pid {holder})' if holder else ''}; wait "
                              "for it to end or give another path") from None
        except OSError:  # a file system without flock: as before, unlocked
            self._fds.remove(fd)
            os.close(fd)

    @staticmethod
    def _same(fd: int, path: Path) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            return False

    def release(self) -> None:
        """Remove the lock file and let go of the locks (once; again does nothing). The file
        goes first, while its lock is still held: see the retry in :meth:`_take`."""
        made, self._made = self._made, None
        if made is not None:
            with contextlib.suppress(OSError):
                made.unlink()
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:  # a sink dropped without being closed (an error before it ran)
        with contextlib.suppress(Exception):
            self.release()


def _open_quietly(path: Path, flags: int) -> int | None:
    """A descriptor of ``path`` (None where it cannot be opened: missing, no permission)."""
    try:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        return None


def _lock_holder(st: os.stat_result) -> int | None:
    """The process holding a ``flock`` on the file ``st`` describes, from ``/proc/locks``
    (Linux; None elsewhere, or where it cannot be told)."""
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if "FLOCK" in fields and "->" not in fields and dev in fields:
                    pid = fields[fields.index(dev) - 1]
                    return int(pid) if pid.isdigit() else None
    except OSError:
        pass
    return None


def _identity(st: os.stat_result) -> tuple[int, int] | None:
    """What names a regular file (device, inode); None for what is none (a pipe, a device)."""
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _check_still_there(path: str, made: tuple[int, int] | None, n: int, what: str,
                       shown: str | None = None) -> None:
    """An OutputError where the regular file ``made`` that a run wrote at ``path`` is gone from
    there (removed with its directory, or replaced) before the run ends: its writes went on into
    a file no name reaches, and the run said its records were written to ``path`` (``shown``,
    where ``path`` is its temporary name)."""
    if made is None:
        return
    try:
        now = _identity(os.stat(path))
    except OSError:
        now = None
    if now != made:
        raise OutputError(f"cannot write {shown or path}: it was "
                          f"{'replaced' if now else 'removed'} "
                          f"while this run wrote it, so the {n:,} {what}{'s' if n != 1 else ''} "
                          f"written to it {'is' if n == 1 else 'are'} lost")


def _text_columns(schema: pa.Schema) -> list[str]:
    """The columns a Parquet output stores with dictionary pages: its text. Numbers are stored
    plain: hashing every value into a dictionary cost the writer a fifth of its time on KDD's
    41 fields (``score`` of 1.24M records: 0.50 s of CPU against 0.40 s; median whole run 1.18 s
    against 1.06 s), for files a third smaller (6.2 MB against 8.4 MB, zstd either way)."""
    return [f.name for f in schema if pa.types.is_string(f.type)
            or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)]


class RecordSink:
    """Writes scored batches to ``.parquet`` or ``.jsonl`` (``-`` is JSONL on stdout).

    Encoding and compression run on one background thread (Arrow and polars release the GIL), so
    writing a batch overlaps parsing and scoring the next; at most two batches wait. Batches are
    written in order, and an error in the writer surfaces on the next ``write`` or ``close``.

    Dictionary-encoded columns (what ``score``'s line cache hands over for text, see
    :func:`deepwatch._line_cache.categorical`) are stored as Parquet's dictionary pages as they
    are, and read back as the plain columns they stand for; batches of one run may mix the two
    encodings (:func:`conform`).
    """

    #: zstd at level 1: about a third faster than the default level, files ~4% larger
    COMPRESSION = "zstd"
    COMPRESSION_LEVEL = 1

    def __init__(self, path: str):
        from concurrent.futures import Future, ThreadPoolExecutor

        self.path = path
        if path == "-":
            self.kind = "jsonl"
        elif path.endswith(".parquet"):
            self.kind = "parquet"
        elif path.endswith((".jsonl", ".ndjson", ".json")):
            self.kind = "jsonl"
        else:
            raise UsageError(f"--out must end in .parquet or .jsonl, not {path!r}")
        if path != "-":
            writable_file(path, "--out")
        #: held until the sink is closed: a second run writing the same file is refused
        self._lock = OutputLock(path, "--out") if path != "-" else None
        self._writer: Any = None
        self._fh: IO[bytes] | None = None
        self.rows = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deepwatch-sink")
        self._pending: list[Future[bool]] = []
        #: the file the first batch made (see :func:`_check_still_there`)
        self._made: tuple[int, int] | None = None
        #: where Parquet is written until the sink closes, and where it then goes (with the
        #: mode of the older file there): see :meth:`_parquet_target`
        self._tmp: str | None = None
        self._final: tuple[str, int | None] | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:  # (a chunk all rejects): the file is made by the first row, so
            return  # that a run stopped before any (see abort) leaves no empty output behind
        self.rows += batch.num_rows
        while len(self._pending) >= 2:  # bounded: wait for the oldest (and raise its error)
            if self._pending.pop(0).result():
                raise KeyboardInterrupt  # the Ctrl-C the writer was handed, for this thread
        self._pending.append(self._pool.submit(self._write, batch))

    def _write(self, batch: pa.RecordBatch) -> bool:
        """Write ``batch``; whether a Ctrl-C reached this thread meanwhile. polars, encoding
        JSONL here, can take the KeyboardInterrupt meant for the main thread: the batch, whose
        rows the run counts as kept, was then lost (an interrupted run's output came out empty).
        It is written again, whole (nothing reached the file before the encoding ended), and
        the interrupt passed on to the main thread by :meth:`write`."""
        try:
            try:
                self._write_batch(batch)
            except KeyboardInterrupt:
                self._write_batch(batch)
                return True
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return False

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            if self._writer is None:
                target = self._parquet_target()
                encoded = batch.schema != plain_schema(batch.schema)
                self._writer = pq.ParquetWriter(target, batch.schema,
                                                compression=self.COMPRESSION,
                                                compression_level=self.COMPRESSION_LEVEL,
                                                store_schema=not encoded,
                                                use_dictionary=_text_columns(batch.schema))
                if encoded:  # read back as the plain columns they stand for
                    self._writer.add_key_value_metadata(_arrow_schema(batch.schema))
                self._made = _identity(os.stat(target))
            self._writer.write_batch(conform(batch, self._writer.schema))
            return
        if self._fh is None:
            self._fh = sys.stdout.buffer if self.path == "-" else open(self.path, "wb")  # noqa: SIM115
            if self.path != "-":
                self._made = _identity(os.fstat(self._fh.fileno()))
        if batch.num_rows:
            write_jsonl(batch, self._fh)

    def _parquet_target(self) -> str:
        """Where Parquet is written: a hidden file beside the output, moved into place when the
        sink closes (a run done, or stopped: its rows are kept). A Parquet file is only readable
        once its footer is written, at the end: a run killed outright (SIGKILL, the OOM killer)
        left a file under the output's name that no reader could open, in place of the older
        output. A path that is no regular file (a named pipe) is written as it is."""
        real = os.path.realpath(self.path)
        st, _there = _stat(self.path, real)
        if st is not None and not stat.S_ISREG(st.st_mode):
            return self.path
        self._final = (real, st.st_mode & 0o7777 if st is not None else None)
        self._tmp = str(_tmp_beside(real))
        return self._tmp

    def _drop_tmp(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)

    def close(self, schema: pa.Schema | None = None) -> None:
        self._drain(lambda: self._finish(schema))

    def abort(self) -> None:
        """Stop after a failure that came before any record: no output file is made (an empty
        one would read as "nothing was malicious"), and one already there is left alone."""
        self._drain(self._close_handles)

    def _drain(self, then: Callable[[], None]) -> None:
        """Wait for the batches in the writer (raising the first error), stop it, then ``then``."""
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)
            try:
                then()
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
            finally:
                if self._lock is not None:  # (after the Parquet file is moved into place)
                    self._lock.release()

    def _close_handles(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._fh is not None and self.path != "-":
                self._fh.close()
        finally:
            self._drop_tmp()

    def _finish(self, schema: pa.Schema | None) -> None:
        try:
            self._close_output(schema)
            _check_still_there(self._tmp or self.path, self._made, self.rows, "row",
                               shown=self.path)
            if self._tmp is not None and self._final is not None:
                final, mode = self._final
                if mode is not None:
                    os.chmod(self._tmp, mode)
                os.replace(self._tmp, final)
                self._tmp = None
        finally:
            self._drop_tmp()

    def _close_output(self, schema: pa.Schema | None) -> None:
        if self.kind == "parquet":
            if self._writer is None:  # no batch came: still this run's file, not an older one
                import pyarrow.parquet as pq

                buf = pa.BufferOutputStream()
                pq.write_table(plain_schema(schema or pa.schema([])).empty_table(), buf)
                replace_file(self.path, buf.getvalue().to_pybytes())
            else:
                self._writer.close()
        elif self._fh is None and self.path != "-":
            Path(self.path).write_bytes(b"")
        elif self._fh is not None and self.path != "-":
            self._fh.close()
        elif self._fh is not None:
            self._fh.flush()


#: Characters valid raw inside a JSON string that no JSONL output writes raw, as inclusive
#: ranges of code points. This is the one definition: the byte pattern, the quick test and the
#: polars pattern below are all derived from it, so the outputs that use one or the other
#: (``score``, rejects, ``stream``, alerts, the REST answer) escape the same set.
#:
#: - DEL and the C1 controls (U+0080-U+009F), which terminals that act on 8-bit controls take
#:   for escape sequences (U+009B is CSI, as ``ESC [``): an alert written to stdout could
#:   rewrite the analyst's screen. (JSON escapes the C0 controls itself.)
#: - U+2028 and U+2029, which JavaScript, Python's ``splitlines`` and some SIEM shippers take
#:   for line breaks: a record's text could split one JSON line in two.
#: - the bidirectional controls, ALM (U+061C), LRM and RLM (U+200E, U+200F), LRE, RLE, PDF,
#:   LRO and RLO (U+202A-U+202E), LRI, RLI, FSI and PDI (U+2066-U+2069): an RLO in a user agent
#:   makes a terminal or an editor show the rest of the line reversed ("Trojan Source",
#:   CVE-2021-42574), so an analyst could read a URL that is not the one requested.
#: - the invisible format characters around them: zero-width space, non-joiner and joiner
#:   (U+200B-U+200D), the word joiner and invisible operators (U+2060-U+2064, with the
#:   deprecated format controls U+206A-U+206F) and U+FEFF. They reorder nothing, but two URLs
#:   that differ only by one look the same on screen, and the one copied from the screen then
#:   matches nothing. They are joiners in some scripts and emoji, which is no loss here: each is
#:   a JSON escape, and the decoded value is the same string.
_UNSAFE_RANGES = ((0x7F, 0x9F), (0x061C, 0x061C), (0x200B, 0x200F), (0x2028, 0x202E),
                  (0x2060, 0x206F), (0xFEFF, 0xFEFF))
#: Each of those characters with its JSON escape.
_UNSAFE_CHARS = {chr(cp): f"\\u{cp:04x}" for lo, hi in _UNSAFE_RANGES
                 for cp in range(lo, hi + 1)}


def _byte_pattern(chars: Iterable[str]) -> re.Pattern[bytes]:
    """A pattern for the UTF-8 encodings of ``chars``: for each leading part, one class of last
    bytes (``\\xc2[\\x80-\\x9f]``). UTF-8 is self-synchronising, so in valid UTF-8 a match is
    always one whole character."""
    tails: dict[bytes, list[int]] = {}
    for c in chars:
        b = c.encode()
        tails.setdefault(b[:-1], []).append(b[-1])
    return re.compile(b"|".join(
        re.escape(lead) + b"[" + b"".join(re.escape(bytes([t])) for t in last) + b"]"
        for lead, last in tails.items()))


_UNSAFE_TEXT = _byte_pattern(_UNSAFE_CHARS)
#: What an output must hold for it to need :data:`_UNSAFE_TEXT` at all: the leading bytes of
#: the characters (a single byte for DEL). A plain ``in`` test each is faster than the pattern.
_UNSAFE_LEADS = tuple(sorted({c.encode()[:-1] or c.encode() for c in _UNSAFE_CHARS}))
#: The same set as one character class in the syntax of polars' (Rust) regular expressions.
_UNSAFE_POLARS = "[" + "".join(f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in _UNSAFE_RANGES) + "]"


def _json_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


def escape_unsafe_text(data: bytes) -> bytes:
    """``data`` (UTF-8 JSON text) with the characters of ``_UNSAFE_RANGES`` written as JSON
    escapes."""
    if not any(lead in data for lead in _UNSAFE_LEADS):
        return data
    return _UNSAFE_TEXT.sub(_json_escape, data)


def escape_unsafe_documents(encoded: Any) -> Any:
    """A polars Series of JSON documents with the characters of ``_UNSAFE_RANGES`` escaped, as
    :func:`escape_unsafe_text` does (one scan where none is found, the common case)."""
    if not encoded.str.contains(_UNSAFE_POLARS).any():
        return encoded
    return encoded.str.replace_many(list(_UNSAFE_CHARS), list(_UNSAFE_CHARS.values()))


def write_all(fh: IO[bytes], data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fh``, or raise ``OSError``.

    An unbuffered stream (stdout under ``PYTHONUNBUFFERED=1``, as many container images set, or
    ``python -u``) is a raw file: one ``write`` may take only part of the bytes and return the
    count (a pipe whose reader went away, a signal during the write). The rest is written again,
    to finish or to get the error; ignoring the count lost the rest of the output silently (``score
    --out - | head`` then said every row was written and exited 0)."""
    view = memoryview(data)
    while view:
        taken = fh.write(view)
        if not taken:  # none taken (a non-blocking pipe that is full): never spin on it
            raise OSError(0, "the output took none of the bytes written to it")
        view = view[taken:]


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with each dictionary-encoded column as the type of its values."""
    if not any(pa.types.is_dictionary(f.type) for f in schema):
        return schema
    return pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                      for f in schema], metadata=schema.metadata)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with each column encoded as in ``schema`` (dictionary or plain), which it
    otherwise matches: the batches of one run may differ only in that."""
    if batch.schema == schema:
        return batch
    cols = []
    for f, c in zip(schema, batch.columns, strict=True):
        if pa.types.is_dictionary(f.type) and not pa.types.is_dictionary(c.type):
            c = c.dictionary_encode().cast(f.type)
        elif c.type != f.type:
            c = c.cast(f.type)
        cols.append(c)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _arrow_schema(schema: pa.Schema) -> dict[bytes, bytes]:
    """The Parquet footer entry that gives the Arrow types to read the file back with: those of
    :func:`plain_schema` (as Arrow itself writes the entry: the schema's IPC form, base64)."""
    import base64

    ipc = plain_schema(schema).serialize().to_pybytes()
    return {b"ARROW:schema": base64.b64encode(ipc)}


def write_jsonl(batch: pa.RecordBatch | pa.Table, fh: IO[bytes]) -> None:
    import polars as pl

    df = pl.from_arrow(batch)
    assert isinstance(df, pl.DataFrame)
    buf = io.BytesIO()
    df.write_ndjson(buf)
    write_all(fh, escape_unsafe_text(buf.getvalue()))


class RejectSink:
    """Rejected records, one JSON object per line: line, raw, reason (and source).

    A failure to write (a full disk) is an :class:`OutputError` naming the file, as for
    :class:`RecordSink`. The file is made by the first rejected record, or empty by
    :meth:`close` (a run that ends whole without any): a run that fails before either leaves an
    older file at the path as it was, as :meth:`RecordSink.abort` does its output (it was
    truncated at the start, then removed, so the rejects an earlier run kept there were lost).
    """

    def __init__(self, path: str | None):
        self.path = path
        #: the records written and the bytes they fill, set as one after each write
        self._kept = (0, 0)
        #: the records and bytes of the write under way (see :meth:`abort`)
        self._writing = (0, 0)
        #: every input of the run has been read through it: a run stopped after that keeps
        #: all its rejects, not an incomplete part (see :func:`keeping_rejects`)
        self.complete = False
        self._fh: IO[bytes] | None = None
        self._made: tuple[int, int] | None = None  # (see :func:`_check_still_there`)
        self._closed = False
        self._lock: OutputLock | None = None
        if path:
            writable_file(path, "--rejects")
            self._lock = OutputLock(path, "--rejects")  # (see RecordSink)

    def _open(self) -> IO[bytes]:
        """The file, made (truncated) now: by the first rejected record, or by :meth:`close`."""
        assert self.path
        try:
            self._fh = open(self.path, "wb")  # noqa: SIM115
            self._made = _identity(os.fstat(self._fh.fileno()))
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return self._fh

    @property
    def count(self) -> int:
        """The rejected records written (where there is no file: counted)."""
        return self._kept[0]

    def write(self, rejects: pa.Table) -> None:
        n = rejects.num_rows
        if not self.path or self._closed or n == 0:
            self._kept = (self._kept[0] + n, self._kept[1])
            return
        data = escape_unsafe_text("".join(
            json.dumps(row, ensure_ascii=False) + "\n" for row in rejects.to_pylist()).encode())
        fh = self._fh if self._fh is not None else self._open()
        self._writing = (n, len(data))
        try:
            fh.write(data)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._kept = (self._kept[0] + n, self._kept[1] + len(data))

    def close(self) -> None:
        """Close the file, empty or not (a run that kept other output, or ran whole)."""
        try:
            self._close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _close(self) -> None:
        if self.path and not self._closed and self._fh is None:
            self._open()  # (no rejected record: the file is made empty, this run's)
        self._closed = True
        fh, self._fh = self._fh, None  # closed once, even when closing fails
        if fh is None:
            return
        self._count_write_under_way(fh)
        try:
            fh.close()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if self.path and self.count:
            _check_still_there(self.path, self._made, self.count, "rejected record")

    def abort(self) -> None:
        """Close and remove the file of a run that failed before it kept anything: an empty
        rejects file would read as "nothing was rejected"; an older one not made by this run
        is left as it was."""
        try:
            self._abort()
        finally:
            self._release()

    def _abort(self) -> None:
        self._closed = True
        fh, self._fh = self._fh, None
        if fh is None:
            return
        self._count_write_under_way(fh)
        fh.close()
        if self.count == 0 and self.path and os.path.isfile(self.path):
            os.unlink(self.path)

    def _count_write_under_way(self, fh: IO[bytes]) -> None:
        """A Ctrl-C can stop the run as a write returns, before its records are counted: they
        are in the file all the same, and counted here (a file is never taken for empty, nor
        said to hold fewer records, when it holds them)."""
        try:
            at = fh.tell()
        except OSError:  # (a pipe: no position)
            return
        if at == self._kept[1] + self._writing[1]:
            self._kept = (self._kept[0] + self._writing[0], at)


def rejects_read(n: int) -> str:
    """``n`` rejected records kept by a run stopped part-way, as its one line names them."""
    return f"the {n:,} rejected record{'s' if n != 1 else ''} read before it"


@contextmanager
def keeping_rejects(path: str | None) -> Iterator[RejectSink]:
    """A :class:`RejectSink` at ``path`` (None: rejects only counted) for the length of a run's
    reading of its inputs, closed whole after it.

    A run that fails keeps the rejects it wrote (they may say why), never an empty file
    (:meth:`RejectSink.abort`). A run stopped part-way, by Ctrl-C or by SIGTERM (taken as
    Ctrl-C for the length, rather than ending the process with the last records still in the
    file's buffer), closes the file whole too, and its one-line report says how many records
    the file holds and that it is incomplete, as ``score`` says of its output: the rejects
    read so far are not lost, nor taken for all of them. (Once the caller has read every input
    through it, :attr:`RejectSink.complete`, the file is whole and all, and a stop says
    nothing of it.)"""
    sink = RejectSink(path)
    try:
        with sigterm_stops_cleanly():
            yield sink
    except KeyboardInterrupt as exc:
        sink.abort()
        if sink.complete or not (sink.path and sink.count):
            raise
        kept = f"{rejects_read(sink.count)} {'is' if sink.count == 1 else 'are'} kept in " \
            f"{sink.path}, which is incomplete"
        detail = getattr(exc, "detail", None)
        raise Interrupted(f"{detail}; {kept}" if detail else kept,
                          terminated=getattr(exc, "terminated", False)) from None
    except BaseException:
        sink.abort()
        raise
    sink.close()
