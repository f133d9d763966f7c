"""The offline demo, small: every step runs and leaves the alerts, the HTML and the lake."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepwatch.demo import check_demo_target, run_demo
from deepwatch.errors import OutputError
from deepwatch.lake import read_lake
from deepwatch.simulate import ATTACKS


@pytest.mark.slow
def test_demo_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPWATCH_TORCH_THREADS", "1")
    said: list[str] = []
    result = run_demo(tmp_path / "out", log=said.append, visits=120, test_visits=60, epochs=4)
    out = tmp_path / "out"
    assert set(result["per_label"]) == {"normal", *ATTACKS}
    # the lake holds the streamed training day
    assert read_lake(out / "lake").num_rows > 1000
    scored = pq.read_table(out / "scored.parquet")
    assert scored.num_rows == sum(v["records"] for v in result["per_label"].values())
    alerts = (out / "alerts.jsonl").read_text().splitlines()
    assert len(alerts) == result["alerts"] > 0
    first = json.loads(alerts[0])
    assert first["event"]["kind"] == "alert"
    # every alert is at or above its threshold: risk 50 or more
    assert min(json.loads(a)["event"]["risk_score"] for a in alerts) >= 50
    assert first["source"]["ip"]
    page = (out / "summary.html").read_text()
    assert "Detection per label" in page and "bruteforce" in page
    report = (out / "report.html").read_text()
    assert 'id="labels-table"' in report and "xss" in report
    assert json.loads((out / "summary.json").read_text())["alerts"] == result["alerts"]
    # it prints per-attack detection and timings
    text = "\n".join(said)
    assert "verdict right" in text and "train autoencoder" in text and "total" in text
    # a model that learnt something: most normal records pass, most attacks are caught
    per = result["per_label"]
    assert per["normal"]["detected"] > 0.9
    caught = [per[a]["detected"] for a in ATTACKS]
    assert sum(caught) / len(caught) > 0.5
    # its own output is no obstacle to running it again there
    check_demo_target(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files the demo did not write \(notes.txt\)"):
        check_demo_target(out)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case", ["lake of mine", "file of mine", "bundle", "traffic of mine",
                                  "lake is a file"])
def test_the_demo_never_deletes_what_it_did_not_write(case: str, tmp_path: Path,
                                                       kdd_bundle: Path) -> None:
    """`demo --out DIR` used to delete DIR/lake whatever it held, and to write its output into a
    trained bundle: now it stops, before any work, and leaves everything as it was."""
    import shutil

    out = tmp_path / "out"
    if case == "lake of mine":
        (out / "lake").mkdir(parents=True)
        (out / "lake" / "mine.txt").write_text("keep")
        match = "lake/ directory that is not a deepwatch lake"
    elif case == "file of mine":
        out.mkdir()
        (out / "report.pdf").write_text("keep")
        match = r"did not write \(report.pdf\)"
    elif case == "bundle":
        shutil.copytree(kdd_bundle, out)
        match = "holds files the demo did not write"
    elif case == "traffic of mine":
        (out / "traffic" / "train").mkdir(parents=True)
        (out / "traffic" / "train" / "normal.log").write_text("the demo would write this")
        (out / "traffic" / "train" / "prod.log").write_text("keep")
        match = "traffic/train, which the demo did not write"
    else:
        out.mkdir()
        (out / "lake").write_text("keep")
        match = "holds lake, which is not a directory"
    before = _tree(out)
    with pytest.raises(OutputError, match=match):
        run_demo(out, log=lambda s: None, visits=5, test_visits=5, epochs=1)
    assert _tree(out) == before
