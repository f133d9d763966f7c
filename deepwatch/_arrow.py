"""Arrow helpers for hot paths.

pyarrow's ``to_numpy`` imports pandas on first use (about 0.8 s of start-up for every command);
primitive columns without nulls are read straight from their buffers instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


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
