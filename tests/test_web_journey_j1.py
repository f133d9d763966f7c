"""An analyst's journey with web server logs (simulate -> ingest -> train -> score -> report),
walked with the real CLI: the defects it found, each reproduced here first."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from deepwatch.cli import main
from deepwatch.lake import read_lake
from deepwatch.simulate import simulate

LINES = "".join(
    f'203.0.113.{i % 7 + 1} - - [14/May/2024:10:{i // 60:02d}:{i % 60:02d} +0000] '
    f'"GET /page/{i} HTTP/1.1" 200 {100 + i} "-" "Mozilla/5.0"\n' for i in range(40))

#: simulate(visits=30, attacks=["sqli"], seed=4, hours=24) before several days were drawn
#: each with its own afternoon (a day or less is drawn as it was)
ONE_DAY_SHA256 = "3914bc79e78f419337168cc891822173ed9b0339bc6cb2585d1a461b8e5ebb1b"

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_rotated_log_compressed_since_is_warned_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str) -> None:
    """logrotate's ``delaycompress``: yesterday's ``access.log.1`` is ``access.log.2.gz``
    today, the same lines. Ingesting ``access.log*`` each day stored them again without a word
    (only the compressed bytes were checksummed, and they differ); now it warns, as for a
    file ingested before, naming the file ingested."""
    logs, lake = tmp_path / "logs", tmp_path / "lake"
    logs.mkdir()
    plain = logs / "access.log.1"
    plain.write_text(LINES)
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(plain)]) == 0
    capsys.readouterr()
    rotated = logs / f"access.log.2.{suffix}"
    rotated.write_bytes(COMPRESSORS[suffix](LINES.encode()))
    plain.unlink()
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(rotated)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {rotated} holds the same lines as {plain}" in err, err
    assert "its records are appended again" in err
    assert read_lake(lake).num_rows == 80  # appended all the same, as documented


def test_compressed_log_then_its_text_is_warned_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The other way round: a ``.gz`` ingested, then the same log decompressed."""
    lake = tmp_path / "lake"
    packed = tmp_path / "access.log.2.gz"
    packed.write_bytes(gzip.compress(LINES.encode()))
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(packed)]) == 0
    text = tmp_path / "access.log.2"
    with gzip.open(packed) as f, text.open("wb") as out:
        shutil.copyfileobj(f, out)
    capsys.readouterr()
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(text)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {text} holds the same lines as {packed}" in err, err


def test_live_log_ingested_then_rotated_and_compressed_is_warned_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A live log ingested part-way through the day, rotated and compressed since: the
    compressed file's lines begin with those stored, and are stored again."""
    lake = tmp_path / "lake"
    live = tmp_path / "access.log"
    half = LINES[:LINES.index("\n", len(LINES) // 2) + 1]
    live.write_text(half)
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(live)]) == 0
    packed = tmp_path / "access.log.1.gz"
    packed.write_bytes(gzip.compress(LINES.encode()))
    capsys.readouterr()
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(packed)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {packed} begins, decompressed, with the {len(half):,} bytes ingested" \
        in err, err
    # other lines, compressed, are not taken for those
    other = tmp_path / "b.log.gz"
    other.write_bytes(gzip.compress(LINES.replace("Mozilla", "curl").encode()))
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(other)]) == 0
    assert "warning" not in capsys.readouterr().err


def _per_day_and_half(log: Path) -> tuple[Counter[str], int, int]:
    """Lines per day, and lines before and after noon, of a simulated log."""
    days: Counter[str] = Counter()
    morning = afternoon = 0
    for line in log.read_text().splitlines():
        stamp = line.split("[", 1)[1].split("]", 1)[0]  # 14/May/2024:13:05:00 +0000
        days[stamp[:11]] += 1
        if int(stamp[12:14]) < 12:
            morning += 1
        else:
            afternoon += 1
    return days, morning, afternoon


def test_simulate_several_days_gives_each_day_its_busy_afternoon(tmp_path: Path) -> None:
    """``simulate --hours 72``: the afternoon peak was drawn once over the whole span (62% of
    the way through it), so three days were one bump (the middle day 3.5 times busier than the
    first) with no daily rhythm at all (as many requests before noon as after), where the docs
    promise a shop busier in the afternoon and evening, each day."""
    paths = simulate(tmp_path / "sim", visits=600, attacks=[], seed=4, hours=72)
    days, morning, afternoon = _per_day_and_half(paths["normal"])
    total = sum(days.values())
    # (a visit begun late on the last day may run on a little past midnight)
    busy = {day: n / total for day, n in days.items() if n / total > 0.02}
    assert sorted(busy) == ["14/May/2024", "15/May/2024", "16/May/2024"], days
    assert all(0.22 < share < 0.45 for share in busy.values()), days
    assert afternoon > 1.3 * morning, (morning, afternoon)
    # a day or less (the default, the demo's) is drawn as before, line for line
    one_day = simulate(tmp_path / "day", visits=30, attacks=["sqli"], seed=4, hours=24)
    digest = hashlib.sha256(one_day["normal"].read_bytes() + one_day["sqli"].read_bytes())
    assert digest.hexdigest() == ONE_DAY_SHA256



def test_ingest_summary_names_the_days_stored_and_no_files_it_did_not_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ingest summary counted the Parquet parts it wrote as "files" (one log ingested:
    "40 records in 2 files"), and gave the days stored as one span: a log of 14 and 20 May
    read "(2024-05-14 .. 2024-05-20)", where ``train --days 2024-05-17`` then said the lake
    "holds no records for 2024-05-17 (days held: 2024-05-14, 2024-05-20)"."""
    log = tmp_path / "access.log"
    week_later = LINES.replace("14/May/2024", "20/May/2024")
    log.write_text(LINES + week_later.splitlines(keepends=True)[0] + "garbage\n")
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(log)]) == 0
    err = capsys.readouterr().err
    assert f"41 records stored in {lake} for 2 days (2024-05-14, 2024-05-20), as 2 new " \
        f"Parquet parts; 1 rejected line kept in {lake}/rejects" in err, err
    assert " files (" not in err
