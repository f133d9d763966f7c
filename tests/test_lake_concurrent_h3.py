"""The lake under concurrent ingests (real processes: the second of two ingests of one file is
told), and rejects parts rewritten by other tools."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deepwatch.errors import InputError
from deepwatch.lake import lake_days, read_lake

LINE = ('9.9.9.{a} - - [14/May/2024:12:{m:02d}:{s:02d} +0000] "GET /h3/{i} HTTP/1.1" 200 10 '
        '"-" "curl/8.5.0"\n')
EXE = str(Path(sys.executable).with_name("deepwatch"))
ENV = {**os.environ, "DEEPWATCH_PROGRESS": "0"}


def _log(path: Path, n: int) -> Path:
    path.write_text("".join(LINE.format(a=i % 5, m=i // 60 % 60, s=i % 60, i=i)
                            for i in range(n)))
    return path


def _ingest(lake: Path, *inputs: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([EXE, "ingest", "--format", "access", "--lake", str(lake), *inputs],
                          capture_output=True, timeout=60, env=ENV)


def _held(lake: Path, log: Path) -> Any:
    """An ingest of ``log`` and then of stdin, left open: it has checked and staged ``log``
    once a part is written, and cannot end before stdin is closed."""
    proc = subprocess.Popen([EXE, "ingest", "--format", "access", "--lake", str(lake),
                             str(log), "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    deadline = time.monotonic() + 30
    while not list(lake.rglob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_an_ingest_of_a_file_another_ingest_is_storing_is_warned(tmp_path: Path) -> None:
    """Two ingests of one file into one lake at once: neither found the file in the lake's
    list of inputs (neither had committed), so both stored it and neither said a word, while
    run one after the other the second warns. Now the second is warned as it would be."""
    lake, log = tmp_path / "lake", _log(tmp_path / "f.log", 50)
    first = _held(lake, log)
    try:
        second = _ingest(lake, str(log))
        assert first.stdin is not None and first.stderr is not None
        first.stdin.close()
        first_err = first.stderr.read().decode()
        assert first.wait(timeout=30) == 0, first_err
    finally:
        first.kill()
        assert first.stderr is not None
        first.stderr.close()
    assert second.returncode == 0, second.stderr.decode()
    assert f"{log} (same size and sha256) was already ingested into {lake}" \
        in second.stderr.decode()
    assert "already ingested" not in first_err
    assert read_lake(lake).num_rows == 100  # ingest appends, as run one after the other
    assert not list(lake.glob(".ingest-*"))


def test_a_killed_ingest_claims_nothing_and_locks_nothing(tmp_path: Path) -> None:
    """An ingest killed outright while it held a file: the next ingest of that file is not
    warned of a repeat that is not there, nor held up; a reader is never held up by the
    lock ingests take (held here by the test)."""
    lake, log = tmp_path / "lake", _log(tmp_path / "f.log", 30)
    first = _held(lake, log)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.stdin is not None and first.stderr is not None
    first.stdin.close()
    first.stderr.close()
    again = _ingest(lake, str(log))
    assert again.returncode == 0 and b"already ingested" not in again.stderr, again.stderr
    assert read_lake(lake).num_rows == 30
    assert not list(lake.glob(".ingest-*"))

    fd = os.open(lake / "_lake.json", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as an ingest holds it while it checks an input
        assert read_lake(lake).num_rows == 30 and lake_days(lake) == ["2024-05-14"]
    finally:
        os.close(fd)


def test_rejects_compacted_by_another_tool_read_beside_deepwatchs(tmp_path: Path) -> None:
    """A rejects part rewritten by polars (its strings ``large_string``) beside one deepwatch
    wrote made read_rejects fail with a traceback (``Unable to merge: Field raw has
    incompatible types``), though rejects another tool compacted are to be read as records
    are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepwatch.lake import read_rejects

    lake = tmp_path / "lake"
    for name in ("a", "b"):
        bad = tmp_path / f"{name}.log"
        bad.write_text(f"not a log line {name}\n")
        assert _ingest(lake, str(bad)).returncode == 0
    first = sorted((lake / "rejects").glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    wide = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f
                      for f in table.schema])
    pq.write_table(table.cast(wide), first)  # as polars' write_parquet writes it
    rejects = read_rejects(lake)
    assert rejects is not None
    assert sorted(rejects.column("raw").to_pylist()) == ["not a log line a",
                                                        "not a log line b"]
    assert rejects.schema.field("raw").type == pa.string()

    first.write_bytes(b"not parquet")  # a damaged part is one clear error, not a traceback
    with pytest.raises(InputError, match="cannot read the rejects part"):
        read_rejects(lake)
