"""``--days``: train and score on some days of a lake, through the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepwatch.errors import UsageError
from deepwatch.lake import lake_sha256, read_lake

LINE = ('{ip} - - [{day}/May/2024:12:{min:02d}:{sec:02d} +0000] "GET /{tag}/{i} HTTP/1.1" 200 10 '
        '"-" "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"')
EXE = str(Path(sys.executable).with_name("deepwatch"))
ENV = {**os.environ, "DEEPWATCH_PROGRESS": "0", "DEEPWATCH_TORCH_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake of three days: 150 records on 2024-05-14, 150 on the 15th, 100 on the 16th."""
    tmp = tmp_path_factory.mktemp("days")
    days = [14] * 150 + [15] * 150 + [16] * 100
    log = tmp / "site.log"
    log.write_text("".join(LINE.format(ip=f"9.9.9.{i % 5}", day=d, min=i // 60 % 60,
                                       sec=i % 60, tag="t", i=i) + "\n"
                           for i, d in enumerate(days)))
    root = tmp / "lake"
    done = _run("ingest", "--format", "access", "--lake", str(root), f"{log}=normal")
    assert done.returncode == 0, done.stderr
    return root


def test_train_and_score_read_only_the_days_given(lake: Path, tmp_path: Path) -> None:
    """``train --lake`` read every day of the lake, and no option picked some (the Python side
    could: read_lake(days=...))."""
    bundle = tmp_path / "bundle"
    done = _run("train", "--format", "access", "--model", "autoencoder", "--out", str(bundle),
                "--lake", str(lake), "--days", "2024-05-15..2024-05-16", "--epochs", "1")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    training = manifest["training"]
    assert training["records"] + training.get("val_records", 0) == 250, training
    # the checksum is of the parts read, and says which days, so it can be made again
    days = ["2024-05-15..2024-05-16"]
    assert manifest["data"] == [{"path": str(lake), "sha256": lake_sha256(lake, days),
                                 "label": None, "role": "training", "lake": True,
                                 "days": days}]

    out = tmp_path / "scored.parquet"  # repeated: one day and a range of one
    done = _run("score", str(bundle), "--format", "access", "--out", str(out), "--lake",
                str(lake), "--days", "2024-05-14", "--days", "2024-05-16..2024-05-16")
    assert done.returncode == 0, done.stderr
    scored = pq.read_table(out, columns=["timestamp"]).column("timestamp").to_pylist()
    assert len(scored) == 250 and {t.day for t in scored} == {14, 16}


@pytest.mark.parametrize(("days", "error"), [
    ("2024-5-15", "error: days (--days) '2024-5-15' is not a day (YYYY-MM-DD), a range of "
                  "days (FIRST..LAST) or 'unknown'"),
    ("2024-05-16..2024-05-14", "error: days (--days) '2024-05-16..2024-05-14' is not a day "
                               "(YYYY-MM-DD), a range of days (FIRST..LAST) or 'unknown'"),
    ("2024-05-20", "error: the lake at {lake} holds no records for 2024-05-20 (days held: "
                   "2024-05-14 .. 2024-05-16)"),
    ("2024-04-01..2024-04-30", "error: the lake at {lake} holds no records for "
                               "2024-04-01..2024-04-30 (days held: 2024-05-14 .. 2024-05-16)"),
])
def test_a_day_malformed_or_without_records_is_one_line(lake: Path, tmp_path: Path, days: str,
                                                         error: str) -> None:
    """Before any reading or training, and nothing written."""
    bundle = tmp_path / "bundle"
    done = _run("train", "--format", "access", "--model", "autoencoder", "--out", str(bundle),
                "--lake", str(lake), "--days", days, "--epochs", "1")
    assert (done.returncode, done.stderr) == (2, error.format(lake=lake) + "\n")
    assert not bundle.exists()


def test_days_need_a_lake(tmp_path: Path) -> None:
    log = tmp_path / "one.log"
    log.write_text(LINE.format(ip="9.9.9.9", day=14, min=0, sec=0, tag="t", i=0) + "\n")
    done = _run("train", "--format", "access", "--model", "autoencoder", "--out",
                str(tmp_path / "bundle"), "--days", "2024-05-14", str(log))
    assert (done.returncode, done.stderr) == (
        2, "error: days (--days) picks days of the lakes read: give a lake (--lake DIR)\n")


def test_read_lake_takes_the_same_days(lake: Path) -> None:
    assert read_lake(lake, "2024-05-15..2024-05-16").num_rows == 250
    assert read_lake(lake, ["2024-05-14", "2024-05-16"]).num_rows == 250
    with pytest.raises(UsageError, match="'2024-5-14' is not a day"):
        read_lake(lake, "2024-5-14")
