"""The lake: Parquet by day with rejects beside, ingest from files and stdin, train/score --lake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepwatch.cli import main
from deepwatch.errors import InputError, UsageError
from deepwatch.formats import get_format
from deepwatch.io import InputReader
from deepwatch.lake import LakeWriter, iter_lake, lake_days, read_lake, read_rejects
from deepwatch.simulate import simulate

LINE = ('{ip} - - [{day}/May/2024:23:59:{sec:02d} +0000] "GET /p{sec} HTTP/1.1" 200 10 "-" '
        '"Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"')


def _log(path: Path, days: list[int], bad: int = 0) -> Path:
    lines = [LINE.format(ip=f"9.9.9.{i % 3}", day=d, sec=i) for i, d in enumerate(days)]
    lines += ["this is not a log line"] * bad
    path.write_text("\n".join(lines) + "\n")
    return path


def test_partitions_by_day_in_arrival_order(tmp_path: Path) -> None:
    fmt = get_format("access")
    writer = LakeWriter(tmp_path / "lake", "access")
    for days in ([14, 15, 14], [15, 16]):
        writer.write(fmt.parse(_log(tmp_path / "a.log", days).read_bytes()).batch)
    assert lake_days(tmp_path / "lake") == ["2024-05-14", "2024-05-15", "2024-05-16"]
    assert sorted(p.parent.name for p in (tmp_path / "lake/records").rglob("*.parquet")) == [
        "day=2024-05-14", "day=2024-05-15", "day=2024-05-15", "day=2024-05-16"]
    table = read_lake(tmp_path / "lake")
    assert table.column("path").to_pylist() == ["/p0", "/p2", "/p1", "/p0", "/p1"]
    assert read_lake(tmp_path / "lake", days=["2024-05-16"]).num_rows == 1
    assert table.schema.equals(fmt.schema)


def test_refuses_other_formats_and_foreign_dirs(tmp_path: Path) -> None:
    LakeWriter(tmp_path / "lake", "access")
    with pytest.raises(UsageError, match="holds 'access'"):
        LakeWriter(tmp_path / "lake", "kdd")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="not a deepwatch lake"):
        LakeWriter(tmp_path / "other", "access")
    with pytest.raises(InputError, match="not a deepwatch lake"):
        list(iter_lake(tmp_path / "other"))
    with pytest.raises(InputError, match="holds no records"):
        read_lake(tmp_path / "lake")


def test_ingest_files_with_labels_and_rejects(tmp_path: Path) -> None:
    log = _log(tmp_path / "site.log", [14, 14, 15], bad=2)
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake), f"{log}=normal"]) == 0
    table = read_lake(lake)
    assert table.num_rows == 3 and set(table.column("label").to_pylist()) == {"normal"}
    rejects = read_rejects(lake)
    assert rejects is not None and rejects.num_rows == 2
    row = rejects.to_pylist()[0]
    assert row["line"] == 4 and row["raw"] == "this is not a log line"
    assert row["reason"] and row["source"] == str(log)
    assert json.loads((lake / "_lake.json").read_text())["format"] == "access"
    # the wrong format for this lake is one clear error
    assert main(["ingest", "--format", "kdd", "--lake", str(lake), str(log)]) == 2


def test_ingest_from_stdin(tmp_path: Path) -> None:
    data = _log(tmp_path / "s.log", [20, 21]).read_bytes() + b"garbage\n"
    exe = Path(sys.executable).with_name("deepwatch")
    done = subprocess.run([str(exe), "ingest", "--format", "access", "--lake",
                           str(tmp_path / "lake"), "-"], input=data, capture_output=True,
                          timeout=120, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr.decode()
    assert b"2 parsed, 1 rejected" in done.stderr
    assert read_lake(tmp_path / "lake").num_rows == 2
    rejects = read_rejects(tmp_path / "lake")
    assert rejects is not None and rejects.column("source").to_pylist() == ["<stdin>"]


def test_reader_reads_lakes_after_files(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    main(["ingest", "--format", "access", "--lake", str(lake),
          f"{_log(tmp_path / 'a.log', [14, 14])}=normal"])
    extra = _log(tmp_path / "b.log", [15])
    reader = InputReader(get_format("access"), [f"{extra}=scanner"], lakes=[str(lake)])
    table, _rej, stats = reader.read_all()
    assert table.column("label").to_pylist() == ["scanner", "normal", "normal"]
    assert stats.parsed == 3
    with pytest.raises(Exception, match="holds 'access' records"):
        InputReader(get_format("kdd"), [], lakes=[str(lake)]).read_all()


@pytest.mark.slow
def test_train_and_score_from_the_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPWATCH_TORCH_THREADS", "1")
    paths = simulate(tmp_path / "sim", visits=60, attacks=["scanner"], attack_share=0.1, seed=2)
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 f"{paths['normal']}=normal"]) == 0
    bundle = tmp_path / "bundle"
    assert main(["train", "--format", "access", "--model", "autoencoder", "--out", str(bundle),
                 "--lake", str(lake), "--epochs", "2"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input_format"] == "access" and manifest["training"]["records"] > 1000
    out = tmp_path / "scored.parquet"
    assert main(["score", str(bundle), "--format", "access", "--out", str(out),
                 "--lake", str(lake), str(paths["scanner"])]) == 0
    scored = pq.read_table(out)
    n_scan = len(paths["scanner"].read_text().splitlines())
    assert scored.num_rows == manifest["training"]["records"] + n_scan
    assert {"anomaly_score", "verdict"} <= set(scored.schema.names)
    assert pa.types.is_timestamp(scored.schema.field("timestamp").type)
    assert main(["score", str(bundle), "--format", "access", "--out", str(out)]) == 2
