"""What a run says about inputs it cannot read as records: no "is --format right?" for damage
or over-long lines, a one-line refusal of UTF-16 text, a reject's reason that says how long
an over-long line is and how much of it is kept, and a progress bar that ends at the size of
the files read (compressed or not)."""

from __future__ import annotations

import contextlib
import gzip
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deepwatch.errors import InputError
from deepwatch.formats import get_format
from deepwatch.formats._base import MAX_RAW, cut_lost
from deepwatch.io import InputReader, Stats
from deepwatch.sources.files import (
    LOST_BYTES,
    MAX_LINE_BYTES,
    InputSpec,
    iter_chunks,
    parse_input_spec,
    utf16_encoding,
)

KDD = get_format("kdd")
LONG_LINE = 2 * MAX_LINE_BYTES


@pytest.fixture(scope="module")
def text(small_kdd_test: Path) -> bytes:
    return small_kdd_test.read_bytes()


def _corrupt_gz(text: bytes, path: Path) -> Path:
    """``text`` as one gzip member with bytes zeroed in its middle: nothing of it can be read."""
    packed = bytearray(gzip.compress(text, mtime=0))
    mid = len(packed) // 2
    packed[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(packed))
    return path


def _read(*paths: Path) -> tuple[list[dict[str, object]], Stats]:
    _, rejects, stats = InputReader(KDD, [str(p) for p in paths]).read_all()
    return rejects.to_pylist(), stats


# -- the --format hint is for lines that were read and failed to parse -------------------------


def test_a_damaged_gz_input_gets_no_format_hint(text: bytes, tmp_path: Path) -> None:
    """Its damage was reported (a warning, one reject that says why): blaming --format too
    sent users after the wrong cause."""
    bad = _corrupt_gz(text, tmp_path / "corrupt.csv.gz")
    rejects, stats = _read(bad)
    assert (stats.lines, stats.parsed, stats.rejected) == (1, 0, 1)
    assert str(rejects[0]["reason"]).startswith("corrupt compressed data")
    assert stats.format_warnings("kdd") == []
    assert stats.format_hint("kdd") == ""


def test_an_input_of_over_long_lines_only_gets_no_format_hint(tmp_path: Path) -> None:
    path = tmp_path / "one-line.csv"
    path.write_bytes(b"x" * LONG_LINE + b"\n" + b"y" * LONG_LINE)
    _, stats = _read(path)
    assert (stats.lines, stats.parsed, stats.rejected) == (2, 0, 2)
    assert stats.format_warnings("kdd") == [] and stats.format_hint("kdd") == ""


def test_lines_that_fail_to_parse_still_get_the_format_hint(text: bytes, tmp_path: Path) -> None:
    """Beside damage too: a damaged .gz whose readable lines are all of another format."""
    other = b"".join(b"%d not a kdd record\n" % i for i in range(5000))
    one = gzip.compress(other, mtime=0)
    packed = bytearray(one + gzip.compress(other, mtime=0))
    mid = len(one) + len(one) // 2  # the second member is damaged; the first one's lines are read
    packed[mid : mid + 64] = bytes(64)
    damaged = tmp_path / "other.log.gz"
    damaged.write_bytes(bytes(packed))
    wrong = tmp_path / "wrong.log"
    wrong.write_bytes(b"not a kdd record\n" * 3)
    rejects, stats = _read(damaged, wrong)
    assert stats.by_source[str(damaged)] == {"lines": 5001, "parsed": 0, "rejected": 5001}
    assert stats.format_warnings("kdd") == [
        f"warning: none of the 5,001 lines of {damaged} could be parsed as kdd records; is "
        "--format right?",
        f"warning: none of the 3 lines of {wrong} could be parsed as kdd records; is --format "
        "right?"]
    assert stats.format_hint("kdd") == (" (none of the 5,004 lines read could be parsed as kdd "
                                        "records: is --format right?)")


def test_a_damaged_input_beside_a_good_one_warns_of_nothing(text: bytes, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_bytes(text)
    bad = _corrupt_gz(text, tmp_path / "corrupt.csv.gz")
    _, stats = _read(good, bad)
    assert stats.parsed == text.count(b"\n") and stats.rejected == 1
    assert stats.format_warnings("kdd") == [] and stats.format_hint("kdd") == ""


# -- UTF-16 text is refused in one line, before it is read ------------------------------------


def _utf16(text: bytes, encoding: str, bom: bool) -> bytes:
    return ("\ufeff" * bom + text.decode()).encode(encoding)


@pytest.mark.parametrize(("encoding", "bom", "convert_from"), [
    ("utf-16-le", True, "UTF-16"),  # Windows PowerShell 5's `>`
    ("utf-16-be", True, "UTF-16"),
    ("utf-16-le", False, "UTF-16LE"),  # iconv -t UTF-16LE
    ("utf-16-be", False, "UTF-16BE"),
])
def test_utf16_text_is_refused_with_the_command_that_converts_it(
        text: bytes, tmp_path: Path, encoding: str, bom: bool, convert_from: str) -> None:
    """Read as UTF-8, every line of it was a reject, and the warning blamed --format."""
    path = tmp_path / "traffic.csv"
    path.write_bytes(_utf16(text[:5000], encoding, bom))
    with pytest.raises(InputError) as err:
        parse_input_spec(str(path))
    assert str(err.value) == (
        f"{path} looks like UTF-16 text; deepwatch reads UTF-8: convert it first, e.g. "
        f"`iconv -f {convert_from} -t UTF-8 {path} | deepwatch ... -`")
    with pytest.raises(InputError, match="looks like UTF-16 text"):  # a glob that matches it
        parse_input_spec(str(tmp_path / "*.csv"))


def test_utf16_text_in_a_gz_file_is_refused_when_decompressed(text: bytes,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "traffic.csv.gz"
    path.write_bytes(gzip.compress(_utf16(text, "utf-16-le", True)))
    (spec,) = parse_input_spec(str(path))  # its text is not known before it is decompressed
    with pytest.raises(InputError) as err:
        list(iter_chunks(spec))
    assert str(err.value) == (
        f"{path} looks like UTF-16 text; deepwatch reads UTF-8: convert it first, e.g. "
        f"`gzip -dc {path} | iconv -f UTF-16 -t UTF-8 | deepwatch ... -`")


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_utf16_text_in_a_bzip2_or_xz_file_is_refused_with_its_decompressor(
        kind: str, text: bytes, tmp_path: Path) -> None:
    import bz2
    import lzma

    path = tmp_path / "traffic.log"  # bzip2 or xz by its first bytes
    data = _utf16(text[:20_000], "utf-16-le", True)
    path.write_bytes(bz2.compress(data) if kind == "bzip2" else lzma.compress(data))
    (spec,) = parse_input_spec(str(path))
    with pytest.raises(InputError) as err:
        list(iter_chunks(spec))
    assert str(err.value) == (
        f"{path} looks like UTF-16 text; deepwatch reads UTF-8: convert it first, e.g. "
        f"`{kind} -dc {path} | iconv -f UTF-16 -t UTF-8 | deepwatch ... -`")


def test_utf16_text_on_a_pipe_is_refused_at_its_first_block(text: bytes, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(_utf16(text[:5000], "utf-16-le", False))

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        (spec,) = parse_input_spec(str(fifo))
        with pytest.raises(InputError, match=r"pipe looks like UTF-16 text; .*`iconv -f "
                                             r"UTF-16LE -t UTF-8 .*pipe \| deepwatch \.\.\. -`"):
            list(iter_chunks(spec))
    finally:
        writer.join()


def test_utf8_text_with_nul_bytes_is_not_taken_for_utf16(text: bytes, tmp_path: Path) -> None:
    """A NUL here and there (a damaged line, even a run of them at the start) is not UTF-16:
    the file is read, the lines with NULs rejected as any bad line is."""
    lines = text.splitlines(keepends=True)[:50]
    odd = b"0\x00,\x00t\x00c\x00p\x00,http,SF\x00\x00\x00\x00,1,2\n"  # NUL-spaced for 10 bytes only
    path = tmp_path / "nuls.csv"
    path.write_bytes(odd + b"".join(lines[:25]) + b"\x00" * 40 + b"\n" + b"".join(lines[25:]))
    assert utf16_encoding(path.read_bytes()) is None
    assert not parse_input_spec(str(path))[0].gzip  # not refused
    rejects, stats = _read(path)
    assert (stats.parsed, stats.rejected) == (50, 2)
    assert [r["line"] for r in rejects] == [1, 27]
    for head in (b"", b"a\x00b\x00", b"\x00" * 64, b"a" * 64, b"\x00a" * 3 + b"\x00\x00"):
        assert utf16_encoding(head) is None


# -- the reject of an over-long line says its length and what is kept ----------------------


def test_an_over_long_line_reject_says_its_length_and_what_is_kept(text: bytes,
                                                                  tmp_path: Path) -> None:
    """It said "raw text cut to its first 10,000 of 40,000 characters" of a 2 MB line: the
    40,000 were the bytes held for the reject, not the line."""
    first, second = text.splitlines(keepends=True)[:2]
    path = tmp_path / "long.csv"
    path.write_bytes(first + b"x" * LONG_LINE + b"\n" + second)
    rejects, stats = _read(path)
    assert (stats.parsed, stats.rejected) == (2, 1)
    (reject,) = rejects
    assert reject["line"] == 2
    assert reject["reason"] == ("the line is 2,097,152 bytes long, over the limit of 1,048,576 "
                                "bytes for one record (the raw text keeps its first 10,000 bytes)")
    assert reject["raw"] == "x" * MAX_RAW


def test_the_bytes_kept_of_an_over_long_line_end_where_a_character_does(tmp_path: Path) -> None:
    """10,000 bytes of text in two-byte characters after one of one byte: the character cut at
    the end is not kept (nor replaced by U+FFFD), and the count says so."""
    line = "a" + "é" * MAX_LINE_BYTES  # 2,097,153 bytes
    path = tmp_path / "accents.csv"
    path.write_bytes(line.encode())
    (reject,), _ = _read(path)
    assert reject["reason"] == ("the line is 2,097,153 bytes long, over the limit of 1,048,576 "
                                "bytes for one record (the raw text keeps its first 9,999 bytes)")
    assert reject["raw"] == "a" + "é" * 4999


def test_cut_lost_keeps_short_text_whole() -> None:
    assert cut_lost(b"cut sh", "why") == ("cut sh", "why")
    # a byte that is not UTF-8 is kept as its escape (four characters), not as U+FFFD
    assert cut_lost(b"\xff" * MAX_RAW, "why") == ("\\xFF" * MAX_RAW, "why")
    raw, why = cut_lost(b"\xff" * LOST_BYTES, "why")
    assert raw == "\\xFF" * MAX_RAW and why == "why (the raw text keeps its first 10,000 bytes)"


def test_the_damage_reject_of_a_gz_file_says_how_much_text_it_keeps(text: bytes,
                                                                   tmp_path: Path) -> None:
    bad = _corrupt_gz(text, tmp_path / "corrupt.csv.gz")
    (reject,), _ = _read(bad)
    assert str(reject["reason"]).endswith(
        "could not be verified, and nothing after them could be read (the raw text keeps its "
        "first 10,000 bytes)")
    assert reject["raw"] == text[:MAX_RAW].decode()


# -- progress: by the bytes read from the files -------------------------------------------------


@pytest.fixture
def bar(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int | None]]:
    """The reader's progress bar, without a terminal: its total and each advance."""
    seen: dict[str, list[int | None]] = {"total": [], "advances": []}

    @contextlib.contextmanager
    def byte_progress(what: str, total: int | None) -> Iterator[Callable[[int], None]]:
        seen["total"].append(total)
        yield seen["advances"].append

    monkeypatch.setattr("deepwatch.progress.byte_progress", byte_progress)
    return seen


def test_the_progress_bar_ends_at_the_size_of_the_files(
        text: bytes, tmp_path: Path, bar: dict[str, list[int | None]]) -> None:
    """It advanced by a quarter of the decompressed text of a .gz file (KDD text compresses
    about 33 to 1: "11.8/1.4 MB"), and not at all for a byte order mark or an over-long line."""
    plain = tmp_path / "plain.csv"
    plain.write_bytes(b"\xef\xbb\xbf" + text + b"z" * LONG_LINE + b"\n" + text)
    packed = tmp_path / "packed.csv.gz"
    packed.write_bytes(gzip.compress(text * 3))
    members = tmp_path / "members.csv.gz"
    members.write_bytes(gzip.compress(text) + gzip.compress(text))
    corrupt = _corrupt_gz(text, tmp_path / "corrupt.csv.gz")
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(gzip.compress(text)[: -len(text) // 40])
    paths = [plain, packed, members, corrupt, truncated]
    reader = InputReader(KDD, [str(p) for p in paths], progress=True)
    reader.read_all()
    size = sum(p.stat().st_size for p in paths)
    assert bar["total"] == [size]
    advances = [int(n or 0) for n in bar["advances"]]
    assert sum(advances) == size and min(advances) > 0


def _told(path: Path, chunk_bytes: int = 8 << 20, magic: str = "gzip") -> list[int]:
    told: list[int] = []
    spec = (InputSpec(str(path), gzip_magic=True) if magic == "gzip"
            else InputSpec(str(path), magic=magic))
    for _ in iter_chunks(spec, chunk_bytes=chunk_bytes, on_bytes=told.append):
        pass
    return told


def test_a_gz_input_tells_of_its_compressed_bytes_once_each(
        text: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member longer than what is held back is read twice, counted once; the bytes after a
    damage, never read, are counted at the end: the counts add up to the file's size."""
    from deepwatch.sources import files

    monkeypatch.setattr(files, "HOLD_BYTES", 64 << 10)
    long = tmp_path / "long.gz"
    long.write_bytes(gzip.compress(text * 4))
    told = _told(long, chunk_bytes=64 << 10)
    assert sum(told) == long.stat().st_size and len(told) >= 2
    bad = bytearray(gzip.compress(text * 4))
    bad[len(bad) // 3 : len(bad) // 3 + 64] = bytes(64)
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(bytes(bad))
    assert sum(_told(damaged)) == damaged.stat().st_size
    empty = tmp_path / "empty.gz"
    empty.write_bytes(b"")
    assert _told(empty) == []


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_a_bzip2_or_xz_input_tells_of_its_compressed_bytes_once_each(
        kind: str, text: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        bar: dict[str, list[int | None]]) -> None:
    """As for gzip: a stream read twice is counted once, the bytes a damage leaves unread are
    counted at the end, and the bar of a run over such files ends at their size."""
    import bz2
    import lzma

    from deepwatch.sources import files

    def pack(data: bytes) -> bytes:
        return bz2.compress(data, 1) if kind == "bzip2" else lzma.compress(data)

    monkeypatch.setattr(files, "HOLD_BYTES", 64 << 10)
    monkeypatch.setattr(files, "_PIECE", 4 << 10)  # compressed bytes read at a time
    long = tmp_path / "long.log"
    long.write_bytes(pack(text * 2) + pack(text))
    told = _told(long, chunk_bytes=64 << 10, magic=kind)
    assert sum(told) == long.stat().st_size and len(told) >= 2
    bad = bytearray(pack(text * 2))
    bad[len(bad) // 3 : len(bad) // 3 + 64] = bytes(64)
    damaged = tmp_path / "damaged.log"
    damaged.write_bytes(bytes(bad))
    assert sum(_told(damaged, magic=kind)) == damaged.stat().st_size
    truncated = tmp_path / "truncated.log"
    truncated.write_bytes(pack(text)[: -len(text) // 40])
    assert sum(_told(truncated, magic=kind)) == truncated.stat().st_size
    paths = [long, damaged, truncated]
    InputReader(KDD, [str(p) for p in paths], progress=True).read_all()
    size = sum(p.stat().st_size for p in paths)
    assert bar["total"] == [size]
    assert sum(int(n or 0) for n in bar["advances"]) == size
