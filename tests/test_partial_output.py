"""A `score` run that an input stops part way keeps what it scored, and says it is incomplete."""

from __future__ import annotations

import bz2
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
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


CHILD = """
import sys, time
import pyarrow as pa
from deepwatch.sinks import RecordSink
sink = RecordSink(sys.argv[1])
for i in range(3):  # (the third waits for the first to be written: the file is made)
    sink.write(pa.record_batch({"x": [i]}))
print("written", flush=True)
time.sleep(60)
"""


def test_a_parquet_output_killed_outright_leaves_the_older_one_readable(tmp_path: Path) -> None:
    """A Parquet file is readable only once its footer is written, when the output closes: a
    run killed outright (SIGKILL, the OOM killer) left a file under the output's name that no
    reader could open, in place of the older output. It is written beside it, hidden, and
    moved into place when it closes (SIGTERM and Ctrl-C close it: see the test above)."""
    out = tmp_path / "out.parquet"
    pq.write_table(pa.table({"x": [41, 42]}), out)
    with subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "written\n"
        finally:
            child.kill()
    assert pq.read_table(out).column("x").to_pylist() == [41, 42]
    [left] = [p.name for p in tmp_path.iterdir() if p != out]
    assert left.startswith(".out.parquet.") and left.endswith(".tmp")  # hidden, as the lake's
    # the next run writing that output removes it once it is old (a young one may be a running
    # writer's), and nothing else beside it: before, each killed run's stayed for good
    from deepwatch.sinks import STALE_TMP_S, RecordSink

    stale = tmp_path / left
    young = tmp_path / ".out.parquet.0123abcd.tmp"
    young.write_bytes(b"PAR1")
    other = tmp_path / ".other.parquet.0123abcd.tmp"
    other.write_bytes(b"PAR1")
    for p in (stale, other):
        os.utime(p, (p.stat().st_atime, p.stat().st_mtime - STALE_TMP_S - 60))
    sink = RecordSink(str(out))
    sink.write(pa.record_batch({"x": [7]}))
    sink.close()
    assert pq.read_table(out).column("x").to_pylist() == [7]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, young.name, other.name])
