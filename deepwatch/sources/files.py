"""Reading files and stdin in chunks of whole lines, with line numbers and optional labels.

A file argument may be written ``PATH=LABEL``: every record from it gets that ground-truth label.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from ..errors import InputError
from ..formats._base import count_newlines

CHUNK_BYTES = 8 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    path: str  # "-" is stdin
    label: str | None = None

    @property
    def display(self) -> str:
        return "<stdin>" if self.path == "-" else self.path


@dataclass
class Chunk:
    data: bytes
    first_line: int
    spec: InputSpec
    #: set (on an empty chunk after the last line that could be read) when the input is damaged
    #: and the rest of it cannot be read: why. ``first_line`` is the first line lost.
    damage: str | None = None


class LineBuffer:
    """Cuts a byte stream into chunks of whole lines, numbering lines from 1.

    ``feed`` returns the whole lines that a block completes (or None); ``finish`` hands out a
    last line that has no line break and starts the numbering over (rotation, truncation).
    """

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.line = 1
        self.rest = b""

    def feed(self, block: bytes) -> Chunk | None:
        cut = block.rfind(b"\n")
        if cut < 0:
            self.rest += block
            return None
        # one copy of the block, not two: the tail after the last line break is short
        whole = (b"".join((self.rest, memoryview(block)[: cut + 1])) if self.rest
                 else block if cut + 1 == len(block) else block[: cut + 1])
        self.rest = block[cut + 1 :]
        chunk = Chunk(whole, self.line, self.spec)
        self.line += count_newlines(whole)
        return chunk

    def finish(self) -> Chunk | None:
        last = Chunk(self.rest, self.line, self.spec) if self.rest else None
        self.line, self.rest = 1, b""
        return last


def parse_input_spec(text: str) -> list[InputSpec]:
    """``PATH``, ``PATH=LABEL``, a glob, or ``-``. A glob expands to its files, sorted."""
    if text == "-":
        return [InputSpec("-")]
    label = None
    path = text
    if not os.path.exists(text) and "=" in text:
        path, label = text.rsplit("=", 1)
        if not label:
            raise InputError(f"empty label in {text!r}; write PATH=LABEL")
    if any(c in path for c in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise InputError(f"no file matches {path!r}")
        return [InputSpec(p, label) for p in found]
    if not os.path.exists(path):
        raise InputError(f"no such file: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a file")
    return [InputSpec(path, label)]


def _open(spec: InputSpec):  # type: ignore[no-untyped-def]
    if spec.path == "-":
        return sys.stdin.buffer
    try:
        if spec.path.endswith(".gz"):
            return pa.input_stream(spec.path, compression="gzip")
        return open(spec.path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise InputError(f"cannot read {spec.path}: {exc.strerror or exc}") from None


def chunks_from_reads(read: Callable[[], bytes], spec: InputSpec) -> Iterator[Chunk]:
    """Whole-line chunks from ``read()`` calls until one returns no bytes."""
    lines = LineBuffer(spec)
    while block := read():
        chunk = lines.feed(block)
        if chunk is not None:
            yield chunk
    last = lines.finish()
    if last is not None:
        yield last


def salvage_gzip(path: str, skip: int, block_bytes: int = CHUNK_BYTES
                 ) -> tuple[Iterator[bytes], list[str]]:
    """What can still be decompressed of a damaged (truncated or corrupt) gzip file, after its
    first ``skip`` decompressed bytes, in blocks; the list gets the reason it stopped."""
    reason: list[str] = []

    def blocks() -> Iterator[bytes]:
        produced = 0
        dec, open_member = zlib.decompressobj(wbits=31), False
        with open(path, "rb") as fh:
            # small pieces: the output of the piece that fails is lost, so keep it small
            while piece := fh.read(4096):
                while piece:
                    if dec.eof:  # a further gzip member follows (concatenated files)
                        dec = zlib.decompressobj(wbits=31)
                    try:
                        out = dec.decompress(piece)
                    except zlib.error as exc:
                        reason.append(f"corrupt compressed data ({exc})")
                        return
                    if produced + len(out) > skip:
                        yield out[max(skip - produced, 0):]
                    produced += len(out)
                    piece = dec.unused_data if dec.eof else b""
                    open_member = not dec.eof
        if open_member:
            reason.append("the compressed stream ends early (truncated file)")

    def sized() -> Iterator[bytes]:  # about block_bytes at a time, one join per block
        parts: list[bytes] = []
        size = 0
        for piece in blocks():
            parts.append(piece)
            size += len(piece)
            if size >= block_bytes:
                yield b"".join(parts)
                parts, size = [], 0
        if parts:
            yield b"".join(parts)

    return sized(), reason


def iter_chunks(spec: InputSpec, chunk_bytes: int = CHUNK_BYTES,
                on_bytes: Callable[[int], None] | None = None) -> Iterator[Chunk]:
    """Whole-line chunks of about ``chunk_bytes`` each, numbered from line 1.

    A damaged .gz input (truncated, corrupt) does not stop the run: every line before the damage
    is read, then a last empty chunk says why the rest is lost (:attr:`Chunk.damage`), and a
    warning is logged.
    """
    stream = _open(spec)
    delivered = 0
    rescue: Iterator[bytes] | None = None
    why: list[str] = []

    def read() -> bytes:
        nonlocal delivered, rescue, why
        if rescue is not None:
            block = next(rescue, b"")
        else:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError) as exc:
                if not spec.path.endswith(".gz") or not os.path.isfile(spec.path):
                    raise InputError(f"cannot read {spec.display}: {exc}") from None
                rescue, why = salvage_gzip(spec.path, delivered, chunk_bytes)
                block = next(rescue, b"")
        delivered += len(block)
        if on_bytes is not None and block:
            on_bytes(len(block))
        return block

    last: Chunk | None = None
    try:
        for last in chunks_from_reads(read, spec):
            yield last
        if why:
            next_line = 1 if last is None else last.first_line + count_newlines(last.data) + \
                (0 if last.data.endswith(b"\n") else 1)
            reason = f"{why[0]}: nothing from line {next_line:,} on could be read"
            log.warning("%s: %s", spec.display, reason)
            yield Chunk(b"", next_line, spec, damage=reason)
    finally:
        if spec.path != "-":
            stream.close()


def read_inputs(specs: Sequence[str | InputSpec], fmt, progress: bool = False):  # type: ignore[no-untyped-def]
    """Parse every input completely. Returns ``(table, rejects, stats)``.

    ``rejects`` has a ``source`` column; ``stats`` maps ``lines``, ``parsed``, ``rejected``.
    """
    from ..io import InputReader

    reader = InputReader(fmt, specs, progress=progress)
    return reader.read_all()
