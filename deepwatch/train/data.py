"""Data preparation for training: label vocabularies, stratified splits, de-duplication."""

from __future__ import annotations

import numpy as np

from ..labels import BENIGN


def label_vocabulary(labels: np.ndarray) -> list[str]:
    """Sorted distinct labels, ``normal`` first when present."""
    uniq = sorted(set(labels.tolist()))
    if BENIGN in uniq:
        uniq.remove(BENIGN)
        uniq.insert(0, BENIGN)
    return uniq


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int
                     ) -> list[np.ndarray]:
    """Split row indices into parts of the given fractions, class by class.

    Every class with at least as many rows as parts gets one row in each part, so rare attacks
    reach validation too. Returns sorted index arrays.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1] / np.sum(fractions)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        rng.shuffle(idx)
        cuts = np.round(bounds * len(idx)).astype(int)
        if len(idx) >= len(fractions):
            # at least one row per later part
            for k in range(len(cuts)):
                cuts[k] = min(max(cuts[k], k + 1), len(idx) - (len(fractions) - 1 - k))
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].append(piece)
    # (no rows at all: empty parts, not a concatenate of nothing)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def dedupe(X: np.ndarray, y: np.ndarray | None = None, w: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Collapse identical (features, label) rows; returns (X_unique, y_unique, counts), in
    order of first occurrence. With ``w`` (each row's multiplicity), the counts are the sums
    of the collapsed rows' ``w``.

    Rows are keyed by two random projections of their features (plus the label), which tells
    apart any two float32 rows that differ; far cheaper than sorting whole rows.
    """
    if len(X) == 0:
        return X, y, np.zeros(0)
    rng = np.random.default_rng(12345)
    proj = X.astype(np.float64) @ rng.standard_normal((X.shape[1], 2))
    key = np.empty(len(X), dtype=[("a", "f8"), ("b", "f8"), ("y", "i8")])
    key["a"], key["b"] = proj[:, 0], proj[:, 1]
    key["y"] = y if y is not None else 0
    if w is None:
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
    else:
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=np.asarray(w, dtype=np.float64),
                             minlength=len(first))
    order = np.argsort(first)
    first, counts = first[order], counts[order]
    return X[first], (y[first] if y is not None else None), counts.astype(np.float64)
