"""``deepwatch train`` and ``deepwatch.api.train`` reviewed afresh (h5): paths and arguments
refused before any training, not after it, and numpy's numbers taken as Python's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import head_lines, run_cli


@pytest.fixture(scope="module")
def twenty(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    """Twenty KDD records of several labels (normal, smurf, ...): trains in a second."""
    p = tmp_path_factory.mktemp("h5") / "twenty.csv"
    p.write_text("".join(head_lines(kdd_train_file, 20, every=499)))
    return p


def _refused(r: subprocess.CompletedProcess[str]) -> str:
    """``r``, a run refused with exit 2, no traceback and no training: its one line."""
    assert "Traceback" not in r.stderr and r.returncode == 2, r.stderr
    assert "training data:" not in r.stderr, r.stderr  # refused before reading
    [line] = r.stderr.strip().splitlines()
    return line


def test_rejects_at_the_bundle_path_is_refused_before_training(twenty: Path,
                                                               tmp_path: Path) -> None:
    # neither there yet: the rejects file was made at --out, the model trained, and then the
    # bundle could not be saved ('--out ... is a file'), an empty rejects file in its place
    out = tmp_path / "b"
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                "--out", str(out), "--rejects", str(out), str(twenty))
    assert _refused(r) == (f"error: --rejects {out} is the bundle directory --out {out}: "
                           "give each its own path")
    assert not out.exists()


@pytest.mark.parametrize(("model", "given"), [
    ("mlp", {"seed": np.int64(3), "folds": np.int64(2), "epochs": np.int32(1)}),
    ("autoencoder", {"target_fpr": np.float32(0.05),
                     "options": {"noise": np.float32(0.05), "latent": np.int64(4)}}),
])
def test_numpy_numbers_are_taken_as_python_ones(model: str, given: dict[str, Any],
                                                twenty: Path, tmp_path: Path) -> None:
    # a notebook's np.int64 seed (or np.float32 rate) passed every check, trained the whole
    # model and then failed with "TypeError: Object of type int64 is not JSON serializable"
    # where the manifest was written
    from deepwatch.api import train

    out = tmp_path / "b"
    manifest = train("kdd", model, twenty, out, **{"epochs": 1, **given})
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["training"]["seed"] == int(given.get("seed", 0))
    assert saved["training"]["folds"] == int(given.get("folds", 1))
    if model == "autoencoder":
        assert saved["thresholds"]["target_fpr"] == pytest.approx(0.05)
        assert saved["training"]["autoencoder"]["latent"] == 4
    assert manifest["model_kind"] == model


@pytest.mark.parametrize(("given", "says"), [
    # an unset shell variable (--out "$OUT"): the current directory, a bundle written into it
    # where it was empty ('error:  exists and is not a deepwatch bundle' elsewhere)
    (["--out", ""], "error: --out is empty: give the bundle's directory"),
    # a directory named '-' was made
    (["--out", "-"], "error: --out takes the bundle's directory, not '-': a bundle is a "
                     "directory of files, not written to standard output"),
    # no rejects file at all, without a word
    (["--out", "b", "--rejects", ""], "error: --rejects is empty: give a file path"),
], ids=["empty-out", "dash-out", "empty-rejects"])
def test_an_output_naming_no_path_is_refused(given: list[str], says: str, twenty: Path,
                                             tmp_path: Path) -> None:
    import sys

    here = tmp_path / "here"
    here.mkdir()
    r = subprocess.run([sys.executable, "-m", "deepwatch", "train", "--format", "kdd",
                        "--model", "mlp", "--epochs", "1", *given, str(twenty)],
                       capture_output=True, text=True, timeout=300, cwd=here)
    assert _refused(r) == says
    assert not any(here.iterdir())  # nothing written where it ran
