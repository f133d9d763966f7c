"""``evaluate --json`` against the contract (ARCHITECTURE.md) and against an independent
computation: the same records scored by ``deepwatch score``, their verdicts and labels measured
here with scikit-learn and the contest's tables as shared/data/README.md gives them (not
deepwatch's own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import trained_bundle
from sklearn import metrics as skm

from deepwatch.cli import main

CATEGORIES = ["normal", "probe", "dos", "u2r", "r2l"]
COST = np.array([[0, 1, 2, 2, 2],
                 [1, 0, 2, 2, 2],
                 [2, 1, 0, 2, 2],
                 [3, 2, 2, 0, 2],
                 [4, 2, 2, 2, 0]], dtype=np.float64)
GROUPS = {
    "dos": "back land neptune pod smurf teardrop apache2 mailbomb processtable udpstorm",
    "probe": "ipsweep nmap portsweep satan mscan saint",
    "r2l": "ftp_write guess_passwd imap multihop phf spy warezclient warezmaster named sendmail "
           "snmpgetattack snmpguess xlock xsnoop worm",
    "u2r": "buffer_overflow loadmodule perl rootkit ps sqlattack xterm httptunnel",
}
CATEGORY_OF = {"normal": "normal", **{n: c for c, names in GROUPS.items() for n in names.split()}}


def _strict(text: str) -> Any:
    def refuse(word: str) -> Any:
        raise AssertionError(f"{word} in the JSON")

    return json.loads(text, parse_constant=refuse)


def _score_and_evaluate(bundle: Path, data: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> tuple[list[dict], dict, str]:
    """The verdicts ``score`` writes, the JSON ``evaluate`` writes and its stderr."""
    scored, out = tmp_path / "s.jsonl", tmp_path / "e.json"
    assert main(["score", str(bundle), "--format", "kdd", "--out", str(scored), str(data)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(bundle), "--format", "kdd", "--json", str(out), str(data)]) == 0
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    return rows, _strict(out.read_text()), err


def test_evaluate_json_is_what_its_verdicts_give(kdd_bundle: Path, small_kdd_test: Path,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    lines = small_kdd_test.read_text().splitlines(keepends=True)[:1500]
    data = tmp_path / "t.csv"  # two lines the parser rejects: reported, not measured
    data.write_text("".join(lines[:700]) + "garbage\n1,2,3\n" + "".join(lines[700:]))
    rows, r, _ = _score_and_evaluate(kdd_bundle, data, tmp_path, capsys)

    # names, types and nesting of the contract
    assert {"n", "binary", "kdd_cost", "categories", "per_label", "confusion",
            "rows_per_second"} <= set(r)
    assert isinstance(r["n"], int) and r["n"] == len(rows) == 1500
    assert r["records"] == {"lines": 1502, "parsed": 1500, "rejected": 2}
    assert set(r["binary"]) >= {"precision", "recall", "f1", "accuracy", "roc_auc", "pr_auc",
                                "fpr", "threshold"}
    assert r["confusion"]["labels"] == CATEGORIES and list(r["categories"]) == CATEGORIES
    assert isinstance(r["rows_per_second"], float) and r["rows_per_second"] > 0

    label = np.array([row["label"] for row in rows], dtype=object)
    y = label != "normal"
    verdict = np.array([row["verdict"] == "malicious" for row in rows])
    score = np.array([row["score"] for row in rows])
    assert 0 < y.sum() < len(y) and 0 < verdict.sum() < len(y)
    b = r["binary"]
    tn, fp, fn, tp = skm.confusion_matrix(y, verdict, labels=[False, True]).ravel()
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (tp, fp, fn, tn)
    assert b["precision"] == pytest.approx(skm.precision_score(y, verdict), abs=1e-12)
    assert b["recall"] == pytest.approx(skm.recall_score(y, verdict), abs=1e-12)
    assert b["f1"] == pytest.approx(skm.f1_score(y, verdict), abs=1e-12)
    assert b["accuracy"] == pytest.approx(skm.accuracy_score(y, verdict), abs=1e-12)
    assert b["fpr"] == pytest.approx(fp / (fp + tn), abs=1e-12)
    assert b["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert b["pr_auc"] == pytest.approx(skm.average_precision_score(y, score), abs=1e-12)

    true_cat = np.array([CATEGORY_OF[lab] for lab in label])
    pred_cat = np.array([row["category"] for row in rows])
    cm = skm.confusion_matrix(true_cat, pred_cat, labels=CATEGORIES)
    assert cm.sum() == len(rows)
    assert r["confusion"]["matrix"] == cm.tolist()
    assert r["kdd_cost"] == pytest.approx((cm * COST).sum() / len(rows), abs=1e-12)
    for c in CATEGORIES:
        m = true_cat == c
        assert r["categories"][c]["support"] == m.sum()
        if m.any():
            assert r["categories"][c]["detection_rate"] == pytest.approx((pred_cat[m] == c).mean())
    assert sorted(r["per_label"]) == sorted(set(label))
    for name, got in r["per_label"].items():
        m = label == name
        assert got == {"support": m.sum(),
                       "detection_rate": pytest.approx((verdict[m] == y[m]).mean(), abs=1e-12)}


def test_records_predicted_outside_the_five_categories_are_named_not_dropped(
        small_kdd: Path, small_kdd_test: Path, bundle_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle trained on a label no KDD category knows predicts the category 'unknown',
    which the contest's matrix has no column for. Those records were left out of kdd_cost and
    the confusion matrix without a word: kdd_cost was the mean over fewer records than n."""
    train = tmp_path / "train.csv"
    train.write_text("".join(ln.replace(",neptune.", ",foo.") for ln in
                             small_kdd.read_text().splitlines(keepends=True)[::8]))
    bundle = trained_bundle("mlp", train, bundle_root, epochs=1)
    data = tmp_path / "t.csv"
    data.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[::10]))
    rows, r, err = _score_and_evaluate(bundle, data, tmp_path, capsys)

    true_cat = np.array([CATEGORY_OF[row["label"]] for row in rows])
    pred_cat = np.array([row["category"] for row in rows])
    outside = ~np.isin(pred_cat, CATEGORIES)
    n_out = int(outside.sum())
    assert n_out and set(pred_cat[outside]) == {"unknown"}
    assert r["uncategorised"] == {}
    assert r["uncategorised_predictions"] == {"unknown": n_out}
    cm = skm.confusion_matrix(true_cat, pred_cat, labels=CATEGORIES)
    assert r["confusion"]["matrix"] == cm.tolist() and cm.sum() == r["n"] - n_out
    assert r["kdd_cost"] == pytest.approx((cm * COST).sum() / cm.sum(), abs=1e-12)
    assert (f"warning: {n_out} records were given a category the KDD cost matrix has no "
            f"column for: 'unknown' ({n_out}); they count in the binary, per-label and "
            "categories figures, not in kdd_cost or confusion") in err
