"""Run every benchmark and write one markdown file (`make bench`).

``python benchmarks/run.py [--quick] [--only kdd,anomaly,...] [--out FILE]``
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUITES = ("kdd", "anomaly", "weblogs", "stream", "rest", "spark")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="subsampled data, minutes not hours")
    ap.add_argument("--only", default=",".join(SUITES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import os

    lines = ["# deepwatch benchmarks", "",
             f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, Python {platform.python_version()}"
             + (" (quick mode: subsampled data)" if args.quick else "") + ".", ""]
    for name in args.only.split(","):
        t0 = time.perf_counter()
        mod = importlib.import_module(f"bench_{name}")
        try:
            lines += mod.run(quick=args.quick)
        except Exception as exc:  # one broken suite must not hide the others' results
            lines += [f"## {name}: failed", "", f"`{type(exc).__name__}: {exc}`", ""]
        print(f"[{name}] {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
