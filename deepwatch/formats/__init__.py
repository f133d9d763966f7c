"""Input formats by name. Each turns raw text into Arrow batches plus counted rejects."""

from __future__ import annotations

import importlib

from ..errors import FormatError
from ._base import REJECT_SCHEMA, Format, ParseResult, split_lines

#: name -> "module:Class"; modules load only when their format is asked for.
_REGISTRY: dict[str, str] = {
    "kdd": "deepwatch.formats.kdd:KDD",
    "nslkdd": "deepwatch.formats.kdd:NSLKDD",
    "access": "deepwatch.formats.access:Access",
    "zeek": "deepwatch.formats.zeek:Zeek",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_format(name: str) -> Format:
    """The format called ``name``; a clear error names the known ones otherwise."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise FormatError(
            f"unknown format {name!r}; known formats: {', '.join(available())}"
        ) from None
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise FormatError(f"format {name!r} is not available in this build: {exc}") from None
    fmt: Format = getattr(mod, cls)()
    return fmt


__all__ = ["REJECT_SCHEMA", "Format", "ParseResult", "available", "get_format", "split_lines"]
