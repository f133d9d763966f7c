"""Zeek conn.log written with ``LogAscii::tsv=T``: no ``#`` lines, but one header line of the
field names (``ts\\tuid\\tid.orig_h...``). It is read as a ``#fields`` header is: the records
after it parse by name, whatever columns the log has, and it counts as a header, not a record,
in local scoring, ``ingest``, and ``stream --follow`` over a rotation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import signal_when
from test_zeek import FIELDS, _conn, _tsv

from deepwatch.formats import get_format
from deepwatch.lake import read_lake, read_rejects

FMT = get_format("zeek")
#: A log with a package's column added (``community_id``), after Zeek's own.
EXTRA = [*FIELDS, "community_id"]
#: A log whose filter leaves fields out: read in the standard order, every field after
#: ``id.orig_h`` is off by one (``id.orig_p`` would get the responder's address).
FEWER = [f for f in FIELDS if f not in ("id.orig_p", "local_orig", "local_resp", "missed_bytes")]
ENV = {**os.environ, "DEEPWATCH_PROGRESS": "0"}


def _row(i: int) -> dict[str, str]:
    row = _conn(i)
    row["duration"] = str(0.1 * (i % 7))  # some variety for the featurizer
    row["orig_pkts"] = str(1 + i % 5)
    row["community_id"] = f"1:{i:08d}AAAAAAAAAAAAAAAAAA="
    return row


def _log(order: list[str], rows: range) -> str:
    """A conn.log as Zeek writes it with ``LogAscii::tsv=T``: the field names, then records."""
    return "\n".join(["\t".join(order), *(_tsv(order, _row(i)) for i in rows)]) + "\n"


def _deepwatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepwatch", *args], capture_output=True,
                          text=True, timeout=120, env=ENV)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An autoencoder trained on a log with a ``#fields`` header (not the layout under test,
    so that a bundle is had without it)."""
    from deepwatch.train.api import train

    root = tmp_path_factory.mktemp("zeek_tsv")
    log = root / "train.log"
    log.write_text("#fields\t" + _log(FEWER, range(400)))
    train("zeek", "autoencoder", [f"{log}=normal"], root / "ae", epochs=1, seed=0)
    return root / "ae"


def test_the_field_name_line_is_a_header() -> None:
    """The header names the fields of the lines after it, in this chunk and the next (the
    format's context); it is counted as skipped, as ``#fields`` is, never as a reject."""
    text = _log(FEWER, range(2))
    res = FMT.parse(text, first_line=1)
    assert (res.lines, res.skipped, res.rejects.num_rows) == (2, 1, 0)
    assert res.line_numbers.to_pylist() == [2, 3]
    row = res.batch.to_pylist()[0]
    assert (row["orig_h"], row["orig_p"], row["resp_h"], row["resp_p"]) == (
        "10.0.0.1", None, "10.0.0.2", 80)
    assert (row["orig_bytes"], row["resp_bytes"], row["history"]) == (1, 999999, "ShADfF")
    context = FMT.context_after(text.encode(), None)
    assert context == "\t".join(FEWER)
    later = FMT.parse_bulk(_tsv(FEWER, _row(5)) + "\n", first_line=4, context=context)
    assert later.rejects.num_rows == 0 and later.batch.column("resp_bytes").to_pylist() == [
        999999]
    # a second log after it, with its own header and columns, is read by its own names
    both = FMT.parse(text + _log(EXTRA, range(2, 4)))
    assert (both.lines, both.skipped, both.rejects.num_rows) == (4, 2, 0)
    assert both.batch.column("orig_p").to_pylist() == [None, None, 40002, 40003]


def test_score_reads_the_records_by_their_header(bundle: Path, tmp_path: Path) -> None:
    """``deepwatch score`` of a tsv=T log whose fields are not the standard ones."""
    log, out, rejects = tmp_path / "conn.log", tmp_path / "out.parquet", tmp_path / "rej.jsonl"
    log.write_text(_log(FEWER, range(300)))
    done = _deepwatch("score", str(bundle), "--format", "zeek", "--out", str(out),
                      "--rejects", str(rejects), str(log))
    assert done.returncode == 0, done.stderr
    assert "300 lines read: 300 parsed, 0 rejected" in done.stderr, done.stderr
    assert not rejects.exists() or rejects.read_text() == ""
    table = pq.read_table(out)
    assert set(table.column("orig_h").to_pylist()) == {"10.0.0.1"}
    assert set(table.column("resp_bytes").to_pylist()) == {999999}
    assert set(table.column("orig_p").to_pylist()) == {None}


def test_ingest_reads_the_records_by_their_header(tmp_path: Path) -> None:
    """``deepwatch ingest`` of two tsv=T logs, each with its own columns."""
    first, second, lake = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "lake"
    first.write_text(_log(EXTRA, range(50)))
    second.write_text(_log(FEWER, range(50, 100)))
    done = _deepwatch("ingest", "--format", "zeek", "--lake", str(lake), str(first),
                      str(second))
    assert done.returncode == 0, done.stderr
    assert "100 lines read: 100 parsed, 0 rejected" in done.stderr, done.stderr
    assert read_rejects(lake) is None
    table = read_lake(lake)
    assert table.num_rows == 100
    assert set(table.column("resp_bytes").to_pylist()) == {999999}
    assert sorted(table.column("orig_p").to_pylist(), key=str) == [
        *range(40000, 40050), *[None] * 50]


def test_stream_follow_reads_each_files_header_over_a_rotation(bundle: Path,
                                                               tmp_path: Path) -> None:
    """``stream --follow``: the followed log is rotated, and the new file at its path starts
    with its own header, naming other fields than the first file's."""
    log, verdicts, rejects = tmp_path / "conn.log", tmp_path / "v.jsonl", tmp_path / "r.jsonl"
    log.write_text(_log(EXTRA, range(100)))

    def read() -> int:  # verdicts and rejects written so far
        return _lines(verdicts) + _lines(rejects)

    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr, subprocess.Popen(
            [sys.executable, "-m", "deepwatch", "stream", str(bundle), "--format", "zeek",
             "--follow", "--out", str(tmp_path / "alerts.jsonl"), "--verdicts", str(verdicts),
             "--rejects", str(rejects), "--batch-wait-ms", "50", str(log)],
            stdout=subprocess.DEVNULL, stderr=stderr, env=ENV) as proc:
        try:
            deadline = time.monotonic() + 60
            while read() < 100:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            log.rename(tmp_path / "conn.log.1")  # rotated: a new file at the same path
            log.write_text(_log(FEWER, range(100, 200)))
            signal_when(proc, lambda: read() >= 200, signal.SIGTERM, within=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = errors.read_text()
    assert proc.returncode == 0, err
    assert _lines(rejects) == 0, rejects.read_text()
    sources = [json.loads(x)["deepwatch"]["source"] for x in verdicts.read_text().splitlines()]
    # numbered within each file: its header is line 1
    assert [s["line"] for s in sources] == [*range(2, 102), *range(2, 102)]
    logs = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    (stop,) = [x for x in logs if x.get("event") == "stop"]
    assert (stop["scored"], stop["rejected"]) == (200, 0), err


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_a_field_name_line_posted_as_a_raw_line_is_a_header(bundle: Path) -> None:
    """Over REST, as in a file: the line gets neither a result nor a reject, and names the
    fields of the lines after it in the same request."""
    import httpx
    from conftest import serving

    lines = _log(FEWER, range(3)).splitlines()
    with serving(bundle) as (_, url):
        answer = httpx.post(url + "/v1/score", json={"records": lines}, timeout=30).json()
    assert answer["rejects"] == []
    assert [r["index"] for r in answer["results"]] == [1, 2, 3]
