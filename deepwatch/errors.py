"""The exception tree. Every error a user can cause is a `DeepwatchError` with one clear sentence.

Exit codes used by the CLI: 2 for a usage or input mistake, 3 for a bundle problem, 4 for a data
problem, 1 for anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self


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


def check_flags(**flags: Any) -> None:
    """A UsageError for a flag argument that is not ``True`` or ``False`` (numpy's bools are
    taken; ``None`` is not, except where the default is None and the caller leaves it out of
    ``flags``): ``alerts_only="no"`` was taken as true, and only the alerts were written."""
    for name, value in flags.items():
        if not isinstance(value, bool) and not (type(value).__module__ == "numpy"
                                                and type(value).__name__ in ("bool_", "bool")):
            raise UsageError(f"{name} must be True or False, not {value!r:.60}")


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


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM taken by a run for the length of a ``with`` block: what the
    run's own handlers share. On the main thread only (elsewhere none can be set), each signal
    :meth:`_takes` accepts gets :meth:`_on_stop`, the subclass's policy (raise, hold, cancel,
    set an event); the handlers found are put back after. A stop after the first that the
    policy holds is answered once, by :meth:`_say_held`."""

    def __init__(self) -> None:
        self._before: dict[int, Any] = {}  # the handlers found, for the signals taken
        self.told = False  # a stop held was answered: the ones after it say nothing

    def _takes(self, signum: int, handler: Any) -> bool:
        """Whether ``signum``, with ``handler`` in, is taken (not where it is ignored)."""
        import signal

        return handler is not signal.SIG_IGN

    def _begin(self) -> bool:
        """On the main thread, before the handlers are put in; False: none are."""
        return True

    def _on_stop(self, signum: int, frame: Any) -> None:
        raise NotImplementedError

    def _take(self) -> bool:
        """Put the handler in; False: not on this thread, or not begun (:meth:`_begin`)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread() or not self._begin():
            return False
        for s in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(s)
            if self._takes(s, handler):
                self._before[s] = handler
                signal.signal(s, self._on_stop)
        return True

    def _restore(self) -> dict[int, Any]:
        """Put back the handlers found; those, by signal."""
        import signal

        before, self._before = self._before, {}
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        return before

    def _say_held(self, line: str, reported: bool = False) -> None:
        """Say ``line`` of a stop held, once (a held key repeats Ctrl-C many times a second);
        ``reported``: as the command's last line about the stop (:func:`stop_reported`).
        os.write, not print, which could re-enter a write to stderr under way."""
        import os

        if not self.told:
            self.told = True
            os.write(2, line.encode(errors="backslashreplace"))
            if reported:
                stop_reported()

    def __enter__(self) -> Self:
        self._take()
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


class _CleanStops(StopSignals):
    """The stop of the run under way (see :func:`sigterm_stops_cleanly`): the first Ctrl-C or
    SIGTERM stops it; the ones after are held while what was kept is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.begun = False  # the first signal came
        self.to_exit = False  # the process is deepwatch's own command: hold them until it has ended

    def _takes(self, signum: int, handler: Any) -> bool:
        import signal

        return handler is not signal.SIG_IGN and (
            signum == signal.SIGTERM or handler is signal.default_int_handler)

    def _begin(self) -> bool:
        import os
        import signal

        if "WORLD_SIZE" in os.environ:
            return False
        if self._on_stop in (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)):
            # inside another such block (or after a stop of this process): its state stands
            return False
        keep_ctrl_c_from_polars()  # (before the handlers: they replace its hook)
        self._before = {}
        self.begun = self.told = False
        return True

    def _on_stop(self, signum: int, _frame: Any) -> None:
        import signal

        if not self.begun:
            self.begun = True
            raise Interrupted(terminated=signum == signal.SIGTERM)
        self._say_held("already stopping: the clean-up under way is finished first\n")

    def _end(self) -> None:
        if not (self.begun and self.to_exit):
            self._restore()
            self.begun = self.told = False


_stop = _CleanStops()


def stop_reported() -> None:
    """The command has printed its last line about the stop: stops held after it say nothing
    more (a line after the last one would read as the outcome)."""
    _stop.told = True


def hold_stops_to_exit() -> None:
    """Say that this process is deepwatch's own command (``deepwatch ...``, not a library
    call): once a run has begun to stop, further Ctrl-C and SIGTERM are held until the process
    ends, through the last line it prints and the exit handlers (a Parquet writer's, logging's),
    where they would print a traceback and make the exit status -2."""
    import atexit

    if not _stop.to_exit:
        _stop.to_exit = True
        atexit.register(_ignore_stops_if_stopping)  # (the first registered runs last)


def _ignore_stops_if_stopping() -> None:
    """At exit, after a stop: the interpreter's finalisation puts the default actions back,
    under which one more Ctrl-C would kill the process (exit status -2, not 130); ignored."""
    import signal

    if _stop.begun:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


def keep_ctrl_c_from_polars() -> None:
    """Import polars, and take SIGINT back from the hook it installs on import.

    polars chains its own Ctrl-C hook to the handler it finds: on Ctrl-C, any polars work under
    way, in any thread, raises KeyboardInterrupt. The output writer's thread then lost the
    batch it was encoding; a REST request in flight, which SIGINT should let finish, answered
    500; a stream's batch in hand was cut. Here the handler Python has for SIGINT is set again,
    which replaces the hook at the C level; handlers set later (uvicorn's) replace it too, so
    callers do this before setting theirs, or after polars was imported under them. polars work
    is then stopped by Python's Ctrl-C as other work is. Main thread only (elsewhere nothing
    can be set); does nothing where SIGINT has no Python handler."""
    import signal
    import threading

    import polars  # noqa: F401

    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


@contextmanager
def sigterm_stops_cleanly() -> Iterator[None]:
    """For its length, SIGTERM (a job scheduler's stop, ``timeout``, ``kill``) stops the run as
    Ctrl-C does, through the clean-up of what it was writing (an output closed whole and said
    to be partial, a lake rolled back, a temporary file or directory removed), instead of
    ending the process mid-write; the handler before is put back after. Not where SIGTERM is
    ignored, outside the main thread, nor in a rank of a data-parallel job (``train --nproc``'s
    ranks take SIGTERM their own way, see ``train.distributed._as_local_rank``, and their
    launcher, which takes it here, speaks for them; torchrun stops its own). A handler that
    only saves state and exits (coverage's, under ``make test``) is replaced for the length:
    the run then ends normally, and exit handlers still run.

    Only the first stop (Ctrl-C or SIGTERM) stops the run. The ones after it are held, with
    one line saying so: a user pressing Ctrl-C again while the output is closed would cut it
    off mid-write (a Parquet file without its footer, a lake half rolled back) and lose the
    line saying what was kept. SIGKILL still ends the process at once."""
    if not _stop._take():  # (a rank, not the main thread, or inside another such block)
        yield
        return
    try:
        yield
    finally:
        _stop._end()
