"""A per-label sample of feature rows taken while a stream of batches goes by.

Every row gets a random key; for each label the rows with the smallest keys are kept
("bottom-k"), which is a uniform sample without replacement of that label's rows however the
stream is cut into batches. How many a label keeps is bounded twice: by ``per_label``, and by a
share of ``total`` rows over all labels, shared out as :func:`balanced_pick` shares the map's
points (rare labels kept whole, the common ones cut to one level); with more labels than
``total``, one row each for the ``total`` labels whose least key is least. Memory is then bounded
by ``total`` rows whatever the number of labels: bounded by ``per_label`` alone, a label per host
kept the features of every record.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .._arrow import to_numpy
from .tsne import MAX_POINTS


def fill_level(counts: np.ndarray, total: int, cap: int) -> int:
    """The largest level ``m`` (1 to ``cap``) at which labels of ``counts`` records, each
    keeping ``min(count, m)``, keep at most ``total`` in all; 1 where even that is more."""
    lo, hi = 1, max(cap, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(counts, mid).sum()) <= total:
            lo = mid
        else:
            hi = mid - 1
    return lo


class LabelSample:
    def __init__(self, per_label: int = 3000, seed: int = 0, total: int | None = None):
        """``total``: most rows kept in all (default :data:`~deepwatch.viz.tsne.MAX_POINTS`,
        the most a t-SNE map draws)."""
        self.per_label = per_label
        self.total = MAX_POINTS if total is None else total
        self._rng = np.random.default_rng(seed)
        #: label -> (keys, global row numbers, feature rows)
        self._kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        #: label -> records seen (kept or not)
        self._seen: dict[str, int] = {}
        self._level = per_label  # what a label may keep: only ever lowers as records come

    def add(self, labels: np.ndarray, X: np.ndarray, first_row: int) -> None:
        """Offer a batch: ``labels[i]`` and ``X[i]`` are global row ``first_row + i``."""
        n = len(labels)
        if n == 0:
            return
        keys = self._rng.random(n)
        # hash-based grouping in Arrow: several times faster than sorting strings with numpy
        encoded = pa.array(labels, pa.string()).dictionary_encode()
        inverse = to_numpy(encoded.indices)
        k = self._level
        for j, lab in enumerate(encoded.dictionary.to_pylist()):
            idx = np.flatnonzero(inverse == j)
            self._seen[lab] = self._seen.get(lab, 0) + len(idx)
            if len(idx) > k:
                idx = idx[np.argpartition(keys[idx], k)[:k]]
            new = (keys[idx], idx.astype(np.int64) + first_row, X[idx].astype(np.float32))
            old = self._kept.get(lab)
            if old is not None:
                new = tuple(np.concatenate([a, b]) for a, b in zip(old, new, strict=True))  # type: ignore[assignment]
            self._kept[lab] = new
        self._trim()

    def _trim(self) -> None:
        """Cut every label to the level its count now allows. The level only lowers as counts
        grow, so a row cut now would never have been kept (bottom-k of a label's keys)."""
        counts = np.fromiter(self._seen.values(), np.int64, len(self._seen))
        self._level = k = fill_level(counts, self.total, self.per_label)
        for lab, (keys, rows, X) in self._kept.items():
            if len(keys) > k:
                keep = np.argpartition(keys, k)[:k]
                self._kept[lab] = (keys[keep], rows[keep], X[keep])
        if len(self._kept) > self.total:
            # more labels than rows: the level is 1, each label holds its row of least key,
            # and the labels whose least key is among the ``total`` least keep theirs. A label
            # cut here never comes back with its old rows: one of its later rows can only beat
            # the keys kept (which only lower) with a key less than its old one, which then is
            # its row. So the sample is the same however the stream is cut (ranking by the
            # counts seen so far was not: a label cut early kept only later rows). A label's
            # chance grows with its count (its least key is the least of more), so the common
            # ones ("normal") keep a row, as balanced_pick gives them its last slots.
            ranked = sorted(self._kept, key=lambda lab: float(self._kept[lab][0].min()))
            for lab in ranked[self.total:]:
                del self._kept[lab]

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
