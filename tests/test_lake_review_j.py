"""A review of the lake as an analyst uses it daily, on slices of the real site log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import data_file, head_lines

from deepwatch.cli import main


@pytest.fixture
def site_log(tmp_path: Path) -> Path:
    """The first 200 lines of the real site log (May 2015), plain text."""
    path = tmp_path / "site.log"
    path.write_text("".join(head_lines(data_file("weblogs/apache_access.log.gz"), 200)))
    return path


@pytest.mark.parametrize("url", ["s3://bucket/lake", "file:///{tmp}/lake"])
def test_a_lake_given_as_a_url_is_refused_before_anything_is_made(
        tmp_path: Path, site_log: Path, url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # a URL was taken for a relative path: ingest made ./s3:/bucket/lake/_lake.json, then died
    # with a traceback (pyarrow read the part's path as an S3 URI); train --lake then read that
    # stray lake's 0 records
    url = url.format(tmp=tmp_path.as_posix().lstrip("/"))
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--format", "access", "--lake", url, str(site_log)]) == 2
    err = capsys.readouterr().err
    assert f"error: the lake {url} is a URL; a lake is a local directory" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["site.log"]  # no stray s3: or file: directory
    assert main(["train", "--format", "access", "--model", "autoencoder", "--out",
                 str(tmp_path / "b"), "--lake", url]) == 2
    assert f"error: the lake {url} is a URL" in capsys.readouterr().err


def test_a_file_given_twice_to_one_ingest_is_warned_about(
        tmp_path: Path, site_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an overlapping glob stored site.log twice without a word: the warning looked only at the
    # lake's earlier ingests, and neither copy was in the lake yet
    lake = tmp_path / "lake"
    other = tmp_path / "other.log"
    other.write_text("".join(head_lines(data_file("weblogs/scan_w3af.log.gz"), 20)))
    assert main(["ingest", "--format", "access", "--lake", str(lake),
                 str(tmp_path / "*.log"), str(site_log)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {site_log} was given twice in this run" in err
    assert err.count("was given twice in this run") == 1  # the second site.log only
    assert "420 records" in err  # appended anyway, as the docs say: 200 + 20 + 200


def test_a_day_missing_between_held_days_is_not_said_to_be_held(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # "holds no records for 2015-05-18 (days held: 2015-05-17 .. 2015-05-19)" read as if the
    # lake held the very day it said it did not
    lines = head_lines(data_file("weblogs/apache_access.log.gz"), 10_000)
    log = tmp_path / "gap.log"
    log.write_text("".join([next(x for x in lines if "[17/May" in x),
                            next(x for x in lines if "[19/May" in x)]))
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "access", "--lake", str(lake), str(log)]) == 0
    capsys.readouterr()
    assert main(["train", "--format", "access", "--model", "autoencoder", "--out",
                 str(tmp_path / "b"), "--lake", str(lake), "--days", "2015-05-18"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: the lake at {lake} holds no records for 2015-05-18 (days held: 2015-05-17, "
        "2015-05-19)")
