"""From model outputs to verdicts: scores, thresholds, attack type, category, expected cost.

Score direction is fixed everywhere: higher means more likely malicious (or more anomalous).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..labels import BENIGN


class Decision:
    """Turns the outputs of a bundle's network into the columns ``score_batch`` appends.

    config keys:
      ``labels`` (class names of ``proba``), ``label_category`` (category of each label),
      ``categories`` (category names, benign first), ``policy`` (``"threshold"`` or ``"cost"``),
      ``threshold`` (on ``score``), ``cost_matrix`` (rows true, columns predicted category),
      ``anomaly_threshold`` (on ``anomaly_score``), ``combine`` (how a hybrid combines).
    """

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.labels: list[str] = list(config.get("labels", []))
        self.categories: list[str] = list(config.get("categories", []))
        self.policy: str = config.get("policy", "threshold")
        self.threshold = float(config.get("threshold", 0.5))
        self.anomaly_threshold = config.get("anomaly_threshold")
        if self.labels:
            cat_index = {c: i for i, c in enumerate(self.categories)}
            member = np.zeros((len(self.labels), len(self.categories)), dtype=np.float32)
            for i, c in enumerate(config["label_category"]):
                member[i, cat_index[c]] = 1.0
            self._member = member
            self._label_cat = np.array([cat_index[c] for c in config["label_category"]])
            self._benign_label = self.labels.index(BENIGN) if BENIGN in self.labels else None
            self._benign_cat = cat_index.get(BENIGN)
        self._cost = (np.asarray(config["cost_matrix"], dtype=np.float64)
                      if config.get("cost_matrix") is not None else None)

    @property
    def supervised(self) -> bool:
        return bool(self.labels)

    def apply(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Columns: ``score``, ``verdict`` (bool malicious), and where known ``anomaly_score``,
        ``attack_type``, ``category``."""
        cols: dict[str, np.ndarray] = {}
        if "proba" in out and self.supervised:
            cols.update(self._supervised(out["proba"]))
        if "anomaly" in out:
            a = out["anomaly"].astype(np.float64)
            cols["anomaly_score"] = a
            flagged = a >= float(self.anomaly_threshold if self.anomaly_threshold is not None
                                 else np.inf)
            if "verdict" in cols:
                from .hybrid import combine  # the hybrid policy lives with the hybrid model

                cols = combine(self, cols, flagged, out)
            else:
                from .hybrid import anomaly_probability

                cols["score"] = anomaly_probability(a, self.anomaly_threshold)  # 0.5 at threshold
                cols["verdict"] = flagged
        return cols

    def _supervised(self, proba: np.ndarray) -> dict[str, np.ndarray]:
        # the attack type is an argmax: the same on the network's float32 probabilities as on
        # their exact float64 copies, at half the memory traffic (float64 ones stay float64)
        attack_proba = np.array(proba, dtype=np.result_type(proba.dtype, np.float32))
        proba = proba.astype(np.float64)
        n = len(proba)
        benign = self._benign_label
        # 1 - P(normal); a bundle with no benign label (attack types only) gives every record
        # P(normal) = 0: it was max P(label), under 0.5 for many records of three labels or
        # more, which its threshold (0.5) then let through as normal, while training said that
        # every record scored would be malicious
        score = 1.0 - proba[:, benign] if benign is not None else np.ones(n)
        cat_p = proba @ self._member
        if benign is not None:
            attack_proba[:, benign] = -1.0
        if self.policy == "cost" and self._cost is not None:
            expected = cat_p @ self._cost  # (n, categories): expected cost of each decision
            cat = expected.argmin(axis=1)
            verdict = cat != self._benign_cat
            # the attack type: the most probable label within the chosen category
            same = self._label_cat[None, :] == cat[:, None]
            masked = np.where(same, attack_proba, -1.0)
            best = masked.argmax(axis=1)
        else:
            verdict = score >= self.threshold
            best = attack_proba.argmax(axis=1)
            cat = self._label_cat[best]
        labels = np.array(self.labels, dtype=object)
        categories = np.array(self.categories, dtype=object)
        attack_type = np.where(verdict, labels[best], BENIGN)
        category = np.where(verdict, categories[cat] if n else categories[:0], BENIGN)
        return {"score": score, "verdict": verdict, "attack_type": attack_type,
                "category": category, "_category_proba": cat_p}
