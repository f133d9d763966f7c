"""Zero bytes after the last stream of a compressed file: padding, not data.

Tape and tar blocking, and log shippers that preallocate a file, can leave a compressed file
followed by zero bytes. GNU gzip reads such a file as a good one ("decompression OK, trailing
zero bytes ignored"). A trailing part that holds any other byte is not padding: it may be a
damaged next member, and stays damage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

#: bytes read at a time while the rest of a file is looked at: however long the padding (a
#: preallocated file may hold gigabytes of it), no more than this is held at once
SCAN_BYTES = 1 << 20
_ZEROS = bytes(SCAN_BYTES)


def all_zero(data: bytes) -> bool:
    """Whether every byte of ``data`` is a zero byte (a memory compare, not a loop over it)."""
    step = len(_ZEROS)
    if len(data) > step:
        return all(all_zero(data[i : i + step]) for i in range(0, len(data), step))
    return data == (_ZEROS if len(data) == step else _ZEROS[: len(data)])


def zeros_to_end(fh: BinaryIO, held: bytes | bytearray, start: int = 0,
                 on_read: Callable[[], None] | None = None) -> int | None:
    """How many bytes there are from ``held[start:]`` (bytes already read, which ``fh`` goes on
    from) to the end of the file, when every one of them is a zero byte; else None. The rest of
    the file is read ``SCAN_BYTES`` at a time and not kept (``on_read`` is called after each
    read), and ``fh`` is left where it was: a caller that finds other bytes reads on as before."""
    count = len(held) - start
    if held.count(0, start) != count:
        return None
    at = fh.tell()
    try:
        while True:
            piece = fh.read(SCAN_BYTES)
            if on_read is not None:
                on_read()
            if not piece:
                return count
            if not all_zero(piece):
                return None
            count += len(piece)
    finally:
        fh.seek(at)
