"""Ingest of a file that is written to while it is ingested (a live log).

The ingest checksums each input before reading it (for the "already ingested" warning), then
reads it to its end. A file that grew in between had more read and stored than the size and
sha256 noted in ``_ingested.jsonl`` described, and a later ingest of the grown file stored every
line again without a word. Here the file really grows on disk between the reader's first chunk
and the rest (``on_batch`` is called after each chunk's records are written), so the run reads
past the size it saw when it began.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from conftest import data_file

from deepwatch.lake import read_lake, read_rejects
from deepwatch.sources.files import CHUNK_BYTES
from deepwatch.web_cli import ingest


def _site_lines() -> list[bytes]:
    with gzip.open(data_file("weblogs/apache_access.log.gz"), "rb") as f:
        return f.read().splitlines(keepends=True)


def _big_log(path: Path, lines: list[bytes]) -> bytes:
    """A real access log of more than one reader chunk (so the run reads it in two or more)."""
    text = b"".join(lines)
    text *= CHUNK_BYTES // len(text) + 1
    path.write_bytes(text)
    return text


def _stored(lake: Path) -> int:
    rejects = read_rejects(lake)
    return read_lake(lake).num_rows + (0 if rejects is None else rejects.num_rows)


def _entries(lake: Path) -> list[dict]:
    return [json.loads(line) for line in (lake / "_ingested.jsonl").read_text().splitlines()]


def test_a_log_that_grows_while_ingested_is_noted_as_read_and_warned_about_later(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site_lines()
    log = tmp_path / "live.log"
    start = _big_log(log, site)
    more = b"".join(site[:500])
    grown = []

    def append_once(_rows: int) -> None:  # the writer of a live log, between two reads
        if not grown:
            with log.open("ab") as f:
                f.write(more)
            grown.append(True)

    lake = tmp_path / "lake"
    ingest("access", str(lake), [str(log)], on_batch=append_once)
    assert grown
    err = capsys.readouterr().err
    assert "grew while it was ingested" in err, err
    [entry] = _entries(lake)
    text = log.read_bytes()
    assert len(text) == len(start) + len(more)
    # what is noted is exactly what was read and stored: every line (start and appended)
    assert _stored(lake) == text.count(b"\n")
    assert entry["size"] == len(text)  # (was len(start): the 500 appended lines not counted)
    assert entry["sha256"] == hashlib.sha256(text[:entry["size"]]).hexdigest()

    # the writer goes on; the next ingest of the grown file is told that its beginning (all it
    # read last time) is in the lake already, instead of storing it again without a word
    with log.open("ab") as f:
        f.write(b"".join(site[500:600]))
    ingest("access", str(lake), [str(log)])
    err = capsys.readouterr().err
    assert f"{log} begins with the {entry['size']:,} bytes ingested into {lake} before" in err, err
    last = _entries(lake)[-1]
    assert last["size"] == log.stat().st_size  # unchanged while read: noted whole, as before
    assert "grew while it was ingested" not in err


def test_a_file_rewritten_while_ingested_is_not_noted_and_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site_lines()
    log = tmp_path / "rotated.log"
    _big_log(log, site)
    done = []

    def rewrite_once(_rows: int) -> None:  # copytruncate-style: emptied, then new lines
        if not done:
            log.write_bytes(b"".join(site[-50:]))
            done.append(True)

    lake = tmp_path / "lake"
    ingest("access", str(lake), [str(log)], on_batch=rewrite_once)
    err = capsys.readouterr().err
    assert f"{log} changed while it was ingested" in err, err
    # which bytes were read cannot be told: the file is not noted at all (the old code noted
    # the size and sha256 it had at the start, which are neither the file's nor what was read)
    assert not (lake / "_ingested.jsonl").exists() or _entries(lake) == []
