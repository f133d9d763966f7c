"""Review of ``deepwatch evaluate`` and ``deepwatch report`` (h6): defects found by running the
real commands on small real data, each test failing on the code before its fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from deepwatch.cli import main


def _renamed(kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
             name: bytes) -> tuple[Path, Path]:
    """A copy of the bundle in a directory named by ``name``'s bytes, and 12 records."""
    bundle = Path(os.fsdecode(bytes(tmp_path) + b"/" + name))
    shutil.copytree(kdd_bundle, bundle)
    data = tmp_path / "t.kdd"
    data.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:12]))
    return bundle, data


def test_a_bundle_path_that_is_not_utf8_is_written_in_the_report(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A directory named in Latin-1 ('modèles' as bytes): Python keeps its byte 0xE8 as the
    # lone surrogate U+DCE8. The page (its title and the bundle note hold the path) could not
    # be encoded as UTF-8: 'deepwatch report' ended in a UnicodeEncodeError traceback, exit 1,
    # no report, after all its work. The byte is written \xE8, as the formats write such bytes.
    bundle, data = _renamed(kdd_bundle, small_kdd_test, tmp_path, b"mod\xe8les")
    out = tmp_path / "r.html"
    assert main(["report", str(bundle), "--format", "kdd", "--out", str(out), str(data)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<h1><bdi>deepwatch report: " in page
    assert "mod\\xE8les</bdi></h1>" in page
    assert "from <bdi>" in page and page.count("mod\\xE8les") >= 3  # title, heading, note
    assert "report written to" in capsys.readouterr().err


def _well_formed_json(text: str) -> dict:
    """``text`` parsed as a strict parser would: a lone surrogate (an escape ``\\udcff``, which
    I-JSON forbids and Rust's serde_json refuses) is an error, as NaN is."""
    import json

    def refuse(word: str) -> None:
        raise AssertionError(f"{word} in the JSON")

    value = json.loads(text, parse_constant=refuse)

    def check(v: object) -> None:
        if isinstance(v, str):
            v.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        elif isinstance(v, dict):
            for k, x in v.items():
                check(k)
                check(x)
        elif isinstance(v, list):
            for x in v:
                check(x)

    check(value)
    return value


def test_evaluate_json_holds_no_lone_surrogate_for_a_path_that_is_not_utf8(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    # The JSON named the bundle "path": "b_\udcff" (Python's surrogateescape of the byte 0xFF,
    # written as a JSON escape): no strict JSON; jq read it as U+FFFD, serde_json refuses it.
    bundle, data = _renamed(kdd_bundle, small_kdd_test, tmp_path, b"b_\xff")
    out = tmp_path / "e.json"
    assert main(["evaluate", str(bundle), "--format", "kdd", "--json", str(out), str(data)]) == 0
    result = _well_formed_json(out.read_text(encoding="utf-8"))
    assert result["bundle"]["path"].endswith("/b_\\xFF")
    assert result["n"] == 12
