"""``deepwatch train`` and ``deepwatch.api.train`` reviewed afresh (h5): paths and arguments
refused before any training, not after it."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
