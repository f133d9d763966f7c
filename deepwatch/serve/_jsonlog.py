"""Structured logs: one JSON object per line on stderr, with the fields a record was given in
``extra`` (``event``, counts, partitions...)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Seen:
    """One line of :class:`Repeats`: when it was last logged, how often it came since, and
    the latest of it (what its summary says)."""

    logged: float
    level: int
    message: str
    extra: dict[str, Any]
    logger: logging.Logger
    failing: bool
    since: int = 0


class Repeats:
    """Rate-limits repeated log lines: a line is logged the first time its ``key`` is seen, then
    at most once every ``interval`` seconds, saying how many times it came meanwhile ("repeated
    N times in the last 30 s"); what was not logged yet is logged by :meth:`flush`.

    Lines said with ``failing=True`` (a client error) put the source in a failing state once one
    is logged; :meth:`ok` (the next evidence that it works) then logs the recovery once, with
    how many such errors came since the failing state began. The errors keep their own interval
    across a recovery: a source that fails and works by turns logs at most one error line and one
    recovery per interval.
    """

    def __init__(self, interval: float, what: str, fields: dict[str, Any] | None = None,
                 recovered_event: str = "recovered",
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.what = what
        self.recovered_event = recovered_event
        self.fields = dict(fields or {})
        self._seen: dict[Any, _Seen] = {}
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._failures = 0

    def say(self, logger: logging.Logger, key: Any, level: int, message: str,
            extra: dict[str, Any], failing: bool = False) -> None:
        extra = {**self.fields, **extra}
        now = self.clock()
        line: tuple[int, str, dict[str, Any]] | None = None
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = _Seen(now, level, message, extra, logger, failing)
                line, count = (level, message, extra), 1
            else:
                seen.since += 1
                seen.level, seen.message, seen.extra, seen.logger = level, message, extra, logger
                if now - seen.logged >= self.interval:
                    count = seen.since
                    line = self._summary(seen, now)
            if failing:
                if self._failing_since is not None:
                    self._failures += 1
                elif line is not None:
                    self._failing_since, self._failures = now, count
        if line is not None:
            logger.log(line[0], line[1], extra=line[2])

    @staticmethod
    def _summary(seen: _Seen, now: float) -> tuple[int, str, dict[str, Any]]:
        """The line saying ``seen``'s repeats (and ``seen`` counted afresh from ``now``)."""
        n, seconds = seen.since, max(1, round(now - seen.logged))
        seen.logged, seen.since = now, 0
        times = "once" if n == 1 else f"{n} times"
        return (seen.level, f"{seen.message} (repeated {times} in the last {seconds} s)",
                {**seen.extra, "repeated": n, "repeated_seconds": seconds})

    def ok(self, logger: logging.Logger) -> None:
        """Logs, once, that the source works again after a client error was logged."""
        if self._failing_since is None:  # the usual case: costs one comparison
            return
        with self._lock:
            if self._failing_since is None:
                return
            seconds = round(self.clock() - self._failing_since, 1)
            errors, self._failing_since = self._failures, None
            for seen in self._seen.values():
                if seen.failing:  # counted in this line: not said again
                    seen.since = 0
        logger.info(f"{self.what} working again after {errors} client error"
                    f"{'' if errors == 1 else 's'} in {seconds:g} s", extra={
                        **self.fields, "event": self.recovered_event, "errors": errors,
                        "seconds": seconds})

    def flush(self) -> None:
        """Logs the repeats not logged yet (at close: none is lost)."""
        now = self.clock()
        with self._lock:
            lines = [(seen.logger, self._summary(seen, now)) for seen in self._seen.values()
                     if seen.since]
        for logger, (level, message, extra) in lines:
            logger.log(level, message, extra=extra)
