"""What several benchmarks share: the data directory and a KDD bundle to time."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DEEPWATCH_DATA", ROOT.parent / "shared" / "data"))
KDD_TRAIN = DATA / "kddcup99" / "kddcup.data_10_percent.gz"
KDD_TEST = DATA / "kddcup99" / "corrected.gz"
STACK = ROOT / "models" / "kdd-stack"


def kdd_bundle(explicit: str | None = None, name: str = "stream-mlp") -> Path:
    """``explicit``, else ``models/kdd-stack`` when trained, else a small cached ``mlp``
    (every 5th record of the 10% file, 3 epochs) under the temp directory."""
    if explicit:
        return Path(explicit)
    if (STACK / "manifest.json").exists():
        return STACK
    cache = Path(tempfile.gettempdir()) / "deepwatch-bench" / name
    if not (cache / "manifest.json").exists():
        from deepwatch.train.api import train

        sample = cache.parent / "kdd_train_every5.csv"
        sample.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(KDD_TRAIN, "rb") as f:
            sample.write_bytes(b"".join(ln for i, ln in enumerate(f) if i % 5 == 0))
        train("kdd", "mlp", [str(sample)], cache, epochs=3, seed=0)
    return cache
