"""Finding repeated records: 128-bit keys and the distinct rows of a batch.

Floods, scans and replays repeat the same record many times; parsing and scoring each distinct
record once, then broadcasting the result, is what makes bulk scoring fast on such traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import polars as pl

#: When at least this share of a batch's records (or lines) are new, looking them up and
#: broadcasting results back costs more than it saves: the batch is processed as it is.
MOSTLY_DISTINCT = 0.7


def record_keys(table: pa.Table | pa.RecordBatch, columns: list[str]) -> pl.DataFrame:
    """Columns ``a`` and ``b``: two independent 64-bit hashes of each row's ``columns``
    (128 bits: a collision among a million records has odds of about 1e-27)."""
    import polars as pl

    df = pl.from_arrow(table.select(columns))
    assert isinstance(df, pl.DataFrame)
    return pl.DataFrame({"a": df.hash_rows(seed=11), "b": df.hash_rows(seed=29)})


def distinct(keys: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)`` for key columns ``a``, ``b``: the first row of each distinct key and,
    for every row, the index of its distinct key, so that ``keys == keys[first][inverse]``."""
    import polars as pl

    # Ranking one 64-bit column costs half as much as ranking the pair; ``b`` then only has to
    # agree within each group (it does unless ``a`` collided, when the pair is ranked after all).
    first, inverse = _first_inverse(keys["a"].rank("dense").to_numpy())
    b = keys["b"].to_numpy()
    if not np.array_equal(b[first][inverse], b):
        first, inverse = _first_inverse(
            keys.select(pl.struct("a", "b").rank("dense")).to_series().to_numpy())
    return first, inverse


def _first_inverse(rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From dense ranks (1-based): the first row of each rank and each row's 0-based rank."""
    inverse = rank.astype(np.int64) - 1
    first = np.empty(int(inverse.max()) + 1 if len(inverse) else 0, dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(inverse) - 1, -1, -1)
    return first, inverse


class KeyIndex:
    """Slots (0, 1, 2 ...) of the 128-bit keys added so far, looked up in bulk.

    The first 64 bits are kept sorted for a binary search, the second 64 checked per slot: a
    lookup of a few thousand keys costs well under a millisecond (a polars join, ten or more).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._a_sorted = np.empty(0, np.uint64)
        self._slot_sorted = np.empty(0, np.int64)
        self._b = np.empty(0, np.uint64)

    def __len__(self) -> int:
        return len(self._b)

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The slot of each key, or -1 for a key never added."""
        if len(self._b) == 0:
            return np.full(len(a), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._a_sorted, a), len(self._a_sorted) - 1)
        slot = self._slot_sorted[pos]
        hit = (self._a_sorted[pos] == a) & (self._b[slot] == b)
        return np.where(hit, slot, -1)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Add keys (not already present); returns their new slots."""
        slots = np.arange(len(self._b), len(self._b) + len(a), dtype=np.int64)
        self._b = np.concatenate([self._b, np.asarray(b, np.uint64)])
        a_all = np.concatenate([self._a_sorted, np.asarray(a, np.uint64)])
        slot_all = np.concatenate([self._slot_sorted, slots])
        order = np.argsort(a_all, kind="stable")
        self._a_sorted, self._slot_sorted = a_all[order], slot_all[order]
        return slots
