"""Input names and PATH=LABEL labels that are not UTF-8 (a file named in Latin-1, a label typed
in a Latin-1 terminal): Python holds their bytes as lone surrogates, which no column, page or
JSON file can store. They are written ``\\xHH`` wherever deepwatch stores or shows them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deepwatch._surrogates import shown, without_surrogates
from deepwatch.cli import main


def _latin1_input(tmp_path: Path, small_kdd_test: Path) -> Path:
    lines = small_kdd_test.read_text().splitlines(keepends=True)[:12]
    src = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.kdd"))
    src.write_text("".join(lines) + "not a record\n")
    return src


def test_an_input_named_in_latin1_keeps_its_rejects(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # 'score' crashed with a UnicodeEncodeError traceback (exit 1) when it stored the rejected
    # line's source, the file's name, in the rejects' column
    src = _latin1_input(tmp_path, small_kdd_test)
    out, rejects = tmp_path / "o.jsonl", tmp_path / "r.jsonl"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--rejects", str(rejects), str(src)]) == 0
    kept = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert [k["line"] for k in kept] == [13]
    assert kept[0]["source"].endswith("caf\\xE9.kdd")
    assert len(out.read_text().splitlines()) == 12
    assert "12 parsed, 1 rejected" in capsys.readouterr().err


def test_a_latin1_label_is_stored_as_text(kdd_bundle: Path, small_kdd_test: Path,
                                          tmp_path: Path) -> None:
    # 'evaluate' of PATH=LABEL with a label holding a byte that is not UTF-8 crashed in the
    # label column (UnicodeEncodeError traceback, exit 1); 'score' and 'train' alike
    src = _latin1_input(tmp_path, small_kdd_test)
    label = os.fsdecode(b"caf\xe9")
    report = tmp_path / "e.json"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(report),
                 f"{src}={label}"]) == 0
    got = json.loads(report.read_text(encoding="utf-8"))
    assert "caf\\xE9" in got["per_label"]
    out = tmp_path / "o.jsonl"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 f"{src}={label}"]) == 0
    assert {json.loads(x)["label"] for x in out.read_text().splitlines()} == {"caf\\xE9"}


def test_surrogates_shown() -> None:
    assert without_surrogates(os.fsdecode(b"a\xff\xe9b")) == "a\\xFF\\xE9b"
    assert without_surrogates("\ud800x") == "<U+D800>x"
    assert without_surrogates("café") == "café"
    assert shown("\u200b") == "<U+200B>"
