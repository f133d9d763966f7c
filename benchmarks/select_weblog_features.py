"""How the access featurizer's sizes were chosen, on validation data only (no test file).

Training: the first 60% of the real site log. Validation: its next 20% (normal) merged with
simulated attacks (``deepwatch simulate``, seed 7). The last 20% of the site log and the real scan
logs, which ``bench_weblogs.py`` tests on, are never read here. Each variant trains the same
autoencoder (seed 0) and reports, per simulated attack, ROC-AUC and recall at the threshold
calibrated at FPR 0.01 on training records; the variant with the best mean ROC-AUC and mean
recall became the default.

Run: ``python benchmarks/select_weblog_features.py`` (about a minute per variant on two cores).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_weblogs import SITE, _lines, _merged, _metrics, _stream  # noqa: E402

VARIANTS: list[tuple[str, dict[str, Any], int, int]] = [
    ("64/32/16 grams, categories >=3, <=64", {"path_buckets": 64, "query_buckets": 32,
                                              "agent_buckets": 16}, 3, 64),
    ("32/16/16 grams, categories >=3, <=64", {"path_buckets": 32, "query_buckets": 16,
                                              "agent_buckets": 16}, 3, 64),
    ("16/8/8 grams, categories >=3, <=64", {"path_buckets": 16, "query_buckets": 8,
                                            "agent_buckets": 8}, 3, 64),
    ("32/16/16 grams, categories >=10, <=32", {"path_buckets": 32, "query_buckets": 16,
                                               "agent_buckets": 16}, 10, 32),
    ("16/8/8 grams, categories >=10, <=32 (default)", {"path_buckets": 16, "query_buckets": 8,
                                                        "agent_buckets": 8}, 10, 32),
    ("8/4/4 grams, categories >=10, <=32", {"path_buckets": 8, "query_buckets": 4,
                                            "agent_buckets": 4}, 10, 32),
    ("16/8/8 grams, categories >=20, <=16", {"path_buckets": 16, "query_buckets": 8,
                                             "agent_buckets": 8}, 20, 16),
]


def main() -> None:
    os.environ.setdefault("DEEPWATCH_TORCH_THREADS", "1")
    from deepwatch.features.web import access_feature_spec
    from deepwatch.formats import get_format
    from deepwatch.formats.access import Access
    from deepwatch.models.detector import Detector
    from deepwatch.simulate import simulate
    from deepwatch.train.api import train

    fmt = get_format("access")
    site = _lines(SITE)
    n = len(site)
    fit, holdout = site[: int(0.6 * n)], b"".join(site[int(0.6 * n) : int(0.8 * n)])
    with tempfile.TemporaryDirectory() as tmp:
        fit_path = Path(tmp) / "fit.log"
        fit_path.write_bytes(b"".join(fit))
        attacks = simulate(Path(tmp) / "sim", visits=200, attack_share=0.5, seed=7)
        attacks.pop("normal")
        merged = {k: _merged(fmt, holdout, p.read_bytes()) for k, p in attacks.items()}
        print("| variant | features | mean ROC-AUC | mean recall | min recall | FPR |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, params, min_count, max_cats in VARIANTS:
            def spec(self: Any, _p: dict[str, Any] = params, _m: int = min_count,
                     _c: int = max_cats) -> dict[str, Any]:
                return access_feature_spec(_p, min_count=_m, max_categories=_c)

            Access.feature_spec = spec  # type: ignore[method-assign]
            bundle = Path(tmp) / "bundle"
            train("access", "autoencoder", [f"{fit_path}=normal"], bundle, seed=0,
                  target_fpr=0.01)
            det = Detector(bundle)
            thr = float(det.decision.anomaly_threshold)
            found = []
            for table in merged.values():
                y = np.asarray(table.column("label").to_pylist(), dtype=object) != "normal"
                s, _rate = _stream(table, lambda b, st, d=det: np.asarray(
                    d.decide(b, st)["anomaly_score"], dtype=np.float64))
                found.append(_metrics(y, s, thr))
            print(f"| {name} | {det.featurizer.n_features} | "
                  f"{np.mean([m['auc'] for m in found]):.4f} | "
                  f"{np.mean([m['recall'] for m in found]):.4f} | "
                  f"{min(m['recall'] for m in found):.4f} | {found[0]['fpr']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
