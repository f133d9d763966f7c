"""Derived features: named functions that add columns to a table before it is vectorised.

The featurizer stores only a deriver's *name* and JSON parameters, so a saved featurizer never
carries code. A deriver may keep state across batches (per-client windows in a stream).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pyarrow as pa

#: A deriver takes (table, params, state) and returns the table with columns added.
Deriver = Callable[[pa.Table, dict[str, Any], dict[str, Any]], pa.Table]

_DERIVERS: dict[str, str | Deriver] = {
    "access_v1": "deepwatch.features.web:derive_access",
}


def register_deriver(name: str, fn: Deriver) -> None:
    _DERIVERS[name] = fn


def get_deriver(name: str) -> Deriver:
    try:
        target = _DERIVERS[name]
    except KeyError:
        raise KeyError(f"unknown feature deriver {name!r}") from None
    if isinstance(target, str):
        module, attr = target.split(":")
        target = getattr(importlib.import_module(module), attr)
        _DERIVERS[name] = target
    return target
