"""Training's progress where no bars are drawn: plain lines on stderr, so that a run whose stderr
goes to a log (``2> log``, nohup, CI, a scheduler) leaves a trail instead of minutes of silence."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import head_lines

from deepwatch.cli import main
from deepwatch.train.loop import TrainConfig, cross_entropy, fit

EPOCH_LINE = re.compile(r"^mlp: epoch (\d)/3, train loss \d+\.\d{5}, val loss \d+\.\d{5} "
                        r"\(best \d+\.\d{5}, epoch \d\), \d+\.\ds$")


@pytest.fixture(scope="module")
def tiny_kdd(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    p = tmp_path_factory.mktemp("progress") / "tiny.csv"
    p.write_text("".join(head_lines(kdd_train_file, 2000, every=24)))
    return p


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPWATCH_PROGRESS"}
    return {**env, "DEEPWATCH_TORCH_THREADS": "1", **extra}


def test_train_with_stderr_in_a_log_writes_a_line_per_network_and_epoch(
        tiny_kdd: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "train", "--format", "kdd",
                        "--model", "mlp", "--epochs", "3", "--out", str(tmp_path / "b"),
                        str(tiny_kdd)],
                       capture_output=True, text=True, timeout=300,  # stderr: a pipe
                       env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # never stdout: outputs may be written there
    lines = r.stderr.splitlines()
    [start] = [i for i, ln in enumerate(lines) if ln.startswith("mlp: training, up to 3 epochs")]
    assert "batches of 512 from" in lines[start] and "on cpu" in lines[start]
    assert [int(m[1]) for ln in lines if (m := EPOCH_LINE.match(ln))] == [1, 2, 3], r.stderr
    done = [ln for ln in lines if ln.startswith("mlp: done after 3 epochs, keeping epoch ")]
    assert len(done) == 1, r.stderr
    # in order: after the data's summary, before the final verdict
    assert lines[start - 1].startswith("features: ")
    assert lines[-1].startswith("validation: ")


def test_progress_zero_silences_the_lines(tiny_kdd: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEEPWATCH_PROGRESS", "0")
    assert main(["train", "--format", "kdd", "--model", "mlp", "--epochs", "2",
                 "--out", str(tmp_path / "b"), str(tiny_kdd)]) == 0
    captured = capsys.readouterr()
    assert "mlp: " not in captured.err and "epoch" not in captured.err, captured.err
    assert captured.err.splitlines()[-1].startswith("validation: ")


def _toy(n: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    return X, y, np.ones(n)


def _fit(cfg: TrainConfig) -> None:
    from torch import nn

    X, y, w = _toy()
    fit(nn.Linear(4, 2), cross_entropy, X, y, w, X[:64], y[:64], w[:64], cfg)


def test_early_stopping_says_when_it_stopped_and_which_epoch_it_keeps(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DEEPWATCH_PROGRESS", raising=False)
    # a learning rate of 0: the validation loss never improves on the first epoch's
    _fit(TrainConfig(epochs=10, patience=2, lr=0.0, batch_size=64, device="cpu",
                     label="   net"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "net: training, up to 10 epochs (4 batches of 64 from 256 rows, on cpu)"
    assert [ln.split(",")[0] for ln in lines[1:4]] == [
        "net: epoch 1/10", "net: epoch 2/10", "net: epoch 3/10"]
    first = lines[1].split("val loss ")[1].split(" ")[0]
    assert all(f"val loss {first} (best {first}, epoch 1)" in ln for ln in lines[1:4]), lines
    assert re.fullmatch(r"net: stopped early after epoch 3 \(no better val loss for 2 epochs\), "
                        r"keeping epoch 1 \(val loss \d+\.\d{5}\), \d+\.\ds", lines[4]), lines
    assert len(lines) == 5


def test_a_refit_says_it_keeps_its_last_weights(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DEEPWATCH_PROGRESS", raising=False)
    _fit(TrainConfig(epochs=5, fixed_epochs=2, batch_size=64, device="cpu", label="net refit"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("net refit: training, up to 2 epochs (") and \
        "no validation" in lines[0]
    assert all(re.fullmatch(rf"net refit: epoch {i}/2, train loss \d+\.\d{{5}}, \d+\.\ds",
                            lines[i]) for i in (1, 2)), lines
    assert lines[3].startswith("net refit: done after 2 epochs, keeping the last weights, ")


@pytest.mark.parametrize("flag", ["0", "1"])
def test_no_lines_where_progress_is_off_or_drawn_as_bars(
        flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEEPWATCH_PROGRESS", flag)
    _fit(TrainConfig(epochs=2, batch_size=64, device="cpu", label="net"))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "net: " not in captured.err and "net: epoch" not in captured.err
    if flag == "1":  # the bar, drawn once, says what the lines would have said
        assert "net" in captured.err and "2/2" in captured.err
    else:
        assert captured.err == ""
