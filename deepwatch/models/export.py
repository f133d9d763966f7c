"""The exported form of a model: one torch module whose named outputs the Detector consumes.

The same module is exported to ONNX and used by the torch fallback, so both agree.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from .nets import ProbaHead, build_network

_HEADS: dict[str, Any] = {}


def register_head(name: str, fn: Any) -> None:
    """``fn(network_config) -> nn.Module`` builds the exported module of a model kind."""
    _HEADS[name] = fn


def build_export_module(network: dict[str, Any]) -> nn.Module:
    head = network.get("head", "proba")
    if head == "proba":
        return ProbaHead(build_network(network)).eval()
    if head not in _HEADS:
        from . import autoencoder, hybrid  # noqa: F401 - register their heads

    try:
        return _HEADS[head](network).eval()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown model head {head!r}") from None


def to_onnx(module: nn.Module, d_in: int, outputs: list[str]) -> bytes:
    module = module.eval()
    example = torch.zeros(2, d_in)
    buf = io.BytesIO()
    dynamic = {"features": {0: "n"}, **{o: {0: "n"} for o in outputs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), buf,  # type: ignore[arg-type]
            input_names=["features"], output_names=outputs,
            dynamic_axes=dynamic, opset_version=17, dynamo=False,
        )
    return buf.getvalue()
