"""Campaigns: alerts grouped by clustering the autoencoder's latent codes.

Thousands of single alerts are hard to act on; alerts whose latent codes lie close together were
reconstructed the same way by the autoencoder and usually come from one campaign (a flood, a
scan, one brute-force tool). ``score --cluster`` adds a ``cluster`` column (the campaign number,
largest first from 0; null for records that are not alerts) and ``evaluate`` reports how pure
the clusters are against the true attack types.

The number of clusters is chosen on the alerts themselves: k-means for each candidate k on a
sample, keeping the k with the best silhouette (no labels involved).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLUSTER_COLUMN = "cluster"
CANDIDATE_K = (4, 8, 16, 32)
_SAMPLE = 10_000
_SILHOUETTE_SAMPLE = 3_000


def _standardise(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float64)
    mu = Z.mean(axis=0)
    sd = Z.std(axis=0)
    return (Z - mu) / np.where(sd > 1e-9, sd, 1.0)


def cluster_latent(Z: np.ndarray, seed: int = 0, k: int | None = None) -> np.ndarray:
    """Cluster the rows of ``Z`` (alerts' latent codes); cluster ids ordered by size, 0 largest."""
    from threadpoolctl import threadpool_limits

    # one thread: k-means on a few thousand rows is fast, OpenMP start-up on busy cores is not
    with threadpool_limits(1):
        return _cluster(Z, seed, k)


def _cluster(Z: np.ndarray, seed: int, k: int | None) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(Z)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    Zs = _standardise(Z)
    distinct = len(np.unique(np.round(Zs[: min(n, _SAMPLE)], 6), axis=0))
    rng = np.random.default_rng(seed)
    sample = Zs[rng.choice(n, size=min(n, _SAMPLE), replace=False)]
    candidates = [k] if k else [c for c in CANDIDATE_K if c < min(distinct, len(sample))]
    if not candidates:
        return np.zeros(n, dtype=np.int64)
    best: Any = None
    best_score = -np.inf
    probe = sample[: _SILHOUETTE_SAMPLE]
    for c in candidates:
        km = KMeans(n_clusters=c, random_state=seed, n_init=1, max_iter=100)
        km.fit(sample)
        if len(candidates) == 1:
            best = km
            break
        labels = km.predict(probe)
        if len(np.unique(labels)) < 2:
            continue
        s = float(silhouette_score(probe, labels))
        if s > best_score + 1e-9:
            best, best_score = km, s
    if best is None:
        return np.zeros(n, dtype=np.int64)
    raw = best.predict(Zs)
    sizes = np.bincount(raw, minlength=best.n_clusters)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(sizes))
    return rank[raw].astype(np.int64)


def cluster_alerts(latent: np.ndarray, alerts: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cluster id per record (-1 where the record is not an alert)."""
    alerts = np.asarray(alerts, dtype=bool)
    out = np.full(len(alerts), -1, dtype=np.int64)
    out[alerts] = cluster_latent(latent[alerts], seed)
    return out


def cluster_report(cluster: np.ndarray, labels: np.ndarray, coverage: float = 0.9,
                   top: int = 10) -> dict[str, Any]:
    """Purity of the alert clusters against true labels, and how many clusters cover
    ``coverage`` of the alerts (largest first)."""
    keep = cluster >= 0
    c, lab = cluster[keep], np.asarray(labels, dtype=object)[keep]
    n = len(c)
    if n == 0:
        return {"alerts": 0, "clusters": 0, "purity": None, "clusters_for_90pct": 0,
                "largest": []}
    from ..evaluate.metrics import label_codes  # labels by their exact text (NULs and all)

    names, lab_idx = label_codes(lab)
    table = np.zeros((int(c.max()) + 1, len(names)), dtype=np.int64)
    np.add.at(table, (c, lab_idx), 1)
    sizes = table.sum(axis=1)
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] > 0]
    cover = np.cumsum(sizes[order]) / n
    need = int(np.searchsorted(cover, coverage - 1e-12) + 1)
    largest = [{"cluster": int(i), "size": int(sizes[i]),
                "top_label": str(names[table[i].argmax()]),
                "top_share": float(table[i].max() / sizes[i])} for i in order[:top]]
    return {"alerts": int(n), "clusters": int(len(order)),
            "purity": float(table.max(axis=1).sum() / n),
            "clusters_for_90pct": need, "largest": largest}


class Campaigns:
    """``score --cluster``: holds one run's scored batches until every alert is in, clusters the
    alerts' latent codes, then hands the batches back with a ``cluster`` column (int, null for
    records that are not alerts). The scored output of the run is held in memory."""

    def __init__(self, detector: Any, alerts_only: bool = False, seed: int = 0):
        from ..errors import UsageError

        if "latent" not in detector.outputs:
            raise UsageError("--cluster needs a bundle with an autoencoder "
                             f"(--model autoencoder or hybrid); this one is {detector.kind!r}")
        self.alerts_only = alerts_only
        self.seed = seed
        self._held: list[tuple[Any, np.ndarray]] = []
        self._latent: list[np.ndarray] = []

    def add(self, scored: Any, outputs: dict[str, np.ndarray]) -> int:
        """Keep one scored batch and its outputs; returns its number of alerts."""
        malicious = scored.column("verdict").to_numpy(zero_copy_only=False) == "malicious"
        if scored.num_rows:
            self._latent.append(np.asarray(outputs["latent"])[malicious])
        if self.alerts_only:
            scored = scored.filter(malicious)
            malicious = malicious[malicious]
        self._held.append((scored, malicious))
        return int(malicious.sum())

    def batches(self) -> Any:
        import pyarrow as pa

        Z = np.concatenate(self._latent) if self._latent else np.zeros((0, 1))
        ids = cluster_latent(Z, self.seed)
        start = 0
        for scored, malicious in self._held:
            col = np.full(len(malicious), -1, dtype=np.int64)
            col[malicious] = ids[start : start + int(malicious.sum())]
            start += int(malicious.sum())
            yield scored.append_column(CLUSTER_COLUMN, pa.array(col, mask=col < 0))
        self._held = []
