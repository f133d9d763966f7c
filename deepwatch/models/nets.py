"""Torch networks. Each is built from a JSON config by :func:`build_network`, so a bundle's
weights (safetensors) plus its manifest fully rebuild the model without executing stored code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """A modern feed-forward net: Linear -> BatchNorm -> SiLU -> Dropout blocks."""

    def __init__(self, d_in: int, n_out: int, hidden: int = 128, depth: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.SiLU(), nn.Dropout(dropout)]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _ResBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * 2)
        self.fc2 = nn.Linear(width * 2, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class ResNet(nn.Module):
    """A residual MLP: pre-norm blocks with identity skips (Gorishniy et al., 2021 style)."""

    def __init__(self, d_in: int, n_out: int, hidden: int = 96, depth: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.stem = nn.Linear(d_in, hidden)
        self.blocks = nn.Sequential(*[_ResBlock(hidden, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.blocks(self.stem(x)))))


class SNN(nn.Module):
    """A self-normalising net: SELU, alpha-dropout, LeCun-normal initialisation."""

    def __init__(self, d_in: int, n_out: int, hidden: int = 128, depth: int = 3,
                 dropout: float = 0.05):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            lin = nn.Linear(d, hidden)
            nn.init.normal_(lin.weight, 0.0, 1.0 / math.sqrt(d))
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.SELU(), nn.AlphaDropout(dropout)]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, n_out)
        nn.init.normal_(self.head.weight, 0.0, 1.0 / math.sqrt(d))
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Stack(nn.Module):
    """Stacking: a linear meta-learner over the base learners' log-probabilities."""

    def __init__(self, bases: list[nn.Module], n_out: int):
        super().__init__()
        self.bases = nn.ModuleList(bases)
        self.meta = nn.Linear(len(bases) * n_out, n_out)

    def base_logprobs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.log_softmax(b(x), dim=1) for b in self.bases], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.meta(self.base_logprobs(x))


class Bag(nn.Module):
    """Members of one kind trained on different folds of the data (``train --folds``): the
    log of their mean class probabilities, a drop-in for one network's logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


SUPERVISED_KINDS = ("mlp", "resnet", "snn")
_CLASSES: dict[str, type[nn.Module]] = {"mlp": MLP, "resnet": ResNet, "snn": SNN}


def build_network(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its config (``kind``, ``d_in``, ``n_out``, hyper-parameters)."""
    kind = config["kind"]
    if kind == "stack":
        bases = [build_network(c) for c in config["bases"]]
        return Stack(bases, config["n_out"])
    if kind == "bag":
        return Bag([build_network(c) for c in config["members"]])
    if kind in _CLASSES:
        hp = {k: v for k, v in config.items() if k not in ("kind", "d_in", "n_out", "head")}
        return _CLASSES[kind](config["d_in"], config["n_out"], **hp)
    from . import autoencoder  # noqa: F401 - registers autoencoder kinds

    builder = _EXTRA_BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"unknown network kind {kind!r}")
    return builder(config)


_EXTRA_BUILDERS: dict[str, Any] = {}


def register_builder(kind: str, fn: Any) -> None:
    _EXTRA_BUILDERS[kind] = fn


class ProbaHead(nn.Module):
    """What gets exported for a classifier: class probabilities, a named ONNX output."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)
