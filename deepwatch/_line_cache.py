"""Scoring each distinct raw line once per run: ``deepwatch score``'s path for repeated traffic.

For a format whose lines parse on their own and a detector whose verdicts depend on the record
alone, a line seen before needs neither parsing nor scoring again: its scored row is kept, keyed
by the line's 128-bit hash, and copied to every later occurrence. Rejected lines are not kept
(they are rare, and parsing them again gives the same reason). The cache is bounded: when full
it starts again empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ._dedupe import MOSTLY_DISTINCT, KeyIndex, distinct
from .formats._base import Format, ParseResult, empty_rejects
from .formats._repeats import (
    REPEAT_MIN_BYTES,
    broadcast,
    gather_lines,
    index_of,
    line_array,
    line_keys,
)

#: After a chunk of mostly new lines, this many chunks are scored as they are before looking
#: for repeats again (unique traffic then pays for the look one chunk in eight).
BACKOFF_CHUNKS = 7


#: The one text column of a scored row that is not drawn from a small set of values.
FREE_TEXT = frozenset({"explanation"})


def categorical(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with its text columns dictionary-encoded, but for :data:`FREE_TEXT`.

    A line format's text fields (KDD's protocol, service, flag, label) and a verdict's (verdict,
    attack type, category) each take a few dozen values. Copied to every repeat of a line as
    dictionary indices, they cost a quarter of what the strings do, and the Parquet writer
    stores the indices as they are instead of hashing every string again
    (:class:`deepwatch.sinks.RecordSink` writes them back as plain text columns). Every batch
    the cache returns has the same columns, encoded the same way."""
    cols = batch.columns
    out = [c.dictionary_encode() if pa.types.is_string(f.type) and f.name not in FREE_TEXT
           else c for f, c in zip(batch.schema, cols, strict=True)]
    if all(o is c for o, c in zip(out, cols, strict=True)):
        return batch
    schema = pa.schema([f.with_type(o.type) for f, o in zip(batch.schema, out, strict=True)],
                       metadata=batch.schema.metadata)
    return pa.RecordBatch.from_arrays(out, schema=schema)


class ScoredLineCache:
    """``parse(data, first_line)`` that returns the chunk's rows already scored."""

    def __init__(self, fmt: Format, detector: Any, max_rows: int = 1 << 17):
        self.fmt = fmt
        self.detector = detector
        self.max_rows = max_rows
        self._keys = KeyIndex()
        self._table: pa.Table | None = None  # one scored row per slot
        self._skip = 0
        self.hits = 0  # lines answered from the cache
        self.misses = 0  # distinct lines new to it (parsed, and scored where they parse)

    @staticmethod
    def applies(fmt: Format, detector: Any) -> bool:
        return bool(fmt.line_independent) and not detector.featurizer.stateful

    def parse(self, data: bytes | str, first_line: int = 1) -> ParseResult:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if len(raw) < REPEAT_MIN_BYTES or self._skip:
            self._skip = max(0, self._skip - 1)
            return self._score_as_is(raw, first_line)
        lines = line_array(raw)
        keys = line_keys(lines)
        a = keys["a"].to_numpy()
        b = keys["b"].to_numpy()
        at = self._keys.lookup(a, b)  # every line: most are found (a flood, a scan, a replay)
        new = np.flatnonzero(at < 0)
        reject_at = np.full(len(lines), -1, np.int64)
        rejects = empty_rejects()
        if len(new):
            first, inverse = distinct(keys[new])  # the lines new to the cache, each once
            if len(self._keys) + len(first) > self.max_rows:
                self._clear()  # full: start again, every line of the chunk new
                at[:], new = -1, np.arange(len(lines))
                first, inverse = distinct(keys)
            self.misses += len(first)
            if len(first) >= MOSTLY_DISTINCT * len(lines):
                self._skip = BACKOFF_CHUNKS
                return self._score_as_is(raw, first_line)
            once = self.fmt.parse(gather_lines(lines, new[first]), 0)  # numbered by new index
            parsed = index_of(once.line_numbers, len(first))
            ok = np.flatnonzero(parsed >= 0)
            slot = np.full(len(first), -1, np.int64)
            if len(ok):
                taken = new[first[ok]]
                slot[ok] = self._add(a[taken], b[taken], self.detector.score_distinct(once.batch))
            at[new] = slot[inverse]
            rejects = once.rejects
            reject_at[new] = index_of(rejects.column("line"), len(first))[inverse]
        self.hits += len(lines) - len(new)
        table = self._table if self._table is not None else self._score_as_is(b"", 0).batch
        batch, rejects, numbers = broadcast(table, at, rejects, reject_at, first_line)
        return ParseResult(batch=batch, rejects=rejects, lines=len(lines), line_numbers=numbers)

    def _score_as_is(self, raw: bytes, first_line: int) -> ParseResult:
        result = self.fmt.parse(raw, first_line)
        result.batch = categorical(self.detector.score_batch(result.batch))
        return result

    def _add(self, a: np.ndarray, b: np.ndarray, scored: pa.RecordBatch) -> np.ndarray:
        new = pa.Table.from_batches([categorical(scored)])
        # one chunk per column: the broadcast is then one take per column
        self._table = new if self._table is None else pa.concat_tables(
            [self._table, new]).combine_chunks()
        return self._keys.add(a, b)

    def _clear(self) -> None:
        self._keys.clear()
        self._table = None
