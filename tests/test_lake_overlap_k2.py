"""Records that would silently count twice: a file read beside a lake it was ingested into, a
--val file that is training data too, the same lines given compressed and not to one ingest."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from conftest import data_file, head_lines

from deepwatch.cli import main
from deepwatch.formats import get_format
from deepwatch.io import InputReader

TOO_FEW = 4  # (exit code of a DataError: too few records, so that no model is trained)


def _log(path: Path, lines: list[str], compressed: bool = False) -> Path:
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compressed else data)
    return path


@pytest.fixture(scope="module")
def site_lines() -> list[str]:
    """The first 40 lines of the real site log (May 2015)."""
    return head_lines(data_file("weblogs/apache_access.log.gz"), 40)


def _ingest(lake: Path, *inputs: Path) -> None:
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 *map(str, inputs)]) == 0


def _train(out: Path, *args: str | Path) -> int:
    return main(["train", "--format", "access", "--model", "autoencoder", "--out", str(out),
                 *map(str, args)])


@pytest.mark.parametrize("order", ["plain first", "compressed first"])
def test_the_same_lines_compressed_and_not_given_to_one_ingest_are_warned_about(
        tmp_path: Path, site_lines: list[str], order: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # access.log.1 and access.log.1.gz in one run were both stored without a word: the run's
    # own check compared their bytes, which differ, and neither was in the lake yet
    plain = _log(tmp_path / "access.log.1", site_lines[:20])
    packed = _log(tmp_path / "access.log.1.gz", site_lines[:20], compressed=True)
    first, second = (plain, packed) if order == "plain first" else (packed, plain)
    _ingest(tmp_path / "lake", first, second)
    err = capsys.readouterr().err
    assert f"warning: {second} holds the same lines as {first} (one of the two compressed), " \
        "given earlier in this run; its records are stored twice" in err, err
    assert err.count("warning:") == 1
    assert "40 records stored" in err  # appended anyway, as for any repeat


@pytest.mark.parametrize("given", ["same bytes", "compressed since"])
def test_a_training_file_ingested_into_the_lake_read_too_is_warned_about(
        tmp_path: Path, site_lines: list[str], given: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # train --lake L FILE, FILE ingested into L already: each of its records counted twice in
    # training, without a word (4 + 4 records: too few to train, so no model is trained)
    plain = _log(tmp_path / "access.log.1", site_lines[:TOO_FEW])
    lake = tmp_path / "lake"
    _ingest(lake, plain)
    capsys.readouterr()
    read = plain if given == "same bytes" else _log(
        tmp_path / "access.log.1.gz", site_lines[:TOO_FEW], compressed=True)
    assert _train(tmp_path / "b", "--lake", lake, read) == 4
    err = capsys.readouterr().err
    how = "" if given == "same bytes" else " (the same lines, one of the two compressed)"
    assert f"warning: {read} was ingested into the lake {lake} already, from {plain}{how}; " \
        "its records are read twice, from the file and from the lake\n" in err
    assert err.count("warning:") == 1
    assert "too few training records (8)" in err


def test_a_file_not_ingested_is_not_warned_about_and_is_checksummed_once(
        tmp_path: Path, site_lines: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "lake"
    _ingest(lake, _log(tmp_path / "a.log", site_lines[:10]))
    capsys.readouterr()
    other = _log(tmp_path / "b.log", site_lines[10:20])
    # as long as the file ingested (so it is checksummed), other lines
    same_size = _log(tmp_path / "c.log", [site_lines[0].replace("GET", "PUT", 1),
                                          *site_lines[1:10]])
    assert same_size.stat().st_size == (tmp_path / "a.log").stat().st_size
    reader = InputReader(get_format("access"), [str(other), str(same_size)],
                         lakes=[str(lake)], checksums=True)
    table, _, _ = reader.read_all()
    assert table.num_rows == 30
    assert "warning" not in capsys.readouterr().err

    # the manifest's checksum of a file compared with the lake is the one taken then
    def read_again(path: object) -> str:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr("deepwatch.bundle.sha256_file", read_again)
    assert reader.sha256(1) == hashlib.sha256(same_size.read_bytes()).hexdigest()


@pytest.mark.parametrize("given", ["same bytes", "compressed since"])
def test_a_validation_file_in_the_training_lake_is_warned_about(
        tmp_path: Path, site_lines: list[str], given: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # a --val file ingested into the training lake: its records stopped the training early and
    # calibrated the threshold though the model had trained on them, without a word (a
    # one-record --val: refused as too small after it is read, so no model is trained)
    lake = tmp_path / "lake"
    held = _log(tmp_path / "held.log", site_lines[20:21])
    _ingest(lake, _log(tmp_path / "site.log", site_lines[:20]), held)
    capsys.readouterr()
    val = held if given == "same bytes" else _log(tmp_path / "held.log.gz", site_lines[20:21],
                                                  compressed=True)
    assert _train(tmp_path / "b", "--lake", lake, "--val", val) == 4
    err = capsys.readouterr().err
    assert f"warning: the validation input {val} (--val) was ingested into the training lake " \
        f"{lake}, from {held}; its records are read for training too: validation records are " \
        "also training records" in err
    assert err.count("warning:") == 1
    assert "fewer than two records" in err


def test_a_validation_file_given_for_training_too_is_warned_about(
        tmp_path: Path, site_lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    site = _log(tmp_path / "site.log", site_lines[:20])
    held = _log(tmp_path / "held.log", site_lines[20:21])
    copy = _log(tmp_path / "copy.log", site_lines[20:21])  # another name, the same bytes
    other = _log(tmp_path / "other.log", site_lines[21:22])
    assert _train(tmp_path / "b", site, held, "--val", copy) == 4
    err = capsys.readouterr().err
    assert f"warning: the validation input {copy} (--val) holds the same bytes as the " \
        f"training input {held}: validation records are also training records" in err
    assert err.count("warning:") == 1
    assert _train(tmp_path / "b", site, held, "--val", other) == 4
    assert "warning:" not in capsys.readouterr().err
