"""Vectorised statistics of many strings at once, read straight from Arrow's byte buffers.

Every function takes an Arrow string array and works on its UTF-8 bytes with numpy: character
class counts, Shannon entropy and hashed character n-grams. No per-string Python runs, so a
million URLs cost a few numpy passes. Null strings count as empty.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Multiplier of the n-gram hash; fixed so that a saved featurizer means the same forever.
_PRIME = np.uint64(1_000_003)


def byte_view(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes as uint8, row of every byte as int64) of a string array; nulls are empty."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    data = (np.frombuffer(bufs[2], dtype=np.uint8)[start:end] if bufs[2] is not None and end > start
            else np.zeros(0, dtype=np.uint8))
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    return data, rows


def char_classes(arr: pa.Array | pa.ChunkedArray) -> dict[str, np.ndarray]:
    """Per string: byte length and counts of digits, letters, upper case, punctuation and
    non-ASCII bytes."""
    n = len(arr)
    data, rows = byte_view(arr)
    digit = (data >= 48) & (data <= 57)
    upper = (data >= 65) & (data <= 90)
    lower = (data >= 97) & (data <= 122)
    non_ascii = data >= 128
    special = ~(digit | upper | lower | non_ascii)

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(rows[mask], minlength=n).astype(np.float64)

    return {
        "length": np.bincount(rows, minlength=n).astype(np.float64),
        "digits": count(digit),
        "letters": count(upper | lower),
        "upper": count(upper),
        "special": count(special),
        "non_ascii": count(non_ascii),
    }


def entropy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Shannon entropy (bits per byte) of every string; 0 for empty strings."""
    n = len(arr)
    data, rows = byte_view(arr)
    if data.size == 0:
        return np.zeros(n)
    key = rows * 256 + data.astype(np.int64)
    uniq, counts = np.unique(key, return_counts=True)
    owner = uniq // 256
    totals = np.bincount(rows, minlength=n).astype(np.float64)
    p = counts / totals[owner]
    return np.bincount(owner, weights=-p * np.log2(p), minlength=n)


def hashed_ngrams(arr: pa.Array | pa.ChunkedArray, n_gram: int, buckets: int) -> np.ndarray:
    """Counts of hashed byte n-grams: a ``(rows, buckets)`` float matrix.

    Each string is framed by a start and an end byte so that short strings and their edges get
    n-grams too. The hash is a fixed polynomial, stable across runs and library versions.
    """
    n = len(arr)
    data, rows = byte_view(arr)
    # frame every string: 0x02 <bytes> 0x03
    lengths = np.bincount(rows, minlength=n)
    framed_len = lengths + 2
    ends = np.cumsum(framed_len)
    starts = ends - framed_len
    framed = np.empty(int(ends[-1]) if n else 0, dtype=np.uint64)
    framed[starts] = 2
    framed[ends - 1] = 3
    inner = np.ones(framed.size, dtype=bool)
    inner[starts] = False
    inner[ends - 1] = False
    framed[inner] = data
    frow = np.repeat(np.arange(n, dtype=np.int64), framed_len)
    m = framed.size - n_gram + 1
    if m <= 0:
        return np.zeros((n, buckets), dtype=np.float64)
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n_gram):
        h = h * _PRIME + framed[k : k + m] + np.uint64(1)
    # an n-gram is valid when it does not cross into the next string
    valid = frow[:m] == frow[n_gram - 1 : n_gram - 1 + m]
    bucket = (h[valid] % np.uint64(buckets)).astype(np.int64)
    cell = frow[:m][valid] * buckets + bucket
    return np.bincount(cell, minlength=n * buckets).astype(np.float64).reshape(n, buckets)


def count_matches(arr: pa.Array | pa.ChunkedArray, pattern: str) -> np.ndarray:
    """Number of non-overlapping matches of a regular expression in every string."""
    counted = pc.count_substring_regex(pc.fill_null(arr, ""), pattern)
    return np.asarray(counted.to_numpy(zero_copy_only=False), dtype=np.float64)
