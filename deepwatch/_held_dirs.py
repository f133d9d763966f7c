"""Temporary directories that outlive a process killed outright, and how the next one clears
them: ``serve --workers``'s state directories and ``train --nproc``'s rendezvous directories.

A process that makes such a directory removes it when it ends, unless it is killed outright
(SIGKILL, the OOM killer): then nobody does, and each such death leaves one more in the
temporary directory. So the directory holds a ``lock`` file that its maker (and whichever of
its children share the directory) keeps locked, shared, for as long as it lives; the kernel lets
go of the lock however the process ends. The next process of the same kind removes the
directories whose lock it can take exclusively: nobody is left to use them. A directory with
no ``lock`` file is never touched (another user's, or made by an older deepwatch).

Where there is no ``flock`` (Windows) the directories are made the same way, and none is ever
judged stale.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: The name of the lock file in every such directory.
LOCK = "lock"


def hold_lock(path: Path) -> int | None:
    """Hold ``path`` with a shared lock for as long as the descriptor returned stays open (the
    kernel lets go of it however the process ends), and a child given the descriptor shares it.
    None where there is no ``flock``."""
    try:
        import fcntl
    except ImportError:  # Windows: no stale directory is recognised there
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def make_held_dir(prefix: str) -> tuple[Path, int | None]:
    """A new directory in the temporary directory, named ``prefix`` and a random part, and the
    descriptor holding its lock (see :func:`hold_lock`). The lock is held before the lock
    file has its name: a process clearing stale directories never finds it without a holder,
    however soon it looks."""
    made = Path(tempfile.mkdtemp(prefix=prefix))
    unnamed = made / f".{LOCK}.tmp"
    unnamed.touch()
    fd = hold_lock(unnamed)
    os.replace(unnamed, made / LOCK)
    return made, fd


def remove_unheld_dirs(tmp: Path, prefix: str) -> list[Path]:
    """Remove the directories in ``tmp`` named ``prefix...`` whose lock no process holds any
    more (their makers, and the makers' children, were killed outright); the removed ones."""
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    for found in tmp.glob(f"{prefix}*"):
        try:
            fd = os.open(found / LOCK, os.O_RDONLY)
        except OSError:  # not ours to judge: another user's, or made by an older deepwatch
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live process holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(found, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(found)
    return removed
