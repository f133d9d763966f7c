"""Repeated lines: parse (and, in :mod:`deepwatch._line_cache`, score) each distinct line once.

Floods, scans and replays send the same line again and again; in KDD's ``corrected`` file four
records in five repeat one seen before. A chunk's lines are cut without copying, keyed by a
128-bit hash, and only distinct lines are parsed; the results are then broadcast back to every
line in input order, each parsed row or reject keeping its own line number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .._dedupe import MOSTLY_DISTINCT, distinct
from ._base import ParseResult, as_bytes

if TYPE_CHECKING:
    import polars as pl

#: Below this size a chunk is parsed as it is: looking for repeated lines would cost more.
REPEAT_MIN_BYTES = 256 << 10


def line_array(data: bytes) -> pa.Array:
    """The lines of ``data`` (each with its ``\\n``) as an Arrow binary array, without copying."""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    offsets = np.empty(len(ends) + 1, np.int32 if len(data) < 2**31 else np.int64)
    offsets[0] = 0
    offsets[1:] = ends + 1
    typ = pa.binary() if offsets.dtype == np.int32 else pa.large_binary()
    return pa.Array.from_buffers(typ, len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def line_keys(lines: pa.Array) -> pl.DataFrame:
    """Columns ``a``, ``b``: two independent 64-bit hashes of each line."""
    import polars as pl

    series = pl.Series(lines)
    return pl.DataFrame({"a": series.hash(11), "b": series.hash(29)})


def gather_lines(lines: pa.Array, idx: np.ndarray) -> bytes:
    """The lines at ``idx``, in that order, as one chunk of text."""
    taken = lines.take(pa.array(idx))
    buffers = taken.buffers()
    offsets = np.frombuffer(buffers[1], np.int32 if taken.type == pa.binary() else np.int64)
    offsets = offsets[taken.offset: taken.offset + len(taken) + 1]
    return buffers[2][offsets[0]: offsets[-1]].to_pybytes()  # copies the slice only


def index_of(numbers: pa.Array | pa.ChunkedArray, size: int) -> np.ndarray:
    """For ``numbers`` 0..size-1 given row by row: the row holding each number, or -1."""
    at = np.full(size, -1, np.int64)
    at[np.asarray(numbers.to_numpy(), np.int64)] = np.arange(len(numbers))
    return at


def broadcast(rows: pa.RecordBatch | pa.Table, at: np.ndarray, rejects: pa.Table,
              reject_at: np.ndarray, first_line: int
              ) -> tuple[pa.RecordBatch, pa.Table, pa.Array]:
    """Results per distinct line back to every line.

    Line ``i`` of the chunk, numbered ``first_line + i``, is row ``at[i]`` of ``rows``, or else
    (``at[i] < 0``) reject ``reject_at[i]``. Returns the rows and rejects of every line, in input
    order, and the rows' line numbers.
    """
    ok = at >= 0
    batch = rows.take(pa.array(at[ok]))
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else \
            pa.RecordBatch.from_pylist([], schema=batch.schema)
    numbers = pa.array(np.flatnonzero(ok) + first_line)
    bad = np.flatnonzero(~ok)
    out_rejects = rejects.slice(0, 0)
    if bad.size:
        out_rejects = rejects.take(pa.array(reject_at[bad]))
        out_rejects = out_rejects.set_column(out_rejects.schema.get_field_index("line"), "line",
                                             pa.array(bad + first_line, pa.int64()))
    return batch, out_rejects, numbers


def parse_repeated(parse: Any, data: bytes | str, first_line: int) -> ParseResult:
    """``parse(data, first_line)``, with each distinct line parsed only once (the same result)."""
    raw = as_bytes(data)
    lines = line_array(raw)
    first, inverse = distinct(line_keys(lines))
    if len(first) >= MOSTLY_DISTINCT * len(lines):
        return parse(raw, first_line)  # type: ignore[no-any-return]
    once: ParseResult = parse(gather_lines(lines, first), 0)  # numbered by distinct index
    row_of = index_of(once.line_numbers, len(first))
    reject_of = index_of(once.rejects.column("line"), len(first))
    batch, rejects, numbers = broadcast(once.batch, row_of[inverse], once.rejects,
                                        reject_of[inverse], first_line)
    return ParseResult(batch=batch, rejects=rejects, lines=len(lines), line_numbers=numbers)
