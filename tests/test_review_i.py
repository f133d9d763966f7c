"""``evaluate``/``report`` as an analyst meets them: which input has no labels, an empty input,
and rates that have nothing to measure (review i)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepwatch.cli import main
from deepwatch.evaluate.run import evaluate
from deepwatch.viz.report import render


def _split(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Normal records alone and attack records alone, 400 of each, from ``src`` (KDD)."""
    lines = src.read_text().splitlines(keepends=True)
    normal = [ln for ln in lines if ln.rstrip().endswith(",normal.")][:400]
    attacks = [ln for ln in lines if not ln.rstrip().endswith(",normal.")][:400]
    assert len(normal) == len(attacks) == 400
    (n := tmp_path / "normal.csv").write_text("".join(normal))
    (a := tmp_path / "attacks.csv").write_text("".join(attacks))
    return n, a


def test_the_input_without_labels_is_named(kdd_bundle: Path, small_kdd_test: Path,
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Among several inputs, the error said "every record needs a label" and left the analyst
    # to guess which input had none (`report` had scored the others first).
    labelled, _ = _split(small_kdd_test, tmp_path)
    bare = tmp_path / "no_labels.csv"
    bare.write_text("".join(ln.rsplit(",", 1)[0] + "\n"
                            for ln in labelled.read_text().splitlines()[:50]))
    code = main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json",
                 str(tmp_path / "e.json"), str(labelled), str(bare)])
    err = capsys.readouterr().err
    assert code == 4
    (line,) = err.strip().splitlines()
    assert line.startswith("error: measuring detection needs labelled records: "
                           f"{bare} has none;"), line


def test_an_empty_input_is_said_to_be_empty(kdd_bundle: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # It said "no records could be parsed from the evaluation inputs", as if they held lines
    # of another format.
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code = main(["report", str(kdd_bundle), "--format", "kdd", "--out",
                 str(tmp_path / "r.html"), str(empty)])
    err = capsys.readouterr().err
    assert code == 4
    assert err == "error: nothing to evaluate: the evaluation inputs are empty (0 lines read)\n"
    assert not (tmp_path / "r.html").exists()


def test_rates_with_nothing_to_measure_are_not_shown_as_zero(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Normal records alone: stderr and the report said "recall 0.0000" (read: every attack
    # missed) where there was no attack to miss; attacks alone: "fpr 0.0000" of no benign
    # record. `train` already names only the figures that mean something.
    normal, attacks = _split(small_kdd_test, tmp_path)
    out = tmp_path / "e.json"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(out),
                 str(normal)]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    figures = line.partition(";")[0]
    assert "precision" not in figures and "recall" not in figures and " f1 " not in figures, line
    assert " fpr 0." in line and line.endswith("; no attack records: no precision, recall or F1")
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(out),
                 str(attacks)]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert " recall 0." in line and "fpr" not in line.partition(";")[0], line
    assert line.endswith("; no benign records: no false-positive rate"), line

    result, cols = evaluate(kdd_bundle, "kdd", normal)
    assert result["binary"]["recall"] == 0.0  # the JSON keeps its contract: a number
    page = render(result, cols, "normal alone", progress=False)
    for name in ("precision", "recall", "F1"):
        assert f"<td>{name}</td><td>– (no attack records)</td>" in page
    assert "<td>false-positive rate</td><td>0." in page
    result, cols = evaluate(kdd_bundle, "kdd", attacks)
    page = render(result, cols, "attacks alone", progress=False)
    assert "<td>false-positive rate</td><td>– (no benign records)</td>" in page
    assert "<td>recall</td><td>0." in page
