"""KDD Cup 99 and NSL-KDD connection records: 41 features, then the label (and NSL's difficulty).

Unlabelled records (the 41 features alone) are accepted too: live traffic has no label.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from ..labels import kdd_category
from ._base import (
    Format,
    ParseResult,
    as_bytes,
    check_text,
    record_list,
    reject_rows,
    split_lines,
)
from ._delimited import FRACTION, parse_delimited
from ._records import record_text

KDD_FEATURES: tuple[str, ...] = (
    "duration", "protocol_type", "service", "flag", "src_bytes", "dst_bytes", "land",
    "wrong_fragment", "urgent", "hot", "num_failed_logins", "logged_in", "num_compromised",
    "root_shell", "su_attempted", "num_root", "num_file_creations", "num_shells",
    "num_access_files", "num_outbound_cmds", "is_host_login", "is_guest_login", "count",
    "srv_count", "serror_rate", "srv_serror_rate", "rerror_rate", "srv_rerror_rate",
    "same_srv_rate", "diff_srv_rate", "srv_diff_host_rate", "dst_host_count",
    "dst_host_srv_count", "dst_host_same_srv_rate", "dst_host_diff_srv_rate",
    "dst_host_same_src_port_rate", "dst_host_srv_diff_host_rate", "dst_host_serror_rate",
    "dst_host_srv_serror_rate", "dst_host_rerror_rate", "dst_host_srv_rerror_rate",
)
CATEGORICAL = ("protocol_type", "service", "flag")
#: Heavy-tailed sizes and counts: log1p before standardising.
LOG_FEATURES = (
    "duration", "src_bytes", "dst_bytes", "wrong_fragment", "urgent", "hot",
    "num_failed_logins", "num_compromised", "num_root", "num_file_creations", "num_shells",
    "num_access_files", "num_outbound_cmds", "count", "srv_count", "dst_host_count",
    "dst_host_srv_count",
)
_RATES = tuple(f for f in KDD_FEATURES if f.endswith("_rate"))


def _feature_fields() -> list[pa.Field]:
    out = []
    for name in KDD_FEATURES:
        if name in CATEGORICAL:
            typ = pa.string()
        elif name in _RATES:
            typ = pa.float64()
        else:
            typ = pa.int64()
        out.append(pa.field(name, typ, nullable=False))
    return out


class KDD(Format):
    name: ClassVar[str] = "kdd"
    has_label: ClassVar[bool] = True
    kdd_labels: ClassVar[bool] = True
    line_independent: ClassVar[bool] = True
    nonnegative: ClassVar[tuple[str, ...]] = tuple(f for f in KDD_FEATURES if f not in CATEGORICAL)
    schema: ClassVar[pa.Schema] = pa.schema([*_feature_fields(), pa.field("label", pa.string())])
    _unlabelled: ClassVar[pa.Schema] = pa.schema(_feature_fields())

    def _schemas(self) -> list[pa.Schema]:
        return [self.schema, self._unlabelled]

    def parse(self, data: bytes | str, first_line: int = 1) -> ParseResult:
        check_text(data)
        data = as_bytes(data)  # once: parse_delimited and the rejects below read the bytes
        table, result = parse_delimited(
            data, self._schemas(), first_line=first_line, sep=",",
            nonneg=[f for f in KDD_FEATURES if f not in CATEGORICAL], fractions=_RATES,
        )
        result.batch, reasons = _text_fields(result.batch)
        if not reasons:
            return result
        rows = np.array(sorted(reasons), dtype=np.int64)
        lines = split_lines(data)
        numbers = np.asarray(result.line_numbers, dtype=np.int64)[rows]
        return reject_rows(result, rows, [lines[n - first_line] for n in numbers],
                            [reasons[r] for r in rows])

    def parse_records(self, records: list[dict[str, Any]]) -> ParseResult:
        """Records as JSON objects (REST), their text fields read as a line's are (see
        :func:`_text_fields`): ``{"protocol_type": " tcp"}`` scores as ``"tcp"``, and a text
        field of spaces only is a reject with the reason a line gets; so is a rate past 1 (see
        :func:`_rates_past_one`)."""
        records = record_list(records)  # (a frame's rows: looked up below by row number)
        result = super().parse_records(records)
        result.batch, reasons = _text_fields(result.batch)
        numbers = np.asarray(result.line_numbers, dtype=np.int64)  # 1-based, one per row
        for row, name in _rates_past_one(result.batch).items():
            if row not in reasons:
                value = records[int(numbers[row]) - 1][name]
                reasons[row] = f"field {name!r} is not {FRACTION}: {value!r}"
        if not reasons:
            return result
        rows = np.array(sorted(reasons), dtype=np.int64)
        return reject_rows(result, rows, [record_text(records[n - 1]) for n in numbers[rows]],
                            [reasons[r] for r in rows])

    def feature_spec(self) -> dict[str, Any]:
        numeric = [f for f in KDD_FEATURES if f not in CATEGORICAL]
        return {
            "categorical": list(CATEGORICAL),
            "numeric": numeric,
            "log1p": list(LOG_FEATURES),
            "min_count": 1,
        }

    def category_of(self, label: str) -> str:
        return kdd_category(label)

    def label_of(self, given: str) -> str:
        # as _text_fields reads the files' own labels; one that is only dots stays as given
        return given.strip().rstrip(". ") or given


def _text_fields(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, dict[int, str]]:
    """Text fields as the KDD files write them, whether the record came as a line or as an
    object: no spaces around a value (``0, tcp, http`` from some CSV exporters, or
    ``{"protocol_type": " tcp"}``, scores as ``tcp``; numbers are read through spaces in
    lines, and are JSON numbers in objects), labels as the tables name them (``smurf.`` is
    ``smurf``). A text field that is nothing but spaces, or a label nothing but dots and
    spaces, is no value: the reason for each such row (its first such field), by row."""
    import pyarrow.compute as pc

    reasons: dict[int, str] = {}
    for name in CATEGORICAL:
        i = batch.schema.get_field_index(name)
        raw = batch.column(i)
        trimmed = pc.ascii_trim_whitespace(raw)
        if _text_bytes(trimmed) == _text_bytes(raw):
            continue  # nothing was trimmed (every KDD file): the column as parsed
        batch = batch.set_column(i, batch.schema.field(i), trimmed)  # "not null" kept
        for row in np.flatnonzero(np.asarray(pc.equal(trimmed, ""), dtype=bool)):
            reasons.setdefault(int(row), f"field {i + 1} ({name}) is empty once the "
                               f"spaces around it are removed: '{raw[row].as_py()[:80]}'")
    i = batch.schema.get_field_index("label")
    raw = batch.column(i)
    label = pc.utf8_rtrim(pc.utf8_trim_whitespace(raw), characters=". ")
    batch = batch.set_column(i, batch.schema.field(i), label)
    empty = pc.fill_null(pc.equal(label, ""), False)
    if pc.any(empty).as_py():
        for row in np.flatnonzero(np.asarray(empty, dtype=bool)):
            text = raw[row].as_py()
            why = "is empty" if not text.strip() else "is empty once its trailing dot is removed"
            reasons.setdefault(int(row), f"field {len(KDD_FEATURES) + 1} (label) {why}: "
                               f"'{text[:80]}'")
    return batch, reasons


def _rates_past_one(batch: pa.RecordBatch) -> dict[int, str]:
    """The rows of ``batch`` (records given as objects) with a rate (``serror_rate``...: a
    share of connections, from 0 to 1) past 1, each with the first such field: a line with one
    is a reject (``parse_delimited``'s ``fractions``); a negative one is already."""
    found: dict[int, str] = {}
    if batch.num_rows == 0:
        return found
    for name in _RATES:
        values = np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        for row in np.flatnonzero(values > 1):
            found.setdefault(int(row), name)
    return found


def _text_bytes(column: pa.Array) -> int:
    """The bytes of text in a string column: one look at its offsets, not a pass over it."""
    if len(column) == 0:
        return 0
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)  # a string column's, int32
    return int(offsets[column.offset + len(column)]) - int(offsets[column.offset])


class NSLKDD(KDD):
    name: ClassVar[str] = "nslkdd"
    schema: ClassVar[pa.Schema] = pa.schema(
        [*_feature_fields(), pa.field("label", pa.string()), pa.field("difficulty", pa.int64())]
    )
    _labelled: ClassVar[pa.Schema] = pa.schema([*_feature_fields(), pa.field("label", pa.string())])

    def _schemas(self) -> list[pa.Schema]:
        return [self.schema, self._labelled, self._unlabelled]
