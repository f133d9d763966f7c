"""Bulk parsing of delimited text (CSV/TSV) into typed Arrow columns, with every bad line kept.

Two paths give identical results: a fast one (Arrow's multi-threaded CSV reader) for chunks that
are clean, and a vectorised polars one that finds, for every line, why it cannot be parsed. No
per-line Python runs on either path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .._arrow import from_numpy, to_numpy
from ._base import (
    BOM_LINE_REASON,
    ParseResult,
    as_bytes,
    count_lines,
    empty_rejects,
    make_rejects,
    split_lines,
)

THREADED_PARSE_BYTES = 1 << 20
#: What a value of a ``fractions`` field (a rate, such as KDD's ``serror_rate``) must be: a
#: share of connections, so 7.5 is damage, never a rate to score.
FRACTION = "a number from 0 to 1 (a rate)"
#: A UTF-8 byte order mark. Arrow's CSV reader drops one that opens its buffer, so a line that
#: starts with one would parse when it is the first of a chunk (or of the distinct lines of
#: one, in hash order) and be a reject anywhere else: such text never goes to Arrow first.
_BOM = b"\xef\xbb\xbf"


def _fast(
    data: bytes, schema: pa.Schema, sep: str, nonneg: Sequence[str],
    fractions: Sequence[str] = (),
) -> pa.Table | None:
    try:  # Arrow decodes an invalid row as UTF-8 to hand it to the handler, and an error raised
        data.decode("utf-8")  # there escapes as an unraisable exception: such bytes go robust
    except UnicodeDecodeError:
        return None
    if data.startswith(_BOM):  # Arrow would drop it: the robust path reads the line as written
        return None
    invalid: list[object] = []

    def handler(row: object) -> str:
        invalid.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            # a native buffer, not a Python file: the reader's I/O thread then never waits for
            # the GIL (one line's p90 went from ~4 ms to ~0.6 ms on a busy 2-core machine)
            pa.BufferReader(data),
            # Threads pay off only past one block (1 MiB): below it, handing the work to the
            # pool costs more than the parse (0.36 ms vs 3 ms for one line on a busy machine).
            read_options=pacsv.ReadOptions(column_names=schema.names,
                                           use_threads=len(data) > THREADED_PARSE_BYTES),
            parse_options=pacsv.ParseOptions(
                delimiter=sep, quote_char=False, ignore_empty_lines=False,
                invalid_row_handler=handler,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=schema, null_values=[], strings_can_be_null=False,
                check_utf8=True,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    if invalid or table.num_rows != count_lines(data):
        return None
    if (b"0x" in data or b"0X" in data) and _has_hex(data, schema, sep):
        return None
    for f in schema:
        col = table.column(f.name)
        floating = pa.types.is_floating(f.type)
        if floating or f.name in nonneg:
            # numbers hold no nulls here (no null values were allowed): numpy checks them
            # without the fixed cost of an Arrow compute call per column
            x = to_numpy(col)
            if floating and not np.isfinite(x).all():
                return None
            if f.name in nonneg and len(x) and x.min() < 0:
                return None
            if f.name in fractions and len(x) and (x.min() < 0 or x.max() > 1):
                return None
        if pa.types.is_string(f.type) and len(col) and pc.min(pc.utf8_length(col)).as_py() == 0:
            return None
    return table


def _read_text(data: bytes, schema: pa.Schema, sep: str, columns: list[str]) -> pa.Table:
    """``columns`` of delimited ``data`` (fields named by ``schema``) as text, exactly as
    written: no type inference, no nulls (raises ArrowInvalid where lines do not split)."""
    return pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(column_names=schema.names, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=sep, quote_char=False,
                                         ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in columns}, include_columns=columns,
            null_values=[], strings_can_be_null=False),
    )


def _has_hex(data: bytes, schema: pa.Schema, sep: str) -> bool:
    """Whether a numeric field of ``data`` (which Arrow has just parsed with ``schema``) is
    written in hexadecimal.

    Arrow reads ``0x10`` in an integer column as 16 (and ``0xFFFFFFFFFFFFFFFF`` as -1), while
    numeric fields are decimal: polars, on the robust path, refuses such values, and a line
    must get the same verdict on either path. Only chunks holding ``0x``/``0X`` somewhere are
    checked (the numeric columns re-read as text), so clean input pays a byte search only.
    """
    numeric = [f.name for f in schema
               if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    if not numeric:
        return False
    try:
        as_text = _read_text(data, schema, sep, numeric)
    except pa.ArrowInvalid:
        return True  # cannot tell: the robust path decides
    # a value Arrow took as a number and that holds an "x" can only be hexadecimal
    return any(pc.any(pc.match_substring(col, "x", ignore_case=True)).as_py()
               for col in as_text.columns)


#: Up to this many lines, clean input is parsed in Python (see :func:`_tiny`).
TINY_LINES = 16
_TINY_INT = re.compile(r"-?[0-9]{1,18}")
_TINY_FLOAT = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")


def _tiny(data: bytes, schemas: Sequence[pa.Schema], sep: str, nonneg: Sequence[str],
          fractions: Sequence[str] = ()) -> pa.Table | None:
    """A few lines of plainly clean input, parsed without Arrow's reader; None for anything
    else (the other paths then parse it, and explain what is wrong).

    Only values whose meaning no parser can differ on are taken: integers of at most 18 digits,
    plain decimals, non-empty strings, no whitespace around numbers, no ``\\r`` inside a line.
    Anything else (exponents, signs, ``inf``, blanks, long numbers) goes down the usual paths,
    so both give the same table.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = split_lines(text)
    if not lines or any("\r" in ln for ln in lines):
        return None
    rows = [ln.split(sep) for ln in lines]
    width = len(rows[0])
    schema = next((s for s in schemas if len(s) == width), None)
    if schema is None or any(len(r) != width for r in rows):
        return None
    nonneg_set = set(nonneg)
    arrays = []
    for j, f in enumerate(schema):
        values = [r[j] for r in rows]
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            pattern = _TINY_INT if pa.types.is_integer(f.type) else _TINY_FLOAT
            if not all(pattern.fullmatch(v) for v in values):
                return None
            if f.name in nonneg_set and any(v.startswith("-") for v in values):
                return None
            cast = int if pa.types.is_integer(f.type) else float
            numbers = np.array([cast(v) for v in values])
            if f.name in fractions and not ((numbers >= 0) & (numbers <= 1)).all():
                return None
            arrays.append(from_numpy(numbers, f.type))
        elif pa.types.is_string(f.type):
            if not all(values):
                return None
            arrays.append(pa.array(values, f.type))
        else:
            return None
    return pa.Table.from_arrays(arrays, schema=schema)


def _robust(
    lines: list[str], schema: pa.Schema, sep: str, nonneg: Sequence[str], count_note: str = "",
    fractions: Sequence[str] = (),
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Returns (parsed table, indices of parsed lines, reason per line or None).

    ``count_note`` follows the expected field count in the reason for a line of another count
    (the other counts the format takes, see :func:`_other_counts`).

    Two lazy polars queries, not one eager operation per field (those cost more than the parse):
    values and a bad-line flag for every line, then reason texts for the bad lines only.
    """
    import polars as pl

    n_fields = len(schema)
    parts = pl.col("_parts")
    values: list[pl.Expr] = []
    flags: list[pl.Expr] = []
    reasons: list[pl.Expr] = []
    for i, f in enumerate(schema):
        text = parts.list.get(i, null_on_oob=True)
        if pa.types.is_integer(f.type):
            val = text.str.strip_chars().cast(pl.Int64, strict=False)
            bad = val.is_null()
            what = "an integer"
        elif pa.types.is_floating(f.type):
            val = text.str.strip_chars().cast(pl.Float64, strict=False)
            bad = val.is_null() | ~val.is_finite().fill_null(False)
            what = "a finite number"
        else:
            val = text
            bad = val.is_null() | (val.str.len_chars() == 0)
            what = "a non-empty string"
        if f.name in fractions:
            bad = bad | ((val < 0) | (val > 1)).fill_null(False)
            what = FRACTION
        elif f.name in nonneg:
            bad = bad | (val < 0).fill_null(False)
            what = "a non-negative " + what.removeprefix("a ").removeprefix("an ")
        values.append(val.alias(f.name))
        flags.append(bad)
        reasons.append(
            pl.when(bad).then(
                pl.lit(f"field {i + 1} ({f.name}) is not {what}: '")
                + text.fill_null("").str.slice(0, 80)
                + pl.lit("'")
            )
        )
    count = parts.list.len()
    # a line of spaces and tabs only is as empty as one with nothing: the reason the other
    # formats give it, not a count of one field
    empty = pl.col("raw").str.strip_chars().str.len_chars() == 0
    count_reason = (
        pl.when(empty)
        .then(pl.lit("empty line"))
        .when(pl.col("raw").str.starts_with(_BOM.decode()))  # invisible in the raw text shown
        .then(pl.lit(BOM_LINE_REASON))
        .when(count != n_fields)
        .then(pl.lit(f"expected {n_fields} fields separated by {sep!r}{count_note}, found ")
              + count.cast(pl.String))
    )
    frame = (
        pl.DataFrame({"raw": pl.Series("raw", lines, dtype=pl.String)})
        .lazy()
        .with_columns(pl.col("raw").str.split(sep).alias("_parts"))
        .with_columns(values)
        .with_columns((empty | (count != n_fields) | pl.any_horizontal(flags)).alias("_bad"))
        .collect()
    )
    ok = ~frame["_bad"].to_numpy()
    reason = np.empty(len(lines), dtype=object)
    bad_idx = np.flatnonzero(~ok)
    if bad_idx.size:
        texts = frame.filter(pl.col("_bad")).select(
            pl.coalesce([count_reason, *reasons]).alias("r"))["r"]
        reason[bad_idx] = texts.to_numpy()
    good = frame.filter(pl.Series(ok))
    arrays = [good[f.name].to_arrow().cast(f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table, np.flatnonzero(ok), reason


def parse_delimited(
    data: bytes | str,
    schemas: Sequence[pa.Schema],
    first_line: int = 1,
    sep: str = ",",
    nonneg: Sequence[str] = (),
    fractions: Sequence[str] = (),
) -> tuple[pa.Table, ParseResult]:
    """Parse ``data`` whose lines may follow any of ``schemas`` (distinguished by field count).

    ``nonneg``: numeric fields where a negative value is a reject; ``fractions``: float fields
    holding a fraction (a rate), where a value outside 0 to 1 is a reject (see ``FRACTION``).

    Returns the parsed rows conformed to the widest schema (missing trailing columns are null)
    and the ParseResult with rejects and line numbers.
    """
    full = max(schemas, key=len)
    raw_bytes = as_bytes(data)
    n_lines = count_lines(raw_bytes)
    if n_lines == 0:
        empty = full.empty_table()
        return empty, ParseResult(empty.to_batches()[0] if empty.num_rows else
                                  pa.RecordBatch.from_pylist([], schema=full),
                                  empty_rejects(), 0)
    if n_lines <= TINY_LINES:  # one REST record: Arrow's reader costs ~1.5 ms of fixed set-up
        tiny = _tiny(raw_bytes, schemas, sep, nonneg, fractions)
        if tiny is not None:
            table = _conform(tiny, full)
            numbers = pa.array(np.arange(first_line, first_line + n_lines, dtype=np.int64))
            return table, _result(table, empty_rejects(), n_lines, numbers)
    # Fast path: all lines have the field count of the first line.
    first = raw_bytes[: raw_bytes.find(b"\n") if b"\n" in raw_bytes else len(raw_bytes)]
    n_first = first.rstrip(b"\r").count(sep.encode()) + 1
    for schema in schemas:
        if len(schema) == n_first:
            table = _fast(raw_bytes, schema, sep, nonneg, fractions)
            if table is not None:
                table = _conform(table, full)
                numbers = pa.array(np.arange(first_line, first_line + n_lines, dtype=np.int64))
                return table, _result(table, empty_rejects(), n_lines, numbers)
            break
    lines = split_lines(raw_bytes)
    parsed_parts = []
    ok_all = np.zeros(len(lines), dtype=bool)
    reason_all = np.empty(len(lines), dtype=object)
    reason_all[:] = None
    remaining = np.arange(len(lines))
    clean = _clean_subset(lines, full, sep, nonneg, fractions)
    if clean is not None:  # most lines are fine: they take the fast path, the rest go robust
        clean_idx, clean_table = clean
        ok_all[clean_idx] = True
        parsed_parts.append((clean_idx, clean_table))
        remaining = np.flatnonzero(~ok_all)
    n_fields = None
    if len(schemas) > 1:
        n_fields = np.asarray(pc.count_substring(pa.array(lines, pa.string()), sep)) + 1
    for schema in sorted(schemas, key=len, reverse=True):
        if remaining.size == 0:
            break
        if len(schema) != len(full) and n_fields is not None and not (
                n_fields[remaining] == len(schema)).any():
            continue  # no line left has this schema's field count: its reasons would not win
        sub = [lines[i] for i in remaining]
        table, idx, reasons = _robust(sub, schema, sep, nonneg,
                                      _other_counts(schemas, full) if schema is full else "",
                                      fractions)
        ok_idx = remaining[idx]
        ok_all[ok_idx] = True
        parsed_parts.append((ok_idx, _conform(table, full)))
        # Lines of another field count are tried against the other schemas; the reason kept is
        # the one against the widest schema unless a narrower schema explains it better.
        field_count_mismatch = np.array(
            [r is not None and r.startswith("expected ") for r in reasons], dtype=bool
        )
        for j, r in zip(remaining, reasons, strict=True):
            if reason_all[j] is None or (r is not None and not r.startswith("expected ")):
                reason_all[j] = r
        remaining = remaining[field_count_mismatch & ~ok_all[remaining]]
    order_idx = np.concatenate([p[0] for p in parsed_parts]) if parsed_parts else np.array([])
    table = pa.concat_tables([p[1] for p in parsed_parts]) if parsed_parts else full.empty_table()
    order = np.argsort(order_idx, kind="stable")
    table = table.take(pa.array(order))
    bad = np.flatnonzero(~ok_all)
    rejects = make_rejects(
        [int(i) + first_line for i in bad],
        [lines[i] for i in bad],
        [str(reason_all[i]) for i in bad],
    )
    numbers = pa.array(np.sort(order_idx).astype(np.int64) + first_line)
    return table, _result(table, rejects, n_lines, numbers)


def _other_counts(schemas: Sequence[pa.Schema], full: pa.Schema) -> str:
    """The narrower field counts a format takes besides the widest, and what each leaves out:
    `` (or 41 without the label)``; empty for a format of one width."""
    narrower = sorted((s for s in schemas if len(s) < len(full)), key=len, reverse=True)
    if not narrower:
        return ""
    said = [f"{len(s)} without the {full.names[len(s)]}" if s.names == full.names[: len(s)]
            else str(len(s)) for s in narrower]
    return f" (or {', '.join(said)})"


def _clean_subset(lines: list[str], schema: pa.Schema, sep: str, nonneg: Sequence[str],
                  fractions: Sequence[str] = ()) -> tuple[np.ndarray, pa.Table] | None:
    """The lines of a chunk the fast path can parse, and their table; None if there are none.

    A few bad lines should not send a whole chunk down the robust path. Lines with the schema's
    field count are read as text by Arrow and checked column by column; every line that passes
    is parsed by ``_fast`` itself, so the result is the fast path's (identical to the robust
    one), and a line that the checks miss only makes this return None (robust for all).
    """
    import polars as pl

    if len(lines) < 2:
        return None
    text = pa.array(lines, pa.string())
    counts = pc.add(pc.count_substring(text, sep), 1)
    candidate = pc.and_(pc.equal(counts, len(schema)), pc.greater(pc.utf8_length(text), 0))
    # a line opened by a byte order mark is left to the robust path (see _BOM)
    candidate = pc.and_(candidate, pc.invert(pc.starts_with(text, _BOM.decode())))
    cand_idx = np.flatnonzero(np.asarray(candidate.to_numpy(zero_copy_only=False), dtype=bool))
    if cand_idx.size == 0:
        return None
    joined = "\n".join(lines[i] for i in cand_idx).encode("utf-8")
    try:
        as_text = _read_text(joined, schema, sep, schema.names)
    except pa.ArrowInvalid:
        return None
    if as_text.num_rows != cand_idx.size:
        return None
    flags: list[pl.Expr] = []
    for f in schema:
        col = pl.col(f.name)
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            kind = pl.Int64 if pa.types.is_integer(f.type) else pl.Float64
            val = col.str.strip_chars().cast(kind, strict=False)
            bad = val.is_null()
            if kind == pl.Float64:
                bad = bad | ~val.is_finite().fill_null(False)
            if f.name in nonneg:
                bad = bad | (val < 0).fill_null(False)
            if f.name in fractions:
                bad = bad | ((val < 0) | (val > 1)).fill_null(False)
        else:
            bad = col.str.len_chars() == 0
        flags.append(bad)
    frame = pl.from_arrow(as_text)
    assert isinstance(frame, pl.DataFrame)
    suspect = frame.lazy().select(pl.any_horizontal(flags).alias("s")).collect()["s"].to_numpy()
    good_idx = cand_idx[~suspect]
    if good_idx.size == 0:
        return None
    table = _fast("\n".join(lines[i] for i in good_idx).encode("utf-8"), schema, sep, nonneg,
                  fractions)
    if table is None or table.num_rows != good_idx.size:
        return None
    return good_idx, _conform(table, schema).cast(schema)


def _conform(table: pa.Table, full: pa.Schema) -> pa.Table:
    """``table`` with exactly the ``full`` schema (missing trailing columns null)."""
    cols = []
    have = set(table.schema.names)  # once: ``schema.names`` builds a new list on every call
    for f in full:
        if f.name in have:
            cols.append(table.column(f.name))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=full)


def _result(table: pa.Table, rejects: pa.Table, n_lines: int, numbers: pa.Array) -> ParseResult:
    table = table.combine_chunks()
    batches = table.to_batches()
    batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
    return ParseResult(batch=batch, rejects=rejects, lines=n_lines, line_numbers=numbers)
