"""Progress bars on stderr (rich), quiet when stderr is not a terminal unless forced."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def enabled() -> bool:
    if (os.environ.get("RANK", "0") not in ("", "0")
            and os.environ.get("WORLD_SIZE", "1") not in ("", "1")):
        return False  # one set of bars per distributed run: rank 0's
    flag = os.environ.get("DEEPWATCH_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no")
    return sys.stderr.isatty()


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


@contextmanager
def step_progress(what: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A bar of discrete steps (epochs, batches); the callback takes ``advance`` and ``info``."""
    if not enabled():
        yield lambda advance=1, info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=False,
                  console=_stderr_console()) as bar:
        task = bar.add_task(what, total=total, info="")

        def update(advance: int = 1, info: str = "") -> None:
            bar.update(task, advance=advance, info=info)

        yield update
