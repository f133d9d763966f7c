"""The Python API in one place: ``from deepwatch.api import train, evaluate, Detector``.

Each command's work is one function here: ``train``, ``evaluate``, ``score_files``
(``score``), ``write_report`` (``report``: the page of what ``evaluate`` returns), ``ingest``,
``simulate``, ``fetch`` (``datasets fetch``).

The functions live in their modules (``deepwatch.train.api.train`` and so on); this module only
names them, and loads each module on first use, so importing it costs nothing until a name is
touched (``import deepwatch.api`` does not load torch or onnxruntime).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "train": "deepwatch.train.api",
    "evaluate": "deepwatch.evaluate.run",
    "Detector": "deepwatch.models.detector",
    "score_files": "deepwatch.scoring",
    "ingest": "deepwatch.web_cli",
    "write_report": "deepwatch.viz.report",
    "get_format": "deepwatch.formats",
    "read_inputs": "deepwatch.sources.files",
    "read_lake": "deepwatch.lake",
    "iter_lake": "deepwatch.lake",
    "lake_days": "deepwatch.lake",
    "simulate": "deepwatch.simulate",
    "fetch": "deepwatch.datasets",
    "Featurizer": "deepwatch.features",
    "register_deriver": "deepwatch.features",
    "DeepwatchError": "deepwatch.errors",
    "UsageError": "deepwatch.errors",
    "InputError": "deepwatch.errors",
    "OutputError": "deepwatch.errors",
    "FormatError": "deepwatch.errors",
    "BundleError": "deepwatch.errors",
    "DataError": "deepwatch.errors",
}

__all__ = [
    "BundleError",
    "DataError",
    "DeepwatchError",
    "Detector",
    "Featurizer",
    "FormatError",
    "InputError",
    "OutputError",
    "UsageError",
    "evaluate",
    "fetch",
    "get_format",
    "ingest",
    "iter_lake",
    "lake_days",
    "read_inputs",
    "read_lake",
    "register_deriver",
    "score_files",
    "simulate",
    "train",
    "write_report",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from .datasets import fetch
    from .errors import (
        BundleError,
        DataError,
        DeepwatchError,
        FormatError,
        InputError,
        OutputError,
        UsageError,
    )
    from .evaluate.run import evaluate
    from .features import Featurizer, register_deriver
    from .formats import get_format
    from .lake import iter_lake, lake_days, read_lake
    from .models.detector import Detector
    from .scoring import score_files
    from .simulate import simulate
    from .sources.files import read_inputs
    from .train.api import train
    from .viz.report import write_report
    from .web_cli import ingest


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'deepwatch.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # (looked up once)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
