"""Records given as JSON objects of already-split fields (the REST API), validated against a
format's schema.

Column by column: a column whose values all have the expected Python type converts in one Arrow
call; only a column holding something else is walked value by value, to coerce what can be
coerced (``"3"`` is not an integer, ``3.0`` is) and to name the reason for what cannot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from .._surrogates import without_surrogates
from ._base import ParseResult, make_rejects

_NONE = type(None)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Seconds since the epoch of the years 1 to 9999 (what a Python datetime, and so an alert's
#: ``@timestamp``, can hold): a timestamp outside is out of range.
_SECONDS_RANGE = (int((datetime(1, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds()),
                  int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - _EPOCH).total_seconds()))
#: Python types that convert to an Arrow type without a check, per kind of Arrow type.
_CLEAN: dict[str, set[type]] = {
    "int": {int, _NONE},
    "float": {int, float, _NONE},
    "str": {str, _NONE},
    "bool": {bool, _NONE},
}


def _kind(typ: pa.DataType) -> str:
    if pa.types.is_integer(typ):
        return "int"
    if pa.types.is_floating(typ):
        return "float"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "str"
    if pa.types.is_boolean(typ):
        return "bool"
    if pa.types.is_timestamp(typ):
        return "timestamp"
    return "other"


def _int_range(typ: pa.DataType) -> tuple[int, int]:
    """The least and greatest value of the integer type ``typ`` (int32's, not only int64's: a
    value past it made Arrow fail the whole request)."""
    bits = typ.bit_width
    if pa.types.is_unsigned_integer(typ):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _coerce(value: Any, typ: pa.DataType) -> Any:
    """One value made fit for ``typ``, or ValueError with the reason (``"is not ..."``)."""
    kind = _kind(typ)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("is not an integer")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("is not an integer")
            value = int(value)
        low, high = _int_range(typ)
        if not low <= value <= high:
            raise ValueError("is out of range")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("is not a number")
        try:
            v = float(value)
        except OverflowError:  # an integer beyond any double
            raise ValueError("is out of range") from None
        if not np.isfinite(v):
            raise ValueError("is not a finite number")
        return v
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("is not a string")
        # a lone surrogate (a byte kept by Python's surrogateescape) has no UTF-8: written
        # \xHH, as a line's bytes that are not UTF-8 are (pyarrow's UnicodeEncodeError, a
        # traceback from parse_records or score_batch)
        return without_surrogates(str(value))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("is not a boolean")
        return value
    if kind == "timestamp":
        return _timestamp(value, typ)
    try:
        pa.array([value], typ)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        raise ValueError(f"is not a valid {typ}") from None
    return value


def _timestamp(value: Any, typ: pa.DataType) -> Any:
    """ISO-8601 text or a ``datetime`` (a time without an offset is taken as UTC, as the
    columns are; digits finer than the column's unit are cut) or seconds since the epoch, as an
    integer in the column's unit."""
    per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[typ.unit]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError("is not a finite timestamp")
        scaled = value * per_second
        if isinstance(scaled, float) and not np.isfinite(scaled):  # (1e308 seconds, in µs)
            raise ValueError("is out of range")
        return _in_range(int(round(scaled)), per_second)
    if isinstance(value, str | datetime):  # (a datetime: records made in Python, pandas')
        try:
            when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("is not an ISO-8601 timestamp") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        since = when - _EPOCH
        micros = (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds
        return _in_range(micros * per_second // 1_000_000, per_second)  # finer digits cut
    raise ValueError("is not a timestamp (ISO-8601 text, a datetime or seconds since the epoch)")


def _in_range(scaled: int, per_second: int) -> int:
    low, high = _SECONDS_RANGE
    if not (low * per_second <= scaled < (high + 1) * per_second
            and -(2**63) <= scaled < 2**63):  # nanoseconds reach only the years 1677 to 2262
        raise ValueError("is out of range")
    return scaled


def _column(values: list[Any], field: pa.Field, nonnegative: bool
            ) -> tuple[pa.Array, dict[int, str]]:
    """The Arrow column of ``values`` (null where bad) and the reason for each bad row."""
    name, typ = field.name, field.type
    kind = _kind(typ)
    bad: dict[int, str] = {}
    types = set(map(type, values))
    if _NONE in types and not field.nullable:
        bad.update((i, f"missing field {name!r}") for i, v in enumerate(values) if v is None)
    arr: pa.Array | None = None
    if kind in _CLEAN and types <= _CLEAN[kind]:
        try:
            arr = pa.array(values, typ)
        except (pa.ArrowException, OverflowError, UnicodeEncodeError):
            arr = None
    if arr is None:
        coerced: list[Any] = []
        for i, v in enumerate(values):
            if v is None:
                coerced.append(None)
                continue
            try:
                coerced.append(_coerce(v, typ))
            except ValueError as exc:
                bad.setdefault(i, f"field {name!r} {exc}: {_shown(v, 500)}"[:500])
                coerced.append(None)
        arr = pa.array(coerced, pa.int64() if kind == "timestamp" else typ)
        if kind == "timestamp":
            arr = arr.cast(typ)
    _check_values(arr, values, field, nonnegative, bad)
    return arr, bad


def _check_values(arr: pa.Array, values: list[Any], field: pa.Field, nonnegative: bool,
                  bad: dict[int, str]) -> None:
    """What the raw-text parsers refuse too: non-finite numbers, negatives where a format
    forbids them, empty text in a required field."""
    kind = _kind(field.type)
    name = field.name
    if kind in ("int", "float") and (kind == "float" or nonnegative):
        filled = arr.fill_null(0) if arr.null_count else arr
        x = filled.to_numpy(zero_copy_only=False)
        if kind == "float" and not np.isfinite(x).all():
            for i in np.flatnonzero(~np.isfinite(x)):
                bad.setdefault(int(i), f"field {name!r} is not a finite number: {values[i]!r}")
        if nonnegative and (x < 0).any():
            for i in np.flatnonzero(x < 0):
                bad.setdefault(int(i), f"field {name!r} is negative: {values[i]!r}")
    elif kind == "str" and not field.nullable and len(arr):
        import pyarrow.compute as pc

        empty = pc.fill_null(pc.equal(pc.utf8_length(arr), 0), False)
        for i in np.flatnonzero(empty.to_numpy(zero_copy_only=False)):
            bad.setdefault(int(i), f"field {name!r} is an empty string")


#: Containers nested deeper than this are shown as ``...`` in a reject's text. The JSON parser
#: accepts about 1,000 levels, more than ``repr`` and ``json.dumps`` can recurse through.
_SHOWN_DEPTH = 32


def _shown(value: Any, limit: int) -> str:
    """``repr(value)``, or the beginning of its JSON text where it is nested too deeply for
    ``repr`` (a RecursionError here would turn a bad record into a failed request)."""
    try:
        return repr(value)
    except RecursionError:
        return _json_head(value, limit)


def _json_head(value: Any, limit: int) -> str:
    """About the first ``limit`` characters of ``value`` as JSON, containers nested deeper
    than ``_SHOWN_DEPTH`` written ``...``; the recursion is bounded by that depth."""
    parts: list[str] = []
    room = [limit]

    def put(text: str) -> None:
        parts.append(text)
        room[0] -= len(text)

    def walk(node: Any, depth: int) -> None:
        if room[0] <= 0:
            return
        if isinstance(node, dict | list) and depth >= _SHOWN_DEPTH:
            put("...")
        elif isinstance(node, dict):
            put("{")
            for i, (key, item) in enumerate(node.items()):
                if room[0] <= 0:
                    return
                put(("" if i == 0 else ", ") + json.dumps(str(key), ensure_ascii=False) + ": ")
                walk(item, depth + 1)
            put("}")
        elif isinstance(node, list):
            put("[")
            for i, item in enumerate(node):
                if room[0] <= 0:
                    return
                put("" if i == 0 else ", ")
                walk(item, depth + 1)
            put("]")
        else:
            put(json.dumps(node, ensure_ascii=False, default=str))

    walk(value, 0)
    return "".join(parts)[:limit]


def record_text(record: Any) -> str:
    """A record as a reject's raw text: its JSON (the first 10,000 characters), lone
    surrogates written visibly (:func:`~deepwatch._surrogates.without_surrogates`)."""
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)[:10_000]
    except RecursionError:
        text = _json_head(record, 10_000)
    except (TypeError, ValueError):
        text = str(record)[:10_000]
    return without_surrogates(text)


def records_to_batch(schema: pa.Schema, records: list[Any],
                     nonnegative: Sequence[str] = ()) -> ParseResult:
    """Validate ``records`` against ``schema``: the good ones as a batch in their order, the
    others as rejects (line = 1-based position, raw = the record as JSON, reason).

    Fields missing from a record are null (a reject where the field is required); fields the
    schema does not know are ignored. Where a record has several problems, the first field in
    schema order gives the reason.
    """
    n = len(records)
    bad: dict[int, str] = {}
    objects: list[Any] = records
    if not all(type(r) is dict for r in records):
        objects = []
        for i, r in enumerate(records):
            if isinstance(r, dict):
                objects.append(r)
            else:
                bad[i] = "record is not a JSON object"
                objects.append({})
    nonneg = set(nonnegative)
    columns: list[pa.Array] = []
    for f in schema:
        name = f.name  # bound once: pyarrow builds a new str on every ``f.name``
        values = [r.get(name) for r in objects]
        arr, col_bad = _column(values, f, f.name in nonneg)
        for i, reason in col_bad.items():
            bad.setdefault(i, reason)
        columns.append(arr)
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    if bad:
        keep = np.ones(n, dtype=bool)
        keep[list(bad)] = False
        batch = batch.filter(pa.array(keep))
        kept = np.flatnonzero(keep)
    else:
        kept = np.arange(n)
    order = sorted(bad)
    return ParseResult(
        batch=batch,
        rejects=make_rejects([i + 1 for i in order], [record_text(records[i]) for i in order],
                             [bad[i] for i in order]),
        lines=n,
        line_numbers=pa.array(kept + 1, pa.int64()),
    )
