"""Inference backends: ONNX Runtime (TensorRT, CUDA, then CPU providers) with torch as fallback.

Both take a float32 feature matrix and return the model's named outputs as numpy arrays.

Thread settings: ONNX Runtime gets one intra-op thread per core this process may run on (its
CPU affinity, capped by its container's cgroup CPU quota: ``_cpus.usable_cores``;
``DEEPWATCH_THREADS`` overrides it) and its worker threads do not spin while idle. Spinning buys
a few microseconds on an idle machine but, when the cores are shared with the web server, the
Kafka client or other processes, the spinning threads steal the very cores the request needs:
in one run on a busy 2-core machine, the median 1,000-row batch took 8.8 ms with spinning and
2.0 ms without. A separate single-threaded session for tiny batches was measured too and not
kept: one row costs about 20 microseconds either way, far below the rest of a request.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ._cpus import usable_cores
from .errors import BundleError, UsageError, first_line

PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
#: Rows per ``session.run`` call: bounds the memory of one call on huge inputs.
CHUNK_ROWS = 65536
#: Rows per call on ONNX Runtime's CPU provider: a stack's layers are narrow (a few hundred
#: units), so a call's activations stay in the caches only for a few thousand rows. Measured on
#: 2 cores: 77,000 rows through the KDD stack took 0.125 s in calls of 4,096-8,192 rows,
#: 0.16-0.18 s in calls of 30,000 rows or more (GPU providers keep :data:`CHUNK_ROWS`).
CPU_CHUNK_ROWS = 8192


class Backend(Protocol):
    name: str
    outputs: list[str]

    def run(self, X: np.ndarray) -> dict[str, np.ndarray]: ...


def threads_from_env(name: str, zero_is_default: bool = False) -> int | None:
    """The thread count the environment variable ``name`` gives; None where it is unset (or 0,
    with ``zero_is_default``). Anything but a whole number from 1 (0 too, where allowed) is a
    one-line UsageError, not a traceback once the work has begun."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        threads = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {raw!r}") from None
    if threads < (0 if zero_is_default else 1):
        rule = "1 or more (0: one per core)" if zero_is_default else "at least 1"
        raise UsageError(f"{name} must be {rule}, not {threads}")
    return threads or None


def default_threads() -> int:
    """ONNX Runtime's intra-op threads: ``DEEPWATCH_THREADS``, else the usable cores."""
    return threads_from_env("DEEPWATCH_THREADS") or usable_cores()


def choose_providers(available: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    """The providers to try, best first: ``wanted`` (default: TensorRT, CUDA, CPU) filtered to
    those this onnxruntime build has. CPU is always kept last as the floor."""
    order = list(wanted) if wanted else list(PROVIDER_PREFERENCE)
    chosen = [p for p in order if p in available]
    if "CPUExecutionProvider" in available and "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _provider_options(provider: str) -> dict[str, Any]:
    if provider == "TensorrtExecutionProvider":
        # Full precision keeps GPU scores equal to the CPU's within the parity tolerance; the
        # engine cache saves the minutes TensorRT spends building an engine on every start.
        cache = Path(tempfile.gettempdir()) / "deepwatch-trt-cache"
        return {"trt_fp16_enable": False, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache)}
    if provider == "CUDAExecutionProvider":
        return {"device_id": 0}
    return {}


class OnnxBackend:
    """An ONNX Runtime session on the best provider that actually starts.

    A provider can be listed by the build yet fail to start (a GPU build on a machine without
    the CUDA or TensorRT libraries): the next one is tried, and the reasons are kept in
    ``skipped``.
    """

    def __init__(self, model_path: str | Path | bytes, outputs: list[str],
                 providers: list[str] | None = None, threads: int | None = None):
        """``model_path``: the ONNX file, or its bytes (what a bundle's loader passes: the
        very bytes it checked against the manifest)."""
        import onnxruntime as ort

        from ._onnx_scan import MalformedModel, refusal

        where = "the ONNX model" if isinstance(model_path, bytes) else str(model_path)
        try:
            model = model_path if isinstance(model_path, bytes) else Path(model_path).read_bytes()
        except OSError as exc:
            raise BundleError(f"cannot read {where}: {exc.strerror or exc}") from None
        try:
            why = refusal(model)
        except MalformedModel as exc:
            raise BundleError(f"cannot load {where}: not a valid ONNX model ({exc})") from None
        if why is not None:
            # ONNX Runtime would read those files (external data relative to the working
            # directory, an EPContext's engine file where its provider is there)
            raise BundleError(f"refusing {where}: {why}")
        available = ort.get_available_providers()
        chain = choose_providers(available, providers)
        if not chain:
            raise UsageError(f"none of the providers {providers} is available ({available})")
        self.threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 4  # fatal only: an error is raised, and said in one line
        self.skipped: dict[str, str] = {}
        session = None
        for i, provider in enumerate(chain):
            rest = chain[i:]
            try:
                session = ort.InferenceSession(
                    model, sess_options=opts, providers=rest,
                    provider_options=[_provider_options(p) for p in rest])
                break
            except Exception as exc:  # onnxruntime raises its own untyped errors here
                if provider == "CPUExecutionProvider":
                    reason = first_line(exc)
                    raise BundleError(f"ONNX Runtime cannot load {where}: {reason}") from None
                self.skipped[provider] = str(exc).splitlines()[0][:200] if str(exc) else "failed"
        assert session is not None
        self.session = session
        self.providers: list[str] = self.session.get_providers()
        self.outputs = outputs
        self.input_name = self.session.get_inputs()[0].name
        self.name = "onnxruntime:" + self.providers[0].removesuffix("ExecutionProvider")
        self.chunk_rows = CPU_CHUNK_ROWS if self.providers[0] == "CPUExecutionProvider" \
            else CHUNK_ROWS

    def run(self, X: np.ndarray, batch: int | None = None) -> dict[str, np.ndarray]:
        batch = batch or self.chunk_rows
        X = np.ascontiguousarray(X, dtype=np.float32)
        if len(X) <= batch:  # the common case: one call, no copies
            got = self.session.run(self.outputs, {self.input_name: X})
            return dict(zip(self.outputs, got, strict=True))
        parts = [self.session.run(self.outputs, {self.input_name: X[i : i + batch]})
                 for i in range(0, len(X), batch)]
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.outputs)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "providers": self.providers, "threads": self.threads,
                "skipped": self.skipped}


def torch_device(name: str) -> Any:
    """The torch device ``name`` (``auto``: CUDA where there is one, else the CPU); a
    UsageError for a name torch does not know or a CUDA device this machine lacks, which
    failed deep in torch and read as a damaged bundle."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for but no CUDA device is available")
    return device


class TorchBackend:
    """The fallback: the same export module, run by torch (CPU or CUDA)."""

    def __init__(self, network: dict[str, Any], weights_path: str | Path | bytes,
                 outputs: list[str], device: str = "cpu"):
        """``weights_path``: the safetensors file, or its bytes. The network is first built
        without memory (on the meta device) and its shapes compared with the weights', so a
        config that does not match them is refused before anything is allocated."""
        import torch
        from safetensors.torch import load

        from .models.export import build_export_module

        self.device = torch_device(device)
        data = (weights_path if isinstance(weights_path, bytes)
                else Path(weights_path).read_bytes())
        try:
            state = load(data)
        except Exception as exc:  # safetensors raises its own error types
            reason = first_line(exc)
            raise BundleError(f"the weights are not a valid safetensors file: {reason}") from None
        for key, tensor in state.items():  # a NaN or inf weight: NaN scores, every one 'normal'
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise BundleError(f"the weights hold NaN or infinite values ({key}); refusing "
                                  "them")
        try:
            with torch.device("meta"):
                skeleton = build_export_module(network)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise BundleError(f"the bundle's network config cannot be built: {exc!r}") from None
        want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            wrong = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
            name = wrong[0]
            raise BundleError(
                f"the network in the manifest does not match the weights ({name}: the config "
                f"makes {want.get(name, 'nothing')}, the weights hold {got.get(name, 'nothing')})")
        self.module = build_export_module(network)
        self.module.load_state_dict(state)
        self.module.to(self.device).eval()
        self.outputs = outputs
        self.name = f"torch:{self.device.type}"

    def run(self, X: np.ndarray, batch: int = CHUNK_ROWS) -> dict[str, np.ndarray]:
        import torch

        X = np.ascontiguousarray(X, dtype=np.float32)
        parts = []
        with torch.inference_mode():
            for i in range(0, max(len(X), 1), batch):
                out = self.module(torch.as_tensor(X[i : i + batch], device=self.device))
                if not isinstance(out, tuple | list):
                    out = (out,)
                parts.append([o.float().cpu().numpy() for o in out])
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.outputs)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "providers": [], "threads": None, "skipped": {}}
