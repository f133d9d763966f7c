"""The hybrid decision: stacked classifiers name known attacks, the autoencoder catches the rest.

Policy (``decision["combine"]``):

1. A record the classifiers call an attack keeps their verdict, attack type and category (they
   were trained on that attack; the autoencoder adds nothing there).
2. A record the classifiers call normal but whose anomaly score reaches the calibrated threshold
   is still flagged, with attack type ``anomaly`` and the category ``novel_category``.
3. ``novel_category`` is chosen from the cost matrix alone, without looking at any test data:
   the attack's category is unknown, so take the category whose worst-case cost over the true
   attack categories is smallest (minimax), ties broken by the cost of a false alarm. On the
   KDD contest matrix that is ``probe``: it costs at most 2 whatever the attack is (``normal``
   costs up to 4 on an r2l) and only 1 when the record was benign after all.
4. ``score`` is the larger of the classifiers' attack probability and the anomaly score mapped
   to 0..1 (``a / (a + threshold)``, 0.5 at the threshold), so both halves rank together.

Data without a cost matrix (web logs) use the category ``anomaly``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..labels import BENIGN

ANOMALY_TYPE = "anomaly"


def minimax_category(categories: list[str], cost: np.ndarray) -> str:
    """The attack category with the least worst-case cost when the true attack is unknown."""
    benign = categories.index(BENIGN)
    attacks = [i for i in range(len(categories)) if i != benign]
    best = min(attacks, key=lambda d: (max(cost[c, d] for c in attacks), cost[benign, d]))
    return categories[best]


def default_combine(decision: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The combination stored in a hybrid bundle's decision."""
    forced = options.get("novel_category")
    cats = list(decision.get("categories", []))
    cost = decision.get("cost_matrix")
    if forced:
        category = str(forced)
        rule = "given"
    elif cost is not None and BENIGN in cats:
        category = minimax_category(cats, np.asarray(cost, dtype=np.float64))
        rule = "minimax cost over attack categories"
    else:
        category, rule = ANOMALY_TYPE, "no cost matrix"
    return {"novel_category": category, "rule": rule}


def anomaly_probability(a: np.ndarray, threshold: float | None) -> np.ndarray:
    """Map an anomaly score (>= 0) to 0..1, monotone, 0.5 at the threshold."""
    if threshold is None or threshold <= 0:
        return a / (a + 1.0)
    return a / (a + float(threshold))


def combine(decision: Any, cols: dict[str, np.ndarray], flagged: np.ndarray,
            out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Classifier verdicts, plus records the classifiers call normal but the autoencoder flags."""
    conf = decision.config.get("combine") or {}
    novel = str(conf.get("novel_category", ANOMALY_TYPE))
    newly = flagged & ~cols["verdict"]
    cols = dict(cols)
    cols["verdict"] = cols["verdict"] | flagged
    cols["attack_type"] = np.where(newly, ANOMALY_TYPE, cols["attack_type"])
    cols["category"] = np.where(newly, novel, cols["category"])
    cols["score"] = np.maximum(cols["score"],
                               anomaly_probability(cols["anomaly_score"],
                                                   decision.anomaly_threshold))
    return cols
