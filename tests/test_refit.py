"""Refitting the classifiers on all labelled records (``train --refit``): the fixed-epoch
training run, the epochs it takes from early stopping, the refitted stack, and the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_lines, run_cli

from deepwatch.models.detector import Detector
from deepwatch.models.nets import Stack, build_network
from deepwatch.train.api import train
from deepwatch.train.data import dedupe
from deepwatch.train.loop import TrainConfig, cross_entropy, fit
from deepwatch.train.supervised import best_epoch, chosen_epochs, refit, train_supervised


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    p = tmp_path_factory.mktemp("refit") / "tiny.csv"
    p.write_text("".join(head_lines(kdd_train_file, 4_000, every=120)))
    return p


def _data(n: int, seed: int, d: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    return X, y, np.ones(n)


def test_best_epoch_is_the_one_early_stopping_kept() -> None:
    hist = [{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.5},
            {"epoch": 3, "val_loss": 0.5 - 1e-8},  # no real improvement: fit keeps epoch 2
            {"epoch": 4, "val_loss": 0.7}, {"epoch": 5, "val_loss": 0.4}, {"epoch": 6,
                                                                           "val_loss": 0.6}]
    assert best_epoch(hist) == 5
    assert best_epoch(hist[:4]) == 2
    members = [{"model": "mlp", "epochs": hist[:2]}, {"model": "mlp", "epochs": hist},
               {"model": "mlp", "epochs": hist[:4]}, {"model": "snn", "epochs": hist[:1]},
               {"model": "mlp", "refit": True, "epochs": [{"epoch": 1, "train_loss": 1.0}]}]
    assert chosen_epochs(members, "mlp") == 2  # the median of 2, 5, 2; refits do not count
    assert chosen_epochs(members, "snn") == 1
    with pytest.raises(ValueError, match="resnet"):
        chosen_epochs(members, "resnet")


def test_fixed_epochs_train_that_many_without_validation() -> None:
    X, y, w = _data(800, 0)
    conf = {"kind": "mlp", "d_in": 5, "n_out": 2, "hidden": 16, "depth": 1, "dropout": 0.0}
    torch.manual_seed(0)
    net = build_network(conf)
    before = [p.detach().clone() for p in net.parameters()]
    cfg = TrainConfig(epochs=8, seed=0, fixed_epochs=6, batch_size=64, lr=1e-2)
    out = fit(net, cross_entropy, X, y, w, X[:0], y[:0], w[:0], cfg)
    assert [h["epoch"] for h in cfg.history] == [1, 2, 3, 4, 5, 6]
    assert all("val_loss" not in h for h in cfg.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, out.parameters(), strict=True))
    with torch.no_grad():
        acc = (out(torch.as_tensor(X)).argmax(1).numpy() == y).mean()
    assert acc > 0.85  # it learnt: a floor, so a broken loop cannot pass


def test_refitted_stack_keeps_the_meta_learner_and_learns_from_every_row() -> None:
    X, y, w = _data(900, 1)
    Xv, yv, wv = _data(150, 2)
    Xm, ym, wm = _data(150, 3)
    cfg = TrainConfig(epochs=4, seed=7, batch_size=64)
    first, _conf = train_supervised("stack", X, y, w, Xv, yv, wv, Xm, ym, wm, 2, cfg)
    assert isinstance(first, Stack)
    allX, ally, allw = np.concatenate([X, Xv, Xm]), np.concatenate([y, yv, ym]), \
        np.concatenate([w, wv, wm])
    net, config, epochs = refit("stack", first, allX, ally, allw, 2, cfg)
    assert isinstance(net, Stack)
    assert [b["kind"] for b in config["bases"]] == ["mlp", "resnet", "snn"]
    for kind in ("mlp", "resnet", "snn"):
        assert epochs[kind] == chosen_epochs(cfg.history, kind)
    refits = [h for h in cfg.history if h.get("refit")]
    assert [len(h["epochs"]) for h in refits] == [epochs[k] for k in ("mlp", "resnet", "snn")]
    assert torch.equal(net.meta.weight, first.meta.weight)
    assert torch.equal(net.meta.bias, first.meta.bias)
    # new base networks (same seeds and architecture, other data): other weights
    for a, b in zip(net.bases, first.bases, strict=True):
        assert a is not b
        assert any(not torch.equal(p, q) for p, q in
                   zip(a.parameters(), b.parameters(), strict=True))
    with torch.no_grad():
        acc = (net(torch.as_tensor(Xm)).argmax(1).numpy() == ym).mean()
    assert acc > 0.85
    # the rebuilt config holds the refitted networks
    rebuilt = build_network(config)
    rebuilt.load_state_dict(net.state_dict())


def test_dedupe_sums_multiplicities() -> None:
    X = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]], dtype=np.float32)
    y = np.array([0, 1, 0, 1, 0])
    Xu, yu, w = dedupe(X, y, np.array([2.0, 1.0, 3.0, 1.0, 4.0]))
    assert Xu.tolist() == [[1, 2], [3, 4], [5, 6], [3, 4]]
    assert yu is not None and yu.tolist() == [0, 1, 1, 0]
    assert w.tolist() == [5.0, 1.0, 1.0, 4.0]
    _, _, counts = dedupe(X, y)
    assert counts.tolist() == [2.0, 1.0, 1.0, 1.0]


def test_refit_hybrid_bundle(tiny: Path, tmp_path: Path, small_kdd_test: Path) -> None:
    plain = train("kdd", "hybrid", [str(tiny)], tmp_path / "plain", epochs=2, seed=0)
    out = tmp_path / "refit"
    manifest = train("kdd", "hybrid", [str(tiny)], out, epochs=2, seed=0, refit=True)
    t = manifest["training"]
    assert t["refit"] is True and plain["training"]["refit"] is False
    # every labelled record with a label the networks know: training, early stopping and
    # calibration parts together (labels too rare to split stay in training)
    assert t["refit_pass"]["rows"] == t["train_rows"] + t["early_stopping_rows"] + \
        t["calibration_rows"] == t["records"]
    assert set(t["refit_pass"]["epochs"]) == {"mlp", "resnet", "snn"}
    # the first pass is the plain run; the manifest's calibration metrics describe it (the
    # refitted networks learnt from the calibration rows) and the thresholds are its own
    assert manifest["metrics"]["calibration"] == plain["metrics"]["calibration"]
    assert manifest["decision"]["threshold"] == plain["decision"]["threshold"]
    assert manifest["decision"]["anomaly_threshold"] == plain["decision"]["anomaly_threshold"]
    data = "".join(small_kdd_test.read_text().splitlines(keepends=True)[:2000])
    from deepwatch.formats import get_format

    batch = get_format("kdd").parse(data).batch
    a = Detector(out, engine="onnx").score_batch(batch)
    b = Detector(out, engine="torch").score_batch(batch)
    p = Detector(tmp_path / "plain", engine="onnx").score_batch(batch)
    assert np.allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-4)
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()
    assert not np.allclose(a.column("score").to_numpy(), p.column("score").to_numpy(),
                           atol=1e-4)  # other classifiers
    truth = np.array(batch.column("label").to_pylist()) != "normal"
    flagged = np.array(a.column("verdict").to_pylist()) == "malicious"
    assert (flagged == truth).mean() > 0.9



def test_refit_of_an_autoencoder_is_a_usage_error(tiny: Path, tmp_path: Path) -> None:
    r = run_cli("train", "--format", "kdd", "--model", "autoencoder", "--refit",
                "--out", str(tmp_path / "b"), str(tiny))
    assert r.returncode == 2, r.stderr
    assert "refit (--refit) trains classifiers again" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "b").exists()


def test_cli_refit_with_folds(tiny: Path, tmp_path: Path) -> None:
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1", "--folds", "2",
                "--refit", "--out", str(tmp_path / "b"), str(tiny))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["training"]["refit"] is True and manifest["training"]["folds"] == 2
    # the refitted network replaces the bag of fold members: one network scores
    assert manifest["network"]["kind"] == "mlp"
