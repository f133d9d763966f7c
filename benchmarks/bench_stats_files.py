"""``/v1/stats`` with ``serve --workers``: the cost of the dashboard's merge as gone workers'
stats files pile up, and after the parent folds them into ``retired.json``.

Each reload replaced every worker and used to leave its ``stats/PID.json`` behind; every poll of
the dashboard (every 2 s) read and merged them all in the event loop. This writes ``--files``
such files (each as full as a busy worker's: 4,096 latency samples, 50 recent alerts), times
``WorkerGroup.all_stats`` + ``merged_snapshot`` over them (best of three), folds all but two
with ``retire_gone_stats`` as the parent does, and times the merge again. The peer is the same
merge over the files as they were: a ratio in one process, not a timed assertion.

``python benchmarks/bench_stats_files.py [--files 730]`` (730: two workers, a year of daily
reloads).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=730)
    args = parser.parse_args(argv)

    from deepwatch.serve._stats import LATENCY_SAMPLES, RecentStats, merged_snapshot
    from deepwatch.serve._workers import WorkerGroup, retire_gone_stats

    busy = RecentStats()
    rng = random.Random(0)
    for i in range(LATENCY_SAMPLES):
        busy.record(10, 1, 0, rng.random() / 100, [{"attack_type": "smurf", "n": i}])
    raw = busy.raw()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        stats = state / "stats"
        stats.mkdir()
        pids = range(10_000, 10_000 + args.files)
        for pid in pids:
            (stats / f"{pid}.json").write_text(json.dumps({**raw,
                                                           "started": raw["started"] + pid}))
        group = WorkerGroup(state)

        def merge() -> float:
            t0 = time.perf_counter()
            merged_snapshot(group.all_stats())
            return time.perf_counter() - t0

        piled = min(merge() for _ in range(3))
        totals = merged_snapshot(group.all_stats())["totals"]
        retire_gone_stats(stats, set(pids[-2:]))  # two live workers; the rest are gone
        folded = min(merge() for _ in range(3))
        assert merged_snapshot(group.all_stats())["totals"] == totals  # nothing lost
        left = sorted(p.name for p in stats.iterdir() if not p.name.startswith("."))
    print(f"/v1/stats merge over {args.files:,} workers' files: {piled:.3f} s; after folding "
          f"into {left}: {folded:.4f} s ({piled / folded:,.0f}x); totals unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
