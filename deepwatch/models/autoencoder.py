"""Autoencoder networks and the exported anomaly / hybrid heads.

The exported module of an autoencoder bundle returns three named outputs, all computed inside
the graph so ONNX Runtime and torch agree:

``anomaly`` (n,)
    ``log1p`` of the mean of the robustly weighted per-feature squared reconstruction errors;
    higher = more anomalous. It depends on the record alone, so scores are comparable across
    batches.
``errors`` (n, d)
    each feature's share of the record's weighted squared error (rows sum to 1): what
    explanations rank.
``latent`` (n, k)
    the bottleneck code (what campaigns are clustered on).

The hybrid head adds the stacked classifiers' ``proba`` (n, labels) in front of these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import export, nets

ANOMALY_OUTPUTS = ["anomaly", "errors", "latent"]
HYBRID_OUTPUTS = ["proba", *ANOMALY_OUTPUTS]


def _tower(d_in: int, widths: list[int], d_out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for w in widths:
        layers += [nn.Linear(d, w), nn.LayerNorm(w), nn.SiLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = w
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class AutoEncoder(nn.Module):
    """A dense autoencoder: encoder tower -> linear bottleneck -> mirrored decoder tower.

    ``hidden`` is the width of the first encoder layer; each further layer halves it (but never
    below twice the bottleneck). The decoder mirrors the encoder.
    """

    def __init__(self, d_in: int, latent: int = 8, hidden: int = 64, depth: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        widths = [max(hidden // (2**i), 2 * latent) for i in range(depth)]
        self.encoder = _tower(d_in, widths, latent, dropout)
        self.decoder = _tower(latent, widths[::-1], d_in, dropout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # type: ignore[no-any-return]


def build_autoencoder(config: dict[str, Any]) -> AutoEncoder:
    hp = {k: config[k] for k in ("latent", "hidden", "depth", "dropout") if k in config}
    return AutoEncoder(config["d_in"], **hp)


class AnomalyHead(nn.Module):
    """The exported form of an autoencoder: (anomaly, errors, latent).

    ``scale`` holds one robust error scale per feature, fitted on held-out benign records, so
    that a feature the network always reconstructs badly cannot drown out the others, and a
    feature it reconstructs perfectly does not make every tiny deviation an alert.
    """

    scale: torch.Tensor

    def __init__(self, ae: AutoEncoder, d_in: int):
        super().__init__()
        self.ae = ae
        self.register_buffer("scale", torch.ones(d_in))

    def set_scale(self, scale: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.ae.encode(x)
        recon = self.ae.decoder(z)
        errors = (recon - x) ** 2 / self.scale
        total = errors.sum(dim=1, keepdim=True)
        share = errors / torch.clamp(total, min=1e-12)
        # log1p keeps the score in a range where float32 ONNX and torch agree to 1e-4 or better
        return torch.log1p(total.squeeze(1) / errors.shape[1]), share, z


class HybridHead(nn.Module):
    """The exported form of a hybrid: the classifiers' probabilities plus the anomaly head."""

    def __init__(self, classifier: nn.Module, anomaly: AnomalyHead):
        super().__init__()
        self.classifier = classifier
        self.anomaly = anomaly

    def forward(self, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        proba = torch.softmax(self.classifier(x), dim=1)
        score, errors, z = self.anomaly(x)
        return proba, score, errors, z


def anomaly_head(network: dict[str, Any]) -> AnomalyHead:
    return AnomalyHead(build_autoencoder(network), network["d_in"])


def hybrid_head(network: dict[str, Any]) -> HybridHead:
    classifier = nets.build_network(network["classifier"])
    return HybridHead(classifier, anomaly_head(network["autoencoder"]))


nets.register_builder("autoencoder", build_autoencoder)
export.register_head("anomaly", anomaly_head)
export.register_head("hybrid", hybrid_head)
