"""Training, decisions and evaluation as the command line drives them: edges a review found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import head_lines

from deepwatch.models.decision import Decision


def test_a_bundle_without_a_benign_label_flags_every_record() -> None:
    # an attack-type classifier (no label 'normal') with the threshold decision: its score was
    # max P(label), under 0.5 for records the network was unsure of between three labels or
    # more, and those were let through as normal (a real bundle trained with --decision
    # threshold on KDD attacks alone flagged 0 of 1,579 attack records), while train said
    # "every record scored will be malicious"
    decision = Decision({"labels": ["ipsweep", "neptune", "smurf"],
                         "label_category": ["probe", "dos", "dos"],
                         "categories": ["normal", "probe", "dos", "u2r", "r2l", "unknown"],
                         "policy": "threshold", "threshold": 0.5})
    proba = np.array([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8], [0.34, 0.33, 0.33]], dtype=np.float32)
    cols = decision.apply({"proba": proba})
    assert cols["verdict"].tolist() == [True, True, True]
    assert cols["score"].tolist() == [1.0, 1.0, 1.0]  # 1 - P(normal), P(normal) = 0
    assert cols["attack_type"].tolist() == ["ipsweep", "smurf", "ipsweep"]
    assert cols["category"].tolist() == ["probe", "dos", "probe"]


def test_inputs_of_another_format_are_named(kdd_train_file: Path, tmp_path: Path) -> None:
    # a training file and a --val file of another format (web logs beside KDD records): the
    # first was left out with no word but the count of rejects, the second ended the run with
    # "the validation data has fewer than two records", as if it were short, not unreadable
    from deepwatch.errors import DataError
    from deepwatch.train.api import train

    kdd = tmp_path / "kdd.csv"
    kdd.write_text("".join(head_lines(kdd_train_file, 12, every=997)))
    web = tmp_path / "access.log"
    web.write_text('10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 5 "-" "x"\n'
                   * 5)
    said: list[str] = []
    with pytest.raises(DataError) as err:
        train("kdd", "mlp", [str(kdd), str(web)], tmp_path / "b", val_inputs=[str(web)],
              epochs=1, log=said.append)
    assert str(err.value) == ("the validation data has fewer than two records (none of the 5 "
                              "lines read could be parsed as kdd records: is --format right?)")
    assert (f"warning: none of the 5 lines of {web} could be parsed as kdd records; is "
            "--format right?") in said, said
    assert not (tmp_path / "b").exists()


class _Caught(Exception):
    """Raised by the stand-in for the training loop: the settings it was given are known."""


@pytest.mark.parametrize(("model", "module", "asked", "setting", "expected"), [
    # --epochs 30 for an autoencoder was taken for "no --epochs" (30 is the classifiers'
    # default) and trained the autoencoder's default 15 epochs; --epochs 29 trained 29
    ("autoencoder", "anomaly", {"epochs": 30}, "epochs", 30),
    ("autoencoder", "anomaly", {}, "epochs", 15),  # (the autoencoder's own default, unchanged)
    # options={"lr": 2e-3} for an mlp was taken for "no lr" (2e-3 is the loop's default) and
    # trained at the mlp's default 3e-3
    ("mlp", "supervised", {"options": {"lr": 2e-3}}, "lr", 2e-3),
    ("mlp", "supervised", {}, "lr", 3e-3),
])
def test_a_setting_given_equal_to_the_loop_default_is_kept(
        model: str, module: str, asked: dict, setting: str, expected: float,
        kdd_train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from deepwatch.train.api import train

    seen: list[object] = []

    def fit(net: object, loss: object, *args: object) -> None:
        seen.append(getattr(args[-1], setting))
        raise _Caught

    monkeypatch.setattr(importlib.import_module(f"deepwatch.train.{module}"), "fit", fit)
    lines = head_lines(kdd_train_file, 40)
    benign, attacks = tmp_path / "benign.csv", tmp_path / "attacks.csv"
    benign.write_text("".join(lines[:20]))
    attacks.write_text("".join(lines[20:]))
    with pytest.raises(_Caught):
        train("kdd", model, [f"{benign}=normal", f"{attacks}=smurf"], tmp_path / "b", **asked)
    assert seen == [expected]


def test_window_features_take_records_without_a_client() -> None:
    # a table of access records given to Detector.score_batch with client_ip null (a frame
    # built by hand; parsed lines always name one): numpy's "'list' argument must have no
    # negative elements" from the windows, a traceback; they are the unnamed client's now
    import pyarrow as pa

    from deepwatch.features._window import window_features

    def windows(clients: list[str | None]) -> dict[str, list[float]]:
        out = window_features(pa.array(clients, pa.string()), np.array([1.0, 2.0, 3.0, 9.0]),
                              pa.array(["/", "/x", "/", "/y"]),
                              np.array([200.0, 404.0, 200.0, 500.0]),
                              pa.array(["GET", "GET", "POST", "GET"]), {})
        return {k: v.tolist() for k, v in out.items()}

    assert windows(["a", None, "a", None]) == windows(["a", "", "a", ""])


@pytest.mark.parametrize(("inputs", "val"), [(["-"], ["-"]), (["-=smurf"], ["-=normal"])])
def test_stdin_as_both_training_and_validation_input_is_refused(
        inputs: list[str], val: list[str], tmp_path: Path) -> None:
    # (the training data read standard input to its end, then the validation data was empty:
    # "error: the validation data has fewer than two records", after reading)
    from deepwatch.errors import UsageError
    from deepwatch.train.api import train

    with pytest.raises(UsageError, match=r"^standard input \(-\) is read once: give it as "
                                         r"training or as validation \(--val\) input, not both$"):
        train("kdd", "mlp", inputs, tmp_path / "b", val_inputs=val, epochs=1)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("where", ["stdin-labelled", "val-stdin", "val-fifo", "fifo"])
def test_nproc_refuses_inputs_read_once(where: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # each rank reads every input: '-=normal' (only a bare '-' was refused) gave rank 0 the
    # records and rank 1 none, and the run ended in a page of torch's RuntimeError (its
    # networks' shapes differed); '--val -' in rank 1's 'the validation data has fewer than
    # two records'; a named pipe split its lines between the ranks
    import os

    from deepwatch.cli import main

    data = tmp_path / "kdd.csv"
    data.write_text("0,tcp,http,SF,181,5450" + ",0" * 35 + ",normal.\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # (nothing writes it: a run that opened it would hang, not fail)
    args = {"stdin-labelled": ["--", "-=normal", str(data)],
            "val-stdin": ["--val", "-", str(data)],
            "val-fifo": ["--val", str(fifo), str(data)],
            "fifo": [str(fifo)]}[where]
    code = main(["train", "--format", "kdd", "--model", "mlp", "--nproc", "2", "--out",
                 str(tmp_path / "b"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1] == ("error: --nproc reads its input once per process: give files, not stdin "
                       "(-)" if "stdin" in where else
                       f"error: --nproc reads its input once per process: {fifo} is no regular "
                       "file (a pipe?) and can be read once only: give files"), err
    assert not any("training in 2 processes" in line for line in err), err
    assert not (tmp_path / "b").exists()


def test_evaluate_names_an_input_of_another_format(kdd_bundle: Path, small_kdd_test: Path,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # (a web log among the KDD files was left out of the figures with no word but the count of
    # rejected lines, where score warns of it)
    from deepwatch.cli import main

    web = tmp_path / "access.log"
    web.write_text('10.0.0.1 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 5 "-" "x"\n'
                   * 3)
    head = tmp_path / "kdd.csv"
    head.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:200]))
    code = main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json",
                 str(tmp_path / "e.json"), str(head), str(web)])
    err = capsys.readouterr().err.splitlines()
    assert code == 0, err
    assert (f"warning: none of the 3 lines of {web} could be parsed as kdd records; is --format "
            "right?") in err, err


@pytest.mark.parametrize("model", ["mlp", "stack", "hybrid"])
def test_batch_size_one_is_refused_for_batch_normalised_networks(model: str,
                                                                 tmp_path: Path) -> None:
    # (torch's ValueError "Expected more than 1 value per channel when training", once the data
    # was read and featurised)
    from deepwatch.errors import UsageError
    from deepwatch.train.api import train

    data = tmp_path / "kdd.csv"
    data.write_text("0,tcp,http,SF,181,5450" + ",0" * 35 + ",normal.\n")
    with pytest.raises(UsageError, match=f"^option batch_size must be at least 2 for model "
                                         f"'{model}', whose batch normalisation needs two rows "
                                         "a batch, not 1$"):
        train("kdd", model, [str(data)], tmp_path / "b", options={"batch_size": 1})


@pytest.mark.parametrize(("labels", "note"), [
    (("normal", "weirdo"), "note: no KDD category knows the training label 'weirdo', for which "
                           "the contest's cost matrix has no row: the bundle decides by "
                           "threshold, not by least expected cost"),
    (("normal", "smurf"), None),
])
def test_kdd_labels_without_a_category_are_said_to_change_the_decision(
        labels: tuple[str, str], note: str | None, kdd_train_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # KDD data with a label of the user's own: the default decision, the contest's cost, was
    # replaced by the threshold with no word said (the manifest alone had it)
    import deepwatch.train.supervised as supervised
    from deepwatch.train.api import train

    def fit(*args: object) -> None:
        raise _Caught

    monkeypatch.setattr(supervised, "fit", fit)
    lines = head_lines(kdd_train_file, 40)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("".join(lines[:20]))
    second.write_text("".join(lines[20:]))
    said: list[str] = []
    with pytest.raises(_Caught):
        train("kdd", "mlp", [f"{first}={labels[0]}", f"{second}={labels[1]}"], tmp_path / "o",
              log=said.append)
    notes = [line for line in said if line.startswith("note:")]
    assert notes == ([note] if note else []), said


def test_a_manifest_of_a_diverged_network_is_strict_json(kdd_train_file: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # a network whose every loss was NaN (train(options={"lr": 1e6}) on a resnet: "keeping the
    # initial weights (no epoch gave a finite val loss)") was saved with NaN in the manifest's
    # history, which is no JSON (jq, browsers, json.loads with parse_constant refuse it)
    import json
    import math

    import deepwatch.train.supervised as supervised
    from deepwatch.train.api import train

    def fit(net: object, loss: object, *args: object) -> object:
        cfg = args[-1]
        cfg.history.append({"epoch": 1, "train_loss": math.nan,  # type: ignore[attr-defined]
                            "val_loss": math.nan})
        return net.eval()  # type: ignore[attr-defined]  # the initial weights, as fit keeps

    monkeypatch.setattr(supervised, "fit", fit)
    lines = head_lines(kdd_train_file, 40)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("".join(lines[:20]))
    second.write_text("".join(lines[20:]))
    out = tmp_path / "b"
    train("kdd", "resnet", [f"{first}=normal", f"{second}=smurf"], out)

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    manifest = json.loads((out / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["training"]["history"][0]["epochs"] == [
        {"epoch": 1, "train_loss": None, "val_loss": None}]


def test_evaluate_counts_an_anomaly_threshold_of_zero_as_the_verdicts_do(
        small_kdd: Path, bundle_root: Path, tmp_path: Path) -> None:
    # an autoencoder bundle whose threshold is 0 flags every record; evaluate's 'anomaly'
    # figures took 0 for no threshold and said none was flagged
    import json
    import shutil

    from conftest import trained_bundle

    from deepwatch.evaluate.run import evaluate

    bundle = tmp_path / "ae"
    shutil.copytree(trained_bundle("autoencoder", small_kdd, bundle_root), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["decision"]["anomaly_threshold"] = 0.0
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    data = tmp_path / "kdd.csv"
    data.write_text("".join(small_kdd.read_text().splitlines(keepends=True)[:50]))
    result, cols = evaluate(bundle, "kdd", data)
    assert cols["verdict"].all()
    anomaly = result["anomaly"]
    assert anomaly["tp"] + anomaly["fp"] == 50 and anomaly["threshold"] == 0.0, anomaly


def test_an_explanation_column_is_there_without_a_benign_label() -> None:
    # --explain on a classifier of attack types alone gave no 'explanation' column at all,
    # while an empty output of the same bundle (and every other supervised bundle's) had one;
    # every record is flagged by the bundle itself, so each explanation is null
    from types import SimpleNamespace

    from deepwatch.models.explain import explain_columns

    decision = Decision({"labels": ["ipsweep", "smurf"], "label_category": ["probe", "dos"],
                         "categories": ["normal", "probe", "dos", "u2r", "r2l", "unknown"],
                         "policy": "threshold", "threshold": 0.5})
    proba = np.array([[0.4, 0.6], [0.9, 0.1]], dtype=np.float32)
    cols = decision.apply({"proba": proba})
    detector = SimpleNamespace(decision=decision,
                               featurizer=SimpleNamespace(feature_names_=["a", "b"]))
    column = explain_columns(detector, np.zeros((2, 2), np.float32), {"proba": proba}, cols)
    assert column is not None and column.type == pa.string() and column.null_count == 2
