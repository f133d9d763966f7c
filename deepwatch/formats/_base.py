"""What every input format provides: text lines in, an Arrow RecordBatch and rejects out."""

from __future__ import annotations

import codecs
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

#: Schema of rejected records, wherever they are kept (JSONL, dead-letter topic, REST reply).
REJECT_SCHEMA = pa.schema(
    [
        pa.field("line", pa.int64()),
        pa.field("raw", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


def empty_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table()


#: The most characters of a rejected line kept with its reason (the reason says when it was cut).
MAX_RAW = 10_000


#: A carriage return with more text after it on the same line (a regular expression). Only
#: ``\n`` ends a line, so such a line is a file with CR line ends (classic Mac OS) read as one
#: line, or records run together. Formats whose lines can hold text after a whole record (an
#: access log's extra fields, a Zeek header or TSV record) reject it: they would otherwise keep
#: the first record, or take the line for a header, and drop the rest unseen.
CR_INSIDE = r"\r\s*\S"
CR_INSIDE_REASON = ("a carriage return (\\r) with more text after it: only \\n ends a line, so "
                    "this may be several records run together (CR line ends? convert them: "
                    "tr '\\r' '\\n')")

#: Why a line that starts with a UTF-8 byte order mark is a reject. The mark that opens a file
#: or stdin is dropped before its first line is parsed (``sources/files.py``), so one that
#: starts a line is inside the text: most often where a file was joined to another that opened
#: with one (``cat a.log b.log``). It is invisible in the raw text shown, so the reason names it.
BOM_LINE_REASON = ("the line starts with a UTF-8 byte order mark (U+FEFF): a file joined to the "
                   "one before it?")


#: The codecs error handler that input text is decoded with (``data.decode("utf-8",
#: HEX_ERRORS)``): each byte that is not part of valid UTF-8 is written ``\xHH`` (upper-case
#: hexadecimal, one escape per byte, as NGINX writes such bytes; Apache and Zeek write ``\xhh``)
#: instead of U+FFFD, which would lose their values: for a security tool the bytes of a payload
#: are evidence. The record is still parsed, with the escapes in its text; valid UTF-8 decodes as
#: fast as with any other handler (it is called on an error only).
def register_hex_errors(name: str, backslash: str) -> str:
    """Register the codecs error handler ``name``, which writes each byte that is not UTF-8 as
    ``backslash`` + ``xHH`` (upper-case hexadecimal); returns ``name``."""
    escapes = tuple(f"{backslash}x{b:02X}" for b in range(256))

    def handler(exc: UnicodeError) -> tuple[str, int]:
        if not isinstance(exc, UnicodeDecodeError):
            raise exc
        return "".join([escapes[b] for b in exc.object[exc.start : exc.end]]), exc.end

    codecs.register_error(name, handler)
    return name


HEX_ERRORS = register_hex_errors("deepwatch-hex", "\\")


def decode_text(data: bytes) -> str:
    """Input bytes as text, each byte that is not UTF-8 written ``\\xHH`` (see HEX_ERRORS)."""
    return data.decode("utf-8", HEX_ERRORS)


def _surrogates_as_bytes(exc: UnicodeError) -> tuple[bytes, int]:
    """Codecs error handler: a lone surrogate U+DC80..U+DCFF written back as the byte it
    stands for (Python's ``surrogateescape``), any other lone surrogate as its three bytes
    (``surrogatepass``); both are then not UTF-8, and read as such bytes are (``\\xHH``)."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start : exc.end]:
        code = ord(ch)
        out += (bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF
                else ch.encode("utf-8", "surrogatepass"))
    return bytes(out), exc.end


SURROGATE_BYTES = "deepwatch-surrogate-bytes"
codecs.register_error(SURROGATE_BYTES, _surrogates_as_bytes)


def as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    """Raw input text as bytes, whatever :func:`check_text` lets through: a ``bytearray`` or
    ``memoryview`` copied, a ``str`` encoded as UTF-8. A str may hold lone surrogates: Python
    keeps the bytes of text that is not UTF-8 so (``errors="surrogateescape"``: ``sys.stdin``
    in the C or POSIX locale, ``os.fsdecode``, ``open(..., errors="surrogateescape")``), and
    strict encoding raised UnicodeEncodeError from deep inside a parse: they are written back
    as those bytes, so the text parses as the bytes it was read from do."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8", SURROGATE_BYTES)
    return bytes(data)


def cut_raw(raw: str, why: str) -> tuple[str, str]:
    """A rejected record's raw text and reason as kept: a text longer than MAX_RAW keeps its
    beginning, and the reason says so."""
    if len(raw) <= MAX_RAW:
        return raw, why
    return raw[:MAX_RAW], (f"{why} (raw text cut to its first {MAX_RAW:,} of {len(raw):,} "
                           "characters)")


def cut_lost(lost: bytes, why: str) -> tuple[str, str]:
    """The raw text and reason of a reject that stands for text not read as a line (an
    over-long line, the damaged rest of an input; ``why`` says which, and how long it is),
    ``lost`` being the first bytes of that text: at most MAX_RAW of them are kept, cut where a
    character starts, and the reason says how many. (:func:`cut_raw` would count the characters
    of ``lost``, which is itself only the beginning of the text.) A byte that is not UTF-8 is
    written ``\\xHH`` (see HEX_ERRORS): the text then holds four characters for it."""
    if len(lost) <= MAX_RAW:
        return decode_text(lost), why
    decoder = codecs.getincrementaldecoder("utf-8")(errors=HEX_ERRORS)
    raw = decoder.decode(lost[:MAX_RAW])  # a character cut at the end is held back, not kept
    kept = MAX_RAW - len(decoder.getstate()[0])
    return raw, f"{why} (the raw text keeps its first {kept:,} bytes)"


def make_rejects(lines: list[int], raws: list[str], reasons: list[str]) -> pa.Table:
    """Rejects from the whole raw lines, cut as :func:`cut_raw` cuts them."""
    if any(len(r) > MAX_RAW for r in raws):
        cut = [cut_raw(r, why) for r, why in zip(raws, reasons, strict=True)]
        raws, reasons = [r for r, _ in cut], [why for _, why in cut]
    return pa.table(
        {
            "line": pa.array(lines, pa.int64()),
            "raw": pa.array(raws, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        },
        schema=REJECT_SCHEMA,
    )


def _last_line_starting(raw: bytes, prefix: bytes) -> tuple[int, str | None]:
    """(where it starts, its text without a CR at its end) of the last line of ``raw`` that
    starts with ``prefix``; (-1, None) where none does. A line with CR_INSIDE is a reject, not
    such a line: the search looks further back."""
    import re

    before = len(raw)
    while True:
        at = raw.rfind(b"\n" + prefix, 0, before)
        start = at + 1 if at >= 0 else 0 if raw.startswith(prefix) else -1
        if start < 0:
            return -1, None
        end = raw.find(b"\n", start)
        line = raw[start : end if end >= 0 else len(raw)]
        if not re.search(CR_INSIDE.encode(), line):
            return start, decode_text(line).removesuffix("\r")
        if at < 0:
            return -1, None
        before = at


@dataclass
class ParseResult:
    """Parsed records of one chunk of input and the lines that could not be parsed.

    ``rows`` holds, for every parsed record, its 1-based line number in the input, so that
    ``len(batch) + len(rejects) == lines`` can always be checked. ``skipped`` counts the lines
    that are not records at all (a Zeek log's ``#fields`` and other header lines): a chunk of
    ``n`` lines gives ``lines + skipped == n``.
    """

    batch: pa.RecordBatch
    rejects: pa.Table
    lines: int
    line_numbers: pa.Array = field(default_factory=lambda: pa.array([], pa.int64()))
    skipped: int = 0

    def __repr__(self) -> str:  # (the default printed every record and line number)
        return (f"ParseResult(lines={self.lines:,}, parsed={self.batch.num_rows:,}, "
                f"rejected={self.rejects.num_rows:,}, skipped={self.skipped:,})")

    def __post_init__(self) -> None:
        if self.batch.num_rows + self.rejects.num_rows != self.lines:
            raise AssertionError(
                f"parser lost records: {self.batch.num_rows} parsed + "
                f"{self.rejects.num_rows} rejected != {self.lines} lines"
            )


def reject_rows(result: ParseResult, rows: Any, raw: list[str], reasons: list[str]
                ) -> ParseResult:
    """``result`` with its parsed records ``rows`` (a numpy array of their indices) turned into
    rejects (their ``raw`` text and ``reasons``), merged into its rejects in line order: for a
    check a format makes after its parse (KDD's text fields, an access client)."""
    import numpy as np
    import pyarrow.compute as pc

    numbers = np.asarray(result.line_numbers, dtype=np.int64)
    found = make_rejects(numbers[rows].tolist(), raw, reasons)
    keep = np.ones(len(numbers), dtype=bool)
    keep[rows] = False
    rejects = pa.concat_tables([result.rejects, found])
    rejects = rejects.take(pc.sort_indices(rejects, [("line", "ascending")]))
    return ParseResult(batch=result.batch.filter(pa.array(keep)), rejects=rejects,
                       lines=result.lines, line_numbers=pa.array(numbers[keep], pa.int64()),
                       skipped=result.skipped)


def check_text(data: object) -> None:
    """A UsageError where :meth:`Format.parse` was handed something else than raw text (a
    path, a list of lines), which failed deep inside with a TypeError or AttributeError."""
    if not isinstance(data, str | bytes | bytearray | memoryview):
        from ..errors import UsageError

        hint = (": read the file first (Path.read_bytes()), or read files with "
                "deepwatch.sources.files.read_inputs" if isinstance(data, os.PathLike)
                else ": join the lines with newlines" if isinstance(data, list | tuple)
                else "")
        raise UsageError(f"parse takes raw text (str or bytes) of whole lines, not "
                         f"{type(data).__name__}{hint}")


def split_lines(data: bytes | bytearray | memoryview | str) -> list[str]:
    """Split raw input into lines the way every format counts them.

    Only ``\\n`` ends a line; one trailing ``\\r`` is dropped (CRLF files); a final line without a
    newline counts; a byte that is not UTF-8 is written ``\\xHH`` (see HEX_ERRORS), never fatal.
    """
    # a str of ASCII holds no surrogates; any other input is read as its bytes (see as_bytes)
    text = data if isinstance(data, str) and data.isascii() else decode_text(as_bytes(data))
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def count_newlines(data: bytes) -> int:
    """``data.count(b"\\n")``, three times faster on large chunks (numpy compares bytes in bulk)."""
    if len(data) < 1 << 16:
        return data.count(b"\n")
    import numpy as np

    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == 10))


def count_lines(data: bytes) -> int:
    if not data:
        return 0
    return count_newlines(data) + (0 if data.endswith(b"\n") else 1)


class Format(ABC):
    """An input format. Subclasses declare their schema and implement :meth:`parse`.

    Formats are stateless and cheap to construct; the registry in :mod:`deepwatch.formats`
    creates them by name.
    """

    name: ClassVar[str]
    #: The schema of the batches :meth:`parse` returns (a ``label`` column may be null).
    schema: ClassVar[pa.Schema]
    #: Whether the raw text carries a ground-truth label.
    has_label: ClassVar[bool] = False
    #: ECS alert field -> column of this format (``source.ip``, ``destination.port`` ...).
    ecs_fields: ClassVar[dict[str, str]] = {}
    #: Whether KDD categories and the contest cost apply to this format's labels.
    kdd_labels: ClassVar[bool] = False
    #: Numeric columns that may not be negative (checked for records given as objects too).
    nonnegative: ClassVar[tuple[str, ...]] = ()

    #: Whether a line parses the same wherever it appears (no headers, no state carried from
    #: line to line): then :meth:`parse_bulk` parses each distinct line of a chunk once.
    line_independent: ClassVar[bool] = False
    #: Lines starting with one of these set how the lines after them in the same input are
    #: read (a Zeek log's ``#fields`` header, or the field-name line of one written with
    #: ``LogAscii::tsv=T``): the *context*. An input read in chunks carries the last such line
    #: from chunk to chunk (:meth:`context_after`, ``parse_bulk(context=...)``).
    context_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Other names a table of parsed records may give a column by (name -> column): Zeek's
    #: JSON writer names ``orig_h`` ``id.orig_h``, so a frame read from such a log has that
    #: column. :meth:`with_column_names` reads them.
    column_aliases: ClassVar[dict[str, str]] = {}

    def label_of(self, given: str) -> str:
        """A label given for a whole input (``PATH=LABEL``) as this format's records name it
        (KDD's files write ``normal.``, read as ``normal``)."""
        return given

    def __repr__(self) -> str:
        return f"get_format({self.name!r})"

    @abstractmethod
    def parse(self, data: bytes | str, first_line: int = 1) -> ParseResult:
        """Parse a chunk of raw text made of whole lines. ``first_line`` numbers its first line."""

    def parse_bulk(self, data: bytes | str, first_line: int = 1,
                   context: str | None = None) -> ParseResult:
        """:meth:`parse` for large chunks: the same result, but where the format allows, lines
        that repeat (floods and scans send the same record again and again) are parsed once.
        ``context``: the context line in force where the chunk starts (see ``context_prefixes``).
        """
        from ._repeats import REPEAT_MIN_BYTES, parse_repeated

        check_text(data)
        if self.context_prefixes:
            return self.parse_in_context(data, first_line, context)
        if self.line_independent and len(data) >= REPEAT_MIN_BYTES:
            return parse_repeated(self.parse, data, first_line)
        return self.parse(data, first_line)

    def parse_in_context(self, data: bytes | str, first_line: int,
                         context: str | None) -> ParseResult:
        """:meth:`parse`, the chunk starting under ``context`` (formats with context_prefixes
        override this)."""
        return self.parse(data, first_line)

    def context_after(self, data: bytes | str, context: str | None) -> str | None:
        """The context in force after ``data``: its last line starting with one of
        ``context_prefixes``, else ``context`` (None for formats without them)."""
        if not self.context_prefixes:
            return None
        raw = as_bytes(data)
        found = [_last_line_starting(raw, p.encode()) for p in self.context_prefixes]
        start, line = max(found, key=lambda f: f[0])
        return line if start >= 0 else context

    def with_column_names(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` with a column added under its own name for each of ``column_aliases`` it
        has under the other name only. A column given under both names keeps its own values
        and takes the other name's where its own are null, value by value, as
        :meth:`parse_records` reads each record (a table concatenated from records written
        both ways has nulls in each column where the record used the other name)."""
        import pyarrow.compute as pc

        names = batch.schema.names
        for alias, col in self.column_aliases.items():
            if alias not in names:
                continue
            if col not in names:
                batch = batch.append_column(col, batch.column(alias))
                continue
            own, other = batch.column(col), batch.column(alias)
            if own.null_count == 0 or other.null_count == len(other):
                continue
            try:
                other = other.cast(own.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                from ..errors import InputError

                raise InputError(f"column {alias!r} fills the nulls of {col!r} ({own.type}), "
                                 f"but its values ({other.type}) do not convert: "
                                 f"{str(exc).splitlines()[0]}") from None
            i = batch.schema.get_field_index(col)
            batch = batch.set_column(i, batch.schema.field(i), pc.coalesce(own, other))
        return batch

    def parse_records(self, records: list[dict[str, Any]] | Any) -> ParseResult:
        """Parse records given as JSON objects of already-split fields (the REST API), or as
        the rows of a table (pyarrow, pandas, polars): each checked as the REST API checks
        them, the bad ones rejects."""
        from ._records import records_to_batch

        return records_to_batch(self.schema, record_list(records), self.nonnegative)

    def feature_spec(self) -> dict[str, Any]:
        """The default featurizer specification for this format (see deepwatch.features)."""
        raise NotImplementedError(f"format {self.name!r} declares no features")

    def category_of(self, label: str) -> str:
        """The category a ground-truth label belongs to (label itself unless KDD)."""
        return label


def record_list(records: list[dict[str, Any]] | Any) -> list[dict[str, Any]]:
    """``parse_records``'s records as a list of dicts: a list as it is, a tuple as a list, the
    rows of a table (pyarrow, pandas, polars) as dicts. (Iterated, a DataFrame gives its column
    names; indexed by a row's number, it looks a column up.)"""
    if isinstance(records, list):
        return records
    if isinstance(records, tuple):
        return list(records)
    from .._arrow import as_arrow

    return as_arrow(records, "parse_records").to_pylist()  # type: ignore[no-any-return]
