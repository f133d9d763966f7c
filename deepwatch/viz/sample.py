"""A per-label sample of feature rows taken while a stream of batches goes by.

Every row gets a random key; for each label the rows with the ``per_label`` smallest keys are
kept ("bottom-k"), which is a uniform sample without replacement of that label's rows however the
stream is cut into batches, in memory bounded by ``per_label`` times the number of labels.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .._arrow import to_numpy


class LabelSample:
    def __init__(self, per_label: int = 3000, seed: int = 0):
        self.per_label = per_label
        self._rng = np.random.default_rng(seed)
        #: label -> (keys, global row numbers, feature rows)
        self._kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, labels: np.ndarray, X: np.ndarray, first_row: int) -> None:
        """Offer a batch: ``labels[i]`` and ``X[i]`` are global row ``first_row + i``."""
        n = len(labels)
        if n == 0:
            return
        keys = self._rng.random(n)
        # hash-based grouping in Arrow: several times faster than sorting strings with numpy
        encoded = pa.array(labels, pa.string()).dictionary_encode()
        inverse = to_numpy(encoded.indices)
        for j, lab in enumerate(encoded.dictionary.to_pylist()):
            idx = np.flatnonzero(inverse == j)
            if len(idx) > self.per_label:
                idx = idx[np.argpartition(keys[idx], self.per_label)[: self.per_label]]
            new = (keys[idx], idx.astype(np.int64) + first_row, X[idx].astype(np.float32))
            old = self._kept.get(lab)
            if old is not None:
                new = tuple(np.concatenate([a, b]) for a, b in zip(old, new, strict=True))  # type: ignore[assignment]
                if len(new[0]) > self.per_label:
                    keep = np.argpartition(new[0], self.per_label)[: self.per_label]
                    new = (new[0][keep], new[1][keep], new[2][keep])
            self._kept[lab] = new

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(global row numbers sorted ascending, their feature rows)."""
        if not self._kept:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        rows = np.concatenate([v[1] for v in self._kept.values()])
        X = np.concatenate([v[2] for v in self._kept.values()])
        order = np.argsort(rows, kind="stable")
        return rows[order], X[order]


def balanced_pick(labels: np.ndarray, total: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``total`` rows, shared as evenly as the labels allow.

    Every label gets the same quota; what a small label leaves unused goes to the larger ones
    (water-filling), so rare attack types stay visible next to the common ones. Where there are
    more labels than slots, the last slots go to the most common labels first: taken in name
    order, thousands of rare labels used them all and the common ones ("normal") had none.
    """
    from ..evaluate.metrics import label_codes

    uniq, inverse = label_codes(labels)  # by exact text (numpy's strings drop trailing NULs)
    counts = np.bincount(inverse, minlength=len(uniq))
    if counts.sum() <= total:
        return np.arange(len(labels))
    quota = np.zeros(len(uniq), np.int64)
    left = total
    open_ = np.ones(len(uniq), bool)
    while left > 0 and open_.any():
        share = max(left // int(open_.sum()), 1)
        room = counts - quota
        grant = np.where(open_, np.minimum(room, share), 0)
        if grant.sum() > left:  # the last few slots: the most common labels take one each
            by_count = np.argsort(-counts, kind="stable")
            fits = np.cumsum(grant[by_count]) <= left
            grant[by_count[~fits]] = 0
            if grant.sum() == 0:
                break
        quota += grant
        left -= int(grant.sum())
        open_ = quota < counts
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(inverse == j), size=int(q), replace=False)
              for j, q in enumerate(quota) if q]
    return np.sort(np.concatenate(picked))
