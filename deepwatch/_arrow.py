"""Arrow helpers for hot paths.

pyarrow's ``to_numpy`` imports pandas on first use (about 0.8 s of start-up for every command);
primitive columns without nulls are read straight from their buffers instead. ``pa.array`` does
the same (it asks pandas whether the values are a pandas object): see :func:`skip_pandas_probe`.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pyarrow as pa


class _NoPandas:
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas":
            raise ModuleNotFoundError("pandas is not needed here", name="pandas")


def skip_pandas_probe() -> None:
    """Spare the process pyarrow's import of pandas (about 0.35 s of every command's start).

    On its first ``pa.array`` call pyarrow imports pandas only to ask whether the values are
    pandas objects; deepwatch never hands it any. This makes that one probe find no pandas, so
    pyarrow skips it from then on; pandas itself stays importable and ``to_pandas`` still works.
    """
    if "pandas" in sys.modules:
        return
    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(blocker)


def from_numpy(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A null-free Arrow array of a 1-D numeric numpy array (no copy once it is contiguous);
    cheaper than ``pa.array`` for a handful of values, where its fixed cost dominates."""
    values = np.ascontiguousarray(values, dtype=np.dtype(typ.to_pandas_dtype()))
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(values)])


def to_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numpy array of an Arrow column (zero-copy for a primitive, null-free single chunk)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    typ = values.type
    if values.null_count == 0 and (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        dtype = np.dtype(typ.to_pandas_dtype())
        buf = values.buffers()[1]
        return np.frombuffer(buf, dtype=dtype, count=len(values),
                             offset=values.offset * dtype.itemsize)
    if pa.types.is_boolean(typ) and values.null_count == 0:
        return to_numpy(values.cast(pa.uint8())).astype(bool)
    return values.to_numpy(zero_copy_only=False)


def as_arrow(records: Any, what: str) -> pa.RecordBatch | pa.Table:
    """Records as Arrow: a RecordBatch or Table as it is, a pandas or polars frame (anything
    ``pa.table`` converts) as a Table; anything else is an InputError naming ``what`` took it.
    A list (of dicts, say) is refused too: iterated, it gave column values, not records."""
    from .errors import InputError, first_line

    if isinstance(records, pa.RecordBatch | pa.Table):
        return records
    if not isinstance(records, list | tuple):
        try:
            return without_views(pa.table(records))
        except OverflowError as exc:  # (a pandas object column holding 2**70)
            raise InputError(f"{what}: a value does not fit a 64-bit number column: "
                             f"{first_line(exc)}") from None
        except (TypeError, ValueError, pa.ArrowException) as exc:
            raise InputError(f"{what} takes parsed records as a table (pyarrow, pandas, "
                             f"polars), not {type(records).__name__}: {first_line(exc)}"
                             ) from None
    raise InputError(f"{what} takes parsed records as a table (pyarrow, pandas, polars), not "
                     f"a {type(records).__name__}; records as dicts of fields go through "
                     f"deepwatch.formats.get_format(NAME).parse_records(records).batch, raw "
                     f"lines through .parse(text).batch")


def without_views(table: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """``table`` with its ``string_view``/``binary_view`` columns as plain strings/binaries:
    polars hands its frames over in the view types, on which some of pyarrow's kernels
    (``take``, which scoring uses on repeated records) have no implementation. A polars
    ``Categorical`` or ``Enum`` comes as a dictionary of ``string_view`` values: its values are
    made plain strings too (scored as they were, it was refused as "not categories (text)")."""
    fields = [pa.field(f.name, plain_type(f.type), f.nullable, f.metadata) for f in table.schema]
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return table if schema.equals(table.schema) else table.cast(schema)


def plain_type(typ: pa.DataType) -> pa.DataType:
    """``typ`` with a view type (itself, or a dictionary's values) as its plain counterpart."""
    if pa.types.is_string_view(typ):
        return pa.string()
    if pa.types.is_binary_view(typ):
        return pa.binary()
    if pa.types.is_dictionary(typ):
        values = plain_type(typ.value_type)
        if values != typ.value_type:
            return pa.dictionary(typ.index_type, values, typ.ordered)
    return typ


def decoded(table: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """``table`` with its dictionary columns as their values (plain strings for a polars
    ``Categorical``'s views): pyarrow's string functions have no kernel for dictionaries, and
    polars hashes an ``Enum`` by its place in the Enum's categories, not by its text."""
    if not any(pa.types.is_dictionary(t) for t in table.schema.types):
        return table
    return table.cast(pa.schema(
        [f.with_type(plain_type(f.type.value_type)) if pa.types.is_dictionary(f.type) else f
         for f in table.schema], metadata=table.schema.metadata))
