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
fails too is it damage. The last piece of a file cut short (no magic number after it) is a block
whose end is not known: its text is used if it is the whole block, which is told by computing
the block's CRC here (:func:`_crc`) and comparing it with the one stored before the block.
"""

from __future__ import annotations

import bisect
import bz2
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from .._cpus import usable_cores

BLOCK_MAGIC = 0x314159265359
END_MAGIC = 0x177245385090
_MASK48 = (1 << 48) - 1
#: threads that decompress blocks, and how many blocks are decompressed or held at once
THREADS = min(4, usable_cores())  # the CPU affinity and any cgroup quota, not the host's cores
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
    #: zero bytes after the last stream, every byte to the end of the file (padding, not data:
    #: the file ended cleanly)
    padding: int = 0


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

    def zeros_from(self, byte: int) -> int | None:
        """How many bytes there are from offset ``byte`` to the end of the file when all of
        them are zero bytes, else None. What is not read yet is looked at a piece at a time
        and not kept: the file's position and the bytes held are as they were."""
        from ._tail import zeros_to_end

        return zeros_to_end(self.fh, self.buf, byte - self.base, self.on_read)

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
            self.ends = {e for e in self.ends if e >= 8 * self.base}


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


#: each byte value with its bits in reverse order
_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _crc(text: bytes) -> int:
    """bzip2's CRC of ``text``: CRC-32 fed the bits of each byte from the most significant on,
    the mirror image of zlib's (so zlib's of the mirrored bytes, mirrored)."""
    return int(f"{zlib.crc32(text.translate(_REVERSED)):032b}"[::-1], 2)


def _decode_some(data: bytes) -> tuple[bytes, str | None]:
    """All the text a decompressor gives for ``data``, a stream cut short, and the error it
    found, if any (the text is not verified: see :func:`_crc`)."""
    dec = bz2.BZ2Decompressor()
    out = []
    try:
        while not dec.eof:
            piece = dec.decompress(data, 1 << 20)  # then empty calls: what it still holds
            data = b""
            if not piece:
                break
            out.append(piece)
    except _ERRORS as exc:
        return b"".join(out), str(exc)
    return b"".join(out), None


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
    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="bzip2")
    try:
        yield from _Reader(_Bits(fh, first, on_read, piece), pool, outcome, keep).text()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _up(bit: int) -> int:
    """The offset of the byte after the one that holds bit ``bit - 1``."""
    return -(-bit // 8)


@dataclass
class _Block:
    """A block being decompressed: its text to come, where it is, its CRC, its stream's level."""

    text: Future[bytes]
    start: int
    stop: int
    crc: int
    level: int


@dataclass
class _End:
    """The end of a stream, with the combined CRC it stores."""

    crc: int


@dataclass
class _Stop:
    """Where reading stops: at the end of the file (``padding``: after that many zero bytes
    that follow the last stream); at a piece that no magic number follows (``last``: a block cut
    short, or damage); or on damage (``why``) or a cut (``truncated``) found where the blocks
    are cut out. Said once the blocks before are handed out."""

    last: int | None = None
    level: int = 9
    why: str | None = None
    truncated: bool = False
    padding: int = 0
    #: with ``why``: the first bytes of what is not a bzip2 stream (text appended to the file?)
    lost: bytes = b""


class _Reader:
    """Reads the streams of a bzip2 file one after the other in one pipeline: the blocks ahead
    (of this stream or the next ones) are being decompressed while the oldest is handed out."""

    def __init__(self, bits: _Bits, pool: ThreadPoolExecutor, outcome: Outcome, keep: int):
        self.bits, self.pool, self.outcome, self.keep = bits, pool, outcome, keep
        self.queue: deque[_Block | _End | _Stop] = deque()
        self.running = 0  # blocks in the queue
        self.q = 0  # the byte offset of the stream being cut into blocks
        self.at: int | None = None  # the bit of its next magic number (None: at its header)
        self.level = 9
        self.stopped = False  # nothing more to cut: a _Stop is queued

    def _stop(self, last: int | None = None, why: str | None = None,
              truncated: bool = False, padding: int = 0, lost: bytes = b"") -> None:
        self.queue.append(_Stop(last, self.level, why, truncated, padding, lost))
        self.stopped = True

    def _cut(self) -> None:
        """Queue blocks (and stream ends) while few are being decompressed (and few stream
        ends are queued: a file may hold streams without blocks)."""
        bits = self.bits
        while not self.stopped and self.running < _AHEAD and len(self.queue) < 4 * _AHEAD:
            if self.at is None:  # a stream's header, then its first block (or its end)
                q = self.q
                bits.has(q + 4)
                head = bits.bytes_at(q, q + 4)
                if not head:  # the end of the file, after a whole stream
                    return self._stop()
                if q and head[0] == 0:  # after a whole stream: zero bytes to the end are padding
                    zeros = bits.zeros_from(q)
                    if zeros is not None:
                        return self._stop(padding=zeros)
                if len(head) < 4 or not (head[:3] == b"BZh" and 49 <= head[3] <= 57):
                    if len(head) < 4 and b"BZh"[: len(head)] == head[:3]:
                        return self._stop(truncated=True)
                    bits.has(q + self.keep)  # the reject keeps their beginning: what are they?
                    return self._stop(why=f"corrupt compressed data (the bytes at offset {q:,} "
                                          "are not the start of a bzip2 stream)",
                                      lost=bits.bytes_at(q, q + self.keep))
                self.level, at = head[3] - 48, 8 * q + 32
                if bits.next_mark(at - 1, at + 1) != at:
                    if bits.eof and 8 * bits.end < at + 48:
                        return self._stop(truncated=True)
                    return self._stop(why="corrupt compressed data (no bzip2 block where the "
                                          f"stream at offset {q:,} starts)")
                self.at = at
            at = self.at
            if at in bits.ends:  # the end of the stream, then the next one's header
                if not bits.has(_up(at + 80)):
                    return self._stop(truncated=True)
                self.queue.append(_End(bits.bits(at + 48, at + 80)))
                self.q, self.at = _up(at + 80), None
                continue
            stop = bits.next_mark(at, at + _cap(self.level))
            if stop is None or not bits.has(_up(at + 80)):
                return self._stop(at)
            crc = bits.bits(at + 48, at + 80)
            data = _one_block_stream(self.level, bits.bits(at, stop), stop - at, crc)
            self.queue.append(_Block(self.pool.submit(_decode, data), at, stop, crc, self.level))
            self.running += 1
            self.at = stop
        return None

    def _keep_from(self) -> int:
        """The first bit still needed: the start of the oldest block in hand, or where the
        cutting is."""
        for item in self.queue:
            if isinstance(item, _Block):
                return item.start
        return 8 * self.q if self.at is None else self.at

    def text(self) -> Iterator[bytes]:
        bits, outcome = self.bits, self.outcome
        combined = 0
        while True:
            self._cut()
            item = self.queue.popleft()
            if isinstance(item, _Block):
                self.running -= 1
                try:
                    text = item.text.result()
                except _ERRORS as exc:
                    for other in self.queue:  # cut where this one was cut: of no use
                        if isinstance(other, _Block):
                            other.text.cancel()
                    self.queue.clear()
                    self.running = 0
                    joined = _rejoin(bits, item.level, item.start, item.stop, item.crc)
                    if joined is None:
                        _damaged(bits, item.level, item.start, item.stop, item.crc, str(exc),
                                 outcome, self.keep)
                        return
                    text, self.at = joined  # cut on from its real end, in its stream
                    self.level, self.stopped = item.level, False
                combined = ((combined << 1 | combined >> 31) & 0xFFFFFFFF) ^ item.crc
                bits.let_go(self._keep_from())
                yield text
            elif isinstance(item, _End):
                if item.crc != combined:
                    outcome.why = ("corrupt compressed data (the combined CRC at the end of a "
                                   "bzip2 stream does not match its blocks', each of which was "
                                   "verified)")
                    return
                combined = 0
                bits.let_go(self._keep_from())  # (a file of many streams without blocks)
            else:
                if item.last is not None:
                    yield from _last(bits, item.last, item.level, outcome, self.keep)
                outcome.why = outcome.why or item.why
                outcome.unverified = outcome.unverified or item.lost
                outcome.truncated = outcome.truncated or item.truncated
                outcome.padding = item.padding
                return


def _cap(level: int) -> int:
    """More bits than any block of a stream of ``level`` (its block size) can take."""
    return 3 * 100_000 * level * 8


def _last(bits: _Bits, at: int, level: int, outcome: Outcome, keep: int) -> Iterator[bytes]:
    """The piece at bit ``at`` that no magic number follows: a block cut short by the end of the
    file (its text if the whole block is there, checked against its CRC here), or damage."""
    if not (bits.eof and 8 * bits.end - at <= _cap(level)):
        outcome.why = f"corrupt compressed data (a bzip2 block longer than one of {level}00 kB)"
        return
    if not bits.has(_up(at + 80)):
        outcome.truncated = True
        return
    crc, size = bits.bits(at + 48, at + 80), 8 * bits.end - at
    head = b"BZh%d" % level
    text, error = _decode_some(head + bits.bits(at, at + size // 8 * 8).to_bytes(size // 8, "big"))
    if _crc(text) != crc and error is None and size % 8:
        # the block may end in the bits of the last byte, which were left out (the block is
        # moved to a byte boundary): again with them, made up to a byte with 0 bits, whatever
        # error those bits give (the text, if whole, is known by its CRC)
        padded = bits.bits(at, at + size) << (8 - size % 8)
        text = _decode_some(head + padded.to_bytes(size // 8 + 1, "big"))[0]
    if text and _crc(text) == crc:
        yield text
        if error is None:
            outcome.truncated = True
        else:  # the block is whole, what follows it is not a block or the stream's end
            outcome.why = f"corrupt compressed data ({error})"
    elif error is not None:
        _damaged(bits, level, at, None, crc, error, outcome, keep)
    else:
        outcome.truncated = True


#: the most pieces a block is tried with, joined, when it does not decode as first cut
_JOINS = 16


def _rejoin(bits: _Bits, level: int, start: int, stop: int, crc: int
            ) -> tuple[bytes, int] | None:
    """The block at bit ``start`` did not decode as cut at bit ``stop``: was that magic number
    one found by chance inside its data? Its text and its real end if it decodes with the next
    pieces joined to it (up to ``_JOINS`` of them, within the most bits a block can take),
    else None."""
    for _ in range(_JOINS):
        got = bits.next_mark(stop, start + _cap(level))
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
