"""Derived features: named functions that add columns to a table before it is vectorised.

The featurizer stores only a deriver's *name* and JSON parameters, so a saved featurizer never
carries code. A deriver may keep state across batches (per-client windows in a stream).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

#: A deriver takes (table, params, state) and returns the table with columns added.
Deriver = Callable[[pa.Table, dict[str, Any], dict[str, Any]], pa.Table]

_DERIVERS: dict[str, str | Deriver] = {
    "access_v1": "deepwatch.features.web:derive_access",
}

#: The parsed columns each deriver reads: a table lacking one is refused with the column
#: named (the deriver itself would stop at the first with whatever error its library raises).
_READS: dict[str, tuple[str, ...]] = {
    "access_v1": ("url", "request", "method", "path", "query", "status", "referer", "protocol",
                  "user_agent", "client_ip", "bytes", "user", "timestamp"),
}


def register_deriver(name: str, fn: Deriver, reads: Sequence[str] = ()) -> None:
    """Make ``fn`` the deriver ``name`` of featurizer specs. ``reads``: the columns it reads,
    so that records without one get an error naming it."""
    if isinstance(reads, str):
        raise TypeError("reads is a sequence of column names, not one string")
    _DERIVERS[name] = fn
    _READS[name] = tuple(reads)


def deriver_reads(name: str) -> tuple[str, ...]:
    """The columns deriver ``name`` declared it reads (none known: empty)."""
    return _READS.get(name, ())


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
