"""The line limit (MAX_LINE_BYTES) leaves the line ending out, CRLF as LF: a line of exactly the
limit is a record either way, one byte more a reject whose reason gives the same length either
way. (A CRLF line of exactly the limit was rejected, its ``\\r`` counted: "the line is 1,048,577
bytes long".)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deepwatch.sources.files import (
    MAX_LINE_BYTES,
    Chunk,
    InputSpec,
    LineBuffer,
    long_line_reason,
    read_inputs,
)
from deepwatch.sources.follow import follow_chunks

ACCESS = b'1.2.3.4 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 5 "-" "Mozilla/5.0"'


def _access_line(size: int) -> bytes:
    """An access log line of ``size`` bytes (its user agent padded), its line ending left out."""
    line = ACCESS[:-1] + b"A" * (size - len(ACCESS)) + b'"'
    assert len(line) == size
    return line


def _fed(data: bytes, block: int, max_line: int) -> list[Chunk]:
    buf = LineBuffer(InputSpec("x"), max_line=max_line)
    out = [c for i in range(0, len(data), block) for c in buf.feed(data[i : i + block])]
    last = buf.finish()
    return out + ([last] if last is not None else [])


@pytest.mark.parametrize("block", [1, 2, 3, 5, 11, 12, 13, 64])
@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_the_line_ending_does_not_count_towards_the_limit(end: bytes, block: int) -> None:
    for extra in (0, 1):
        line = b"x" * (10 + extra)
        data = b"a" + end + line + end + b"b" + end
        chunks = _fed(data, block, max_line=10)
        kept = b"".join(c.data for c in chunks)
        rejects = [(c.first_line, c.damage) for c in chunks if c.damage]
        if extra == 0:
            assert kept == data and not rejects, (end, block)
        else:
            assert kept == b"a" + end + b"b" + end, (end, block)
            assert rejects == [(2, long_line_reason(11, 10))], (end, block)


@pytest.mark.parametrize("block", [1, 4, 64])
def test_a_last_line_without_its_line_feed(block: int) -> None:
    """A last line that ends in ``\\r`` (which the formats drop, as they do before ``\\n``)."""
    assert _fed(b"a\n" + b"x" * 10 + b"\r", block, 10)[-1].data == b"x" * 10 + b"\r"
    chunks = _fed(b"a\n" + b"x" * 11 + b"\r", block, 10)
    assert chunks[-1].damage == long_line_reason(11, 10)


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_a_line_of_exactly_the_limit_is_a_record(tmp_path: Path, end: bytes) -> None:
    """With the real limit, as ``deepwatch score`` and ``ingest`` read files."""
    path = tmp_path / "big.log"
    for extra in (0, 1):
        path.write_bytes(end.join([ACCESS, _access_line(MAX_LINE_BYTES + extra), ACCESS]) + end)
        table, rejects, stats = read_inputs([InputSpec(str(path))], "access")
        if extra == 0:
            assert (table.num_rows, rejects.num_rows) == (3, 0), end
            assert len(table.column("user_agent")[1].as_py()) == MAX_LINE_BYTES - len(ACCESS) + 11
        else:
            assert (table.num_rows, rejects.num_rows) == (2, 1), end
            reject = rejects.to_pylist()[0]
            assert reject["line"] == 2
            assert reject["reason"].startswith(long_line_reason(MAX_LINE_BYTES + 1))


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_a_followed_log_keeps_a_line_of_exactly_the_limit(tmp_path: Path, end: bytes) -> None:
    """``stream --follow``, its first read ending just before the long line's ``\\n``."""
    log = tmp_path / "access.log"
    log.write_bytes(end.join([ACCESS, _access_line(MAX_LINE_BYTES), ACCESS]) + end)
    size = len(ACCESS) + len(end) + MAX_LINE_BYTES + len(end) - 1
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        chunks = list(follow_chunks(InputSpec(str(log)), stop, chunk_bytes=size, poll=0.05))
    finally:
        timer.cancel()
    assert not [c.damage for c in chunks if c.damage]
    assert b"".join(c.data for c in chunks).count(b"\n") == 3


def test_long_lines_finds_the_same_rows_for_files_and_messages() -> None:
    """One measure of a line for a file (whole lines) and a Kafka batch (an unended last
    message): the CRLF ending is no part of a line, an unended last line counts."""
    from deepwatch.sources.files import long_lines

    assert long_lines(b"abcd\nefgh\n" * 50, 4) is None
    assert long_lines(b"abcd\r\nab\n", 4) is None  # 4 bytes and its \r: not over
    found = long_lines(b"ab\nabcde\r\nxy\nabcdef", 4)
    assert found is not None
    rows, starts, ends = found
    assert rows.tolist() == [1, 3]
    assert starts[rows].tolist() == [3, 13] and ends[rows].tolist() == [9, 19]
