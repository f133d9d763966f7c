"""Cross-fitted classifiers (``train --folds K``): the folds, the bagged network, out-of-fold
calibration, and the user's mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_lines, run_cli

from deepwatch.models.detector import Detector
from deepwatch.models.nets import Bag, build_network
from deepwatch.train.api import _fold_indices, train
from deepwatch.train.loop import TrainConfig
from deepwatch.train.supervised import FoldData, train_folds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    p = tmp_path_factory.mktemp("folds") / "tiny.csv"
    p.write_text("".join(head_lines(kdd_train_file, 4_000, every=120)))
    return p



def test_fold_indices_partition_the_rows_by_label() -> None:
    labels = np.array(["normal"] * 50 + ["smurf"] * 30 + ["rare"] * 5 + ["once"], dtype=object)
    parts = _fold_indices(labels, 5, seed=3)
    held_all = np.concatenate([np.concatenate([es, cal]) for _tr, es, cal in parts])
    # every row is held out by exactly one member
    assert np.array_equal(np.sort(held_all), np.arange(len(labels)))
    for tr, es, cal in parts:
        held = np.concatenate([es, cal])
        # a member trains on every row it does not hold out, and on none it does
        assert np.array_equal(np.sort(np.concatenate([tr, held])), np.arange(len(labels)))
        assert not set(tr) & set(held)
        assert not set(es) & set(cal)
        # stratified: a label with at least one row per fold is held out by every member
        assert {"normal", "smurf", "rare"} <= set(labels[held])
    assert [p[0].tolist() for p in parts] == [p[0].tolist() for p in _fold_indices(labels, 5, 3)]


def test_bag_is_the_log_of_the_members_mean_probability() -> None:
    torch.manual_seed(0)
    conf = {"kind": "mlp", "d_in": 6, "n_out": 3, "hidden": 8, "depth": 1, "dropout": 0.0}
    bag = build_network({"kind": "bag", "members": [conf, conf, conf]}).eval()
    assert isinstance(bag, Bag)
    x = torch.randn(20, 6)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(x), dim=1) for m in bag.members]).mean(dim=0)
        assert torch.allclose(torch.softmax(bag(x), dim=1), mean, atol=1e-6)
        assert torch.allclose(torch.exp(bag(x)).sum(dim=1), torch.ones(20), atol=1e-5)


def _synthetic_folds(k: int, n: int = 600, d: int = 5) -> list[FoldData]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    labels = np.where(y == 1, "smurf", "normal").astype(object)
    out = []
    for tr, es, cal in _fold_indices(labels, k, seed=0):
        one = np.ones
        out.append(FoldData(X[tr], y[tr], one(len(tr)), X[es], y[es], one(len(es)),
                            X[cal], y[cal], one(len(cal))))
    return out


@pytest.mark.parametrize("kind", ["mlp", "stack"])
def test_out_of_fold_predictions_come_from_the_member_that_held_the_rows_out(kind: str) -> None:
    folds = _synthetic_folds(3)
    fitted = train_folds(kind, folds, 2, TrainConfig(epochs=2, seed=0))
    sizes = np.cumsum([0] + [len(f.Xc) for f in folds])
    assert fitted.oof_proba.shape == (sizes[-1], 2)
    kinds = ("mlp", "resnet", "snn") if kind == "stack" else (kind,)
    bags = fitted.net.bases if kind == "stack" else [fitted.net]  # type: ignore[union-attr]
    with torch.no_grad():
        for k, f in enumerate(folds):
            xc = torch.as_tensor(f.Xc)
            logp = torch.cat([torch.log_softmax(b.members[k](xc), dim=1) for b in bags], dim=1)
            expect = (torch.softmax(fitted.net.meta(logp), dim=1)  # type: ignore[operator]
                      if kind == "stack" else torch.exp(logp))
            got = torch.as_tensor(fitted.oof_proba[sizes[k] : sizes[k + 1]])
            assert torch.allclose(got, expect, atol=1e-5), k
            # ... and the bagged network differs there: it also holds members that saw them
            assert not torch.allclose(torch.softmax(fitted.net(xc), dim=1), expect, atol=1e-4)
    assert len(kinds) == len(bags) and all(len(b.members) == 3 for b in bags)
    # the first fold's view: its members only
    with torch.no_grad():
        first = torch.softmax(fitted.first(torch.as_tensor(folds[0].Xc)), dim=1)
    assert torch.allclose(first, torch.as_tensor(fitted.oof_proba[: sizes[1]]), atol=1e-5)
    # the OOF predictions carry the signal: a floor, so a broken fold cannot pass
    truth = np.concatenate([f.yc for f in folds])
    assert ((fitted.oof_proba[:, 1] > 0.5) == truth).mean() > 0.85


def test_cross_fitted_hybrid_bundle(tiny: Path, tmp_path: Path, small_kdd_test: Path) -> None:
    out = tmp_path / "hybrid"
    manifest = train("kdd", "hybrid", [str(tiny)], out, epochs=2, seed=0, folds=3)
    assert manifest["training"]["folds"] == 3
    bases = manifest["network"]["classifier"]["bases"]
    assert [b["kind"] for b in bases] == ["bag"] * 3
    assert all(len(b["members"]) == 3 for b in bases)
    cal = manifest["metrics"]["calibration"]
    assert cal["recall"] > 0.9 and cal["fpr"] < 0.1
    # ONNX and the torch rebuild from safetensors give the same verdicts
    data = "".join(small_kdd_test.read_text().splitlines(keepends=True)[:2000])
    from deepwatch.formats import get_format

    batch = get_format("kdd").parse(data).batch
    a = Detector(out, engine="onnx").score_batch(batch)
    b = Detector(out, engine="torch").score_batch(batch)
    assert np.allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-4)
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()
    truth = np.array(batch.column("label").to_pylist()) != "normal"
    flagged = np.array(a.column("verdict").to_pylist()) == "malicious"
    assert (flagged == truth).mean() > 0.9


@pytest.mark.parametrize(("args", "says"), [
    (["--folds", "0"], "folds (--folds) must be between 1 and 20, not 0"),
    (["--folds", "3", "--model", "autoencoder"], "folds (--folds) above 1 cross-fit classifiers"),
    (["--folds", "3", "--val", "VAL"], "folds (--folds) above 1 hold out part of each fold"),
])
def test_folds_mistakes_are_one_line(args: list[str], says: str, tiny: Path,
                                     tmp_path: Path) -> None:
    argv = ["train", "--format", "kdd", "--out", str(tmp_path / "b")]
    if "--model" not in args:
        argv += ["--model", "mlp"]
    argv += [str(tiny) if a == "VAL" else a for a in args] + [str(tiny)]
    r = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "b").exists()


def test_one_fold_by_default(tiny: Path, tmp_path: Path) -> None:
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                "--out", str(tmp_path / "b"), str(tiny))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["training"]["folds"] == 1
    assert manifest["network"]["kind"] == "mlp"
