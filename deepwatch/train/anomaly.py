"""Trainers for ``--model autoencoder`` and ``--model hybrid``.

The autoencoder learns only from benign records (label ``normal``; every record when the data
has no labels): early stopping uses the held-out benign records of the early-stopping split, and
the anomaly threshold is the smallest that flags at most a ``target_fpr`` share of the scores of
the calibration split's benign records, which the network never saw. The hybrid is the stacked
classifiers and such an autoencoder in one exported module and one decision (see
``models/hybrid.py``).

Options (``train(options=...)``): ``latent`` (bottleneck width; default sized to the data),
``hidden``, ``depth``, ``noise`` (std of the denoising noise), ``scale_floor``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..models.autoencoder import ANOMALY_OUTPUTS, HYBRID_OUTPUTS, AnomalyHead, HybridHead
from ..models.autoencoder import build_autoencoder as build
from .api import (
    FPR_NEEDS_BENIGN,
    Split,
    TrainContext,
    Trained,
    fpr_cut,
    require_labelled_validation,
    require_two_labels,
    train_classifier,
)
from .loop import fit, seed_everything

DEFAULTS: dict[str, Any] = {"hidden": 64, "depth": 2, "dropout": 0.0, "noise": 0.05,
                            "scale_floor": 0.05, "min_latent": 4, "max_latent": 24,
                            "explained": 0.99, "dup_power": 0.5}
#: Fewer epochs than the classifiers: an autoencoder on de-duplicated benign rows converges fast.
AE_EPOCHS = 15


def latent_size(X: np.ndarray, w: np.ndarray, explained: float, lo: int, hi: int) -> int:
    """The bottleneck: principal components needed for ``explained`` of the (weighted)
    variance of the benign training rows, clipped to ``[lo, hi]``."""
    w = w / w.sum()
    mu = w @ X
    Xc = (X - mu) * np.sqrt(w)[:, None]
    eig = np.linalg.svd(Xc.astype(np.float64), compute_uv=False) ** 2
    share = np.cumsum(eig) / max(eig.sum(), 1e-12)
    k = int(np.searchsorted(share, explained) + 1)
    return int(min(max(k, lo), hi, X.shape[1]))


def reconstruction_loss(noise: float):  # type: ignore[no-untyped-def]
    """Denoising Huber loss: the input is jittered while training, the target is the clean row.
    Huber keeps the rare benign outliers from steering the fit."""

    def loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
             reduction: str = "mean") -> torch.Tensor:
        noisy = x + noise * torch.randn_like(x) if net.training and noise > 0 else x
        per_row = nn.functional.smooth_l1_loss(net(noisy).float(), x, reduction="none",
                                               beta=1.0).mean(dim=1)
        return per_row.mean() if reduction == "mean" else per_row

    return loss


@torch.no_grad()
def fit_scale(ae: nn.Module, X: np.ndarray, floor: float) -> torch.Tensor:
    """Per-feature error scale: the mean squared residual on held-out benign rows, floored at
    ``floor`` times the median feature's so that near-perfectly reconstructed features (one-hot
    slots benign traffic never uses) do not turn every small deviation into a huge score."""
    ae.eval()
    total = torch.zeros(X.shape[1], dtype=torch.float64)
    for i in range(0, len(X), 16384):
        xb = torch.as_tensor(X[i : i + 16384])
        total += ((ae(xb) - xb) ** 2).sum(dim=0).double()
    ms = total / max(len(X), 1)
    base = float(torch.median(ms))
    return torch.clamp(ms, min=max(floor * base, 1e-6)).float()


def calibrate(scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold that flags at most a ``target_fpr`` share of benign ``scores``
    (flag: >=; records tied at the boundary are all flagged or none: :func:`fpr_cut`)."""
    if len(scores) == 0:
        raise DataError("no benign records were left to calibrate the anomaly threshold")
    return fpr_cut(scores, target_fpr)


def _benign(split: Split, what: str) -> Split:
    b = split.benign()
    if len(b.X) == 0:
        raise DataError(f"the {what} data has no benign records (label 'normal') to learn "
                        "what normal looks like")
    return b


def train_anomaly_head(ctx: TrainContext) -> tuple[AnomalyHead, dict[str, Any], dict[str, Any]]:
    """Fit an autoencoder on benign records; returns (head, network config, info)."""
    opts = {**DEFAULTS, **{k: v for k, v in ctx.options.items() if k in DEFAULTS or
                           k == "latent"}}
    tr, es, cal = _benign(ctx.train, "training"), _benign(ctx.early, "early-stopping"), \
        _benign(ctx.calib, "calibration")
    d = tr.X.shape[1]
    latent = int(opts.get("latent") or latent_size(tr.X, tr.w, opts["explained"],
                                                    opts["min_latent"], opts["max_latent"]))
    config = {"kind": "autoencoder", "head": "anomaly", "d_in": d, "latent": latent,
              "hidden": int(opts["hidden"]), "depth": int(opts["depth"]),
              "dropout": float(opts["dropout"])}
    seed_everything(ctx.cfg.seed)
    ae = build(config)
    epochs = ctx.cfg.epochs if ctx.cfg.given("epochs") else AE_EPOCHS
    # at least 16 batches an epoch: tiny benign sets still get enough steps (and a valid
    # one-cycle schedule)
    epoch_size = max(ctx.cfg.epoch_size or min(len(tr.X), 200_000), 16 * ctx.cfg.batch_size)
    run = ctx.cfg.with_(epochs=epochs, label="autoencoder", class_balance=1.0,
                        epoch_size=epoch_size)
    # duplicates are drawn w ** dup_power often: < 1 lets rare benign patterns be learnt too
    fit(ae, reconstruction_loss(float(opts["noise"])), tr.X, None,
        tr.w ** float(opts["dup_power"]), es.X, None, es.w, run)  # trains ae in place
    head = AnomalyHead(ae, d)
    head.set_scale(fit_scale(ae, es.X, float(opts["scale_floor"])))
    head.eval()
    with torch.no_grad():
        cal_scores = np.concatenate([head(torch.as_tensor(cal.X[i : i + 16384]))[0].numpy()
                                     for i in range(0, len(cal.X), 16384)])
    threshold = calibrate(cal_scores, ctx.target_fpr)
    info = {"autoencoder": {"latent": latent, "noise": opts["noise"], "epochs": run.history,
                            "benign_train_rows": int(tr.w.sum()),
                            "calibration_benign_rows": int(len(cal.X)),
                            "anomaly_threshold": threshold, "target_fpr": ctx.target_fpr}}
    return head, config, info


def train_autoencoder(kind: str, ctx: TrainContext) -> Trained:
    head, config, info = train_anomaly_head(ctx)
    decision = {"labels": [], "label_category": [], "categories": [], "policy": "threshold",
                "threshold": 0.5,
                "anomaly_threshold": info["autoencoder"]["anomaly_threshold"],
                "target_fpr": ctx.target_fpr}
    return Trained(head, config, list(ANOMALY_OUTPUTS), decision, info)


def train_hybrid(kind: str, ctx: TrainContext) -> Trained:
    from ..models.hybrid import default_combine

    # before the stack's own checks, which would name the stack
    require_two_labels(kind, ctx)
    require_labelled_validation(kind, ctx)
    if ctx.policy == "fpr" and not len(ctx.calib.benign().X):
        raise DataError(FPR_NEEDS_BENIGN)  # (the stack's own word for it)
    for split, what in ((ctx.train, "training"), (ctx.early, "early-stopping"),
                        (ctx.calib, "calibration")):
        _benign(split, what)  # said before the stack trains (minutes on real data), not after
    stack = train_classifier("stack", ctx)
    classifier: nn.Module = stack.module.net  # type: ignore[assignment]  # ProbaHead(net)
    head, ae_config, info = train_anomaly_head(ctx)
    network = {"kind": "hybrid", "head": "hybrid", "classifier": stack.network,
               "autoencoder": ae_config}
    decision = {**stack.decision,
                "anomaly_threshold": info["autoencoder"]["anomaly_threshold"],
                "target_fpr": ctx.target_fpr,
                "combine": default_combine(stack.decision, ctx.options)}
    first = None
    if stack.calibration_module is not None:  # cross-fitted: the first fold's classifiers
        first = HybridHead(stack.calibration_module.net, head)  # type: ignore[arg-type]
    return Trained(HybridHead(classifier, head), network, list(HYBRID_OUTPUTS), decision,
                   {**stack.info, **info}, first)
