"""evaluate's numbers: every label counted once under its exact text, strict JSON (null for an
undefined number, never NaN), ``binary.threshold`` the cut on ``score`` that made the verdicts (or
null), and ``report`` saying on stderr what ``evaluate`` says."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import trained_bundle

from deepwatch.cli import main


def _strict(text: str) -> Any:
    """JSON as the standard has it: NaN and Infinity are not JSON."""
    def refuse(word: str) -> Any:
        raise AssertionError(f"{word} in the JSON")

    return json.loads(text, parse_constant=refuse)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepwatch.cli", *args], capture_output=True,
                          text=True, timeout=300)


def _with_label(line: str, label: str) -> str:
    return line.rstrip("\n").rsplit(",", 1)[0] + "," + label + "\n"


# -- labels by their exact text ------------------------------------------------------------------

def test_labels_are_counted_once_under_their_exact_text() -> None:
    """numpy's fixed-width strings drop trailing NULs: 'normal.\\x00' got support 0 and a NaN
    detection rate in per_label (with a 'Mean of empty slice' warning), and was named 'normal.'
    in uncategorised, where it ran together with a real 'normal.'."""
    from deepwatch.evaluate.run import metrics_from

    labels = np.array(["normal", "normal.\x00", "smurf\x00\x00", "smurf", "normal.", "smurf"],
                      dtype=object)
    cols = {"label": labels, "score": np.array([0.1, 0.8, 0.9, 0.8, 0.3, 0.2]),
            "verdict": np.array([0, 1, 1, 1, 0, 0], dtype=bool)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = metrics_from(cols, True, None, 1.0)
    assert r["per_label"] == {
        "normal": {"support": 1, "detection_rate": 1.0},
        "normal.": {"support": 1, "detection_rate": 0.0},
        "normal.\x00": {"support": 1, "detection_rate": 1.0},
        "smurf": {"support": 2, "detection_rate": 0.5},
        "smurf\x00\x00": {"support": 1, "detection_rate": 1.0},
    }
    assert r["uncategorised"] == {"normal.": 1, "normal.\x00": 1, "smurf\x00\x00": 1}
    assert sum(v["support"] for v in r["per_label"].values()) == r["n"] == 6
    assert sum(map(sum, r["confusion"]["matrix"])) == 3  # normal, smurf, smurf
    _strict(json.dumps(r))


def test_the_report_groups_labels_by_their_exact_text() -> None:
    from deepwatch.viz import figures
    from deepwatch.viz.sample import balanced_pick

    labels = np.array(["normal", "normal\x00", "normal\x00", "x"], dtype=object)
    assert figures.label_order(labels) == ["normal", "normal\x00", "x"]
    fig = figures.sankey(labels, np.array([False, True, True, True]))
    assert sorted(fig.data[0].link.value) == [1, 1, 2]
    assert len(balanced_pick(labels, 3)) == 3


def test_evaluate_counts_a_label_ending_in_nul_bytes_under_its_own_text(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """A KDD line whose label ends in NUL bytes (damage) made evaluate write NaN, which is not
    JSON, leave the record out of per_label and name it 'normal.' in the warning."""
    lines = small_kdd_test.read_text().splitlines(keepends=True)[:200]
    lines[5] = _with_label(lines[5], "normal.\x00")
    lines[6] = _with_label(lines[6], "smurf.\x00\x00")
    data = tmp_path / "damaged.csv"
    data.write_text("".join(lines))
    out = tmp_path / "e.json"
    r = _run("evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(out), str(data))
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr
    result = _strict(out.read_text())
    assert result["n"] == 200 == sum(v["support"] for v in result["per_label"].values())
    assert result["per_label"]["normal.\x00"]["support"] == 1
    assert result["per_label"]["smurf.\x00\x00"]["support"] == 1
    assert result["uncategorised"] == {"normal.\x00": 1, "smurf.\x00\x00": 1}
    assert "'normal.\\x00' (1), 'smurf.\\x00\\x00' (1)" in r.stderr


# -- null, never NaN -----------------------------------------------------------------------------

def test_undefined_numbers_are_null_and_the_json_is_strict(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """The AUCs are undefined over one class (null, as before) and over a NaN score (was NaN);
    the JSON writer turns any NaN or infinity left into null and never writes NaN."""
    from deepwatch.evaluate.metrics import binary_metrics

    y = np.array([True, False, True, False])
    b = binary_metrics(y, np.array([0.9, 0.1, np.nan, 0.2]), y)
    assert b["roc_auc"] is None and b["pr_auc"] is None
    one_class = binary_metrics(~y | y, np.array([0.9, 0.1, 0.4, 0.2]), y)
    assert one_class["roc_auc"] is None and one_class["pr_auc"] is None
    from deepwatch.evaluate.metrics import to_json

    assert _strict(to_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -np.inf}})
                   ) == {"a": None, "b": [None, 1.5], "c": {"d": None}}

    normal = [ln for ln in small_kdd_test.read_text().splitlines(keepends=True)
              if ln.rstrip().endswith(",normal.")][:100]
    data = tmp_path / "normal.csv"
    data.write_text("".join(normal))
    out = tmp_path / "e.json"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(out),
                 str(data)]) == 0
    result = _strict(out.read_text())
    assert result["binary"]["roc_auc"] is None and result["binary"]["pr_auc"] is None
    assert result["per_label"]["normal"]["support"] == 100


# -- binary.threshold ----------------------------------------------------------------------------

def _decision(**config: Any) -> Any:
    from deepwatch.models.decision import Decision

    base = {"labels": ["normal", "smurf", "satan"], "label_category": ["normal", "dos", "probe"],
            "categories": ["normal", "probe", "dos", "u2r", "r2l"]}
    return Decision({**base, **config})


def test_threshold_is_the_cut_on_score_that_made_the_verdicts() -> None:
    """It was the decision's threshold whatever the decision: 0.7878 for the cost decision
    (whose verdicts no cut on score gives) and the anomaly_score threshold for an autoencoder
    (whose score is cut at 0.5)."""
    from deepwatch.evaluate.run import verdict_threshold
    from deepwatch.labels import KDD_COST

    rng = np.random.default_rng(0)
    proba = rng.dirichlet([0.3, 0.3, 0.3], size=5000).astype(np.float32)
    anomaly = rng.gamma(1.0, 2.0, size=5000).astype(np.float32)
    cost = KDD_COST.tolist()

    def cut(decision: Any, out: dict[str, np.ndarray]) -> float | None:
        cols = decision.apply(out)
        found = verdict_threshold(decision, cols)
        if found is not None:  # the claim itself
            assert np.array_equal(cols["score"] >= found, cols["verdict"])
        return found

    assert cut(_decision(policy="threshold", threshold=0.7), {"proba": proba}) == 0.7
    cost_decision = _decision(policy="cost", threshold=0.7, cost_matrix=cost)
    assert cut(cost_decision, {"proba": proba}) is None
    cols = cost_decision.apply({"proba": proba})
    assert (cols["score"][cols["verdict"]].min() < 0.7) or \
        (cols["score"][~cols["verdict"]].max() >= 0.7)  # no cut at 0.7: the old claim was false
    # cost named, but no matrix to take it from: the threshold decides
    assert cut(_decision(policy="cost", threshold=0.7), {"proba": proba}) == 0.7
    # an autoencoder: score = a / (a + t), 0.5 exactly at a = t
    auto = {"anomaly": anomaly}
    assert cut(_decision(labels=[], label_category=[], categories=[], anomaly_threshold=2.0),
               auto) == 0.5
    assert cut(_decision(labels=[], label_category=[], categories=[], anomaly_threshold=None),
               auto) is None
    # hybrids: classifier verdicts OR the autoencoder's; one cut only where both cut at 0.5
    both = {"proba": proba, "anomaly": anomaly}
    assert cut(_decision(policy="threshold", threshold=0.7, anomaly_threshold=2.0), both) is None
    assert cut(_decision(policy="threshold", threshold=0.5, anomaly_threshold=2.0), both) == 0.5
    assert cut(_decision(policy="cost", cost_matrix=cost, anomaly_threshold=2.0), both) is None


def test_threshold_holds_on_every_record_of_real_bundles(
        kdd_bundle: Path, small_kdd: Path, small_kdd_test: Path, bundle_root: Path) -> None:
    from deepwatch.evaluate.run import evaluate
    from deepwatch.models.detector import Detector

    det = Detector(kdd_bundle, explain=False)
    assert det.decision.policy == "cost"  # KDD data's default
    result, cols = evaluate(str(kdd_bundle), "kdd", [str(small_kdd_test)])
    assert result["binary"]["threshold"] is None
    result, cols = evaluate(str(kdd_bundle), "kdd", [str(small_kdd_test)], policy="threshold")
    t = result["binary"]["threshold"]
    assert t == det.decision.threshold
    assert np.array_equal(cols["score"] >= t, cols["verdict"].astype(bool))

    ae = trained_bundle("autoencoder", small_kdd, bundle_root)
    result, cols = evaluate(str(ae), "kdd", [str(small_kdd_test)])
    assert result["binary"]["threshold"] == 0.5
    assert np.array_equal(cols["score"] >= 0.5, cols["verdict"].astype(bool))
    # the autoencoder's own figures stay on its own scale
    anomaly_cut = Detector(ae, explain=False).decision.anomaly_threshold
    assert result["anomaly"]["threshold"] == anomaly_cut
    assert np.array_equal(cols["anomaly_score"] >= anomaly_cut, cols["verdict"].astype(bool))


# -- report says what evaluate says --------------------------------------------------------------

def test_report_keeps_rejects_and_says_what_evaluate_says(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """report had no --rejects and said nothing of the counts or of unknown labels."""
    lines = small_kdd_test.read_text().splitlines(keepends=True)[:300]
    lines = [_with_label(ln, "foo.") if i % 50 == 0 else ln for i, ln in enumerate(lines)]
    data = tmp_path / "t.csv"
    data.write_text("".join(lines[:10]) + "not a record\n1,2,3\n" + "".join(lines[10:]))
    told = {}
    for cmd, out in (("evaluate", ["--json", str(tmp_path / "e.json")]),
                     ("report", ["--out", str(tmp_path / "r.html")])):
        rej = tmp_path / f"{cmd}.jsonl"
        r = _run(cmd, str(kdd_bundle), "--format", "kdd", *out, "--rejects", str(rej), str(data))
        assert r.returncode == 0, r.stderr
        kept = [json.loads(x) for x in rej.read_text().splitlines()]
        assert [k["line"] for k in kept] == [11, 12] and all(k["reason"] for k in kept)
        told[cmd] = [ln.split(" (")[0] + ln.split("rows/s)")[-1] if ln.startswith("n ") else ln
                     for ln in r.stderr.splitlines() if not ln.startswith("report written")]
    assert told["report"] == told["evaluate"]
    assert any(ln.endswith("302 lines read: 300 parsed, 2 rejected") for ln in told["report"])
    assert any(ln.startswith("warning: 6 records have labels no KDD category knows: 'foo' (6)")
               for ln in told["report"])
    # an output that is an input is refused before any work, as on evaluate
    r = _run("report", str(kdd_bundle), "--format", "kdd", "--out", str(tmp_path / "r2.html"),
             "--rejects", str(data), str(data))
    assert r.returncode == 2 and "is also an input" in r.stderr


@pytest.mark.parametrize("cmd", ["evaluate", "report"])
def test_report_and_evaluate_take_the_same_options(cmd: str, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main([cmd, "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--rejects" in shown and "--backend,--engine" in shown


def test_campaign_purity_keeps_labels_apart_by_their_exact_text() -> None:
    """Two labels that differ only by a trailing NUL are two labels in the campaign report
    too (numpy's strings merged them, and one cluster of both looked pure)."""
    import numpy as np

    from deepwatch.models.campaigns import cluster_report

    labels = np.array(["normal.", "normal.\x00", "normal.", "normal.\x00"], dtype=object)
    report = cluster_report(np.array([0, 0, 0, 0]), labels)
    assert report["purity"] == 0.5
    assert report["largest"][0]["top_label"] in ("normal.", "normal.\x00")
