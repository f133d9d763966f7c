"""The body of ``POST /v1/score``: validated, then parsed into one Arrow batch plus rejects.

``records`` may hold raw lines (parsed by the format, exactly as a file would be), JSON objects of
parsed fields (validated against the format's schema), or both mixed; the accepted records keep
their order and every other record becomes a reject naming its index in the request.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from ..errors import DeepwatchError
from ..formats import Format, ParseResult, get_format

log = logging.getLogger("deepwatch.serve")
ALLOWED_KEYS = frozenset({"format", "records", "explain"})


class RequestError(DeepwatchError):
    """A request the service refuses as a whole; ``status`` is its HTTP status."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Parsed:
    """The accepted records of one request and what happened to the others."""

    batch: pa.RecordBatch
    #: For each row of ``batch``, the record's index in the request.
    index: np.ndarray
    #: ``{"index", "reason"}`` for each refused record, by index.
    rejects: list[dict[str, Any]]


@dataclass
class ScoreRequest:
    format: Format
    records: list[Any]
    #: add the ``explanation`` of each malicious record (costs extra inference passes)
    explain: bool
    #: records refused before parsing, by index: the reason (an object naming a field twice)
    refused: dict[int, str] = field(default_factory=dict)


def decode(body: bytes, bundle_format: str, max_records: int) -> ScoreRequest:
    """The format, records and options of a score request, or RequestError with the reason."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, "the body must be a JSON object with a 'records' array")
    unknown = sorted(set(payload) - ALLOWED_KEYS)
    if unknown:
        raise RequestError(422, f"unknown key(s) {', '.join(map(repr, unknown))}; "
                                "the body takes 'format', 'records' and 'explain'")
    name = payload.get("format")
    if name is None:  # left out or null (as the OpenAPI schema allows): the bundle's
        name = bundle_format
    elif not isinstance(name, str):
        raise RequestError(422, "'format' must be a string (or null: the bundle's)")
    try:
        fmt = get_format(name)
    except DeepwatchError as exc:
        raise RequestError(422, str(exc)) from None
    if name != bundle_format:
        raise RequestError(422, f"this service's model reads format {bundle_format!r}, "
                                f"not {name!r}")
    records = payload.get("records")
    if not isinstance(records, list):
        raise RequestError(422, "'records' must be an array of raw lines or JSON objects")
    if len(records) > max_records:
        raise RequestError(413, f"{len(records):,} records in one request; the limit is "
                                f"{max_records:,} (split the batch)")
    explain = payload.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(422, "'explain' must be true or false")
    return ScoreRequest(fmt, records, explain, _repeated_keys(body, payload, records))


#: A key's closing quote and its colon with whitespace between (``"a" : 1``).
_SPACED_KEY = re.compile(rb'"[ \t\r\n]+:')


def _zero(text: str) -> int:
    return 0


class _Pairs(list):  # type: ignore[type-arg]
    """An object's ``(key, value)`` pairs as the standard json module reads them, every one."""


def _repeated_keys(body: bytes, payload: dict[str, Any], records: list[Any]) -> dict[int, str]:
    """The records (objects) that name a field twice, by index: the reason; RequestError (422)
    when the body itself names a key twice.

    orjson keeps the last of them: ``{"records": [A, B], "records": [C]}`` scored C alone and
    dropped A and B without a word, ``{"duration": 0, "duration": 9, ...}`` was scored with 9,
    and a proxy or filter reading the first saw other records or values than the model scored.

    Each key in the body ends in a quote and a colon, and outside strings a colon is nothing
    else: so where the body holds no more colons (then no more quote-colons) than the keys
    orjson kept of the body and its records, no key was given twice (one count of the body,
    the common case). Otherwise (a colon in the data, an object elsewhere) the body is read
    again by the standard library, which shows every pair."""
    kept = len(payload) + sum(len(r) for r in records if type(r) is dict)
    if body.count(b":") == kept:
        return {}
    if body.count(b'":') + len(_SPACED_KEY.findall(body)) == kept:
        return {}
    try:  # (numbers are not needed: not read, so no digit limit)
        top = json.loads(body, object_pairs_hook=_Pairs, parse_int=_zero, parse_float=_zero)
    except RecursionError:
        raise RequestError(400, "the body is nested too deeply to be read") from None
    except ValueError:  # (not expected of JSON orjson read: then there is nothing to tell)
        return {}
    repeated = _twice(top)
    if repeated:
        raise RequestError(422, f"the body names {repeated} more than once (a JSON reader "
                                f"keeps only one of them); send each key once")
    refused: dict[int, str] = {}
    items: list[Any] = next((v for k, v in top if k == "records"), [])
    for i, item in enumerate(items):
        if type(item) is _Pairs and (repeated := _twice(item)):
            refused[i] = (f"the record names {repeated} more than once (a JSON reader keeps "
                          f"only one of them); send each field once")
    return refused


def _twice(pairs: _Pairs) -> str:
    """The keys named more than once among ``pairs``, quoted (empty where none is)."""
    return ", ".join(map(repr, sorted(k for k, n in Counter(k for k, _ in pairs).items()
                                      if n > 1)))


def parse(fmt: Format, records: list[Any], refused: dict[int, str] | None = None) -> Parsed:
    """Parse ``records``: strings as raw lines, objects as parsed fields, anything else refused,
    as are the records in ``refused`` (index: reason)."""
    if not refused:
        if all(type(r) is str for r in records):
            return _lines(fmt, records, np.arange(len(records)))
        if all(type(r) is dict for r in records):
            return _objects(fmt, records, np.arange(len(records)))
    kinds = np.array([0 if type(r) is str else 1 if type(r) is dict else 2 for r in records],
                     dtype=np.int8)
    if refused:
        kinds[list(refused)] = 3
    parts: list[Parsed] = []
    idx_lines, idx_objects = np.flatnonzero(kinds == 0), np.flatnonzero(kinds == 1)
    if idx_lines.size:
        parts.append(_lines(fmt, [records[i] for i in idx_lines], idx_lines))
    if idx_objects.size:
        parts.append(_objects(fmt, [records[i] for i in idx_objects], idx_objects))
    others = [{"index": int(i), "reason": "a record must be a raw line (string) or a JSON "
               "object of fields"} for i in np.flatnonzero(kinds == 2)]
    others += [{"index": i, "reason": reason} for i, reason in (refused or {}).items()]
    return _merge(fmt, parts, others)


def _lines(fmt: Format, lines: list[str], positions: np.ndarray) -> Parsed:
    text = "\n".join(lines)
    if text.count("\n") != len(lines) - 1 and lines:
        # a record holding a line break would shift every record after it: refuse those alone
        broken = np.array(["\n" in s for s in lines])
        good = np.flatnonzero(~broken)
        inner = _lines(fmt, [lines[i] for i in good], positions[good])
        refused = [{"index": int(positions[i]),
                    "reason": "the record holds a line break; send one record per element"}
                   for i in np.flatnonzero(broken)]
        return _merge(fmt, [inner], refused)
    result = fmt.parse(text + "\n" if lines else "")
    return _result(result, positions)


def _objects(fmt: Format, objects: list[dict[str, Any]], positions: np.ndarray) -> Parsed:
    """The objects parsed together; where the format's reader fails on a value it does not
    expect (its defect, not the sender's), each object alone, so that only those it fails on
    are refused (with the error, logged with its traceback) and the others are scored."""
    try:
        return _result(fmt.parse_records(objects), positions)
    except DeepwatchError:
        raise
    except Exception:
        log.exception("the %s reader failed on a request's records; scoring them one by one "
                      "and refusing those it fails on", fmt.name)
    parts: list[Parsed] = []
    refused: list[dict[str, Any]] = []
    for obj, position in zip(objects, positions, strict=True):
        try:
            parts.append(_result(fmt.parse_records([obj]), np.array([position])))
        except DeepwatchError:
            raise
        except Exception as exc:
            refused.append({"index": int(position), "reason": f"the record cannot be read: "
                            f"{type(exc).__name__}: {exc}"})
    return _merge(fmt, parts, refused)


def _result(result: ParseResult, positions: np.ndarray) -> Parsed:
    """Map a ParseResult (1-based line numbers within the part) to request indices."""
    rows = result.line_numbers.to_numpy(zero_copy_only=False).astype(np.int64) - 1
    rejects: list[dict[str, Any]] = []
    if result.rejects.num_rows:
        lines = result.rejects.column("line").to_numpy(zero_copy_only=False) - 1
        reasons = result.rejects.column("reason").to_pylist()
        rejects = [{"index": int(positions[i]), "reason": r}
                   for i, r in zip(lines, reasons, strict=True)]
    return Parsed(result.batch, positions[rows], rejects)


def _merge(fmt: Format, parts: list[Parsed], refused: list[dict[str, Any]]) -> Parsed:
    batches = [p.batch.cast(fmt.schema) if p.batch.schema != fmt.schema else p.batch
               for p in parts if p.batch.num_rows]
    index = np.concatenate([p.index for p in parts if p.batch.num_rows] or [np.array([], int)])
    if batches:
        table = pa.Table.from_batches(batches).take(pa.array(np.argsort(index, kind="stable")))
        batch = table.combine_chunks().to_batches()[0]
    else:
        batch = pa.RecordBatch.from_pylist([], schema=fmt.schema)
    rejects = [r for p in parts for r in p.rejects] + refused
    rejects.sort(key=lambda r: r["index"])
    return Parsed(batch, np.sort(index), rejects)
