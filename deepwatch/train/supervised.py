"""Supervised classifiers: the three base networks and their stacking ensemble."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.nets import Bag, ProbaHead, Stack, build_network
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
               label: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    config = network_config(kind, X.shape[1], n_out)
    seed_everything(cfg.seed)
    net = build_network(config)
    lr = cfg.lr if cfg.given("lr") else DEFAULT_LR[kind]
    run = cfg.with_(lr=lr, label=label or f"{kind:>6}")
    net = fit(net, cross_entropy, X, y, w, Xv, yv, wv, run)
    cfg.history.append({"model": kind, "epochs": run.history})  # type: ignore[dict-item]
    return net, config


@torch.no_grad()
def base_logprobs(stack: Stack, X: np.ndarray) -> torch.Tensor:
    """The stack's base learners' log-probabilities on ``X`` (the meta-learner's input)."""
    stack.eval()
    if len(X) == 0:
        return torch.zeros(0, stack.meta.in_features)
    return torch.cat([stack.base_logprobs(torch.as_tensor(X[i : i + 65536]))
                      for i in range(0, len(X), 65536)])


def fit_meta(stack: Stack, Z: torch.Tensor, y: np.ndarray, w: np.ndarray, seed: int,
             l2: float = 1e-3, steps: int = 300) -> None:
    """Fit the meta-learner (multinomial logistic regression) on held-out base
    log-probabilities ``Z`` (see :func:`base_logprobs`)."""
    seed_everything(seed)
    stack.eval()
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
    fit_meta(stack, base_logprobs(stack, Xm), ym, sampling_probs(ym, wm, cfg.class_balance),
             cfg.seed)
    return stack, {"kind": "stack", "n_out": n_out, "bases": configs}


@dataclass
class FoldData:
    """One member's data in cross-fitting: what it trains on (``X``, ``y``, ``w``), what stops
    it early (``Xv``...) and the held-out rows its out-of-fold predictions are made on (``Xc``...).
    """

    X: np.ndarray
    y: np.ndarray
    w: np.ndarray
    Xv: np.ndarray
    yv: np.ndarray
    wv: np.ndarray
    Xc: np.ndarray
    yc: np.ndarray
    wc: np.ndarray


@dataclass
class CrossFitted:
    """What :func:`train_folds` returns: the bagged network and its config, its out-of-fold
    class probabilities on every fold's held-out rows (in fold order), and ``first``: the same
    network built from the first fold's members only, which never saw that fold's held-out rows.
    """

    net: nn.Module
    config: dict[str, Any]
    oof_proba: np.ndarray
    first: nn.Module


def train_folds(kind: str, folds: list[FoldData], n_out: int, cfg: TrainConfig) -> CrossFitted:
    """Cross-fitting (``train --folds K``): each base network is trained K times, member k on
    every fold but k, early-stopped on part of fold k; a record scores as the mean of the
    members' probabilities (:class:`Bag`). A stack's meta-learner is fitted on the members'
    out-of-fold log-probabilities, each held-out row seen through the members that did not
    train on it.
    """
    kinds = ("mlp", "resnet", "snn") if kind == "stack" else (kind,)
    members: dict[str, list[nn.Module]] = {k: [] for k in kinds}
    configs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    oof: list[torch.Tensor] = []  # per fold: the bases' log-probabilities on its held-out rows
    for f, d in enumerate(folds):
        per_kind = []
        for i, base_kind in enumerate(kinds):
            run = cfg.with_(seed=cfg.seed + i + 1000 * f)
            net, conf = train_base(base_kind, d.X, d.y, d.w, d.Xv, d.yv, d.wv, n_out, run,
                                   label=f"{base_kind:>6} {f + 1}/{len(folds)}")
            cfg.history.extend({**h, "fold": f} for h in run.history)
            members[base_kind].append(net)
            configs[base_kind].append(conf)
            with torch.no_grad():
                per_kind.append(torch.log_softmax(net(torch.as_tensor(d.Xc)), dim=1)
                                if len(d.Xc) else torch.zeros(0, n_out))
        oof.append(torch.cat(per_kind, dim=1))
    Z = torch.cat(oof)
    bags = [Bag(members[k]) for k in kinds]
    bag_configs = [{"kind": "bag", "members": configs[k]} for k in kinds]
    if kind != "stack":
        first: nn.Module = members[kind][0]
        return CrossFitted(bags[0], bag_configs[0], torch.exp(Z).numpy(), first)
    yc = np.concatenate([d.yc for d in folds])
    wc = np.concatenate([d.wc for d in folds])
    stack = Stack(list(bags), n_out)
    fit_meta(stack, Z, yc, sampling_probs(yc, wc, cfg.class_balance), cfg.seed)
    with torch.no_grad():
        oof_proba = torch.softmax(stack.meta(Z), dim=1).numpy()  # as Stack.forward does
    first = Stack([members[k][0] for k in kinds], n_out)
    first.meta = stack.meta
    return CrossFitted(stack, {"kind": "stack", "n_out": n_out, "bases": bag_configs},
                       oof_proba, first.eval())


def best_epoch(history: list[dict[str, float]]) -> int:
    """The epoch whose weights :func:`~deepwatch.train.loop.fit` kept (the first to reach the
    best validation loss, by its own rule), counted from 1."""
    best, chosen = float("inf"), 1
    for h in history:
        if h["val_loss"] < best - 1e-6:
            best, chosen = h["val_loss"], int(h["epoch"])
    return chosen


def chosen_epochs(history: list[dict[str, Any]], kind: str) -> int:
    """The epochs early stopping chose for the ``kind`` networks trained so far (their median
    over cross-fitted members), at least 1."""
    picks = [best_epoch(h["epochs"]) for h in history
             if h.get("model") == kind and h.get("epochs") and not h.get("refit")]
    if not picks:
        raise ValueError(f"no early-stopping history for {kind!r}")
    return max(1, int(round(float(np.median(picks)))))


def refit(kind: str, first: nn.Module, X: np.ndarray, y: np.ndarray, w: np.ndarray,
          n_out: int, cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any], dict[str, int]]:
    """``train --refit``: train ``kind``'s networks again, once each, on all the labelled
    rows ``(X, y, w)``, each for the epochs its early stopping chose in the first pass, with
    that pass's seeds. A stack keeps the meta-learner fitted on the first pass's held-out
    predictions (as scikit-learn's ``StackingClassifier`` refits its base estimators on all
    the data and fits the final estimator on cross-validated predictions). Returns the network,
    its config and the epochs of each kind.
    """
    kinds = ("mlp", "resnet", "snn") if kind == "stack" else (kind,)
    nets, configs, epochs = [], [], {}
    empty_X, empty_y = X[:0], y[:0]
    for i, base_kind in enumerate(kinds):
        epochs[base_kind] = chosen_epochs(cfg.history, base_kind)
        seed = cfg.seed + i if kind == "stack" else cfg.seed
        lr = cfg.lr if cfg.given("lr") else DEFAULT_LR[base_kind]
        run = cfg.with_(seed=seed, lr=lr, fixed_epochs=epochs[base_kind],
                        label=f"{base_kind:>6} refit")
        config = network_config(base_kind, X.shape[1], n_out)
        seed_everything(seed)
        net = fit(build_network(config), cross_entropy, X, y, w, empty_X, empty_y, w[:0], run)
        entry: dict[str, Any] = {"model": base_kind, "refit": True, "epochs": run.history}
        cfg.history.append(entry)
        nets.append(net)
        configs.append(config)
    if kind != "stack":
        return nets[0], configs[0], epochs
    assert isinstance(first, Stack)
    stack = Stack(nets, n_out)
    stack.meta.load_state_dict(first.meta.state_dict())
    return stack.eval(), {"kind": "stack", "n_out": n_out, "bases": configs}, epochs


def proba_module(net: nn.Module) -> nn.Module:
    return ProbaHead(net).eval()
