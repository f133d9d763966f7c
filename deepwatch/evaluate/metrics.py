"""Metrics in plain numpy: binary precision/recall/F1, ROC-AUC, PR-AUC, FPR, KDD cost.

A metric that is undefined on the records given (an AUC over one class only, or over scores
that are not numbers) is None, written ``null``: never NaN, which is not JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .._surrogates import without_surrogates
from ..labels import KDD_CATEGORIES, KDD_COST


def label_codes(labels: Any) -> tuple[list[str], np.ndarray]:
    """The distinct labels, sorted, each exactly as written, and every record's index into them.

    Labels are grouped by their exact text. numpy's fixed-width strings cannot be trusted with
    that: they drop trailing NUL characters, so ``labels == "normal.\\x00"`` matches nothing
    and ``np.unique(labels.astype(str))`` names it ``"normal."``.
    """
    import pyarrow as pa

    from .._arrow import skip_pandas_probe, to_numpy

    skip_pandas_probe()
    values = labels if isinstance(labels, (pa.Array, pa.ChunkedArray)) else \
        pa.array(np.asarray(labels, dtype=object), pa.string())
    encoded = values.dictionary_encode()
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    if encoded.null_count:
        raise ValueError("a record without a label cannot be measured")
    names = encoded.dictionary.to_pylist()
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names))
    codes = rank[to_numpy(encoded.indices).astype(np.int64)]
    return [names[i] for i in order], codes


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite, at any depth, made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def well_formed(value: Any) -> Any:
    """``value`` with every string (and key), at any depth, free of lone surrogates: one of
    U+DC80..U+DCFF is a byte that is not UTF-8 as Python keeps it (``surrogateescape``: a path
    named in Latin-1) and is written ``\\xHH``, as the formats write such bytes; another is
    written ``<U+XXXX>``. JSON text holding one as an escape (``"\\udcff"``) is no strict
    JSON: I-JSON (RFC 7493) forbids it, strict parsers (Rust's serde_json) refuse it, jq makes
    it U+FFFD."""
    if isinstance(value, str):
        return without_surrogates(value)
    if isinstance(value, dict):
        return {well_formed(k): well_formed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [well_formed(v) for v in value]
    return value


def to_json(result: dict[str, Any]) -> str:
    """The evaluation JSON: strict JSON, an undefined number written ``null``, never NaN, and
    no text a strict parser refuses (see :func:`well_formed`)."""
    return json.dumps(well_formed(finite_or_none(result)), indent=2, allow_nan=False) + "\n"


def _safe(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when only one class is present or a
    score is NaN (it has no rank)."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0 or np.isnan(np.asarray(score, dtype=np.float64)).any():
        return None
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision (step-wise area under the precision-recall curve); None when only one
    class is present or a score is NaN."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y) or np.isnan(np.asarray(score, dtype=np.float64)).any():
        return None
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s = np.asarray(score)[order]
    t = y[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # evaluate only at the last index of each run of equal scores (ties move together)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def binary_metrics(y: np.ndarray, score: np.ndarray, verdict: np.ndarray,
                   threshold: float | None = None) -> dict[str, Any]:
    y = np.asarray(y, dtype=bool)
    v = np.asarray(verdict, dtype=bool)
    tp = int(np.sum(y & v))
    fp = int(np.sum(~y & v))
    fn = int(np.sum(y & ~v))
    tn = int(np.sum(~y & ~v))
    precision = _safe(tp, tp + fp)
    recall = _safe(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _safe(2 * precision * recall, precision + recall),
        "accuracy": _safe(tp + tn, len(y)),
        "roc_auc": roc_auc(y, score),
        "pr_auc": pr_auc(y, score),
        "fpr": _safe(fp, fp + tn),
        "threshold": threshold,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def confusion(true: np.ndarray, pred: np.ndarray, labels: list[str]) -> list[list[int]]:
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    ti = np.array([index.get(t, -1) for t in true])
    pi = np.array([index.get(p, -1) for p in pred])
    ok = (ti >= 0) & (pi >= 0)
    np.add.at(m, (ti[ok], pi[ok]), 1)
    return m.tolist()


def kdd_cost(true_cat: np.ndarray, pred_cat: np.ndarray) -> float | None:
    """Mean contest cost per record over the five KDD categories (records of another category
    left out); None when no record has one."""
    m = np.asarray(confusion(true_cat, pred_cat, list(KDD_CATEGORIES)), dtype=np.float64)
    n = m.sum()
    return float((m * KDD_COST).sum() / n) if n else None
