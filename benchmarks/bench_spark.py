"""Batch scoring on Spark beside the local engine: same bundle, same file, same run.

Each engine runs as its own ``deepwatch score`` process (whole process timed: start-up, Spark's
JVM and workers included) on KDD `corrected` (311,029 records; ``--quick``: its first 50,000
lines), and the two outputs are compared row by row. The Spark engine runs on ``local[2]``.

Run alone: ``python benchmarks/bench_spark.py [--quick] [--bundle DIR]``; ``run(quick)`` returns
markdown lines for ``benchmarks/run.py``. The bundle is ``models/kdd-stack`` where it exists,
else an ``mlp`` trained here on every 5th line of the KDD 10% training file (cached in the temp
dir, shared with bench_stream).
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KDD_TEST as TEST_FILE  # noqa: E402
from _common import kdd_bundle  # noqa: E402

QUICK_LINES = 50_000


def _bundle(explicit: str | None) -> Path:
    return kdd_bundle(explicit)


def _input(quick: bool, work: Path) -> Path:
    if not quick:
        return TEST_FILE
    head = work / "corrected_head.csv.gz"
    with gzip.open(TEST_FILE, "rb") as f:
        lines = [next(f) for _ in range(QUICK_LINES)]
    head.write_bytes(gzip.compress(b"".join(lines)))
    return head


def _score(bundle: Path, data: Path, out: Path, *extra: str) -> float:
    cmd = [sys.executable, "-m", "deepwatch.cli", "score", str(bundle), "--format", "kdd",
           "--out", str(out), str(data), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra) or 'local'} failed: {done.stderr.strip()[-400:]}")
    return seconds


def run(quick: bool = False, bundle: str | None = None) -> list[str]:
    import pyarrow.parquet as pq

    model = _bundle(bundle)
    with tempfile.TemporaryDirectory(prefix="deepwatch-bench-spark-") as tmp:
        work = Path(tmp)
        data = _input(quick, work)
        local_s = _score(model, data, work / "local.parquet")
        spark_s = _score(model, data, work / "spark.parquet", "--engine", "spark",
                         "--master", "local[2]")
        a = pq.read_table(work / "local.parquet")
        b = pq.read_table(work / "spark.parquet")
        same = a.equals(b)
        n = a.num_rows
    return [
        "## Batch scoring: Spark (local[2]) beside the local engine", "",
        f"Bundle `{model}`, {n:,} records of KDD `corrected`"
        + (" (quick: first lines only)" if quick else "") + "; whole `deepwatch score` "
        "processes, one after the other. Outputs identical row for row: "
        f"**{'yes' if same else 'NO'}**.", "",
        "| engine | seconds | records/s |", "| --- | ---: | ---: |",
        f"| local (ONNX Runtime) | {local_s:.1f} | {n / local_s:,.0f} |",
        f"| spark local[2] | {spark_s:.1f} | {n / spark_s:,.0f} |", "",
        f"Spark / local time: {spark_s / local_s:.1f}x. On one machine Spark only adds its JVM, "
        "the Python workers and moving every line between them; it pays where a cluster has "
        "more cores than one machine.", "",
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bundle", default=None)
    args = ap.parse_args()
    print("\n".join(run(quick=args.quick, bundle=args.bundle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
