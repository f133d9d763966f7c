"""Inference backends: ONNX Runtime (TensorRT, CUDA, then CPU providers) with torch as fallback.

Both take a float32 feature matrix and return the model's named outputs as numpy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import UsageError

PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


class Backend(Protocol):
    name: str
    outputs: list[str]

    def run(self, X: np.ndarray) -> dict[str, np.ndarray]: ...


class OnnxBackend:
    def __init__(self, model_path: str | Path, outputs: list[str],
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        chosen = [p for p in (providers or PROVIDER_PREFERENCE) if p in available]
        if not chosen:
            raise UsageError(f"none of the providers {providers} is available ({available})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=chosen)
        self.providers = self.session.get_providers()
        self.outputs = outputs
        self.name = "onnxruntime:" + self.providers[0].removesuffix("ExecutionProvider")

    def run(self, X: np.ndarray, batch: int = 65536) -> dict[str, np.ndarray]:
        X = np.ascontiguousarray(X, dtype=np.float32)
        parts: list[list[np.ndarray]] = []
        for i in range(0, max(len(X), 1), batch):
            parts.append(self.session.run(self.outputs, {"features": X[i : i + batch]}))
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.outputs)}


class TorchBackend:
    def __init__(self, network: dict[str, Any], weights_path: str | Path, outputs: list[str],
                 device: str = "cpu"):
        import torch
        from safetensors.torch import load_file

        from .models.export import build_export_module

        self.module = build_export_module(network)
        self.module.load_state_dict(load_file(str(weights_path)))
        self.device = torch.device(device)
        self.module.to(self.device).eval()
        self.outputs = outputs
        self.name = f"torch:{self.device.type}"

    def run(self, X: np.ndarray, batch: int = 65536) -> dict[str, np.ndarray]:
        import torch

        parts = []
        with torch.no_grad():
            for i in range(0, max(len(X), 1), batch):
                out = self.module(torch.as_tensor(X[i : i + batch], device=self.device))
                if not isinstance(out, tuple | list):
                    out = (out,)
                parts.append([o.float().cpu().numpy() for o in out])
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.outputs)}
