"""Supervised classifiers: the three base networks and their stacking ensemble."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.nets import ProbaHead, Stack, build_network
from .loop import TrainConfig, cross_entropy, fit, sampling_probs, seed_everything

DEFAULT_HP: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": 128, "depth": 3, "dropout": 0.1},
    "resnet": {"hidden": 96, "depth": 2, "dropout": 0.1},
    "snn": {"hidden": 128, "depth": 3, "dropout": 0.05},
}
#: Learning rates that suit each network (SELU nets want a gentler step).
DEFAULT_LR = {"mlp": 3e-3, "resnet": 2e-3, "snn": 1e-3}


def network_config(kind: str, d_in: int, n_out: int) -> dict[str, Any]:
    return {"kind": kind, "d_in": d_in, "n_out": n_out, **DEFAULT_HP[kind]}


def train_base(kind: str, X: np.ndarray, y: np.ndarray, w: np.ndarray, Xv: np.ndarray,
               yv: np.ndarray, wv: np.ndarray, n_out: int, cfg: TrainConfig,
               ) -> tuple[nn.Module, dict[str, Any]]:
    config = network_config(kind, X.shape[1], n_out)
    seed_everything(cfg.seed)
    net = build_network(config)
    lr = DEFAULT_LR[kind] if cfg.lr == TrainConfig.lr else cfg.lr
    run = cfg.with_(lr=lr, label=f"{kind:>6}")
    net = fit(net, cross_entropy, X, y, w, Xv, yv, wv, run)
    cfg.history.append({"model": kind, "epochs": run.history})  # type: ignore[dict-item]
    return net, config


def fit_meta(stack: Stack, X: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int,
             l2: float = 1e-3, steps: int = 300) -> None:
    """Fit the meta-learner on held-out base predictions (multinomial logistic regression)."""
    seed_everything(seed)
    stack.eval()
    with torch.no_grad():
        Z = torch.cat([stack.base_logprobs(torch.as_tensor(X[i : i + 65536]))
                       for i in range(0, len(X), 65536)])
    n_out = stack.meta.out_features
    k = len(stack.bases)
    with torch.no_grad():  # start from the plain average of the bases' log-probabilities
        stack.meta.weight.zero_()
        for b in range(k):
            stack.meta.weight[:, b * n_out : (b + 1) * n_out] = torch.eye(n_out) / k
        stack.meta.bias.zero_()
    yt = torch.as_tensor(y, dtype=torch.long)
    wt = torch.as_tensor(w / w.sum(), dtype=torch.float32)
    Z = torch.clamp(Z, min=-30.0)
    opt = torch.optim.LBFGS(stack.meta.parameters(), lr=0.5, max_iter=steps,
                            line_search_fn="strong_wolfe")
    init_w = stack.meta.weight.detach().clone()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (nn.functional.cross_entropy(stack.meta(Z), yt, reduction="none") * wt).sum()
        loss = loss + l2 * ((stack.meta.weight - init_w) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    stack.eval()


def train_supervised(kind: str, X: np.ndarray, y: np.ndarray, w: np.ndarray,
                     Xv: np.ndarray, yv: np.ndarray, wv: np.ndarray,
                     Xm: np.ndarray, ym: np.ndarray, wm: np.ndarray,
                     n_out: int, cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``kind`` (a base network or ``stack``). Returns the network and its config.

    ``(Xv, yv, wv)`` drive early stopping; ``(Xm, ym, wm)`` is held out for the stack's
    meta-learner (unused by a single network).
    """
    if kind != "stack":
        return train_base(kind, X, y, w, Xv, yv, wv, n_out, cfg)
    bases, configs = [], []
    for i, base_kind in enumerate(("mlp", "resnet", "snn")):
        run = cfg.with_(seed=cfg.seed + i)
        net, conf = train_base(base_kind, X, y, w, Xv, yv, wv, n_out, run)
        cfg.history.extend(run.history)
        bases.append(net)
        configs.append(conf)
    stack = Stack(bases, n_out)
    # The meta-learner gets the bases' objective: the same class re-balancing. Fitting it to the
    # raw training mix instead would re-impose the training priors (80% floods in KDD 99), an
    # artefact of how the data was collected rather than what a deployment will see.
    fit_meta(stack, Xm, ym, sampling_probs(ym, wm, cfg.class_balance), cfg.seed)
    return stack, {"kind": "stack", "n_out": n_out, "bases": configs}


def proba_module(net: nn.Module) -> nn.Module:
    return ProbaHead(net).eval()
