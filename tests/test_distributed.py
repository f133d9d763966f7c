"""Data-parallel training (torch DDP, gloo on CPU): two real processes, as torchrun starts them
and as ``deepwatch train --nproc`` does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from deepwatch.bundle import read_manifest

#: The same small job in one process and in two: a net without dropout or batch norm, so the
#: data-parallel run must retrace the one-process run step by step.
_FIT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from torch import nn
    from safetensors.torch import save_file
    from deepwatch.train import distributed
    from deepwatch.train.loop import TrainConfig, cross_entropy, fit

    out = sys.argv[1]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 10)).astype(np.float32)
    y = ((X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int64) + (X[:, 2] > 1)).astype(np.int64)
    w = rng.integers(1, 4, size=len(X)).astype(np.float64)  # multiplicities steer the sampler
    Xv, yv, wv = X[:501], y[:501], np.ones(501)
    with distributed.session("cpu") as d:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
        cfg = TrainConfig(epochs=4, batch_size=128, seed=0, patience=10, device="cpu",
                          epoch_size=2000)
        seen = {"train": 0, "val": 0}  # rows this rank computed the loss of

        def loss(model, x, y, reduction="mean"):
            seen["train" if model.training else "val"] += len(x)
            return cross_entropy(model, x, y, reduction=reduction)

        net = fit(net, loss, X, y, w, Xv, yv, wv, cfg)
        tag = f"rank{d.rank}_of{d.world}"
        with open(f"{out}/{tag}.rows.json", "w") as f:
            json.dump(seen, f)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  f"{out}/{tag}.safetensors")
        with open(f"{out}/{tag}.json", "w") as f:
            json.dump(cfg.history, f)
""")


def _launch(command: list[str], nproc: int) -> tuple[int, list[str]]:
    from deepwatch.train.distributed import launch_local

    said: list[str] = []
    return launch_local(command, nproc, said.append), said


def test_two_processes_train_the_same_model_as_one(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    script = tmp_path / "fit.py"
    script.write_text(_FIT_SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    code, said = _launch([sys.executable, str(script), str(tmp_path)], 2)
    assert code == 0, said

    single = load_file(str(tmp_path / "rank0_of1.safetensors"))
    r0 = load_file(str(tmp_path / "rank0_of2.safetensors"))
    r1 = load_file(str(tmp_path / "rank1_of2.safetensors"))
    assert single.keys() == r0.keys() == r1.keys()
    moved = 0.0
    for k in single:
        np.testing.assert_array_equal(r0[k], r1[k])  # the ranks end with one model
        # each rank took half of every batch; the averaged gradients are the whole batch's
        np.testing.assert_allclose(r0[k], single[k], rtol=1e-3, atol=2e-5)
        moved += float(np.abs(single[k]).sum())
    assert moved > 0
    h1 = json.loads((tmp_path / "rank0_of1.json").read_text())
    h2 = json.loads((tmp_path / "rank0_of2.json").read_text())
    assert len(h1) == len(h2) == 4
    # validation losses are summed over both ranks' shares: the same numbers as one process
    np.testing.assert_allclose([e["val_loss"] for e in h2], [e["val_loss"] for e in h1],
                               rtol=1e-4)
    assert h1[-1]["val_loss"] < h1[0]["val_loss"]  # it learnt something
    # and the work was split: 4 epochs of 16 batches of 128 rows, 501 validation rows each
    rows = [json.loads((tmp_path / f"{t}.rows.json").read_text())
            for t in ("rank0_of1", "rank0_of2", "rank1_of2")]
    assert rows[0] == {"train": 4 * 16 * 128, "val": 4 * 501}
    assert rows[1] == {"train": 4 * 16 * 64, "val": 4 * 250}
    assert rows[2] == {"train": 4 * 16 * 64, "val": 4 * 251}


def _deepwatch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepwatch", *args], capture_output=True,
                          text=True, timeout=timeout)


def _quality(bundle: Path, test_file: Path) -> dict[str, float]:
    from deepwatch.evaluate.run import evaluate

    result, _ = evaluate(str(bundle), "kdd", [str(test_file)])
    return result["binary"]


def test_torchrun_launches_deepwatch_train(small_kdd: Path, small_kdd_test: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "deepwatch", "train", "--format", "kdd",
                        "--model", "mlp", "--epochs", "3", "--out", str(out), str(small_kdd)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("saved mlp bundle") == 1  # rank 0 alone writes and reports
    assert r.stderr.count("validation: precision") == 1
    manifest = read_manifest(out)
    assert manifest["training"]["world_size"] == 2
    assert manifest["training"]["device"] == "cpu"
    binary = _quality(out, small_kdd_test)
    assert binary["recall"] > 0.9 and binary["precision"] > 0.9


def test_nproc_trains_a_hybrid_in_two_processes(small_kdd: Path, small_kdd_test: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "hybrid"
    r = _deepwatch("train", "--nproc", "2", "--format", "kdd", "--model", "hybrid",
                   "--epochs", "3", "--out", str(out), str(small_kdd))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training in 2 processes" in r.stderr
    assert r.stderr.count("saved hybrid bundle") == 1
    manifest = read_manifest(out)  # checksums verified
    assert manifest["training"]["world_size"] == 2
    assert manifest["thresholds"]["anomaly"] is not None
    binary = _quality(out, small_kdd_test)
    assert binary["recall"] > 0.9 and binary["precision"] > 0.9


def test_nproc_cross_fits_with_folds(tmp_path: Path, small_kdd: Path) -> None:
    small = tmp_path / "small.csv"
    small.write_text("".join(small_kdd.read_text().splitlines(keepends=True)[::4]))
    out = tmp_path / "folds"
    r = _deepwatch("train", "--nproc", "2", "--format", "kdd", "--model", "mlp", "--folds", "2",
                   "--epochs", "2", "--out", str(out), str(small))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["folds"] == 2
    assert manifest["network"]["kind"] == "bag" and len(manifest["network"]["members"]) == 2
    r = _deepwatch("train", "--nproc", "2", "--format", "kdd", "--model", "mlp", "--folds", "0",
                   "--out", str(tmp_path / "b"), str(small))
    assert r.returncode == 2 and r.stderr.count("error: folds (--folds) must be between") == 1
    # --refit reaches the ranks: one network, refitted on every record, in both processes
    r = _deepwatch("train", "--nproc", "2", "--format", "kdd", "--model", "mlp", "--folds", "2",
                   "--refit", "--epochs", "2", "--out", str(tmp_path / "refit"), str(small))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_manifest(tmp_path / "refit")
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["refit"] is True
    assert manifest["network"]["kind"] == "mlp"
    assert manifest["training"]["refit_pass"]["rows"] == manifest["training"]["records"]


def test_nproc_user_mistakes_are_one_line_errors(small_kdd: Path, tmp_path: Path) -> None:
    r = _deepwatch("train", "--nproc", "2", "--format", "kdd", "--model", "mlp",
                   "--out", str(tmp_path / "b"), str(tmp_path / "missing.csv"))
    assert r.returncode == 2
    assert r.stderr.count("error: no such file") == 1  # said once, not once per rank
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()
    r = _deepwatch("train", "--nproc", "2", "--format", "kdd", "--model", "mlp",
                   "--out", str(tmp_path / "b"), "-")
    assert r.returncode == 2 and "give files, not stdin" in r.stderr
    r = _deepwatch("train", "--nproc", "0", "--format", "kdd", "--model", "mlp",
                   "--out", str(tmp_path / "b"), str(small_kdd))
    assert r.returncode == 2 and "--nproc must be at least 1" in r.stderr
    import torch

    if not torch.cuda.is_available():  # said by the launcher, before any rank reads the data
        r = _deepwatch("train", "--nproc", "2", "--device", "cuda", "--format", "kdd",
                       "--model", "mlp", "--out", str(tmp_path / "b"), str(small_kdd))
        assert r.returncode == 2 and r.stderr.count("no CUDA device") == 1
        assert "training in 2 processes" not in r.stderr


def _children(parent: int) -> dict[int, dict[str, str]]:
    """The child processes of ``parent`` and their environments (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            raw = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
        found[int(entry.name)] = env
    return found


def test_a_rank_killed_mid_training_fails_the_run_cleanly(small_kdd: Path,
                                                          tmp_path: Path) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc to find the ranks")
    out = tmp_path / "stack"
    launcher = subprocess.Popen([sys.executable, "-m", "deepwatch", "train", "--nproc", "2",
                                 "--format", "kdd", "--model", "stack", "--epochs", "30",
                                 "--out", str(out), str(small_kdd)],
                                stderr=subprocess.PIPE, text=True)
    ranks: dict[str | None, int] = {}
    deadline = time.monotonic() + 120
    while len(ranks) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        ranks = {env.get("RANK"): pid for pid, env in _children(launcher.pid).items()}
        time.sleep(0.1)
    victim = ranks.get("1")
    assert victim is not None, "rank 1 never started"
    time.sleep(4.0)  # into reading or training: either way the run must end, and cleanly
    os.kill(victim, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "error: training rank 1 failed (signal 9)" in err
    assert "Traceback" not in err
    assert not out.exists()  # no bundle from a broken run
    assert not [pid for pid in ranks.values() if Path(f"/proc/{pid}").exists()]  # none left
