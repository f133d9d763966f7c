"""The offline demo, small: every step runs and leaves the alerts, the HTML and the lake."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepwatch.demo import run_demo
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
