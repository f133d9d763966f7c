"""Records given as JSON objects (REST), validated against a format's schema, row by row only
where a row is bad."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ._base import ParseResult, make_rejects


def _coerce(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_integer(typ):
        if isinstance(value, bool):
            raise ValueError("is a boolean, not an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if not isinstance(value, float) else _raise("is not an integer")
    if pa.types.is_floating(typ):
        if isinstance(value, bool):
            raise ValueError("is a boolean, not a number")
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("is not a finite number")
        return v
    if pa.types.is_string(typ):
        if not isinstance(value, str | int | float):
            raise ValueError("is not a string")
        return str(value)
    if pa.types.is_timestamp(typ):
        return value
    return value


def _raise(msg: str) -> Any:
    raise ValueError(msg)


def records_to_batch(schema: pa.Schema, records: list[dict[str, Any]]) -> ParseResult:
    good: dict[str, list[Any]] = {f.name: [] for f in schema}
    kept: list[int] = []
    lines, raws, reasons = [], [], []
    required = [f.name for f in schema if not f.nullable]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            lines.append(i + 1)
            raws.append(str(rec)[:10_000])
            reasons.append("record is not a JSON object")
            continue
        row: dict[str, Any] = {}
        reason = None
        for f in schema:
            if f.name not in rec or rec[f.name] is None:
                if f.name in required:
                    reason = f"missing field {f.name!r}"
                    break
                row[f.name] = None
                continue
            try:
                row[f.name] = _coerce(rec[f.name], f.type)
            except (TypeError, ValueError) as exc:
                msg = str(exc) if str(exc).startswith("is ") else "has the wrong type"
                reason = f"field {f.name!r} {msg}: {rec[f.name]!r}"[:500]
                break
        if reason is not None:
            lines.append(i + 1)
            raws.append(str(rec)[:10_000])
            reasons.append(reason)
            continue
        kept.append(i + 1)
        for k, v in row.items():
            good[k].append(v)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(good[f.name], f.type) for f in schema], schema=schema
    )
    return ParseResult(
        batch=batch,
        rejects=make_rejects(lines, raws, reasons),
        lines=len(records),
        line_numbers=pa.array(kept, pa.int64()),
    )
