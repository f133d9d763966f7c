"""Following a growing log the way ``tail -F`` does: whole lines as they are written, across
truncation and rotation (the path reopened when it points to a new file)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from .files import Chunk, InputSpec, LineBuffer

POLL_SECONDS = 0.2


def _open(path: str, stop: threading.Event, poll: float) -> tuple[BinaryIO, int] | None:
    """The file and its inode, waiting for it to appear (``tail -F`` retries too)."""
    while not stop.is_set():
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by follow_chunks
        except FileNotFoundError:
            stop.wait(poll)
            continue
        return fh, os.fstat(fh.fileno()).st_ino
    return None


def follow_chunks(spec: InputSpec, stop: threading.Event, chunk_bytes: int = 4 << 20,
                  poll: float = POLL_SECONDS) -> Iterator[Chunk]:
    """Chunks of whole lines from ``spec.path`` until ``stop`` is set.

    Line numbers restart at 1 when the file is truncated or replaced. A last line without a line
    break is held back until it is finished, or handed out when the file is rotated or on stop.
    """
    opened = _open(spec.path, stop, poll)
    if opened is None:
        return
    fh, inode = opened
    lines = LineBuffer(spec)
    try:
        while True:
            block = fh.read(chunk_bytes)
            if block:
                yield from lines.feed(block)
                continue
            if stop.is_set():
                break
            try:
                st = os.stat(spec.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino != inode:  # rotated: finish the old, open the new
                last = lines.finish()
                if last is not None:
                    yield last
                fh.close()
                opened = _open(spec.path, stop, poll)
                if opened is None:
                    return
                fh, inode = opened
            elif st is not None and st.st_size < fh.tell():  # truncated in place
                last = lines.finish()
                if last is not None:
                    yield last
                fh.seek(0)
            else:
                stop.wait(poll)
        last = lines.finish()
        if last is not None:
            yield last
    finally:
        fh.close()
