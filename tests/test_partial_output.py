"""A `score` run that an input stops part way keeps what it scored, and says it is incomplete."""

from __future__ import annotations

import bz2
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq


def test_an_input_failing_mid_run_leaves_an_output_that_says_it_is_incomplete(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    text = small_kdd_test.read_bytes()
    n = text.count(b"\n")
    fifo = tmp_path / "later"
    os.mkfifo(fifo)  # a pipe is only read when its turn comes: its compressed data fails then

    def feed() -> None:
        try:
            with open(fifo, "wb") as f:
                f.write(bz2.compress(text))
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed)
    writer.start()
    out = tmp_path / "out.parquet"
    try:
        run = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                              "--format", "kdd", "--out", str(out), str(small_kdd_test),
                              str(fifo)], capture_output=True, text=True, timeout=120)
    finally:
        writer.join(timeout=30)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"error: {fifo} is compressed with bzip2;")
    assert line.endswith(f"; the {n:,} rows scored before it are kept in {out}, which is "
                         "incomplete")
    assert pq.read_table(out).num_rows == n  # a whole Parquet file, footer and all
