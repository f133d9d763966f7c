"""The training template shared by every torch model: device, sampling, epochs, early stopping.

A model supplies its network and a loss; this module owns the rest (STYLE.md, practice 3).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .._cpus import usable_cores
from ..errors import UsageError
from ..progress import EpochReport, epoch_progress
from ..runtime import threads_from_env
from . import distributed


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 4
    seed: int = 0
    device: str = "auto"
    #: Sampling mass of a class is proportional to (its weight) ** class_balance:
    #: 1 keeps the natural mix, 0 balances classes fully, 0.5 is in between.
    class_balance: float = 0.5
    #: Samples drawn per epoch (default: the number of training rows, at most 200k).
    epoch_size: int | None = None
    label: str = "training"
    #: Refit (``train --refit``): train exactly this many epochs of the ``epochs``-long
    #: schedule, without validation or early stopping, and keep the final weights.
    fixed_epochs: int | None = None
    #: Report each network's epochs on stderr (bars or lines, see ``deepwatch.progress``):
    #: what the command does; a library call's ``train(progress=False)`` shows nothing.
    progress: bool = True
    #: The settings the user chose (``--epochs``, ``train(options=...)``), each taken as given
    #: even where it equals the default above: ``epochs`` and ``lr`` left at their defaults are
    #: replaced by the model's own (the autoencoder's epochs, each network's learning rate),
    #: and ``--epochs 30`` or ``lr=2e-3`` was taken for them.
    chosen: frozenset[str] = frozenset()
    history: list[dict[str, float]] = field(default_factory=list)

    def with_(self, **kw: Any) -> TrainConfig:
        return replace(self, history=[], **kw)

    def given(self, name: str) -> bool:
        """Whether setting ``name`` is the user's (chosen, or other than the default) rather
        than the default, which the model may replace with its own."""
        return name in self.chosen or getattr(self, name) != getattr(TrainConfig, name)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for but no CUDA device is available")
    return dev


def torch_threads() -> int | None:
    """``DEEPWATCH_TORCH_THREADS``: the intra-op threads torch is to use, or None where it is
    unset or 0 (the default: the usable cores); checked as ``DEEPWATCH_THREADS`` is."""
    return threads_from_env("DEEPWATCH_TORCH_THREADS", zero_is_default=True)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    # DEEPWATCH_TORCH_THREADS sets the threads: small networks on a busy CPU train many times
    # faster on one thread than on several that wait for each other.
    # Several training processes on one machine (torchrun) share its cores.
    threads = torch_threads()
    per_process = max(1, usable_cores() // distributed.current().local_world)
    torch.set_num_threads(threads or per_process)


def sampling_probs(y: np.ndarray | None, w: np.ndarray, balance: float) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if y is None or balance == 1.0:
        p = w
    else:
        totals = np.bincount(y, weights=w)
        factor = np.where(totals > 0, np.power(np.maximum(totals, 1e-12), balance - 1.0), 0.0)
        p = w * factor[y]
    return p / p.sum()


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]


def fit(
    net: nn.Module,
    loss_fn: LossFn,
    X: np.ndarray,
    y: np.ndarray | None,
    w: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray | None,
    w_val: np.ndarray,
    cfg: TrainConfig,
) -> nn.Module:
    """Train ``net`` by minimising ``loss_fn``; keep the weights with the best validation loss.

    ``w`` are per-row multiplicities (rows may be de-duplicated); training batches are drawn with
    probability proportional to them (re-balanced across classes by ``cfg.class_balance``).
    Validation loss is the multiplicity-weighted mean on the natural distribution.
    """
    seed_everything(cfg.seed)
    dist = distributed.current()
    device = distributed.device_for(pick_device(cfg.device), dist)
    use_amp = device.type == "cuda"
    net = net.to(device)
    Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.long, device=device) if y is not None else None
    # each rank scores its share of the validation rows; the sums are added over the ranks
    share = dist.share(len(X_val))
    Xv = torch.as_tensor(X_val[share], dtype=torch.float32, device=device)
    yv = torch.as_tensor(y_val[share], dtype=torch.long, device=device) \
        if y_val is not None else None
    wv = torch.as_tensor(w_val[share], dtype=torch.float32, device=device)
    probs = sampling_probs(y, w, cfg.class_balance)
    # the same seed on every rank: all draw the same global batches and take their shares
    rng = np.random.default_rng(cfg.seed)
    epoch_size = cfg.epoch_size or min(len(X), 200_000)
    steps = max(1, math.ceil(epoch_size / cfg.batch_size))
    stepper = distributed.wrap(net, device, dist)
    model = distributed.inner(stepper)
    opt = torch.optim.AdamW(stepper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = steps * cfg.epochs
    sched: torch.optim.lr_scheduler.LRScheduler
    if total_steps >= 20:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1)
    else:  # too few steps for a warm-up and an annealing phase: a constant rate
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    best = math.inf
    best_state = copy.deepcopy(model.state_dict())
    stale = 0
    mine = dist.share(cfg.batch_size)
    fixed = cfg.fixed_epochs is not None
    n_epochs = min(cfg.fixed_epochs, cfg.epochs) if cfg.fixed_epochs is not None else cfg.epochs
    best_epoch, early = 0, False  # epoch 0: the initial weights
    before = len(cfg.history)
    detail = f"{steps:,} batch{'es' if steps != 1 else ''} of {cfg.batch_size:,} from " \
        f"{len(X):,} rows" + (", no validation" if fixed else "") + f", on {device}"
    with (epoch_progress(cfg.label, n_epochs, detail) if cfg.progress
          else nullcontext(EpochReport())) as report:
        for epoch in range(n_epochs):
            stepper.train()
            idx = torch.as_tensor(rng.choice(len(X), size=steps * cfg.batch_size, p=probs),
                                  device=device)
            total = 0.0
            for s in range(steps):
                b = idx[s * cfg.batch_size : (s + 1) * cfg.batch_size][mine]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = loss_fn(stepper, Xt[b], yt[b] if yt is not None else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            if fixed:  # a refit: no validation, the weights after the last epoch are kept
                [total] = distributed.all_sum([total / dist.world], device, dist)
                cfg.history.append({"epoch": epoch + 1, "train_loss": total / steps})
                report.epoch(epoch + 1, total / steps)
                continue
            val_total, val_weight = evaluate_loss(model, loss_fn, Xv, yv, wv)
            total, val_total, val_weight = distributed.all_sum(
                [total / dist.world, val_total, val_weight], device, dist)
            val = val_total / max(val_weight, 1e-12)
            cfg.history.append({"epoch": epoch + 1, "train_loss": total / steps, "val_loss": val})
            if val < best - 1e-6:
                best, best_epoch, stale = val, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                early = stale >= cfg.patience
            report.epoch(epoch + 1, total / steps, val, best_epoch, best)
            if early:
                break
        if fixed:
            report.stopped(len(cfg.history) - before, None, None)
        else:
            report.stopped(len(cfg.history) - before, best_epoch, best,
                           cfg.patience if early else None)
    if not fixed:
        net.load_state_dict(best_state)
    # per-rank batch-norm statistics may differ: every rank goes on with rank 0's model
    distributed.broadcast_module(net, dist)
    return net.cpu().eval()


@torch.no_grad()
def evaluate_loss(net: nn.Module, loss_fn: LossFn, X: torch.Tensor, y: torch.Tensor | None,
                  w: torch.Tensor, batch: int = 8192) -> tuple[float, float]:
    """The weighted sum of per-row losses over ``X`` and the sum of the weights."""
    net.eval()
    total, weight = 0.0, 0.0
    for i in range(0, len(X), batch):
        xb = X[i : i + batch]
        yb = y[i : i + batch] if y is not None else None
        wb = w[i : i + batch]
        per_row = loss_fn(net, xb, yb, reduction="none")  # type: ignore[call-arg]
        total += float((per_row.float() * wb).sum())
        weight += float(wb.sum())
    return total, weight


def cross_entropy(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                  reduction: str = "mean") -> torch.Tensor:
    assert y is not None
    return nn.functional.cross_entropy(net(x).float(), y, reduction=reduction)
