"""Structured logs: one JSON object per line on stderr, with the fields a record was given in
``extra`` (``event``, counts, partitions...)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "log.level": record.levelname.lower(),
            "log.logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["error.stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup(level: str = "info", logger: str = "deepwatch") -> logging.Logger:
    """Send ``logger``'s records to stderr as JSON lines (once, however often it is called)."""
    log = logging.getLogger(logger)
    numeric = logging.getLevelName(level.upper())
    log.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    if not any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
    log.propagate = False
    return log
