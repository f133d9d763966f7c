"""Metrics in plain numpy: binary precision/recall/F1, ROC-AUC, PR-AUC, FPR, KDD cost."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..labels import KDD_CATEGORIES, KDD_COST


def _safe(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when only one class is present."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision (step-wise area under the precision-recall curve)."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
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
