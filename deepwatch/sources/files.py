"""Reading files and stdin in chunks of whole lines, with line numbers and optional labels.

A file argument may be written ``PATH=LABEL`` (``-=LABEL`` for stdin): every record from it gets
that ground-truth label. A UTF-8 byte order mark that opens an input is dropped.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from .._surrogates import without_surrogates
from ..errors import InputError, UsageError
from ..formats._base import MAX_RAW, count_newlines
from ._tail import all_zero, zeros_to_end

if TYPE_CHECKING:
    import pyarrow as pa

    from ..formats import Format
    from ..io import Stats

CHUNK_BYTES = 8 << 20
#: The UTF-8 byte order mark some Windows tools write at the start of a text file.
BOM = b"\xef\xbb\xbf"
#: The longest line read as a record (no format's records come near it). A longer line (a
#: file without line breaks, a decompression bomb) is one reject, its first bytes kept: it is
#: never held in memory whole, which could take gigabytes and the run with it.
MAX_LINE_BYTES = 1 << 20

log = logging.getLogger(__name__)


#: gzip's first two bytes: a file that starts with them is read as gzip whatever its name
GZIP_MAGIC = b"\x1f\x8b"
#: bzip2's: ``BZh``, the block size, then the magic of the first block (or of the end of an
#: empty stream), so that a text file that merely starts with ``BZh`` is not taken for bzip2
BZIP2_MAGIC = tuple(b"BZh%d" % n + tail for n in range(1, 10)
                    for tail in (b"1AY&SY", b"\x17rE8P\x90"))
#: xz's stream header magic
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class Compression:
    """A compressed format, told by its first bytes (``magic``)."""

    name: str  # as the user knows it: "gzip"
    magic: tuple[bytes, ...]
    command: str  # the command that decompresses a file to stdout
    #: the names of files read as this compression whatever their first bytes (none: refused)
    suffix: str = ""
    #: what a checksum covers, the unit whose output is held back until it is verified
    unit: str = ""


#: Compressions read from files (not from stdin or a pipe), by their name or first bytes. A
#: file may hold several units one after the other (``cat``, ``pbzip2``, ``bgzip``): all are read.
READ_COMPRESSION = (
    Compression("gzip", (GZIP_MAGIC,), "gzip -dc", ".gz", "gzip member"),
    Compression("bzip2", BZIP2_MAGIC, "bzip2 -dc", ".bz2", "bzip2 block"),
    Compression("xz", (XZ_MAGIC,), "xz -dc", ".xz", "xz stream"),
)
#: Compressed files deepwatch does not read, and the command that decompresses each to stdout.
#: Without this check their bytes would be read as text: every "line" a reject, and a warning
#: that blames --format.
OTHER_COMPRESSION = (
    Compression("zstd", (b"\x28\xb5\x2f\xfd",), "zstd -dc"),
    Compression("lz4", (b"\x04\x22\x4d\x18",), "lz4 -dc"),
    Compression("zip", (b"PK\x03\x04",), "unzip -p"),
    Compression("7-Zip", (b"7z\xbc\xaf\x27\x1c",), "7z x -so"),
    # LZMA Utils' format (``xz --format=lzma``), often under a .xz name: no magic number, but
    # the header that every preset writes starts so (lc=3 lp=0 pb=2, then a dictionary size
    # that is a multiple of 64 KiB); and no checksum, so its text could never be verified
    Compression("lzma (the legacy .lzma format, not xz)", (b"\x5d\x00\x00",), "xz -dc"),
)
_READ_NAMES = ", ".join(c.name for c in READ_COMPRESSION[:-1]) + f" and {READ_COMPRESSION[-1].name}"


def compression(name: str) -> Compression:
    """The compression read from files that is called ``name``."""
    return next(c for c in READ_COMPRESSION if c.name == name)


#: The byte order marks of UTF-16 text: little-endian (what Windows PowerShell 5's ``>`` writes)
#: and big-endian.
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
#: How many first bytes of an input are looked at for UTF-16 text without a byte order mark.
UTF16_SNIFF_BYTES = 64


@dataclass(frozen=True)
class InputSpec:
    path: str  # "-" is stdin
    label: str | None = None
    #: the file starts with gzip's magic bytes (set by :func:`parse_input_spec`), so it is read
    #: as gzip even without a ``.gz`` name
    gzip_magic: bool = False
    #: the compression (a name in READ_COMPRESSION) the file's first bytes show (set by
    #: :func:`parse_input_spec`): it is read so whatever its name
    magic: str | None = None

    @property
    def display(self) -> str:
        """The input as messages, rejects' ``source`` and outputs name it: a path's bytes that
        are not UTF-8 (a name in Latin-1) written ``\\xHH`` (a file with a rejected line of such
        a name crashed ``score``, ``evaluate`` and ``ingest`` when its ``source`` was stored)."""
        return "<stdin>" if self.path == "-" else without_surrogates(self.path)

    @property
    def compression(self) -> str | None:
        """The compression it is read as (its first bytes, else its name: ``.gz``, ``.bz2``,
        ``.xz``), or None for text."""
        if self.magic is not None:
            return self.magic
        if self.gzip_magic:
            return "gzip"
        if self.path == "-":
            return None
        return next((c.name for c in READ_COMPRESSION if self.path.endswith(c.suffix)), None)

    @property
    def gzip(self) -> bool:
        """Read as gzip: a ``.gz`` name, or a file that starts as gzip does."""
        return self.compression == "gzip"


def _refuse_compressed(spec: InputSpec, head: bytes) -> None:
    """A one-line refusal of an input whose first bytes say it is compressed and that would
    otherwise be read as text (stdin, a pipe, or a regular file by a caller that did not look)."""
    known = list(OTHER_COMPRESSION)
    if spec.compression is None:
        known.extend(READ_COMPRESSION)
    for kind in known:
        if head.startswith(kind.magic):
            where = spec.path if spec.path != "-" else "FILE"
            raise InputError(f"{spec.display} is compressed with {kind.name}; deepwatch reads "
                             f"plain text, and {_READ_NAMES} from files (not from stdin or a "
                             f"pipe): decompress it first, e.g. `{kind.command} {where} | "
                             "deepwatch ... -`")


def _starts_a_magic(head: bytes) -> bool:
    """Whether ``head`` (first bytes that have arrived) is the start of a compression's magic
    or of a UTF-16 byte order mark, too short to tell yet: a writer whose first write was cut
    there (``printf '\\x1f'``, then the rest) had its compressed data read as text."""
    magics = [m for c in (*READ_COMPRESSION, *OTHER_COMPRESSION) for m in c.magic]
    return bool(head) and any(len(head) < len(m) and m.startswith(head)
                              for m in (*magics, *UTF16_BOMS))


def utf16_encoding(head: bytes) -> str | None:
    """The encoding to convert from when ``head``, an input's first bytes, is UTF-16 text, else
    None: ``UTF-16`` when it opens with a UTF-16 byte order mark (bytes that UTF-8 never has),
    ``UTF-16LE`` or ``UTF-16BE`` when, without one, its first bytes (4 characters at least) have
    a NUL in every other position and in no other (ASCII text in UTF-16). A NUL here and there,
    as a damaged UTF-8 line may hold, is not UTF-16."""
    if head.startswith(UTF16_BOMS):
        return "UTF-16"
    sample = head[: min(len(head), UTF16_SNIFF_BYTES) & ~1]
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    if not odd.strip(b"\x00") and b"\x00" not in even:
        return "UTF-16LE"
    if not even.strip(b"\x00") and b"\x00" not in odd:
        return "UTF-16BE"
    return None


def _refuse_utf16(spec: InputSpec, head: bytes) -> None:
    """A one-line refusal of an input whose first bytes (decompressed, for a compressed file) are
    UTF-16 text: read as UTF-8, every line would be a reject, and the warning would blame
    --format."""
    encoding = utf16_encoding(head)
    if encoding is None:
        return
    where = spec.path if spec.path != "-" else "FILE"
    packed = spec.compression
    convert = (f"{compression(packed).command} {where} | iconv -f {encoding} -t UTF-8"
               if packed is not None else f"iconv -f {encoding} -t UTF-8 {where}")
    raise InputError(f"{spec.display} looks like UTF-16 text; deepwatch reads UTF-8: convert it "
                     f"first, e.g. `{convert} | deepwatch ... -`")


def _sniff(path: str, label: str | None) -> InputSpec:
    """The spec of an existing path, after a look at a regular file's first bytes: gzip, bzip2 or
    xz by its magic, and a one-line refusal of other compression and of UTF-16 text (a FIFO or
    device is not read ahead: what it gives can be read once only)."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return InputSpec(path, label)
        with open(path, "rb") as f:
            head = f.read(UTF16_SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    magic = next((c.name for c in READ_COMPRESSION if head.startswith(c.magic)), None)
    spec = InputSpec(path, label, gzip_magic=magic == "gzip", magic=magic)
    _refuse_compressed(spec, head)
    if spec.compression is None:  # a compressed file's text is looked at when decompressed
        _refuse_utf16(spec, head)
    return spec


@dataclass
class Chunk:
    data: bytes
    first_line: int
    spec: InputSpec
    #: set (on an empty chunk after the last line that could be read) when the input is damaged
    #: and the rest of it cannot be read: why. ``first_line`` is the first line lost. Also set
    #: on an empty chunk standing for the one line ``first_line`` that is over MAX_LINE_BYTES;
    #: either way the chunk is one reject.
    damage: str | None = None
    #: with ``damage``: the beginning of the text that was read but cannot be trusted (the line
    #: cut short by the damage, the output of a gzip member, xz stream or bzip2 block that fails
    #: its check), at most 4 * MAX_RAW bytes; empty when there is none.
    lost: bytes = b""
    #: with ``damage``: True when the chunk stands for the unreadable rest of a damaged input
    #: (a warning was logged), False when it stands for one over-long line.
    rest_lost: bool = False
    #: where the reader found it (a followed file read on from a kept position): the format's
    #: context in force before this chunk's first line (a Zeek ``#fields`` header), as a
    #: 1-tuple; None where the chunk follows the one before it, which set it.
    context: tuple[str | None] | None = None


#: Why the last line of an input that a stop ended (stdin, a named pipe, a followed file), read
#: without its line break, is a reject: its writer may not have finished it, and a line cut
#: short can still parse, as a wrong record (an access-log line cut inside its size, a KDD line
#: cut inside its last count).
STOP_CUT = ("the run was stopped before this line's line break came: it may be cut short, so "
            "it is not read as a record")


def long_line_reason(size: int, limit: int = MAX_LINE_BYTES) -> str:
    """Why a line of ``size`` bytes (its line break left out) is no record."""
    return f"the line is {size:,} bytes long, over the limit of {limit:,} bytes for one record"


def long_lines(data: bytes, max_line: int) -> tuple[Any, Any, Any] | None:
    """The lines of ``data`` over ``max_line`` bytes, as numpy arrays ``(rows, starts, ends)``
    (``ends``: where each line's ``\\n`` is, or ``len(data)`` for an unended last line), or
    None where no line is over it. The ``\\r`` of a CRLF ending is no part of a line.

    A line over ``max_line = 2w`` bytes holds a whole w-byte window, aligned on a multiple of
    w, without a line break; a window with one is found by memchr in its first bytes. So where
    every window has one, no line is over the limit: most data is cleared at C speed, without
    numpy. (A CRLF line is over the limit only when it is over it in bytes first.)"""
    w = max(1, max_line // 2)
    if len(data) <= max_line or all(
            data.find(b"\n", k, k + w) >= 0 for k in range(0, len(data) - w + 1, w)):
        return None
    import numpy as np

    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(data))
    starts = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - starts
    sizes -= (sizes > 0) & (buf[np.maximum(ends - 1, 0)] == 13)
    rows = np.flatnonzero(sizes > max_line)
    return (rows, starts, ends) if rows.size else None


class LineBuffer:
    """Cuts a byte stream into chunks of whole lines, numbering lines from 1.

    ``feed`` returns the chunks of whole lines that a block completes; ``finish`` hands out a
    last line that has no line break and starts the numbering over (rotation, truncation). A
    UTF-8 byte order mark at the very start (of the input, or after ``finish``) is dropped. A
    line over ``max_line`` bytes is not kept: an empty chunk with ``damage`` stands for it (its
    first bytes in ``lost``), so memory stays bounded whatever the input. A line's length leaves
    out its line ending, ``\r\n`` as ``\n`` (a ``\r`` that ends the input too: the formats drop
    it there as well), so that a CRLF line of exactly ``max_line`` bytes is kept as an LF one is.
    """

    def __init__(self, spec: InputSpec, max_line: int = MAX_LINE_BYTES):
        self.spec = spec
        self.max_line = max_line
        self.line = 1
        self.rest = b""
        self.at_start = True  # nothing handed out since the input started
        self.long = 0  # bytes so far of an over-long line being skipped (0: none)
        self.long_head = b""  # its first bytes (at most LOST_BYTES)
        self.long_cr = False  # its last byte so far is a \r (the start of a CRLF line ending)

    def _handed_out(self, data: bytes) -> bytes:
        """``data``, the next bytes handed out, without the byte order mark if it opens them."""
        if self.at_start:
            self.at_start = False
            if data[:3] == BOM:
                return data[3:]
        return data

    def _skip(self, data: bytes) -> None:
        """Bytes of an over-long line: counted, the first few kept."""
        self.long += len(data)
        if data:
            self.long_cr = data[-1] == 13
        if len(self.long_head) < LOST_BYTES:
            self.long_head += data[: LOST_BYTES - len(self.long_head)]

    def _long_line(self) -> Chunk:
        """The reject standing for the over-long line just skipped."""
        size = self.long - self.long_cr  # (a \r that ends it is its line ending's)
        chunk = Chunk(b"", self.line, self.spec, damage=long_line_reason(size, self.max_line),
                      lost=self.long_head)
        self.line += 1
        self.long, self.long_head, self.long_cr = 0, b"", False
        return chunk

    def _whole(self, data: bytes) -> list[Chunk]:
        """Chunks of ``data`` (whole lines), each over-long line among them a reject."""
        found = long_lines(data, self.max_line)
        if found is None:
            chunks = [Chunk(data, self.line, self.spec)]
            self.line += count_newlines(data)
            return chunks
        long, starts, ends = found
        out, at = [], 0
        for i in long.tolist():
            begin, end = int(starts[i]), int(ends[i])
            if begin > at:
                out.append(Chunk(data[at:begin], self.line, self.spec))
                self.line += count_newlines(out[-1].data)
            self._skip(data[begin:end])
            out.append(self._long_line())
            at = end + 1
        if at < len(data):
            out.append(Chunk(data[at:], self.line, self.spec))
            self.line += count_newlines(out[-1].data)
        return out

    def feed(self, block: bytes) -> list[Chunk]:
        out: list[Chunk] = []
        if self.long:  # inside an over-long line: skip to its end
            end = block.find(b"\n")
            if end < 0:
                self._skip(block)
                return out
            self._skip(block[:end])
            out.append(self._long_line())
            block = block[end + 1 :]
        cut = block.rfind(b"\n")
        if cut < 0:
            self.rest += block
        else:
            # one copy of the block, not two: the tail after the last line break is short
            whole = (b"".join((self.rest, memoryview(block)[: cut + 1])) if self.rest
                     else block if cut + 1 == len(block) else block[: cut + 1])
            self.rest = block[cut + 1 :]
            out.extend(self._whole(self._handed_out(whole)))
        # the start of an over-long line (a byte order mark still to be dropped not counted, nor
        # a \r that may be the start of its line ending)
        if (len(self.rest) - (3 if self.at_start and self.rest[:3] == BOM else 0)
                - self.rest.endswith(b"\r") > self.max_line):
            rest, self.rest = self.rest, b""
            self._skip(self._handed_out(rest))
        return out

    def finish(self, stopped: bool = False) -> Chunk | None:
        """The last line, which has no line break (None if there is none), and the numbering
        starts over. ``stopped``: a stop ended the input there (see :data:`STOP_CUT`), so that
        line is a reject, its text kept, rather than a record."""
        if self.long:
            last: Chunk | None = self._long_line()
        else:
            rest = self._handed_out(self.rest) if self.rest else b""
            last = (None if not rest else
                    Chunk(b"", self.line, self.spec, damage=STOP_CUT, lost=rest[:LOST_BYTES])
                    if stopped else Chunk(rest, self.line, self.spec))
        self.line, self.rest, self.at_start = 1, b"", True
        return last


#: What a Python caller may give as inputs: one path or several, as ``str`` or
#: ``pathlib.Path`` (``PATH=LABEL``, globs and ``-`` are strings).
Inputs = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


def input_list(inputs: Inputs, what: str = "inputs") -> list[str]:
    """``inputs`` as a list of their texts: a lone ``str`` or ``pathlib.Path`` is one input. A
    string is a ``Sequence[str]`` too, and iterating it made each of its characters an input
    (``train(..., "kdd.txt", ...)`` failed with ``/ is a directory``); a ``Path`` failed deep
    inside with an ``AttributeError``."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    elif (isinstance(inputs, bytes | Mapping) or not isinstance(inputs, Iterable)
          or hasattr(inputs, "columns") or hasattr(inputs, "schema")):
        # (a data frame or table iterates over its column names, a dict over its keys: each
        # was read as a path, "no such file: duration")
        hint = (": inputs here are files; a frame of records is scored with "
                "Detector.score_batch, or written to a file first"
                if hasattr(inputs, "columns") or hasattr(inputs, "schema") else "")
        raise UsageError(f"{what} must be a path (str or pathlib.Path) or a list of them, "
                         f"not {type(inputs).__name__}{hint}")
    out: list[str] = []
    for item in inputs:
        if not isinstance(item, str | os.PathLike):
            raise UsageError(f"{what} must be paths (str or pathlib.Path), not "
                             f"{type(item).__name__} ({item!r:.60})")
        out.append(os.fspath(item))
    return out


#: A rotated log's name: the log's, then logrotate's number (``access.log.2``) or date
#: (``dateext``: ``access.log-20240514``, ``access.log-2024051413``, ``access.log.2024-05-14``),
#: then the compression's extension, if any
_ROTATED = re.compile(r"(?P<log>.+?)(?:\.(?P<n>\d{1,6})|[-.](?P<date>\d{8}(?:\d{2})?|"
                      r"\d{4}-\d{2}-\d{2}))(?:\.(?:gz|bz2|xz))?")


def log_order(paths: Sequence[str]) -> list[str]:
    """``paths`` sorted, except that the rotated files of a log that is among them come just
    before it, oldest first: ``access.log*`` gives ``access.log.2.gz``, ``access.log.1``,
    ``access.log`` (sorted, the newest came first, then the older ones in turn, and the
    per-client windows of an access log saw later requests before earlier ones); by date with
    ``dateext`` names, by number (``.10`` is older than ``.9``) with logrotate's. Files whose
    log is not among them are sorted as they are (``part.1``, ``part.2``)."""
    names = set(paths)

    def key(path: str) -> tuple[str, int, int, str, str]:
        m = _ROTATED.fullmatch(path)
        if m is None or m["log"] not in names:
            return path, 1, 0, "", path
        if m["n"] is not None:
            return m["log"], 0, -int(m["n"]), "", path
        return m["log"], 0, 0, m["date"].replace("-", ""), path

    return sorted(paths, key=key)


def parse_input_spec(text: str) -> list[InputSpec]:
    """``PATH``, ``PATH=LABEL``, a glob, ``-`` or ``-=LABEL`` (stdin). A glob expands to its
    files, sorted, a log's rotated files oldest first (:func:`log_order`); a path that exists is
    taken as it is written, even with ``*?[`` in it."""
    if text == "-":
        return [InputSpec("-")]
    label = None
    path = text
    read_as = ""
    if not os.path.exists(text) and "=" in text:
        path, label = _split_label(text)
        label = without_surrogates(label)  # (stored in a column: written as text can be)
        if not label:
            raise InputError(f"empty label in {text!r}; write PATH=LABEL")
        if path == "-":
            return [InputSpec("-", label)]
        read_as = f" (read {text!r} as PATH=LABEL with the label {label!r})"
    if not os.path.exists(path) and any(c in path for c in "*?["):
        found = log_order(glob.glob(path))
        if not found:
            raise InputError(f"no file matches {path!r}{read_as}")
        # a directory it matches is refused here, as one named is: found only when opened, it
        # failed the run after the files before it were read (and their output thrown away)
        folders = [p for p in found if os.path.isdir(p)]
        if folders:
            more = f" (and {len(folders) - 1:,} more)" if len(folders) > 1 else ""
            raise InputError(f"{folders[0]}{more}, matched by {path!r}, is a directory, not a "
                             "file: write a pattern that matches files only (such as "
                             f"{os.path.join(os.path.dirname(path), '*.log')!r})")
        return [_sniff(p, label) for p in found]
    if not os.path.exists(path):
        raise InputError(f"no such file: {path}{read_as}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a file")
    return [_sniff(path, label)]


def _split_label(text: str) -> tuple[str, str]:
    """``PATH=LABEL`` where either part may hold ``=``: split at the first ``=`` that leaves a
    path that exists (or stdin, or a glob that matches), else at the last one."""
    at = text.find("=")
    while at != -1:
        path = text[:at]
        if path == "-" or os.path.exists(path) or (
                any(c in path for c in "*?[") and glob.glob(path)):
            return path, text[at + 1 :]
        at = text.find("=", at + 1)
    path, label = text.rsplit("=", 1)
    return path, label


#: How often a read that waits on a pipe or terminal wakes to let Ctrl-C or SIGTERM be handled.
WAKE_SECONDS = 0.2


def waits_for_data(stream: BinaryIO) -> bool:
    """Whether a read of ``stream`` may block for as long as its writer likes (a pipe, a
    terminal, a socket: stdin, mostly), rather than only as long as a disk takes."""
    if os.name != "posix":
        return False
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISBLK(mode)


def cannot_be_read_again(path: str) -> bool:
    """Whether what is read of input ``path`` is gone once read: stdin (``-``) or a named pipe
    that is a pipe, a terminal or a socket, not a file (which can be read again). A stop while
    such an input is read scores what was read of it (``score``, ``stream``)."""
    if path == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        return stdin is not None and waits_for_data(stdin)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISBLK(mode)


def _read_waking(stream: BinaryIO, size: int, stop: threading.Event | None = None,
                 interrupts: list[BaseException] | None = None) -> bytes:
    """Up to ``size`` bytes of ``stream`` (fewer only at its end), as ``stream.read(size)``, but
    waiting for data in ``select`` with a timeout instead of in ``read``. A signal (Ctrl-C,
    SIGTERM) that the kernel hands to another thread (ONNX Runtime's, the output writer's) does
    not interrupt a read the main thread is blocked in, so Python would not run its handler until
    the writer sent more data or closed the pipe: a ``score -`` stopped while its input was idle
    hung. Waking every ``WAKE_SECONDS`` lets the handler run; ``stop`` being set ends the
    input there. With ``interrupts``, a stop that the handler raises (``KeyboardInterrupt``)
    ends the read too: it is added to ``interrupts``, and the bytes read before it are
    returned (a pipe cannot be read again: raised here, they would be lost)."""
    fd = stream.fileno()  # read below the buffer, which nothing has read through before
    parts: list[bytes] = []
    got = 0
    while got < size:
        try:
            piece = read_when_ready(fd, size - got, stop)
        except KeyboardInterrupt as exc:
            if interrupts is None:
                raise
            interrupts.append(exc)
            break
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def wait_readable(fd: int, stop: threading.Event | None = None) -> bool:
    """Wait until ``fd`` (a pipe, a terminal) has data or its writer has gone (True), or until
    ``stop`` is set (False), in ``select`` that wakes every ``WAKE_SECONDS``: a pending
    signal's handler runs between the waits. (``select`` is never restarted after a handler,
    even one installed with ``SA_RESTART``.)"""
    import select

    while stop is None or not stop.is_set():
        ready, _, _ = select.select([fd], [], [], WAKE_SECONDS)
        if ready:
            return True
    return False


def read_when_ready(fd: int, size: int, stop: threading.Event | None = None) -> bytes:
    """One ``os.read`` of up to ``size`` bytes of ``fd`` (a pipe, a terminal) once it has data,
    waiting in :func:`wait_readable`: ``stop`` being set ends the wait with no bytes, as at the
    end of the input. A descriptor left non-blocking whose data another reader of the same
    pipe took first is waited on again."""
    while wait_readable(fd, stop):
        try:
            return os.read(fd, size)
        except BlockingIOError:
            continue
    return b""


def read_arrived(fd: int, size: int, stop: threading.Event | None = None) -> bytes:
    """What has arrived on ``fd`` (a pipe, a terminal), up to ``size`` bytes, as soon as
    anything has: :func:`read_when_ready` for the first bytes, then more reads while more is
    there already (a busy writer fills chunks as large as ``size``; an idle one's lines are not
    kept waiting for more). No bytes at its end, or once ``stop`` is set while it is idle."""
    import select

    first = read_when_ready(fd, size, stop)
    parts = [first]
    got = len(first)
    while first and got < size and select.select([fd], [], [], 0)[0]:
        try:
            piece = os.read(fd, size - got)
        except BlockingIOError:  # (another reader of the same pipe took the data)
            break
        if not piece:  # its end: said by the next call
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _widen_pipe(fd: int, size: int) -> None:
    """Let the pipe of ``fd`` hold up to ``size`` bytes, 1 MiB at most (Linux; left as it is
    where that fails, or where it holds more already): a writer faster than the reader queues
    that much while a batch is scored, and :func:`read_arrived` hands it out as one chunk,
    instead of the 64 KiB a pipe holds by default (many small batches: half the records per
    second of 4 MiB chunks)."""
    import fcntl

    get, set_ = (getattr(fcntl, "F_GETPIPE_SZ", None), getattr(fcntl, "F_SETPIPE_SZ", None))
    if get is None or set_ is None:
        return
    want = min(size, 1 << 20)
    with contextlib.suppress(OSError):  # (not a pipe: a terminal, a socket; over the limit)
        if fcntl.fcntl(fd, get) < want:
            fcntl.fcntl(fd, set_, want)


#: The stop of the run under way (see :func:`stop_reads_on`). A context variable: other runs
#: (threads) are not stopped by it.
_RUN_STOP: ContextVar[threading.Event | None] = ContextVar("deepwatch_run_stop", default=None)


@contextlib.contextmanager
def stop_reads_on(stop: threading.Event) -> Iterator[None]:
    """Within it, :func:`iter_chunks` called without a ``stop`` of its own takes ``stop``:
    once it is set, a text input ends where it is, after the chunks of what was read of it (a
    last line without its line break is a reject: :data:`STOP_CUT`), a compressed named pipe as
    ``stop`` ends it there, and an input begun after that is not read at all. ``deepwatch
    score`` sets it on Ctrl-C or SIGTERM while it reads stdin or a pipe, which cannot be read
    again: every line it has read of them is scored before it stops."""
    token = _RUN_STOP.set(stop)
    try:
        yield
    finally:
        _RUN_STOP.reset(token)


class _Stopped(Exception):
    """``stop`` was set while a named pipe waited for its writer."""


def open_input(path: str, stop: threading.Event | None = None, buffering: int = -1
               ) -> BinaryIO | None:
    """``open(path, "rb")``, except that a named pipe (FIFO) is waited on in ``select`` until
    its writer has come (None if ``stop`` is set first), not in ``open``.

    ``open`` of a FIFO blocks until a writer opens it, in a system call that a signal does
    not end: Python retries it once its handler has run (PEP 475), and the kernel restarts it
    by itself when the signal went to another thread (ONNX Runtime's, a writer's) or the
    handler has ``SA_RESTART``. So a handler that only asks the run to stop (``deepwatch
    stream``'s, on SIGTERM or Ctrl-C) left it waiting for ever while nobody wrote to the FIFO.
    Here the FIFO is opened non-blocking (that returns at once), waited on until it has data or
    its writer came and went (Linux reports neither before a first writer, so a reader that
    opened early does not take the silence for the end of the input), then set blocking again
    for the reads that follow; the path is opened once only. Elsewhere than on Linux, where a
    FIFO with no writer may look readable at once, it is opened as any file is."""
    if not sys.platform.startswith("linux"):
        return open(path, "rb", buffering=buffering)  # noqa: SIM115 - closed by the caller

    def opener(name: str, flags: int) -> int:
        fd = os.open(name, flags | os.O_NONBLOCK)
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode) and not wait_readable(fd, stop):
                raise _Stopped
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        return open(path, "rb", buffering=buffering, opener=opener)  # noqa: SIM115
    except _Stopped:
        return None


def _open(spec: InputSpec, stop: threading.Event | None = None) -> BinaryIO | None:
    """Stdin or a file that is not compressed (None: ``stop`` was set while a named pipe
    waited for its writer)."""
    if spec.path == "-":
        if sys.stdin is None:  # its descriptor was closed when the run began (``- <&-``)
            raise InputError("cannot read <stdin>: standard input is closed")
        return sys.stdin.buffer
    try:
        return open_input(spec.path, stop)
    except OSError as exc:
        raise InputError(f"cannot read {spec.path}: {exc.strerror or exc}") from None


def chunks_from_reads(read: Callable[[], bytes], spec: InputSpec,
                      stopped: Callable[[], bool] | None = None) -> Iterator[Chunk]:
    """Whole-line chunks from ``read()`` calls until one returns no bytes. ``stopped()``, asked
    then, says whether a stop ended the reads (a last line without its line break is then a
    reject: see :data:`STOP_CUT`)."""
    lines = LineBuffer(spec)
    while block := read():
        yield from lines.feed(block)
    last = lines.finish(stopped is not None and stopped())
    if last is not None:
        yield last


#: The most output of one gzip member (xz stream) held back in memory until its checksum is
#: verified. A longer one is decompressed twice: once to verify it, once to hand it out (no copy
#: of it is kept in memory or on disk); that costs about 10% more time on such a gzip file, one
#: more decompression of it on an xz one. bzip2 is verified block by block instead, and read
#: once (see :mod:`deepwatch.sources._bzip2`).
HOLD_BYTES = 256 << 20
_PIECE = 128 << 10  # compressed bytes read at a time
_OUT = 1 << 20  # the most output of one decompress call (a flood compresses 1,000 to 1)
#: The most bytes of text that could not be trusted kept with the damage (see Chunk.lost).
LOST_BYTES = 4 * MAX_RAW
_TRUNCATED = "the compressed stream ends early (truncated file)"
_CUT_AT_STOP = ("the stop cut the named pipe short inside a bzip2 block (its writer had not "
                "closed it), whose text was not decoded")


@dataclass
class _Member:
    """How the decompression of one gzip member (or xz stream) ended."""

    ended: bool = False  # its end was read and the checksums (and length) were right
    error: str | None = None  # why it is damaged (bad header, invalid data, wrong checksum)
    empty: bool = False  # there was no member: the input had ended
    rest: bytes = b""  # compressed bytes read after its end (the next member's start)
    #: with ``empty``: the zero bytes read after the previous member (xz stream padding, or
    #: zero bytes that are not a multiple of 4 but run to the end of the file)
    padding: int = 0
    # none of the above: the file ends inside the member (truncated)


def _inflate(fh: BinaryIO, first: bytes, member: _Member) -> Iterator[bytes]:
    """The decompressed output of the gzip member that starts with ``first`` (compressed bytes
    already read) and goes on in ``fh``, in pieces as zlib gives them; ``member`` says how it
    ended. zlib checks the member's CRC-32 only at its end: the output is unverified until then.
    """
    dec = zlib.decompressobj(wbits=31)
    data = first or fh.read(_PIECE)
    if not data:
        member.empty = True
        return
    try:
        while True:
            while data:
                before = dec.copy()  # the output of a call that fails is lost: see _before_error
                try:
                    out = dec.decompress(data, _OUT)
                except zlib.error:
                    yield _before_error(before, data)
                    raise
                if out:
                    yield out
                if dec.eof:
                    member.ended, member.rest = True, dec.unused_data
                    return
                data = dec.unconsumed_tail
            data = fh.read(_PIECE)
            if not data:  # the file ends inside the member: hand out what zlib still holds
                out = dec.flush()
                if out:
                    yield out
                member.ended = dec.eof
                return
    except zlib.error as exc:
        member.error = f"corrupt compressed data ({exc})"


def _before_error(dec: Any, data: bytes) -> bytes:
    """What ``dec`` decompresses from ``data`` before it fails, to about 4 KiB (small steps)."""
    out = []
    try:
        while data:
            out.append(dec.decompress(data, 4096))
            data = dec.unconsumed_tail
    except zlib.error:
        pass
    return b"".join(out)


def _decompressor(kind: Compression) -> Any:
    """A new decompressor of one xz stream (bzip2 is read by :mod:`._bzip2`)."""
    import lzma

    return lzma.LZMADecompressor(lzma.FORMAT_XZ)


def _unpack(kind: Compression, fh: BinaryIO, first: bytes, member: _Member,
            after: bool = False) -> Iterator[bytes]:
    """The decompressed output of the xz stream that starts with ``first`` (compressed bytes
    already read) and goes on in ``fh``, in pieces; ``member`` says how it ended, as
    :func:`_inflate` does for gzip. Each stream's checksums are checked at its end at the latest
    (per block and its index). ``after``: another stream ended just before, so the NUL bytes of
    xz's stream padding may come first.
    """
    import lzma

    data = first or fh.read(_PIECE)
    if after and kind.name == "xz":  # stream padding: a multiple of 4 NUL bytes
        nuls = 0
        while data and all_zero(data):
            nuls += len(data)
            data = fh.read(_PIECE)
        rest = data.lstrip(b"\x00")
        nuls += len(data) - len(rest)
        data = rest
        member.padding = nuls
        if nuls % 4 and data:  # (all the rest of the file zero bytes: padding, not damage)
            member.error = (f"corrupt compressed data (stream padding of {nuls:,} bytes, not a "
                            "multiple of 4)")
            return
    if not data:
        member.empty = True
        return
    dec = _decompressor(kind)
    while True:
        try:
            out = dec.decompress(data, _OUT)
        except (OSError, EOFError, lzma.LZMAError) as exc:
            member.error = f"corrupt compressed data ({exc})"
            return
        if out:
            yield out
        if dec.eof:
            member.ended, member.rest = True, dec.unused_data
            return
        data = b""
        if dec.needs_input:  # else it still holds input: called again with none
            data = fh.read(_PIECE)
            if not data:  # the file ends inside the stream
                return


@dataclass
class StreamDamage:
    """Why a compressed input could not be read to its end."""

    why: str
    #: output of the member that failed, decompressed but not handed out: it could not be
    #: verified. ``unverified`` keeps its first bytes (at most LOST_BYTES); for a file that
    #: is not of its compression at all (``unverified_bytes`` 0), the file's first bytes.
    unverified_bytes: int = 0
    unverified: bytes = b""
    #: what failed: "gzip member", "bzip2 block", "xz stream"
    unit: str = "gzip member"


@dataclass(frozen=True)
class HeldBack:
    """The output of the gzip member (xz stream) that a stop cut short on a named pipe: it was
    decompressed but not handed out, since its checksum was still to come (see
    :class:`VerifiedStream`)."""

    size: int  # its bytes
    newlines: int  # the line breaks among them
    ends_line: bool  # its last byte is a line break (or it is empty)
    unit: str = "gzip member"


@dataclass(frozen=True)
class StopCut:
    """What a stop left unscored of a compressed input read from a named pipe: the text of the
    gzip member (xz stream) it cut short, from line ``line`` on, which could not be verified
    (its checksum was still to come) and is not handed out. The line that the member before it
    left unfinished, if any, goes with it (it goes on in that text)."""

    input: str  # as the user named it
    line: int  # its first line
    lines: int  # how many lines it holds (a last one without its line break included)
    size: int  # its bytes
    unit: str = "gzip member"

    def describe(self) -> str:
        lines = (f"line {self.line:,}" if self.lines == 1 else
                 f"lines {self.line:,}-{self.line + self.lines - 1:,}" if self.lines else
                 f"no whole line (from line {self.line:,})")
        return (f"{self.input} was cut at the stop: {self.size:,} bytes decompressed from its "
                f"last {self.unit} ({lines}) were read but not scored, since they could not be "
                "verified (the checksum comes at the end)")


class VerifiedStream:
    """The decompressed bytes of a gzip file (one member or several, concatenated), in blocks of
    about ``block_bytes``, each member's only once its checksum is verified. ``kind`` xz reads
    such a file the same way, a stream of it (one or several, concatenated, and xz's stream
    padding between them) standing for a gzip member, verified by its blocks' checks and its
    index. ``kind`` bzip2 reads each block of each stream (one or several, as ``pbzip2``
    writes) as its own unit, verified by its own CRC, the stream's combined CRC checked at its
    end (:mod:`deepwatch.sources._bzip2`): nothing is held back longer than a block, and
    nothing is read twice.

    Deflate data that is corrupt, not cut, can decompress to garbage before zlib sees the
    damage, at the latest at the member's CRC-32 in its trailer. So the output of a member is
    held back until the member ends and is verified: up to ``hold_bytes`` in memory; a longer
    member is decompressed once to the end to verify it, then again from its start to hand it
    out (the file is read twice there, and memory stays bounded). After iteration,
    :attr:`damage` says why the file could not be read to its end, or is None:

    * a member that fails (bad header, invalid data, wrong checksum or length): nothing of it is
      handed out, and its output counts as ``unverified``; nothing after it can be read either,
      since the next member's start cannot be found in damaged data.
    * the file ends inside a member (truncated): what it gave up to the cut is handed out, as
      deflate output before a cut is genuine (it cannot be verified, the trailer being lost).
      Corrupt data that zlib decodes without an error up to the end of the file (a damaged
      end-of-block code in the last member, say) looks the same and cannot be told apart.
    * ``stop`` cuts a named pipe short (:attr:`cut`; its writer had not closed it): what was
      read of it is read as a whole file would be, except for the member it cut short, whose
      output is not handed out (it could be verified had the run read on): :attr:`held_back`
      says how much it was. That is no damage. (bzip2: a block cut short is damage, its text
      not read.)

    Holding back a whole member, rather than rejecting on failure what was already handed out,
    is what keeps every handed-out line genuine: the lines of a member that fails are never
    parsed, scored or counted as records. The price is latency and, for members longer than
    ``hold_bytes``, a second decompression (zlib here is still faster than the single pass of
    Arrow's gzip stream that it replaces). An xz file written in one piece (``xz``, even ``xz
    -T0``: one stream of many blocks) is one such unit, so damage anywhere in it withholds all
    of it, as for a gzip file of one member. (liblzma, like libbzip2, writes a block's text
    before it has checked the block's check, so an xz block cannot be handed out on its own as
    a bzip2 block is; and ``xz`` without ``-T`` writes one block.) In a bzip2 file, damage
    withholds the damaged block's text (900 kB of it at ``bzip2 -9``) and what follows.

    ``on_bytes`` is told of the compressed bytes as they are read (a progress bar's advance):
    each byte of the file once, an xz stream or gzip member read twice counted once, and the
    bytes a damage leaves unread at the end, so that the counts add up to the file's size.
    """

    def __init__(self, path: str, block_bytes: int = CHUNK_BYTES, hold_bytes: int | None = None,
                 on_bytes: Callable[[int], None] | None = None, kind: str = "gzip",
                 stop: threading.Event | None = None,
                 on_read: Callable[[bytes], None] | None = None):
        self.path = path
        #: a named pipe is read until ``stop`` is set at the latest (see :func:`open_input`)
        self.stop = stop
        #: after iteration: ``stop`` was set before the named pipe's writer came
        self.stopped = False
        #: after iteration: ``stop`` cut a named pipe short (its writer had not closed it)
        self.cut = False
        #: after iteration, with ``cut``: the output of the member (xz stream) the stop cut
        #: short, held back unverified and not handed out; None when the cut fell between two
        #: (bzip2: see :meth:`_bzip2`)
        self.held_back: HeldBack | None = None
        self.block_bytes = block_bytes
        self.hold_bytes = HOLD_BYTES if hold_bytes is None else hold_bytes
        self.kind = compression(kind)
        self.damage: StreamDamage | None = None
        #: after iteration: the file held no byte at all (no member, not even a header)
        self.empty = False
        #: after iteration: zero bytes from the end of the last member (stream) to the end of
        #: the file, read as padding rather than damage (see :mod:`._tail`); xz's own stream
        #: padding, a multiple of 4 bytes, is left out: it is part of the format
        self.padding = 0
        self.on_bytes = on_bytes
        self._counted = 0  # compressed bytes told to on_bytes so far
        #: handed the compressed bytes of a file that cannot seek (a named pipe), each once, as
        #: they are read (a seekable file may be read twice and is not handed over)
        self.on_read = on_read

    def __iter__(self) -> Iterator[bytes]:
        parts: list[bytes] = []  # verified output, joined once about block_bytes are there
        size = 0
        opened = open_input(self.path, self.stop, buffering=0)
        if opened is None:
            self.stopped = True
            return
        with opened as raw:
            fh: BinaryIO = raw
            if not raw.seekable():
                fh, self.cut = _spooled(raw, self.stop, self.on_read)
            try:
                for piece in self._verified(fh):
                    parts.append(piece)
                    size += len(piece)
                    if size >= self.block_bytes:
                        yield b"".join(parts)
                        parts, size = [], 0
                # read to its end, or a damage leaves the rest unread: counted as read all the same
                self._count(fh, to_end=True)
            finally:
                if fh is not raw:
                    fh.close()
        if parts:
            yield b"".join(parts)

    def _count(self, fh: BinaryIO, to_end: bool = False) -> None:
        """Tell ``on_bytes`` of the compressed bytes read so far (to the end of the file with
        ``to_end``) not told yet."""
        if self.on_bytes is None:
            return
        at = os.fstat(fh.fileno()).st_size if to_end else fh.tell()
        if at > self._counted:
            self.on_bytes(at - self._counted)
            self._counted = at

    def _start(self, fh: BinaryIO, first: bytes, member: _Member, after: bool
               ) -> Iterator[bytes]:
        """The output of the member that starts with ``first`` (``after`` another)."""
        if self.kind.name == "gzip":
            return _inflate(fh, first, member)
        return _unpack(self.kind, fh, first, member, after)

    def _verified(self, fh: BinaryIO) -> Iterator[bytes]:
        first = fh.read(_PIECE)  # compressed bytes of the next member already read
        if not first:
            self.empty = True
            return
        if not self._starts_unit(first):
            # the reject keeps the file's first bytes: they show what it is
            self._damage(_not_compressed(self.kind, self.path, first), 0, first[:LOST_BYTES])
            return
        if self.kind.name == "bzip2":  # verified block by block, read once
            yield from self._bzip2(fh, first)
            return
        after = False  # a member ended just before
        while True:
            if after and self.kind.name == "gzip":
                first = first or fh.read(_PIECE)
                if first[:1] == b"\x00":  # zero bytes to the end of the file are padding
                    zeros = zeros_to_end(fh, first, on_read=lambda: self._count(fh))
                    if zeros is not None:
                        self.padding = zeros
                        return
            if after:
                first = first or fh.read(_PIECE)
                if first[:1] not in (b"", b"\x00") and not self._starts_unit(first):
                    self._not_a_unit(fh, first)
                    return
            start = fh.tell() - len(first)
            member = _Member()
            output = self._start(fh, first, member, after)
            after = True
            held: list[bytes] = []
            size = 0
            for out in output:
                size += len(out)
                self._count(fh)
                if size > self.hold_bytes:
                    break
                held.append(out)
            else:  # the whole member was held
                if member.empty:
                    self.padding = member.padding if member.padding % 4 else 0
                    return
                if member.error is not None:
                    self._fail(member.error, size, held)
                    return
                if not member.ended and self.cut:  # unverified: held back, not handed out
                    self.held_back = HeldBack(size, sum(count_newlines(p) for p in held),
                                              not size or held[-1].endswith(b"\n"),
                                              self.kind.unit)
                    return
                held.reverse()  # handed out first to last, each piece let go once handed out
                while held:
                    yield held.pop()
                if not member.ended:
                    self._damage(_TRUNCATED)
                    return
                first = member.rest
                continue
            # longer than hold_bytes: decompress it to its end to verify it, then again
            head = held[:1] or [out]
            # a member cut short by a stop is not read again: its line breaks are counted here
            newlines = sum(count_newlines(p) for p in held) + count_newlines(out) if self.cut else 0
            last = out
            del held
            for more in output:
                size += len(more)
                self._count(fh)
                if self.cut:
                    newlines += count_newlines(more)
                    last = more or last
            if member.error is not None:
                self._fail(member.error, size, head)
                return
            if not member.ended and self.cut:
                self.held_back = HeldBack(size, newlines, last.endswith(b"\n"), self.kind.unit)
                return
            fh.seek(start)
            again = _Member()
            yield from self._start(fh, b"", again, after=start > 0)
            if again.error is not None or again.ended != member.ended:  # rewritten meanwhile
                self._damage(f"the file changed while it was read (a long {self.kind.unit}, "
                             "read twice, did not end the same way)")
                return
            if not again.ended:
                self._damage(_TRUNCATED)
                return
            first = again.rest

    def _starts_unit(self, first: bytes) -> bool:
        """Whether ``first``, bytes read where a member (stream) would start, may be one: they
        start with its magic, or with as much of it as they have."""
        return any(first[: len(m)] == m[: len(first)] for m in self.kind.magic)

    def _not_a_unit(self, fh: BinaryIO, first: bytes) -> None:
        """Damage by bytes after a member (stream) that are not another one, ``first`` being
        their beginning: text appended to a compressed file, say (``gzip -d`` warns of trailing
        garbage). The reject keeps their first bytes, which show what they are."""
        at = fh.tell() - len(first)
        lost = (first + fh.read(max(0, LOST_BYTES - len(first))))[:LOST_BYTES]
        unit = self.kind.unit
        self._damage(f"corrupt compressed data (the bytes at offset {at:,} are not the start of "
                     f"{'an' if unit.startswith('xz') else 'a'} {unit})", 0, lost)

    def _bzip2(self, fh: BinaryIO, first: bytes) -> Iterator[bytes]:
        """A bzip2 file's text, each block's once its CRC is verified (see
        :mod:`deepwatch.sources._bzip2`)."""
        from ._bzip2 import Outcome, read_bzip2

        outcome = Outcome()
        yield from read_bzip2(fh, first, lambda: self._count(fh), outcome, LOST_BYTES, _PIECE)
        if outcome.why is not None:
            self._damage(outcome.why, outcome.unverified_bytes, outcome.unverified)
        elif outcome.truncated:
            # (the text of a bzip2 block cut short is not decoded: its size is not known)
            self._damage(_CUT_AT_STOP if self.cut else _TRUNCATED)
        self.padding = outcome.padding

    def _fail(self, why: str, size: int, held: list[bytes]) -> None:
        """Damage by a member that fails after ``size`` bytes of output (``held``: its first)."""
        head, kept = [], 0
        for piece in held:
            if kept >= LOST_BYTES:
                break
            head.append(piece)
            kept += len(piece)
        self._damage(why, size, b"".join(head)[:LOST_BYTES])

    def _damage(self, why: str, unverified_bytes: int = 0, unverified: bytes = b"") -> None:
        self.damage = StreamDamage(why, unverified_bytes, unverified, self.kind.unit)


def _spooled(stream: BinaryIO, stop: threading.Event | None = None,
             on_read: Callable[[bytes], None] | None = None) -> tuple[BinaryIO, bool]:
    """A copy of a stream that cannot seek (a named pipe), in a temporary file that can: a long
    gzip member (xz stream) is read twice. The copy is compressed data, a fraction of the
    text. A pipe is waited on in ``select`` (see :func:`wait_readable`), so that Ctrl-C and
    SIGTERM stop a run while its writer is idle; ``stop`` ends the copy there. ``on_read`` is
    handed each piece of the stream as it is copied. Also returned: whether ``stop`` cut the
    copy short (the pipe had not ended)."""
    copy = tempfile.TemporaryFile()  # noqa: SIM115 - closed by VerifiedStream
    cut = False
    if waits_for_data(stream):
        fd = stream.fileno()  # unbuffered (VerifiedStream opens it so): nothing read past
        while True:
            if not wait_readable(fd, stop):
                cut = True
                break
            try:
                piece = os.read(fd, _PIECE)
            except BlockingIOError:  # (another reader of the same pipe took the data)
                continue
            if not piece:
                break
            copy.write(piece)
            if on_read is not None:
                on_read(piece)
    elif on_read is None:
        shutil.copyfileobj(stream, copy, _PIECE)
    else:
        while piece := stream.read(_PIECE):
            copy.write(piece)
            on_read(piece)
    copy.seek(0)
    return copy, cut  # type: ignore[return-value]


def _not_compressed(kind: Compression, path: str, head: bytes) -> str:
    """Why a file read as ``kind`` (by its name) is not read: its first bytes, ``head``, are not
    ``kind``'s. Plain text under a compressed name is told apart from other bytes."""
    named = f"named {kind.suffix}" if path.endswith(kind.suffix) else f"read as {kind.name}"
    why = f"not {kind.name} data: the file is {named} but does not start as {kind.name} data does"
    sample = head[:4096]
    try:
        sample.decode("utf-8")
        textual = True
    except UnicodeDecodeError as exc:  # a character cut at the end of the sample is still text
        textual = exc.reason == "unexpected end of data"
    if textual and any(c < 32 for c in sample.translate(None, b"\t\n\r\x0c")):
        textual = False
    if textual:
        return (f"{why}; it looks like plain text (to read it as text, name it without "
                f"{kind.suffix}, or read it from stdin: `deepwatch ... - < FILE`)")
    return f"{why} (damaged at its start, or compressed otherwise)"


def _damage_reason(damage: StreamDamage, line: int, cut: bytes) -> str:
    """The reason of the reject that stands for the lines from ``line`` on, which could not be
    read or trusted; ``cut``: the text of line ``line`` before the damage, if any."""
    if damage.unverified_bytes:
        return (f"{damage.why}: the {damage.unverified_bytes:,} bytes decompressed from line "
                f"{line:,} on come from a damaged {damage.unit} and could not be verified, and "
                "nothing after them could be read")
    if cut:
        return f"{damage.why}: line {line:,} is cut short, and nothing after it could be read"
    return f"{damage.why}: nothing from line {line:,} on could be read"


def _notes(spec: InputSpec, kind: str, blocks: VerifiedStream) -> list[str]:
    """What to warn about a compressed file read to its end without damage that is no reject:
    a file of no byte at all (``gzip -t`` calls it an unexpected end of file: a failed transfer,
    or a log not written yet), and zero bytes after its last member or stream (padding)."""
    notes = []
    if blocks.empty:
        suffix = compression(kind).suffix
        named = f"named {suffix}" if spec.path.endswith(suffix) else f"read as {kind}"
        notes.append(f"the file is empty (0 bytes) and holds no {kind} data, though it is "
                     f"{named} (a failed transfer, or a file not written yet?)")
    if blocks.padding:
        last = "gzip member" if kind == "gzip" else f"{kind} stream"
        notes.append(f"decompression OK, {blocks.padding:,} trailing zero bytes ignored (after "
                     f"the last {last}: padding, not data)")
    return notes


def _compressed_chunks(spec: InputSpec, kind: str, chunk_bytes: int,
                       on_bytes: Callable[[int], None] | None,
                       stop: threading.Event | None = None,
                       on_read: Callable[[bytes], None] | None = None,
                       on_cut: Callable[[StopCut], None] | None = None) -> Iterator[Chunk]:
    """:func:`iter_chunks` of a compressed file (gzip, bzip2 or xz): the lines of its verified
    members or streams (:class:`VerifiedStream`)."""
    try:
        blocks = VerifiedStream(spec.path, chunk_bytes, on_bytes=on_bytes, kind=kind, stop=stop,
                                on_read=on_read)
        lines = LineBuffer(spec)
        first = True
        for block in blocks:
            if first:  # its text, which could not be looked at before it was decompressed
                first = False
                _refuse_utf16(spec, block)
            yield from lines.feed(block)
    except OSError as exc:
        raise InputError(f"cannot read {spec.path}: {exc.strerror or exc}") from None
    if blocks.stopped:  # a named pipe that no writer opened before the stop: no input at all
        return
    held = blocks.held_back
    if held is not None:  # a named pipe cut short by the stop inside a member (stream)
        rest = lines.long if lines.long else len(lines.rest)
        size = rest + held.size
        ends_line = held.ends_line if held.size else not rest
        stop_cut = StopCut(spec.display, lines.line, held.newlines + (0 if ends_line else 1),
                           size, held.unit)
        if on_cut is not None:
            on_cut(stop_cut)
        else:
            log.warning("%s", stop_cut.describe())
        return
    damage = blocks.damage
    if damage is None:
        for note in _notes(spec, kind, blocks):
            log.warning("%s: %s", spec.display, note)
        last = lines.finish(stopped=blocks.cut)  # (a stop between two members)
        if last is not None:
            yield last
        return
    # the line cut by the damage is no record: it goes with the damage, as the rest does
    cut = lines.long_head if lines.long else lines.rest
    reason = _damage_reason(damage, lines.line, cut)
    log.warning("%s: %s", spec.display, reason)
    yield Chunk(b"", lines.line, spec, damage=reason,
                lost=(cut + damage.unverified)[:LOST_BYTES], rest_lost=True)


def iter_chunks(spec: InputSpec, chunk_bytes: int = CHUNK_BYTES,
                on_bytes: Callable[[int], None] | None = None,
                stop: threading.Event | None = None,
                on_read: Callable[[bytes], None] | None = None,
                on_cut: Callable[[StopCut], None] | None = None,
                promptly: bool = False) -> Iterator[Chunk]:
    """Whole-line chunks of about ``chunk_bytes`` each, numbered from line 1.

    ``promptly`` (``deepwatch stream``, which scores records as they arrive): a text input that
    is a pipe or terminal (stdin, a named pipe) hands out its whole lines as soon as they
    arrive, with what else has arrived by then (:func:`read_arrived`), instead of once
    ``chunk_bytes`` have come or the writer has closed it; stdin read from a file ends at once
    when ``stop`` is set. Either way the first bytes of stdin or a pipe are looked at before
    anything is handed out: compressed data or UTF-16 text is refused with one line
    (:class:`InputError`).

    A damaged compressed input (.gz, .bz2, .xz) does not stop the run: every line before the
    damage that can be trusted is read, then a last empty chunk stands for the rest
    (:attr:`Chunk.damage` says why), and a warning is logged. That chunk is one reject, whatever
    the number of lines it stands for: the line cut short by the damage, the output of a gzip
    member, xz stream or bzip2 block that fails its check (see :class:`VerifiedStream`) and what
    follows. Their number is not known: the line breaks in corrupt data are not to be trusted
    either.

    A pipe or terminal (stdin, a named pipe) is waited on in ``select``, so that Ctrl-C and
    SIGTERM stop the run while it is idle, a named pipe with no writer yet included (see
    :func:`open_input`). ``stop`` being set ends such an input where it is, as its end would;
    a compressed one is read to that point as it would be to its end, except for the gzip
    member (xz stream) the stop cut short: its text, unverified, is not handed out, and
    ``on_cut`` is told of it (:class:`StopCut`; logged as a warning without ``on_cut``). Complete
    members before it are handed out. (A bzip2 block cut short is the damage of a last chunk.)
    Within :func:`stop_reads_on`, a stop raised there instead (Ctrl-C and SIGTERM raise
    ``KeyboardInterrupt``) ends a text input so too: the lines read before it are handed out,
    then it is raised again. An input a stop ended (not its end) hands out a last line without
    its line break as a reject (:data:`STOP_CUT`): its writer may not have finished it.

    ``on_read`` is handed the input's bytes as they are read, each once, in order (for a
    checksum of an input that cannot be read again, such as stdin or a pipe): all of them for
    text; for a compressed input, only where it cannot seek (a named pipe; a file that can seek
    may be read twice, and is not handed over).
    """
    run_stop = stop is None and _RUN_STOP.get() is not None
    if run_stop:  # (see stop_reads_on)
        stop = _RUN_STOP.get()
        if stop is not None and stop.is_set():  # begun after the run's stop: not read at all
            return
    kind = spec.compression
    if kind is not None:
        yield from _compressed_chunks(spec, kind, chunk_bytes, on_bytes, stop, on_read, on_cut)
        return
    opened = _open(spec, stop)
    if opened is None:  # stopped before the named pipe's writer came: no input at all
        return
    stream = opened
    first = True
    waits = waits_for_data(stream)
    if waits and promptly:
        _widen_pipe(stream.fileno(), chunk_bytes)

    # within stop_reads_on, a stop raised (Ctrl-C, SIGTERM: KeyboardInterrupt) while a pipe or
    # stdin is waited on: what was read of it is handed out first, then the stop is raised again
    interrupts: list[BaseException] = []
    # a pipe, stdin, or within stop_reads_on any input, ends where the stop came, not at its
    # end: its last line read may be unfinished (a regular file read to its end is not that)
    ends_on_stop = waits or spec.path == "-" or run_stop

    def stopped() -> bool:
        return bool(interrupts) or (ends_on_stop and stop is not None and stop.is_set())

    def read() -> bytes:
        nonlocal first
        if interrupts or (run_stop and stop is not None and stop.is_set() and not waits):
            return b""  # (a pipe's read ends by itself on stop, after what it has read)
        try:
            if waits:
                block: bytes = (read_arrived(stream.fileno(), chunk_bytes, stop) if promptly
                                else _read_waking(stream, chunk_bytes, stop,
                                                  interrupts if run_stop else None))
                # the first bytes are looked at below: not while they may be half a magic
                while first and promptly and _starts_a_magic(block):
                    more = read_arrived(stream.fileno(), chunk_bytes - len(block), stop)
                    if not more:
                        break
                    block += more
            elif promptly and spec.path == "-" and stop is not None and stop.is_set():
                block = b""
            else:
                block = stream.read(chunk_bytes)
        except OSError as exc:
            raise InputError(f"cannot read {spec.display}: {exc}") from None
        if first:  # stdin or a pipe, which could not be looked at before it was read
            first = False
            _refuse_compressed(spec, block)
            _refuse_utf16(spec, block)
        if on_bytes is not None and block:
            on_bytes(len(block))
        if on_read is not None and block:
            on_read(block)
        return block

    try:
        yield from chunks_from_reads(read, spec, stopped)
    finally:
        if spec.path != "-":
            stream.close()
    if interrupts:
        raise interrupts[0]


def read_inputs(specs: Inputs | Sequence[InputSpec], fmt: Format | str,
                progress: bool = False) -> tuple[pa.Table, pa.Table, Stats]:
    """Parse every input completely. Returns ``(table, rejects, stats)``.

    ``fmt``: a format or its name (``"kdd"``; a name failed with ``AttributeError:
    parse_bulk``). ``rejects`` has a ``source`` column; ``stats`` counts ``lines``,
    ``parsed``, ``rejected``.
    """
    from ..formats import get_format
    from ..io import InputReader

    if isinstance(fmt, str):
        fmt = get_format(fmt)
    elif not hasattr(fmt, "parse_bulk"):  # (it failed with "AttributeError: parse_bulk")
        raise UsageError(f"fmt must be a format or its name ('kdd', 'access'...), not "
                         f"{type(fmt).__name__}")
    reader = InputReader(fmt, specs, progress=progress)
    return reader.read_all()
