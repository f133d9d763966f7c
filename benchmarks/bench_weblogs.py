"""Web logs, the issue's "done when" protocol: an autoencoder learns normal traffic from the first
80% of a real site log; the last 20% (normal) is scored together with each real scan log.

Per scanner: ROC-AUC, and recall and false-positive rate at the bundle's own threshold (calibrated
at ``TARGET_FPR`` on held-out *training* records only; the test records never choose anything).
A scikit-learn peer, IsolationForest on the same features with its threshold calibrated the same
way, runs in the same process on the same records.

Run alone: ``python benchmarks/bench_weblogs.py [--quick]``; ``benchmarks/run.py`` calls ``run``.
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DEEPWATCH_DATA", ROOT.parent / "shared" / "data")) / "weblogs"
SITE = "apache_access.log.gz"
SCANS = {"acunetix": "scan_acunetix.log.gz", "w3af": "scan_w3af.log.gz"}
TARGET_FPR = 0.01
TRAIN_SHARE = 0.8


def _lines(name: str) -> list[bytes]:
    with gzip.open(DATA / name) as fh:
        return fh.read().splitlines(keepends=True)


def _merged(fmt: Any, normal: bytes, attack: bytes) -> pa.Table:
    """Normal and attack records as one log in time order (a server writes them interleaved)."""
    a = pa.Table.from_batches([fmt.parse(normal).batch])
    b = pa.Table.from_batches([fmt.parse(attack).batch])
    a = a.set_column(a.schema.get_field_index("label"), "label",
                     pa.array(["normal"] * a.num_rows, pa.string()))
    b = b.set_column(b.schema.get_field_index("label"), "label",
                     pa.array(["scanner"] * b.num_rows, pa.string()))
    both = pa.concat_tables([a, b])
    order = pc.sort_indices(both, sort_keys=[("timestamp", "ascending")])
    return both.take(order)


def _stream(table: pa.Table, score: Any, batch_rows: int = 4096) -> tuple[np.ndarray, float]:
    """Scores of every record, fed batch by batch with state carried; and rows per second."""
    state: dict[str, Any] = {}
    t0 = time.perf_counter()
    parts = [score(table.slice(i, batch_rows), state) for i in range(0, table.num_rows, batch_rows)]
    seconds = time.perf_counter() - t0
    return np.concatenate(parts), table.num_rows / max(seconds, 1e-9)


def _metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    flagged = s >= threshold
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "recall": float(flagged[y].mean()),
            "fpr": float(flagged[~y].mean()),
            "recall_at_2pct": float(tpr[fpr <= 0.02].max())}


def _isolation_forest(featurizer: Any, train_path: Path, fmt: Any, seed: int
                      ) -> tuple[Any, float, float]:
    """IsolationForest on the bundle's features of the training file; threshold calibrated at
    TARGET_FPR on a held-out tenth of it. Returns (model, threshold, seconds)."""
    from sklearn.ensemble import IsolationForest

    t0 = time.perf_counter()
    table = pa.Table.from_batches([fmt.parse(train_path.read_bytes()).batch])
    X = featurizer.transform(table, {})
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    cut = int(0.9 * len(X))
    model = IsolationForest(n_estimators=200, random_state=seed).fit(X[perm[:cut]])
    held = -model.score_samples(X[perm[cut:]])
    threshold = float(np.quantile(held, 1.0 - TARGET_FPR, method="higher"))
    return model, threshold, time.perf_counter() - t0


def _one_seed(seed: int, quick: bool, fmt: Any, train_path: Path, bundle: Path,
              scans: dict[str, pa.Table]) -> list[str]:
    from deepwatch.models.detector import Detector
    from deepwatch.train.api import train

    t0 = time.perf_counter()
    train("access", "autoencoder", [f"{train_path}=normal"], bundle, seed=seed,
          target_fpr=TARGET_FPR, epochs=8 if quick else None)
    t_train = time.perf_counter() - t0
    det = Detector(bundle)
    threshold = float(det.decision.anomaly_threshold)
    forest, f_threshold, t_forest = _isolation_forest(det.featurizer, train_path, fmt, seed)

    def ae_score(batch: pa.Table, state: dict[str, Any]) -> np.ndarray:
        return np.asarray(det.decide(batch, state)["anomaly_score"], dtype=np.float64)

    def if_score(batch: pa.Table, state: dict[str, Any]) -> np.ndarray:
        return np.asarray(-forest.score_samples(det.featurizer.transform(batch, state)))

    rows = []
    for name, table in scans.items():
        y = np.asarray(table.column("label").to_pylist(), dtype=object) != "normal"
        for model, fn, thr, took in (("autoencoder", ae_score, threshold, t_train),
                                     ("IsolationForest", if_score, f_threshold, t_forest)):
            s, rate = _stream(table, fn)
            m = _metrics(y, s, thr)
            rows.append(f"| {name} ({int(y.sum()):,}) | {model} | {seed} | {m['auc']:.4f} | "
                        f"{m['recall']:.4f} | {m['fpr']:.4f} | {m['recall_at_2pct']:.4f} | "
                        f"{took:.1f} | {rate:,.0f} |")
    return rows


def run(quick: bool = False) -> list[str]:
    os.environ.setdefault("DEEPWATCH_TORCH_THREADS", "1")
    from deepwatch.formats import get_format

    if not (DATA / SITE).exists():
        return [f"## Web logs\n\nskipped: {DATA / SITE} not found (set DEEPWATCH_DATA)"]
    fmt = get_format("access")
    site = _lines(SITE)
    cut = int(TRAIN_SHARE * len(site))
    seeds = (0,) if quick else (0, 1, 2)
    out: list[str] = ["## Web logs: autoencoder vs IsolationForest on real scans", "",
                      f"Site log: {len(site):,} lines; both models learn from the first {cut:,}; "
                      f"test: the last {len(site) - cut:,} (normal) merged in time order with each "
                      f"scan. Thresholds calibrated at FPR {TARGET_FPR} on held-out training "
                      "records only; 'oracle' is the best recall at test FPR <= 0.02 (for "
                      f"reference, not a usable threshold). Seeds {', '.join(map(str, seeds))}.",
                      "", "| scanner | model | seed | ROC-AUC | recall @ threshold | "
                      "FPR @ threshold | recall @ FPR<=0.02 (oracle) | train s | rows/s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    test_normal = b"".join(site[cut:])
    scans = {name: _merged(fmt, test_normal, b"".join(_lines(f))) for name, f in SCANS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        train_path = Path(tmp) / "site_train.log"
        train_path.write_bytes(b"".join(site[:cut]))
        for seed in seeds:
            out += _one_seed(seed, quick, fmt, train_path, Path(tmp) / f"bundle{seed}", scans)
    out += ["", "Timings are indicative (2 shared CPU cores). Reproduce: "
            "`python benchmarks/bench_weblogs.py`.", ""]
    return out


if __name__ == "__main__":
    print("\n".join(run(quick="--quick" in sys.argv)))
