"""The I/O-free heart of ``deepwatch stream``: raw records in, serialised messages out.

A :class:`RawBatch` is a micro-batch of records, one per line, each with its origin (Kafka
topic/partition/offset, or file/line) and optional message key. :class:`StreamProcessor` parses
it with the bundle's format, scores it through ``Detector.score_batch`` with one featurizer state
per worker, and returns every message to write: an ECS alert per malicious record, a verdict per
scored record and a dead letter per rejected one, each keyed by its input's key and carrying its
origin under ``deepwatch.source``. Sources and sinks live elsewhere (Kafka, files, memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from ..alerts import AlertContext, alert_lines
from ..formats import Format
from ..formats._base import ParseResult
from ..sinks import escape_unsafe_documents

ALERT, VERDICT, DEAD_LETTER = "alert", "verdict", "dead_letter"
KINDS = (ALERT, VERDICT, DEAD_LETTER)
#: What a verdict message holds besides ``deepwatch.source``: the record itself stays in the
#: input topic (its key and offset name it); ``label`` only where the input carries one.
VERDICT_COLUMNS = ("score", "anomaly_score", "verdict", "attack_type", "category", "label")


@dataclass
class RawBatch:
    """``count`` records joined by ``\\n`` (one record a line) and, per record, its origin."""

    data: bytes
    count: int
    origin: pl.DataFrame
    keys: list[bytes | None] | None = None
    #: Where a consumer may resume once this batch is written: (topic, partition) -> offset.
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    #: The input these lines continue, where the batches of one input follow each other in
    #: order (a file): a Zeek ``#fields`` header then reaches the batches after it.
    stream: str | None = None
    #: Set on a batch standing for the unreadable rest of a damaged input (a truncated .gz):
    #: why. Its one record (the first line lost) becomes a dead letter with that reason.
    damage: str | None = None
    #: With ``damage``: the beginning of the text that was read but cannot be trusted (see
    #: :class:`deepwatch.sources.files.Chunk`), kept in the dead letter as a reject keeps it.
    lost: bytes = b""
    #: The records whose message held a line break (joined with it written as the two
    #: characters ``\\n``, see :func:`join_messages`): each is a dead letter, never scored.
    broken: tuple[int, ...] = ()
    #: Where the source knows it (a followed file read on from a kept position): the format's
    #: context in force before this batch's first line, as a 1-tuple, in place of the one the
    #: batches before it in ``stream`` left (see :class:`deepwatch.sources.files.Chunk`).
    context: tuple[str | None] | None = None
    _split: list[bytes] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.origin.height != self.count:
            raise ValueError(f"{self.origin.height} origins for {self.count} records")
        if self.keys is not None and len(self.keys) != self.count:
            raise ValueError(f"{len(self.keys)} keys for {self.count} records")

    def line(self, row: int) -> bytes:
        """The bytes of record ``row`` (the batch is split into lines once, on first use)."""
        if self._split is None:
            self._split = _lines(self)
        return self._split[row]


@dataclass
class Messages:
    """Serialised messages of one kind and, for each, the key of the record it came from."""

    values: list[bytes] = field(default_factory=list)
    keys: list[bytes | None] | None = None
    #: For each message, the index of its record in the batch (where a sink may need it: a
    #: message too large to be written becomes a dead letter of that record).
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Output:
    """Everything one RawBatch produced."""

    messages: dict[str, Messages]
    records: int
    scored: int
    rejected: int
    alerts: int
    #: The batch these messages came from, its format and when it was scored: what a sink
    #: needs to turn a message it cannot write into a dead letter (:func:`dead_letter_for`).
    source: RawBatch | None = None
    format_name: str = ""
    now: datetime | None = None

    def drop(self, kind: str, indices: list[int]) -> None:
        """Removes messages of ``kind`` that were not written (so that counts stay true)."""
        msgs = self.messages[kind]
        gone = set(indices)
        keep = [i for i in range(len(msgs)) if i not in gone]
        msgs.values = [msgs.values[i] for i in keep]
        if msgs.keys is not None:
            msgs.keys = [msgs.keys[i] for i in keep]
        if msgs.rows is not None:
            msgs.rows = msgs.rows[keep]

    def add_dead_letters(self, letters: list[tuple[bytes | None, bytes]]) -> None:
        msgs = self.messages.setdefault(DEAD_LETTER, Messages())
        msgs.values = msgs.values + [v for _, v in letters]
        if msgs.keys is not None:
            msgs.keys = msgs.keys + [k for k, _ in letters]
        msgs.rows = None


#: The reason of a dead letter whose message held a line break.
BROKEN = ("the message holds a line break (shown as \\n in raw): a message is one record, so it "
          "is not scored")
#: The reason of a dead letter whose message is a log header line (Zeek's ``#fields``,
#: ``#types``, ``#path``..., or the field-name line of a ``LogAscii::tsv=T`` log), where
#: messages are read each on its own (Kafka): it is no record, and it sets no field order.
HEADER_MESSAGE = ("a log header line (Zeek's #fields, #types, #path...) is not a record: each "
                  "message is read on its own, so a header sets no field order for the messages "
                  "after it (send JSON lines, or TSV in conn.log's standard field order)")
#: Added to a dead letter's reason when its record's bytes were not UTF-8.
NOT_UTF8 = ("; the raw bytes were not valid UTF-8 and the undecodable ones are shown as \\xHH: "
            "the original is at deepwatch.source")


def _lines(raw: RawBatch) -> list[bytes]:
    return [x.removesuffix(b"\r") for x in raw.data.split(b"\n")]


def _over_long(data: bytes) -> np.ndarray:
    """The rows (lines of ``data``) over ``MAX_LINE_BYTES``, measured as a file's lines are
    (``sources.files.long_lines``)."""
    from ..sources.files import MAX_LINE_BYTES, long_lines

    found = long_lines(data, MAX_LINE_BYTES)
    return np.empty(0, dtype=np.int64) if found is None else found[0].astype(np.int64)


def _long_text(raw: RawBatch, row: int) -> tuple[str, str]:
    """The raw text and reason of the dead letter of record ``row``, over ``MAX_LINE_BYTES``:
    the words and the cut of a file's line that long (``sources.files.long_line_reason``)."""
    from ..formats._base import cut_lost
    from ..sources.files import LOST_BYTES, long_line_reason

    line = raw.line(row)
    return cut_lost(line[:LOST_BYTES], long_line_reason(len(line)))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _damage_text(raw: RawBatch) -> tuple[list[str], list[str]]:
    """The raw texts and reasons of a damaged batch's dead letters: its first record keeps
    the beginning of the untrusted text, cut as a reject's is."""
    from ..formats._base import cut_lost

    assert raw.damage is not None
    text, reason = cut_lost(raw.lost, raw.damage)
    texts, reasons = [""] * raw.count, [raw.damage] * raw.count
    if raw.count:
        texts[0], reasons[0] = text, reason
    return texts, reasons


def dead_letter_for(out: Output, kind: str, index: int, why: str) -> tuple[bytes | None, bytes]:
    """A dead letter (key, value) for the record behind message ``index`` of ``kind``, which
    could not be written (``why``): its raw text, cut as a reject's is, and its origin."""
    msgs = out.messages[kind]
    if out.source is None or msgs.rows is None:
        raise ValueError("this output does not know the records behind its messages")
    key = msgs.keys[index] if msgs.keys is not None else None
    return key, record_dead_letter(out.source, int(msgs.rows[index]), why, out.format_name,
                                   out.now)


def record_dead_letter(raw: RawBatch, row: int, why: str, fmt: str,
                       now: datetime | None = None) -> bytes:
    """The dead letter of record ``row`` of ``raw``, whose output could not be written
    (``why``): its raw text, cut as a reject's is, and its origin."""
    from ..formats._base import cut_raw, decode_text

    line = raw.line(row)
    text, reason = cut_raw(decode_text(line), why)
    if not _is_utf8(line):
        reason += NOT_UTF8
    return _dead_letter_rows(now or datetime.now(UTC), fmt, [text], [reason],
                             raw.origin[[row]])[0]


def find_record(batches: list[RawBatch], source: dict[str, Any]) -> tuple[RawBatch, int] | None:
    """The batch and row of the record whose origin is ``source`` (what a message carries
    under ``deepwatch.source``), or None when none of ``batches`` holds it."""
    for raw in batches:
        if set(source) != set(raw.origin.columns):
            continue
        rows = raw.origin.with_row_index("_row").filter(**source)["_row"]
        if len(rows):
            return raw, int(rows[0])
    return None


def _take_keys(keys: list[bytes | None] | None, idx: np.ndarray) -> list[bytes | None] | None:
    if keys is None:
        return None
    arr = pa.array(keys, pa.binary())
    return arr.take(pa.array(idx, pa.int64())).to_pylist()  # type: ignore[no-any-return]


def _with_source(frame: pl.DataFrame, origin: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with ``deepwatch: {source: {...origin...}}`` appended (same row count)."""
    src = origin.select(pl.struct(pl.all()).alias("source"))
    return frame.with_columns(src.select(pl.struct("source").alias("deepwatch"))["deepwatch"])


def encode_rows(frame: pl.DataFrame) -> list[bytes]:
    """Each row as one JSON document (bytes, no newline), with the characters a JSONL writer
    escapes escaped (a verdict or dead letter may be a line of a file or of a terminal)."""
    if frame.height == 0:
        return []
    encoded = frame.select(pl.struct(pl.all()).struct.json_encode().alias("j"))["j"]
    return escape_unsafe_documents(encoded).cast(pl.Binary).to_list()


class StreamProcessor:
    """Parses, scores and serialises micro-batches for one worker (not thread-safe)."""

    def __init__(self, detector: Any, fmt: Format, verdicts: bool = True,
                 alert_context: AlertContext | None = None):
        self.detector = detector
        self.fmt = fmt
        self.verdicts = verdicts
        self.alert_context = alert_context or AlertContext.from_detector(
            detector, include_record=False)
        self.state = detector.new_state()
        self._contexts: dict[str, str | None] = {}  # per input stream: its format context

    def process(self, raw: RawBatch, now: datetime | None = None) -> Output:
        if raw.context is not None and raw.stream is not None:  # (a damaged batch's too)
            self._contexts[raw.stream] = raw.context[0]
        if raw.damage is not None:
            messages = {k: Messages(keys=[] if raw.keys is not None else None) for k in KINDS}
            idx = np.arange(raw.count, dtype=np.int64)
            messages[DEAD_LETTER] = Messages(
                self._dead_letters(now or datetime.now(UTC), *_damage_text(raw), raw.origin),
                _take_keys(raw.keys, idx), idx)
            return Output(messages, raw.count, 0, raw.count, 0, raw, self.fmt.name, now)
        context = self._contexts.get(raw.stream) if raw.stream is not None else None
        result = (self.fmt.parse_bulk(raw.data, first_line=0, context=context) if raw.count
                  else None)
        if raw.stream is not None and raw.count:
            self._contexts[raw.stream] = self.fmt.context_after(raw.data, context)
        if result is not None and result.lines + result.skipped != raw.count:
            raise ValueError(f"{raw.count} records became {result.lines + result.skipped} "
                             "lines; a record holds a line break")
        headers = np.empty(0, dtype=np.int64)
        if result is not None and result.skipped and raw.stream is None:
            # messages read each on its own (Kafka): a header line is no record, yet the format
            # skipped it unsaid and let it set how the messages after it in this batch (only)
            # were read. Each is a dead letter, and the rest are parsed again without them.
            result, headers = self._without_headers(raw, result)
        messages = {k: Messages(keys=[] if raw.keys is not None else None) for k in KINDS}
        if result is None:
            return Output(messages, 0, 0, 0, 0, raw, self.fmt.name, now)
        now = now or datetime.now(UTC)
        scored_idx = np.asarray(result.line_numbers, dtype=np.int64)
        batch = result.batch
        broken = np.empty(0, dtype=np.int64)
        # a record over MAX_LINE_BYTES (a Kafka message; a file's line that long is never read
        # as one, see sources.files.LineBuffer) is a dead letter saying so, as a file's is: it
        # was parsed and scored. (``broken`` holds these too, once taken out of the scored.)
        long = set(_over_long(raw.data).tolist())
        if (raw.broken or long) and batch.num_rows:
            # a message holding a line break is one record, rejected whole: the format may have
            # parsed it all the same (a KDD label, an access log's quoted user agent, holding
            # the text "\n"), and it was scored
            hit = np.isin(scored_idx, np.asarray([*raw.broken, *long], dtype=np.int64))
            if hit.any():
                broken = scored_idx[hit]
                batch = batch.filter(pa.array(~hit))
                scored_idx = scored_idx[~hit]
        n_alerts = 0
        if batch.num_rows:
            scored = self.detector.score_batch(batch, self.state)
            frame = pl.from_arrow(scored)
            assert isinstance(frame, pl.DataFrame)
            origin = raw.origin[scored_idx]
            if self.verdicts:
                lean = frame.select([c for c in VERDICT_COLUMNS if c in frame.columns])
                messages[VERDICT] = Messages(encode_rows(_with_source(lean, origin)),
                                             _take_keys(raw.keys, scored_idx), scored_idx)
            bad = (frame["verdict"] == "malicious").to_numpy()
            n_alerts = int(bad.sum())
            if n_alerts:
                pick = np.flatnonzero(bad)
                messages[ALERT] = Messages(
                    alert_lines(frame[pick], self.alert_context, origin[pick], now),
                    _take_keys(raw.keys, scored_idx[pick]), scored_idx[pick])
        rejects = result.rejects
        reject_idx = np.asarray(rejects.column("line"), dtype=np.int64)
        texts = rejects.column("raw").to_pylist()
        reasons = rejects.column("reason").to_pylist()
        if long:
            # one the format rejected is rejected for its length (whatever else it holds)
            for j, row in enumerate(reject_idx.tolist()):
                if row in long:
                    texts[j], reasons[j] = _long_text(raw, row)
        if len(broken) or len(headers):
            from ..formats._base import cut_raw, decode_text

            held = set(raw.broken)
            for row in broken.tolist() + headers.tolist():
                text, why = (_long_text(raw, row) if row in long else
                             cut_raw(decode_text(raw.line(row)),
                                     BROKEN if row in held else HEADER_MESSAGE))
                texts.append(text)
                reasons.append(why)
            reject_idx = np.concatenate([reject_idx, broken, headers])
            order = np.argsort(reject_idx, kind="stable")
            reject_idx = reject_idx[order]
            texts = [texts[i] for i in order]
            reasons = [reasons[i] for i in order]
        if len(reject_idx):
            reasons = _note_not_utf8(raw, reject_idx, texts, reasons)
            messages[DEAD_LETTER] = Messages(
                self._dead_letters(now, texts, reasons, raw.origin[reject_idx]),
                _take_keys(raw.keys, reject_idx), reject_idx)
        # header lines of an input read in order (a Zeek log file's #fields...) are no records:
        # neither scored nor rejected. A message's header line (above) is a dead letter.
        return Output(messages, result.lines + len(headers), batch.num_rows, len(reject_idx),
                      n_alerts, raw, self.fmt.name, now)

    def _without_headers(self, raw: RawBatch, result: ParseResult
                         ) -> tuple[ParseResult, np.ndarray]:
        """``result`` of ``raw`` parsed again without its header lines (those the format
        skipped), its line numbers those of ``raw``; and the header lines' indices."""
        seen = np.zeros(raw.count, dtype=bool)
        seen[np.asarray(result.line_numbers, dtype=np.int64)] = True
        seen[np.asarray(result.rejects.column("line"), dtype=np.int64)] = True
        headers, keep = np.flatnonzero(~seen), np.flatnonzero(seen)
        parts = raw.data.split(b"\n")
        rest = [parts[i] for i in keep.tolist()]
        data = b"\n".join(rest) + (b"\n" if rest and not rest[-1] else b"")
        again = self.fmt.parse_bulk(data, first_line=0, context=None)
        if again.lines + again.skipped != len(keep) or again.skipped:
            raise ValueError(f"{len(keep)} records without their headers became "
                             f"{again.lines} records and {again.skipped} headers")
        rejects = again.rejects
        if rejects.num_rows:
            at = rejects.schema.get_field_index("line")
            lines = keep[np.asarray(rejects.column("line"), dtype=np.int64)]
            rejects = rejects.set_column(at, rejects.schema.field(at),
                                         pa.array(lines, rejects.schema.field(at).type))
        return ParseResult(again.batch, rejects, again.lines,
                           pa.array(keep[np.asarray(again.line_numbers, dtype=np.int64)],
                                    pa.int64())), headers

    def _dead_letters(self, now: datetime, raw: list[str], reasons: list[str],
                      origin: pl.DataFrame) -> list[bytes]:
        """A dead letter per rejected record: what it was, why, and where it came from."""
        return _dead_letter_rows(now, self.fmt.name, raw, reasons, origin)


def _note_not_utf8(raw: RawBatch, idx: np.ndarray, texts: list[str],
                   reasons: list[str]) -> list[str]:
    """``reasons``, each saying so where its record's bytes were not UTF-8 (its text then holds
    ``\\xHH`` in their place, see ``formats._base.HEX_ERRORS``, which text that was valid UTF-8
    may hold as written: the note tells the two apart; a text without ``\\x`` is not looked at
    again)."""
    if not any("\\x" in t for t in texts):
        return reasons
    lines = _lines(raw)
    return [why + NOT_UTF8 if "\\x" in t and not _is_utf8(lines[int(i)]) else why
            for i, t, why in zip(idx, texts, reasons, strict=True)]


def _dead_letter_rows(now: datetime, fmt: str, raw: list[str], reasons: list[str],
                      origin: pl.DataFrame) -> list[bytes]:
    dead = pl.DataFrame({
        "@timestamp": [now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"] * len(raw),
        "format": [fmt] * len(raw), "raw": raw, "reason": reasons,
    })
    return encode_rows(_with_source(dead, origin))


def join_records(values: list[bytes | None]) -> bytes:
    """The text of :func:`join_messages`."""
    return join_messages(values)[0]


def join_messages(values: list[bytes | None]) -> tuple[bytes, tuple[int, ...]]:
    """One record per message: values joined by ``\\n`` so that a format parses them as lines,
    and the indices of those that held a line break (``RawBatch.broken``).

    A trailing line break is dropped and one inside a value is written as the two characters
    ``\\n``: every message stays one record (rejected, never split, when that breaks it).
    An empty last record (a tombstone, whose value is null, or an empty value) is ended by a
    line break of its own: joined as it is, the text would end with the break after the record
    before it and hold one line fewer than the messages (the worker stopped with a traceback,
    and again at every restart, on a batch ending with a tombstone).
    """
    clean = [v if v is not None else b"" for v in values]
    data = b"\n".join(clean)
    broken: tuple[int, ...] = ()
    if data.count(b"\n") != max(len(clean) - 1, 0):
        clean = [v.rstrip(b"\r\n") for v in clean]
        broken = tuple(i for i, v in enumerate(clean) if b"\n" in v)
        clean = [v.replace(b"\n", b"\\n") for v in clean]
        data = b"\n".join(clean)
    if clean and not clean[-1]:
        data += b"\n"
    return data, broken
