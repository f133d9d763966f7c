"""Progress on stderr: rich bars on a terminal; plain lines for training's epochs elsewhere.

``DEEPWATCH_PROGRESS=1`` draws the bars whatever stderr is, ``DEEPWATCH_PROGRESS=0`` shows
nothing. Unset, a terminal gets the bars and anything else (a log file, ``nohup``, CI) a line
per network and per epoch of training, so that a long run leaves a trail.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

Mode = Literal["bars", "lines", "off"]


def mode() -> Mode:
    """How progress is shown now: ``bars``, ``lines`` (training only) or ``off``."""
    if (os.environ.get("RANK", "0") not in ("", "0")
            and os.environ.get("WORLD_SIZE", "1") not in ("", "1")):
        return "off"  # one voice per distributed run: rank 0's
    flag = os.environ.get("DEEPWATCH_PROGRESS")
    if flag is not None:
        # (any case, and "off" too: DEEPWATCH_PROGRESS=off or FALSE drew the bars)
        return "off" if flag.strip().lower() in ("0", "false", "no", "off") else "bars"
    return "bars" if sys.stderr.isatty() else "lines"


def enabled() -> bool:
    """Whether progress bars are drawn."""
    return mode() == "bars"


def _stderr_console() -> Any:
    """A rich console on stderr: rich's default is stdout, where ``score --out -`` writes its
    records (a bar or even one blank line there breaks the JSONL)."""
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def byte_progress(what: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    if not enabled():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


class EpochReport:
    """What the training loop says about one network: told of each epoch and of the end, it
    shows nothing (this base), advances a bar, or writes lines."""

    def epoch(self, epoch: int, train_loss: float, val_loss: float | None = None,
              best_epoch: int = 0, best_loss: float = 0.0) -> None:
        """Epoch ``epoch`` (1-based) is over; ``val_loss`` None: no validation (a refit);
        ``best_epoch`` 0: no epoch has improved on the initial weights yet."""

    def stopped(self, last: int, best_epoch: int | None, best_loss: float | None,
                patience: int | None = None) -> None:
        """Training ended after epoch ``last``, keeping ``best_epoch`` (None: the last
        weights); ``patience``: it stopped early, after that many epochs without progress."""


class _Bar(EpochReport):
    def __init__(self, update: Callable[[int, str], None], total: int) -> None:
        self._update, self._total, self._done = update, total, 0

    def epoch(self, epoch: int, train_loss: float, val_loss: float | None = None,
              best_epoch: int = 0, best_loss: float = 0.0) -> None:
        self._done += 1
        self._update(1, f"train loss {train_loss:.5f}" if val_loss is None
                     else f"val loss {val_loss:.5f}")

    def stopped(self, last: int, best_epoch: int | None, best_loss: float | None,
                patience: int | None = None) -> None:
        if patience is not None and best_loss is not None:
            self._update(self._total - self._done, f"early stop, best val loss {best_loss:.5f}")


class _Lines(EpochReport):
    """One line on stderr when a network starts, after each of its epochs and when it ends."""

    def __init__(self, what: str, total: int, detail: str) -> None:
        self._what, self._total = what.strip(), total
        self._t0 = time.perf_counter()
        self._say(f"training, up to {total} epoch{'s' if total != 1 else ''}"
                  + (f" ({detail})" if detail else ""))

    def _say(self, text: str) -> None:
        # stderr looked up now: a redirection made after import (tests, callers) is honoured
        print(f"{self._what}: {text}", file=sys.stderr, flush=True)

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self._t0:.1f}s"

    def epoch(self, epoch: int, train_loss: float, val_loss: float | None = None,
              best_epoch: int = 0, best_loss: float = 0.0) -> None:
        text = f"epoch {epoch}/{self._total}, train loss {train_loss:.5f}"
        if val_loss is not None:
            text += f", val loss {val_loss:.5f} " + (
                f"(best {best_loss:.5f}, epoch {best_epoch})" if best_epoch else "(no best yet)")
        self._say(f"{text}, {self._elapsed()}")

    def stopped(self, last: int, best_epoch: int | None, best_loss: float | None,
                patience: int | None = None) -> None:
        if patience is not None:
            text = (f"stopped early after epoch {last} (no better val loss for {patience} "
                    f"epoch{'s' if patience != 1 else ''})")
        else:
            text = f"done after {last} epoch{'s' if last != 1 else ''}"
        if best_epoch is None:
            text += ", keeping the last weights"
        elif not best_epoch:
            text += ", keeping the initial weights (no epoch gave a finite val loss)"
        else:
            text += f", keeping epoch {best_epoch} (val loss {best_loss:.5f})"
        self._say(f"{text}, {self._elapsed()}")


@contextmanager
def epoch_progress(what: str, total: int, detail: str = "") -> Iterator[EpochReport]:
    """Progress of one network's ``total`` epochs, labelled ``what``: a bar on a terminal,
    lines elsewhere (``detail`` says what an epoch is), nothing where progress is off."""
    shown = mode()
    if shown == "off":
        yield EpochReport()
        return
    if shown == "lines":
        yield _Lines(what, total, detail)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=False,
                  console=_stderr_console()) as bar:
        task = bar.add_task(what, total=total, info="")

        def update(advance: int, info: str) -> None:
            bar.update(task, advance=advance, info=info)

        yield _Bar(update, total)
