"""bzip2 files read block by block, each block's text handed out once its own CRC is verified.

A bzip2 stream is a 4-byte header (``BZh`` and the block size, 1-9 hundred kB), blocks that each
start with a 48-bit magic number and the CRC-32 of the block's text, then a 48-bit end-of-stream
magic and the combined CRC of the blocks; blocks are bit-aligned, streams byte-aligned. libbzip2
hands out a block's text before it compares the block's CRC (it finds a bad one only when the
block's text has all been written), so a decompressor fed the stream as it is cannot tell which
of the text it gave is verified until the whole stream ends, which is why a long stream was
decompressed twice (once to verify it, once to hand it out). Here each block is cut out of the
stream at its magic numbers, as ``pbzip2`` and ``lbzip2`` do to decompress in parallel, and
decompressed alone as a stream of one block (the same header, the block, an end-of-stream magic
and the block's CRC as the combined CRC): its text is used only when that one-block stream has
ended, that is when libbzip2 has verified the block's CRC. The stream's own combined CRC is
checked too. So every file is read once, at most a few blocks' text (about 900 kB each, at most
about 46 MB for a block of runs) are held at once, and blocks are decompressed on several threads
(libbzip2 runs without the GIL).

The magic numbers are found by searching the compressed bytes; the same 48 bits can turn up by
chance inside a block's data. A block that does not decode as cut at such a place is tried again
with the next piece joined to it, up to the most bits a block of its size can take; only if that
fails too is it damage.
"""

from __future__ import annotations

import bisect
import bz2
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

BLOCK_MAGIC = 0x314159265359
END_MAGIC = 0x177245385090
_MASK48 = (1 << 48) - 1
#: threads that decompress blocks, and how many blocks are decompressed or held at once
THREADS = max(1, min(4, os.cpu_count() or 1))
_AHEAD = THREADS + 1


def _patterns() -> list[tuple[bytes, int, int, bool]]:
    """For each magic and each bit position ``r`` (0-7) it may start at inside a byte: the whole
    bytes it then fills (searched for in the data as they are, without shifting the data), how
    many bytes before them it starts, ``r``, and whether it is the end-of-stream magic."""
    out = []
    for magic, end in ((BLOCK_MAGIC, False), (END_MAGIC, True)):
        for r in range(8):
            head = (8 - r) % 8  # its bits in the byte it starts in, when it starts inside one
            rest = 48 - head
            whole = rest // 8
            core = (magic >> (rest - 8 * whole)) & ((1 << 8 * whole) - 1)
            out.append((core.to_bytes(whole, "big"), 1 if head else 0, r, end))
    return out


_PATTERNS = _patterns()


@dataclass
class Outcome:
    """How reading a bzip2 file ended, when not at its clean end."""

    why: str | None = None  # damage: why the rest cannot be read
    unverified_bytes: int = 0  # text of a damaged block decoded before its damage was found
    unverified: bytes = b""  # its first bytes
    truncated: bool = False  # the file ends inside a stream


class _Bits:
    """The compressed bytes of a bzip2 file as they are read, addressed by byte and bit offsets
    from the start of the file, and the bit offsets of the magic numbers found in them."""

    def __init__(self, fh: BinaryIO, first: bytes, on_read: Callable[[], None], piece: int):
        self.fh = fh
        self.on_read = on_read
        self.piece = piece  # bytes read at a time
        self.buf = bytearray()
        self.base = 0  # the offset of buf[0] (bytes before it are let go)
        self.scanned = 0  # bytes looked at for magic numbers
        self.marks: list[int] = []  # bit offsets of magic numbers, in order
        self.ends: set[int] = set()  # those of them that are the end-of-stream magic
        self.eof = False
        self._add(first)

    @property
    def end(self) -> int:
        """The offset of the end of the bytes read so far."""
        return self.base + len(self.buf)

    def more(self) -> bool:
        """Read more of the file; False at its end."""
        if self.eof:
            return False
        data = self.fh.read(self.piece)
        self.on_read()
        if not data:
            self.eof = True
            return False
        self._add(data)
        return True

    def _add(self, data: bytes) -> None:
        before = self.scanned
        self.buf += data
        end = self.end
        start = max(before - 7, self.base)  # a magic cut by the last read is found now
        buf = self.buf
        found = []
        for core, back, r, is_end in _PATTERNS:
            j = buf.find(core, start - self.base)
            while j >= 0:
                at = 8 * (self.base + j - back) + r  # the bit the magic would start at
                if at >= 8 * self.base and 8 * before < at + 48 <= 8 * end:
                    lo = at // 8 - self.base
                    word = int.from_bytes(buf[lo : lo + 7].ljust(7, b"\0"), "big")
                    if (word >> (8 - at % 8)) & _MASK48 == (END_MAGIC if is_end else BLOCK_MAGIC):
                        found.append(at)
                        if is_end:
                            self.ends.add(at)
                j = buf.find(core, j + 1)
        self.scanned = end
        if found:
            self.marks.extend(sorted(found))
            if len(self.marks) > len(found) and self.marks[-len(found) - 1] > min(found):
                self.marks.sort()

    def next_mark(self, after: int, limit: int) -> int | None:
        """The first magic number after bit ``after``, reading on as needed, or None if there is
        none before bit ``limit`` or the end of the file."""
        while True:
            i = bisect.bisect_right(self.marks, after)
            if i < len(self.marks):
                return self.marks[i] if self.marks[i] < limit else None
            if 8 * self.end >= limit + 48 or not self.more():
                return None

    def has(self, byte: int) -> bool:
        """Whether bytes up to offset ``byte`` are there, reading on as needed."""
        while self.end < byte:
            if not self.more():
                return False
        return True

    def bits(self, start: int, stop: int) -> int:
        """Bits [start, stop) as an integer (all of them must have been read)."""
        lo, hi = start // 8 - self.base, -(-stop // 8) - self.base
        word = int.from_bytes(self.buf[lo:hi], "big")
        return (word >> (8 * (hi - lo) - (stop - 8 * (start // 8)))) & ((1 << (stop - start)) - 1)

    def bytes_at(self, start: int, stop: int) -> bytes:
        return bytes(self.buf[start - self.base : stop - self.base])

    def let_go(self, bit: int) -> None:
        """Bytes before the one holding bit ``bit`` are no longer needed."""
        cut = bit // 8 - self.base
        if cut > 1 << 20:  # in large steps: deleting the front of a bytearray moves the rest
            del self.buf[:cut]
            self.base += cut
            i = bisect.bisect_left(self.marks, 8 * self.base)
            del self.marks[:i]


def _one_block_stream(level: int, block: int, nbits: int, crc: int) -> bytes:
    """A stream of the one block whose ``nbits`` bits (from its magic number on) are ``block``."""
    total = nbits + 80
    pad = -total % 8
    word = (((block << 48 | END_MAGIC) << 32) | crc) << pad
    return b"BZh%d" % level + word.to_bytes((total + pad) // 8, "big")


def _decode(data: bytes) -> bytes:
    """The text of a one-block stream: only once it has ended, its CRCs verified."""
    dec = bz2.BZ2Decompressor()
    out = dec.decompress(data)
    if not dec.eof:
        raise EOFError("a bzip2 block does not end where the next one starts")
    return out


def _decode_cut(data: bytes) -> bytes:
    """The text of a stream cut short after (at most) one block: its whole text, verified, or
    nothing. libbzip2 writes no text of a block before it has read all of it, then all of it,
    then checks its CRC before it asks for more input: so once it asks for input (an empty call
    gives nothing more), what it gave is verified."""
    dec = bz2.BZ2Decompressor()
    out = [dec.decompress(data)]
    while not dec.eof and (more := dec.decompress(b"")):
        out.append(more)
    return b"".join(out)


def _decode_until_error(data: bytes, keep: int) -> tuple[int, bytes]:
    """How many bytes of text a damaged one-block stream gives before its damage is found, and
    the first ``keep`` of them (for the reject)."""
    dec = bz2.BZ2Decompressor()
    size, head = 0, b""
    try:
        while True:
            out = dec.decompress(data, 16 << 10)  # small steps: a failing call gives nothing
            data = b""
            size += len(out)
            if len(head) < keep:
                head += out[: keep - len(head)]
            if not out or dec.eof:
                break
    except (OSError, EOFError, ValueError):
        pass
    return size, head


_ERRORS = (OSError, EOFError, ValueError)


def read_bzip2(fh: BinaryIO, first: bytes, on_read: Callable[[], None], outcome: Outcome,
               keep: int, piece: int = 128 << 10) -> Iterator[bytes]:
    """The text of the bzip2 file ``fh`` (one stream or several; its first bytes ``first``
    already read), block by verified block; ``outcome`` says how it ended when it did not end
    cleanly (``keep``: the most text of a damaged block kept for the reject). ``on_read`` is
    called after each read of ``piece`` compressed bytes."""
    bits = _Bits(fh, first, on_read, piece)
    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="bzip2")
    try:
        q = 0  # the byte offset of the stream being read
        while True:
            bits.has(q + 4)
            head = bits.bytes_at(q, q + 4)
            if not head:
                return  # the end of the file, after a whole stream
            if len(head) < 4 or not (head[:3] == b"BZh" and 49 <= head[3] <= 57):
                if len(head) < 4 and b"BZh"[: len(head)] == head[:3]:
                    outcome.truncated = True
                else:
                    outcome.why = (f"corrupt compressed data (the bytes at offset {q:,} are not "
                                   "the start of a bzip2 stream)")
                return
            after = yield from _stream(bits, pool, q, head[3] - 48, outcome, keep)
            if after is None:
                return
            q = after
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _up(bit: int) -> int:
    """The offset of the byte after the one that holds bit ``bit - 1``."""
    return -(-bit // 8)


def _stream(bits: _Bits, pool: ThreadPoolExecutor, q: int, level: int, outcome: Outcome,
            keep: int) -> Generator[bytes, None, int | None]:
    """The text of the stream at byte ``q`` (``level``: its block size), block by block; returns
    the offset of the byte after it, or None when it could not be read to its end (``outcome``
    says why)."""
    cap = 3 * 100_000 * level * 8  # more bits than any block of this size can take
    at = 8 * q + 32  # the first block (or the end of an empty stream) follows the header
    if bits.next_mark(at - 1, at + 1) != at:
        if bits.eof and 8 * bits.end < at + 48:
            outcome.truncated = True
        else:
            outcome.why = ("corrupt compressed data (no bzip2 block where the stream at offset "
                           f"{q:,} starts)")
        return None
    combined = 0
    ahead: deque[tuple[Future[bytes], int, int, int]] = deque()  # (text, start, stop, crc)
    while True:
        # blocks to decompress, while they are not too many and their ends are known
        while len(ahead) < _AHEAD and at not in bits.ends:
            stop = bits.next_mark(at, at + cap)
            if stop is None or not bits.has(_up(at + 80)):
                break
            crc = bits.bits(at + 48, at + 80)
            data = _one_block_stream(level, bits.bits(at, stop), stop - at, crc)
            ahead.append((pool.submit(_decode, data), at, stop, crc))
            at = stop
        if ahead:  # the oldest: its text, once verified
            fut, start, stop, crc = ahead.popleft()
            try:
                text = fut.result()
            except _ERRORS as exc:
                for other, *_ in ahead:  # cut where this one was cut: of no use
                    other.cancel()
                ahead.clear()
                joined = _rejoin(bits, level, start, stop, crc, cap)
                if joined is None:
                    _damaged(bits, level, start, stop, crc, str(exc), outcome, keep)
                    return None
                text, at = joined
            combined = ((combined << 1 | combined >> 31) & 0xFFFFFFFF) ^ crc
            bits.let_go(ahead[0][1] if ahead else at)
            yield text
            continue
        if at in bits.ends:  # the end of the stream, and its combined CRC
            if not bits.has(_up(at + 80)):
                outcome.truncated = True
                return None
            if bits.bits(at + 48, at + 80) != combined:
                outcome.why = ("corrupt compressed data (the combined CRC at the end of a bzip2 "
                               "stream does not match its blocks', each of which was verified)")
                return None
            return _up(at + 80)
        # no magic number follows: the file ends inside this block, or it is damaged
        if bits.eof and 8 * bits.end - at <= cap and bits.has(_up(at + 80)):
            crc = bits.bits(at + 48, at + 80)
            whole = (8 * bits.end - at) // 8  # the whole bytes of it (no bits made up)
            data = b"BZh%d" % level + bits.bits(at, at + 8 * whole).to_bytes(whole, "big")
            try:
                text = _decode_cut(data)
            except _ERRORS as exc:
                _damaged(bits, level, at, None, crc, str(exc), outcome, keep)
                return None
            if text:
                yield text
            outcome.truncated = True
        elif bits.eof and 8 * bits.end < at + 80:
            outcome.truncated = True
        else:
            outcome.why = ("corrupt compressed data (a bzip2 block longer than a block of "
                           f"{level}00 kB can be)")
        return None


#: the most pieces a block is tried with, joined, when it does not decode as first cut
_JOINS = 16


def _rejoin(bits: _Bits, level: int, start: int, stop: int, crc: int, cap: int
            ) -> tuple[bytes, int] | None:
    """The block at bit ``start`` did not decode as cut at bit ``stop``: was that magic number
    one found by chance inside its data? Its text and its real end if it decodes with the next
    pieces joined to it (up to ``_JOINS`` of them, within ``cap`` bits), else None."""
    for _ in range(_JOINS):
        got = bits.next_mark(stop, start + cap)
        if got is None:
            return None
        stop = got
        try:
            return _decode(_one_block_stream(level, bits.bits(start, stop), stop - start,
                                             crc)), stop
        except _ERRORS:
            continue
    return None


def _damaged(bits: _Bits, level: int, start: int, stop: int | None, crc: int, error: str,
             outcome: Outcome, keep: int) -> None:
    """Damage in the block at bit ``start`` (cut at ``stop``, or the file's last piece): why, and
    how much text it gave before the damage was found, its first ``keep`` bytes kept."""
    if stop is None:
        whole = (8 * bits.end - start) // 8
        data = b"BZh%d" % level + bits.bits(start, start + 8 * whole).to_bytes(whole, "big")
    else:
        data = _one_block_stream(level, bits.bits(start, stop), stop - start, crc)
    outcome.why = f"corrupt compressed data ({error})"
    outcome.unverified_bytes, outcome.unverified = _decode_until_error(data, keep)
