"""Lines ended by a carriage return alone (a log with classic Mac OS line ends, or records run
together by a stray CR), or records run together by a lost line break: only ``\\n`` ends a line,
so such text is one line, and it must come out as one counted reject with its text and reason,
never as one record standing for many, or as a header that takes the records after it along,
unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_file, head_lines
from test_zeek import FIELDS, HEADER, _conn, _tsv

from deepwatch.formats import get_format
from deepwatch.formats._base import CR_INSIDE_REASON

QUIET = {**os.environ, "DEEPWATCH_PROGRESS": "0"}


def _zeek_log(n: int) -> str:
    rows = [_conn(i) for i in range(n)]
    for i, r in enumerate(rows):  # some variety for the featurizer
        r["duration"] = str(0.1 * (i % 7))
        r["orig_pkts"] = str(1 + i % 5)
    return "\n".join([HEADER, *(_tsv(FIELDS, r) for r in rows)]) + "\n"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small autoencoder bundles for the two formats whose lines may end in free text."""
    from deepwatch.train.api import train

    root = tmp_path_factory.mktemp("line_ends")
    (root / "conn.log").write_text(_zeek_log(300))
    site = root / "site.log"
    site.write_text("".join(head_lines(data_file("weblogs/apache_access.log.gz"), 600)))
    out = {"zeek": root / "zeek", "access": root / "access"}
    train("zeek", "autoencoder", [f"{root / 'conn.log'}=normal"], out["zeek"], epochs=1, seed=0)
    train("access", "autoencoder", [f"{site}=normal"], out["access"], epochs=1, seed=0)
    return out


def _text(fmt: str) -> str:
    """A few lines of ``fmt``, each ended by ``\\n`` (a Zeek log with its header)."""
    if fmt == "zeek":
        return _zeek_log(30)
    return "".join(head_lines(data_file("weblogs/apache_access.log.gz"), 30))


def _score(bundle: Path, fmt: str, log: Path, tmp_path: Path) -> tuple[str, list[dict]]:
    """``deepwatch score`` of ``log`` in a fresh process: its stderr and its rejects."""
    rejects = tmp_path / "rejects.jsonl"
    proc = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(bundle), "--format",
                           fmt, "--out", str(tmp_path / "out.jsonl"), "--rejects", str(rejects),
                           str(log)], capture_output=True, text=True, timeout=300, env=QUIET)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    kept = [json.loads(line) for line in rejects.read_text().splitlines()] if (
        rejects.exists()) else []
    return proc.stderr, kept


@pytest.mark.parametrize("fmt", ["zeek", "access"])
def test_a_log_with_cr_line_ends_is_one_counted_reject(
        fmt: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    # it was "1 lines read: 1 parsed" for an access log (the records after the first read as
    # its extra fields) and "0 lines read" for a Zeek log (the whole text taken for a header)
    text = _text(fmt).replace("\n", "\r")
    log = tmp_path / "cr.log"
    log.write_text(text)
    err, rejects = _score(bundles[fmt], fmt, log, tmp_path)
    assert "1 lines read: 0 parsed, 1 rejected" in err, err
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, CR_INSIDE_REASON)]
    assert rejects[0]["raw"] == text.removesuffix("\r")


@pytest.mark.parametrize("fmt", ["zeek", "access"])
def test_records_run_together_by_a_cr_are_a_reject_the_others_parse(
        fmt: str, bundles: dict[str, Path], tmp_path: Path) -> None:
    lines = _text(fmt).splitlines()
    at = len(lines) - 5
    joined = lines[at] + "\r" + lines[at + 1]
    mixed = [*lines[:at], joined, *lines[at + 2:]]
    log = tmp_path / "mixed.log"
    log.write_text("\r\n".join(mixed) + "\r\n")  # CRLF ends around it are fine
    err, rejects = _score(bundles[fmt], fmt, log, tmp_path)
    records = len(mixed) - (HEADER.count("\n") + 1 if fmt == "zeek" else 0)
    assert f"{records} lines read: {records - 1} parsed, 1 rejected" in err, err
    assert [(r["line"], r["raw"], r["reason"]) for r in rejects] == [
        (at + 1, joined, CR_INSIDE_REASON)]


def test_a_zeek_header_with_text_after_a_cr_sets_no_field_order() -> None:
    fmt = get_format("zeek")
    swapped = "#fields\t" + "\t".join(reversed(FIELDS))
    row = _tsv(FIELDS, _conn(1))
    text = f"{swapped}\r{row}\n{row}\n"
    result = fmt.parse_bulk(text, context=None)
    # the line is neither a header (skipped, uncounted) nor the order of the record after it
    assert (result.lines, result.skipped, result.batch.num_rows) == (2, 0, 1)
    assert result.rejects.column("reason").to_pylist() == [CR_INSIDE_REASON]
    assert fmt.context_after(text, None) is None
    assert fmt.context_after("#fields\tts\n" + text, None) == "#fields\tts"


def test_zeek_records_run_together_under_a_header_are_a_reject(
        bundles: dict[str, Path], tmp_path: Path) -> None:
    # the #fields header declares 21 fields: a line of 41 is two records that lost the line
    # break between them; the first was scored and the second was gone, the line counted parsed
    lines = _text("zeek").splitlines()
    at = len(lines) - 5
    joined = lines[at] + lines[at + 1]
    log = tmp_path / "joined.log"
    log.write_text("\n".join([*lines[:at], joined, *lines[at + 2:]]) + "\n")
    err, rejects = _score(bundles["zeek"], "zeek", log, tmp_path)
    assert "29 lines read: 28 parsed, 1 rejected" in err, err
    n = len(FIELDS)  # the last field of the first and the first of the second are one
    assert [(r["line"], r["raw"], r["reason"]) for r in rejects] == [
        (at + 1, joined, f"expected {n} tab-separated fields, found {2 * n - 1}")]
