"""The lake beside other tools: parts rewritten by polars, a lake read by polars while written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepwatch.cli import main
from deepwatch.errors import InputError
from deepwatch.formats import get_format
from deepwatch.lake import lake_days, read_lake

LINE = ('{ip} - - [{day}/May/2024:12:00:{sec:02d} +0000] "GET /p{sec} HTTP/1.1" 200 10 "-" '
        '"Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0"')


def _log(path: Path, days: list[int]) -> Path:
    path.write_text("".join(LINE.format(ip=f"9.9.9.{i % 3}", day=d, sec=i % 60) + "\n"
                            for i, d in enumerate(days)))
    return path


def _compact_with_polars(day_dir: Path) -> Path:
    """What a data scientist does to a day of many small parts: one part, written by polars
    (which writes its strings as ``large_string`` and drops the not-null marks)."""
    import polars as pl

    parts = sorted(day_dir.glob("part-*.parquet"))
    one = day_dir / "part-compacted.parquet"
    pl.read_parquet([str(p) for p in parts]).write_parquet(one)
    for part in parts:
        part.unlink()
    return one


def test_a_day_compacted_by_polars_reads_back_as_the_lakes_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # reading the lake joined parts of two schemas: a traceback (ArrowTypeError) in train
    monkeypatch.setenv("DEEPWATCH_TORCH_THREADS", "1")
    lake = tmp_path / "lake"
    for name, days in (("a.log", [14] * 150 + [15] * 150), ("b.log", [14] * 100 + [16] * 100)):
        assert main(["ingest", "--format", "access", "--lake", str(lake),
                     f"{_log(tmp_path / name, days)}=normal"]) == 0
    one = _compact_with_polars(lake / "records" / "day=2024-05-14")
    assert not pq.read_schema(one).equals(get_format("access").schema)  # as polars wrote it
    table = read_lake(lake)
    assert table.num_rows == 500 and table.schema.equals(get_format("access").schema)
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    assert main(["train", "--format", "access", "--model", "autoencoder", "--out", str(bundle),
                 "--lake", str(lake), "--epochs", "1"]) == 0, capsys.readouterr().err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["training"]["records"] + manifest["training"].get("val_records", 0) > 0

    # a part that does not hold the lake's records (a column dropped) is one clear line
    pq.write_table(pq.read_table(one).drop_columns(["status"]), one)
    capsys.readouterr()
    assert main(["train", "--format", "access", "--model", "autoencoder", "--out",
                 str(tmp_path / "bundle2"), "--lake", str(lake), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {one} does not hold the lake's records: no column "
                           "'status'"), err


def test_a_lake_written_before_the_vhost_and_offset_columns_still_reads(tmp_path: Path) -> None:
    """A part written before the access format kept ``vhost`` and ``utc_offset_minutes`` lacks
    both: it was refused (``no column 'vhost'``), so every lake written before could no longer
    be read. It reads, those columns null; a part beside it written now keeps its own."""
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 str(_log(tmp_path / "a.log", [14] * 5))]) == 0
    [old] = (lake / "records" / "day=2024-05-14").glob("part-*.parquet")
    table = pq.read_table(old)
    assert table.column("utc_offset_minutes").to_pylist() == [0] * 5
    schema = get_format("access").schema
    before = pa.schema([f for f in schema if f.name not in ("vhost", "utc_offset_minutes")])
    pq.write_table(table.select(before.names).cast(before), old)  # as the code before wrote it
    (tmp_path / "b.log").write_text("www.example.com:443 " + LINE.format(ip="9.9.9.9", day=14,
                                                                        sec=59) + "\n")
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 str(tmp_path / "b.log")]) == 0
    back = read_lake(lake)
    assert back.schema.equals(schema)
    assert back.column("client_ip").to_pylist() == ["9.9.9.0", "9.9.9.1", "9.9.9.2", "9.9.9.0",
                                                    "9.9.9.1", "9.9.9.9"]
    assert back.column("vhost").to_pylist() == [None] * 5 + ["www.example.com"]
    assert back.column("utc_offset_minutes").to_pylist() == [None] * 5 + [0]


@pytest.mark.parametrize("column", ["label", "referer"])
def test_a_part_missing_any_other_nullable_column_is_refused(tmp_path: Path,
                                                             column: str) -> None:
    """Only the columns the format gained since (``vhost``, ``utc_offset_minutes``) read as
    null where a part lacks them: a part that lost another nullable column (its ``label``, by a
    tool that rewrote it) read as records without labels or referers, with no word of it."""
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 f"{_log(tmp_path / 'a.log', [14] * 5)}=scanner"]) == 0
    [part] = (lake / "records" / "day=2024-05-14").glob("part-*.parquet")
    pq.write_table(pq.read_table(part).drop_columns([column]), part)
    with pytest.raises(InputError) as err:
        read_lake(lake)
    assert str(err.value) == f"{part} does not hold the lake's records: no column {column!r}"


def test_a_lake_rewritten_by_polars_partition_by_reads_every_record(tmp_path: Path) -> None:
    """polars writes a hive-partitioned data set as ``day=…/00000000.parquet``: only names
    ``part-*.parquet`` were read, so the days it wrote held no records (no word, or "the lake
    holds no records" where it wrote them all). Hidden files beside them are not parts."""
    import polars as pl

    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 str(_log(tmp_path / "a.log", [14] * 4 + [15] * 3 + [16] * 2))]) == 0
    records = lake / "records"
    pl.scan_parquet(records / "day=2024-05-1[45]" / "*.parquet", hive_partitioning=True
                    ).collect().write_parquet(tmp_path / "rewritten", partition_by="day")
    for day in ("2024-05-14", "2024-05-15"):
        shutil.rmtree(records / f"day={day}")
        shutil.move(tmp_path / "rewritten" / f"day={day}", records / f"day={day}")
        (records / f"day={day}" / "_SUCCESS.parquet").write_bytes(b"")  # (not a part)
    assert sorted(p.name for p in (records / "day=2024-05-14").iterdir()) == [
        "00000000.parquet", "_SUCCESS.parquet"]
    back = read_lake(lake)
    assert back.num_rows == 9 and back.schema.equals(get_format("access").schema)
    assert [t.day for t in back.column("timestamp").to_pylist()] == [14] * 4 + [15] * 3 + [16] * 2
    assert lake_days(lake) == ["2024-05-14", "2024-05-15", "2024-05-16"]
    assert read_lake(lake, days="2024-05-15").num_rows == 3


def test_a_damaged_part_read_with_its_checksum_hands_arrow_no_python_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train --lake`` reads each part's bytes once, for the lake's checksum and the records.
    They were a Python ``bytes`` handed to Arrow: when a part failed to decode, Arrow's threads
    still reading its other columns let go of that memory only after the error had ended the
    run, which then needs the interpreter, by then gone: "terminate called without an active
    exception", exit 134 (3 runs in 8 of a real ``train --lake`` on a damaged part; gdb showed
    ``PyBuffer::~PyBuffer`` in an Arrow thread). The bytes are now read into Arrow's own memory,
    and the damage is still one error line."""
    import hashlib

    from deepwatch import lake as lake_module
    from deepwatch.lake import iter_lake, lake_sha256

    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 str(_log(tmp_path / "a.log", [14] * 50))]) == 0
    [part] = (lake / "records" / "day=2024-05-14").glob("part-*.parquet")
    handed: list[type] = []
    reader = pa.BufferReader

    def recording(source: object) -> pa.BufferReader:
        handed.append(type(source))
        return reader(source)

    monkeypatch.setattr(lake_module.pa, "BufferReader", recording)
    digest = hashlib.sha256()
    assert sum(b.num_rows for b in iter_lake(lake, digest=digest)) == 50
    assert digest.hexdigest() == lake_sha256(lake)  # the same bytes, the same checksum
    assert handed == [pa.Buffer]
    data = bytearray(part.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
    part.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"cannot read {part}"):
        list(iter_lake(lake, digest=hashlib.sha256()))
    assert handed == [pa.Buffer, pa.Buffer]
