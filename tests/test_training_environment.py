"""The manifest records what a seed's weights depend on besides the data and the code: torch's
thread count during training and the libraries' versions (two venvs gave the same seed other
weights, and the contest figure moved from 0.2361 to 0.2400 with no record of why)."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
import torch

from deepwatch.train.api import train


def test_the_manifest_records_the_thread_count_and_library_versions(
        tmp_path: Path, small_kdd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "few.csv"
    data.write_text("".join(small_kdd.read_text().splitlines(keepends=True)[:400]))
    before = torch.get_num_threads()
    monkeypatch.setenv("DEEPWATCH_TORCH_THREADS", "1")
    train("kdd", "mlp", [str(data)], tmp_path / "b", epochs=1, seed=0, progress=False)
    training = json.loads((tmp_path / "b" / "manifest.json").read_text())["training"]
    assert training["torch_threads"] == 1
    assert training["libraries"]["torch"] == md.version("torch")
    assert training["libraries"]["numpy"] == md.version("numpy")
    assert set(training["libraries"]) == {"torch", "numpy", "pyarrow", "polars", "onnx"}
    assert torch.get_num_threads() == before  # put back after training, as before
