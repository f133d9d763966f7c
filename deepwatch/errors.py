"""The exception tree. Every error a user can cause is a `DeepwatchError` with one clear sentence.

Exit codes used by the CLI: 2 for a usage or input mistake, 3 for a bundle problem, 4 for a data
problem, 1 for anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class DeepwatchError(Exception):
    """Base of every error deepwatch raises on purpose."""

    exit_code = 1


class UsageError(DeepwatchError):
    """A command was called with arguments that cannot work."""

    exit_code = 2


class InputError(DeepwatchError):
    """An input file is missing, unreadable or of the wrong kind."""

    exit_code = 2


class OutputError(DeepwatchError):
    """An output file or directory cannot be written (a directory in the way, no permission,
    a full disk)."""

    exit_code = 2


class FormatError(DeepwatchError):
    """An unknown format name or a format that cannot be used the way it was asked."""

    exit_code = 2


class BundleError(DeepwatchError):
    """A model bundle is missing, damaged, tampered with or from an incompatible version."""

    exit_code = 3


class DataError(DeepwatchError):
    """The data cannot train or evaluate a model (no rows, one class only, no labels...)."""

    exit_code = 4


class DistributedError(DeepwatchError):
    """A data-parallel training process lost contact with the others (one of them died)."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300, default: str | None = None) -> str:
    """The first line of an exception's message, for a one-line error (at most ``limit``
    characters); ``default`` (else the exception's type name) when it has no message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if default is None else default
    return text.splitlines()[0][:limit]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), or SIGTERM where a command takes it as one (``terminated``; see
    :func:`sigterm_stops_cleanly`), once a run has said what it kept: ``detail`` is that, for the
    one-line report (``interrupted: DETAIL``, ``terminated: DETAIL``)."""

    def __init__(self, detail: str | None = None, terminated: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.terminated = terminated


@contextmanager
def sigterm_stops_cleanly() -> Iterator[None]:
    """For its length, SIGTERM (a job scheduler's stop, ``timeout``, ``kill``) stops the run as
    Ctrl-C does, through the clean-up of what it was writing (an output closed whole and said
    to be partial, a lake rolled back, a temporary file or directory removed), instead of
    ending the process mid-write; the handler before is put back after. Not where SIGTERM is
    ignored, outside the main thread, nor in a rank of a data-parallel job (one waiting on its
    peers could not run the handler; its launcher stops it with SIGTERM and says what
    happened). A handler that only saves state and exits (coverage's, under ``make test``)
    is replaced for the length: the run then ends normally, and exit handlers still run."""
    import os
    import signal
    import threading

    if "WORLD_SIZE" in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN:
        yield
        return

    def terminated(_signum: int, _frame: object) -> None:
        raise Interrupted(terminated=True)

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
