"""A named pipe followed with ``--follow`` (``deepwatch stream --follow live``) read compressed
data and UTF-16 text as lines of junk, each a dead letter, and exited 0, where the same pipe
without ``--follow`` is refused with one error line (exit 2): its first bytes are looked at
now as stdin's are."""

from __future__ import annotations

import gzip
import os
import threading
import time
from pathlib import Path

import pytest

from deepwatch.errors import InputError
from deepwatch.sources.files import InputSpec
from deepwatch.sources.follow import follow_chunks

KDD = b"0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.\n"  # noqa: E501


def _follow_pipe(tmp_path: Path, pieces: list[bytes]) -> list:
    """``follow_chunks`` of a named pipe whose writer writes ``pieces`` (a pause after each)."""
    pipe = tmp_path / "live"
    os.mkfifo(pipe)
    stop = threading.Event()

    def write() -> None:
        with open(pipe, "wb", buffering=0) as w:
            for piece in pieces:
                w.write(piece)
                time.sleep(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    timer = threading.Timer(5, stop.set)  # (only if the pipe's end never came)
    timer.start()
    try:
        return list(follow_chunks(InputSpec(str(pipe)), stop, poll=0.05))
    finally:
        stop.set()
        timer.cancel()
        writer.join(5)


@pytest.mark.parametrize("pieces", [
    [gzip.compress(KDD * 20)],
    [b"\x1f", gzip.compress(KDD * 20)[1:]],  # its first write cut inside the magic
], ids=["gzip", "gzip-cut"])
def test_a_followed_named_pipe_of_compressed_data_is_refused(tmp_path: Path,
                                                             pieces: list[bytes]) -> None:
    with pytest.raises(InputError, match="live is compressed with gzip"):
        _follow_pipe(tmp_path, pieces)


def test_a_followed_named_pipe_of_utf16_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="live looks like UTF-16 text"):
        _follow_pipe(tmp_path, [KDD.decode().encode("utf-16")])


def test_a_followed_named_pipe_of_text_is_read(tmp_path: Path) -> None:
    chunks = _follow_pipe(tmp_path, [KDD[:7], KDD[7:] + KDD, KDD])
    assert b"".join(c.data for c in chunks) == KDD * 3
    assert not [c for c in chunks if c.damage]
