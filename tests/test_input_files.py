"""Reading input files: gzip members (bzip2 and xz streams) handed out only once verified, lines
cut by damage, names with glob characters, byte order marks and labelled stdin."""

from __future__ import annotations

import gzip
import io
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from deepwatch.errors import InputError
from deepwatch.formats import get_format
from deepwatch.sources import files
from deepwatch.sources.files import BOM as BOM_BYTES
from deepwatch.sources.files import (
    Chunk,
    InputSpec,
    LineBuffer,
    chunks_from_reads,
    iter_chunks,
    parse_input_spec,
    read_inputs,
)

ACCESS = ('1.2.3.4 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 5 "-" "Mozilla/5.0"\n')


@pytest.fixture(scope="module")
def text(small_kdd_test: Path) -> bytes:
    return small_kdd_test.read_bytes()


def _chunks(path: Path, chunk_bytes: int = 64 << 10) -> list[Chunk]:
    return list(iter_chunks(InputSpec(str(path)), chunk_bytes=chunk_bytes))


def _sniffed(path: Path, chunk_bytes: int = 64 << 10) -> list[Chunk]:
    """The chunks of ``path`` read as ``parse_input_spec`` finds it (compression by first bytes)."""
    (spec,) = parse_input_spec(str(path))
    return list(iter_chunks(spec, chunk_bytes=chunk_bytes))


def _data(chunks: list[Chunk]) -> bytes:
    return b"".join(c.data for c in chunks)


def _members(text: bytes, parts: int) -> list[bytes]:
    """``text`` in ``parts`` gzip members, cut at line breaks."""
    lines = text.splitlines(keepends=True)
    step = -(-len(lines) // parts)
    return [gzip.compress(b"".join(lines[i : i + step]), mtime=0)
            for i in range(0, len(lines), step)]


def _flip(member: bytes, at: int) -> bytes:
    bad = bytearray(member)
    bad[at] ^= 0xFF
    return bytes(bad)


# -- corrupt gzip members ---------------------------------------------------------------------


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7, 0.95])
def test_a_corrupt_member_hands_out_no_line_of_it(text: bytes, tmp_path: Path,
                                                  where: float) -> None:
    """A flipped byte inside a member: deflate may decode garbage before the damage is seen
    (at the latest at the CRC-32 in the trailer). No line of that member is handed out; the
    members before it are, whole."""
    members = _members(text, 4)
    third = members[2]
    path = tmp_path / "flipped.csv.gz"
    path.write_bytes(b"".join(members[:2]) + _flip(third, int(len(third) * where))
                     + members[3])
    chunks = _chunks(path)
    good = gzip.decompress(b"".join(members[:2]))
    assert _data(chunks) == good
    last = chunks[-1]
    assert last.damage is not None and last.data == b""
    assert last.first_line == good.count(b"\n") + 1
    assert last.damage.startswith("corrupt compressed data")
    assert [c.damage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_the_garbage_of_a_corrupt_member_is_kept_as_lost_text(text: bytes,
                                                               tmp_path: Path) -> None:
    member = gzip.compress(text[:200_000], mtime=0)
    path = tmp_path / "flipped.csv.gz"
    path.write_bytes(_flip(member, len(member) // 2))
    chunks = _chunks(path)
    assert _data(chunks) == b""
    (last,) = chunks
    assert "come from a damaged gzip member and could not be verified" in last.damage
    # what was decoded before the damage was seen: the member's start, as far as it is intact
    assert 0 < len(last.lost) <= 4 * files.MAX_RAW
    assert text.startswith(last.lost[:1000])


def test_score_scores_no_line_of_a_corrupt_member(
        kdd_bundle: Path, text: bytes, tmp_path: Path) -> None:
    """The audit's case: every scored row is the line of the original with its number."""
    import json

    from deepwatch.cli import main

    members = _members(text, 3)
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(members[0] + _flip(members[1], len(members[1]) // 2) + members[2])
    out, rejects = tmp_path / "v.jsonl", tmp_path / "r.jsonl"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--rejects", str(rejects), str(path)]) == 0
    good = gzip.decompress(members[0]).count(b"\n")
    assert len(out.read_text().splitlines()) == good
    (rej,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert rej["line"] == good + 1 and "damaged gzip member" in rej["reason"]


# -- members longer than what is held back -------------------------------------------------


@pytest.fixture
def small_hold(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """HOLD_BYTES of 64 KiB; the list gets one entry for each member decompression started."""
    monkeypatch.setattr(files, "HOLD_BYTES", 64 << 10)
    starts: list[int] = []
    inflate = files._inflate

    def counting(fh, first, member):  # type: ignore[no-untyped-def]
        starts.append(1)
        return inflate(fh, first, member)

    monkeypatch.setattr(files, "_inflate", counting)
    return starts


def test_a_long_member_is_verified_then_read_again(text: bytes, tmp_path: Path,
                                                   small_hold: list[int]) -> None:
    path = tmp_path / "long.csv.gz"
    path.write_bytes(gzip.compress(text))
    chunks = _chunks(path)
    assert _data(chunks) == text and chunks[-1].damage is None
    assert len(small_hold) == 3  # verify, read again, and the end of the file


def test_a_long_corrupt_member_hands_out_nothing(text: bytes, tmp_path: Path,
                                                 small_hold: list[int]) -> None:
    first = gzip.compress(text[:50_000], mtime=0)  # short: held back, then handed out
    second = gzip.compress(text[50_000:], mtime=0)
    path = tmp_path / "long_bad.csv.gz"
    path.write_bytes(first + _flip(second, len(second) // 2))
    chunks = _chunks(path)
    good = text[: text.rfind(b"\n", 0, 50_000) + 1]
    assert _data(chunks) == good
    assert chunks[-1].first_line == good.count(b"\n") + 1
    assert "damaged gzip member" in chunks[-1].damage
    assert len(small_hold) == 2  # the long member was not read a second time


def test_a_long_truncated_member_hands_out_its_whole_lines(text: bytes, tmp_path: Path,
                                                           small_hold: list[int]) -> None:
    whole = gzip.compress(text)
    path = tmp_path / "long_cut.csv.gz"
    path.write_bytes(whole[: len(whole) * 3 // 4])
    chunks = _chunks(path)
    decoded = zlib.decompressobj(wbits=31).decompress(whole[: len(whole) * 3 // 4])
    assert _data(chunks) == decoded[: decoded.rfind(b"\n") + 1]
    assert "truncated" in chunks[-1].damage
    assert chunks[-1].lost == decoded[decoded.rfind(b"\n") + 1 :]


def test_a_named_pipe_is_read_through_a_copy(text: bytes, tmp_path: Path,
                                             small_hold: list[int]) -> None:
    """A pipe cannot seek back to a long member's start; its compressed data is copied first."""
    fifo = tmp_path / "pipe.csv.gz"
    os.mkfifo(fifo)
    payload = gzip.compress(text)
    writer = threading.Thread(target=fifo.write_bytes, args=(payload,))
    writer.start()
    try:
        chunks = _chunks(fifo)
    finally:
        writer.join()
    assert _data(chunks) == text and chunks[-1].damage is None


def test_many_small_members_make_full_chunks(text: bytes, tmp_path: Path) -> None:
    """bgzip-like files (a member every 64 KiB) are handed out in chunks of the usual size."""
    raw = text * 3
    path = tmp_path / "blocks.csv.gz"
    path.write_bytes(b"".join(gzip.compress(raw[i : i + (64 << 10)], mtime=0)
                              for i in range(0, len(raw), 64 << 10)))
    chunks = _chunks(path, chunk_bytes=1 << 20)
    assert _data(chunks) == raw
    assert len(chunks) <= len(raw) // (1 << 20) + 2


def test_an_empty_gz_file_is_an_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "empty.gz"
    path.write_bytes(b"")
    assert _chunks(path) == []


# -- a line cut by damage --------------------------------------------------------------------


def test_a_line_cut_by_a_truncation_is_no_record(tmp_path: Path) -> None:
    """The audit's case: a web log cut inside its second line's user agent."""
    cut = ('5.6.7.8 - - [17/May/2015:10:05:04 +0000] "GET /admin HTTP/1.1" 200 7 '
           '"http://evil.example/" "sqlmap/1.')
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    path = tmp_path / "ua_cut.log.gz"
    path.write_bytes(comp.compress((ACCESS + cut).encode()) + comp.flush(zlib.Z_SYNC_FLUSH))
    chunks = _chunks(path)
    assert _data(chunks) == ACCESS.encode()
    assert chunks[-1].first_line == 2 and chunks[-1].lost == cut.encode()
    assert "line 2 is cut short" in chunks[-1].damage
    table, rejects, stats = read_inputs([str(path)], get_format("access"))
    assert table.num_rows == 1 and table.column("user_agent").to_pylist() == ["Mozilla/5.0"]
    assert rejects.column("line").to_pylist() == [2]
    assert (stats.lines, stats.parsed, stats.rejected) == (2, 1, 1)


def test_a_truncation_at_a_line_break_cuts_no_line(tmp_path: Path) -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    path = tmp_path / "at_break.log.gz"
    path.write_bytes(comp.compress(ACCESS.encode() * 2) + comp.flush(zlib.Z_SYNC_FLUSH))
    chunks = _chunks(path)
    assert _data(chunks) == ACCESS.encode() * 2
    assert chunks[-1].first_line == 3 and chunks[-1].lost == b""
    assert "nothing from line 3 on could be read" in chunks[-1].damage


# -- input names -----------------------------------------------------------------------------


def test_a_path_that_exists_is_not_a_glob(tmp_path: Path) -> None:
    literal = tmp_path / "data[1].csv"
    literal.write_text("x\n")
    (tmp_path / "data1.csv").write_text("y\n")  # what the glob data[1].csv matches
    assert parse_input_spec(str(literal)) == [InputSpec(str(literal))]
    assert parse_input_spec(f"{literal}=scan") == [InputSpec(str(literal), "scan")]
    # a pattern that names no file as it is written is still a glob
    assert parse_input_spec(str(tmp_path / "data[0-9].csv")) == [
        InputSpec(str(tmp_path / "data1.csv"))]
    assert parse_input_spec(str(tmp_path / "*.csv")) == [
        InputSpec(str(tmp_path / "data1.csv")), InputSpec(str(literal))]


def test_stdin_can_have_a_label() -> None:
    assert parse_input_spec("-=scanner") == [InputSpec("-", "scanner")]
    assert parse_input_spec("-=a=b") == [InputSpec("-", "a=b")]
    assert parse_input_spec("-") == [InputSpec("-")]


def test_a_label_may_hold_an_equals_sign(tmp_path: Path) -> None:
    f = tmp_path / "x=1.csv"  # and so may the path
    f.write_text("x\n")
    assert parse_input_spec(f"{f}=k=v") == [InputSpec(str(f), "k=v")]
    assert parse_input_spec(f"{tmp_path}/*.csv=k=v") == [InputSpec(str(f), "k=v")]
    with pytest.raises(InputError, match=r"no such file: .*/gone.csv=k \(read .* as PATH=LABEL "
                                         r"with the label 'v'\)"):
        parse_input_spec(f"{tmp_path}/gone.csv=k=v")


def test_a_labelled_stdin_taken_for_an_option_gets_a_hint(
        capsys: pytest.CaptureFixture[str]) -> None:
    from deepwatch.cli import main

    assert main(["score", "nowhere", "-f", "kdd", "--out", "o.jsonl", "-=scan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("to label stdin, end the options first: -- -=LABEL"), err


# -- byte order marks ------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def test_a_byte_order_mark_is_dropped_at_the_start_only() -> None:
    lines = LineBuffer(InputSpec("x"))
    assert lines.feed(BOM[:1]) == [] and lines.feed(BOM[1:] + b"a") == []  # split over reads
    [first] = lines.feed(b"b\n" + BOM + b"c\n")
    assert first.data == b"ab\n" + BOM + b"c\n"  # not in the middle
    [second] = lines.feed(BOM + b"d\n")
    assert second.data == BOM + b"d\n"  # nor at a later chunk's start
    assert lines.finish() is None
    # after finish (a rotated or truncated log): a new start
    [again] = lines.feed(BOM + b"e\n")
    assert again.data == b"e\n" and again.first_line == 1
    # a mark alone makes no line; a last line without a break loses it too
    only = LineBuffer(InputSpec("x"))
    assert only.feed(BOM) == [] and only.finish() is None
    last = LineBuffer(InputSpec("x"))
    assert last.feed(BOM + b"f") == []
    end = last.finish()
    assert end is not None and end.data == b"f"


def test_stdin_loses_its_byte_order_mark() -> None:
    stream = io.BytesIO(BOM + b"a\nb\n")
    chunks = list(chunks_from_reads(lambda: stream.read(2), InputSpec("-")))
    assert _data(chunks) == b"a\nb\n"


@pytest.mark.parametrize("gz", [False, True])
def test_formats_read_files_that_open_with_a_byte_order_mark(
        text: bytes, tmp_path: Path, gz: bool) -> None:
    from test_zeek import HEADER, ROW

    inputs = {"access": ACCESS.encode() * 3, "kdd": text[: text.rfind(b"\n", 0, 20_000) + 1],
              "zeek": (HEADER + "\n" + ROW + "\n").encode()}
    for name, body in inputs.items():
        path = tmp_path / (f"{name}.log.gz" if gz else f"{name}.log")
        path.write_bytes(gzip.compress(BOM + body) if gz else BOM + body)
        table, rejects, stats = read_inputs([str(path)], get_format(name))
        assert rejects.num_rows == 0, (name, rejects.to_pylist())
        assert stats.parsed == table.num_rows > 0
        if name == "access":
            assert table.column("client_ip").to_pylist() == ["1.2.3.4"] * 3


def test_score_rejects_every_line_opened_by_a_byte_order_mark_wherever_it_falls(
        kdd_bundle: Path, text: bytes, tmp_path: Path) -> None:
    """A mark inside a file (``cat a.csv b.csv`` of files that open with one) stays on its line,
    which is a reject: also where it opens the second 8 MiB chunk of a file, and in a small
    file. It was parsed there, Arrow's CSV reader dropping the mark that opens its buffer, while
    the same line was a reject anywhere else in the file."""
    import json
    import subprocess
    import sys

    lines = text.splitlines(keepends=True)
    first = bytearray()
    while len(first) < files.CHUNK_BYTES - 1000:  # one chunk of whole lines, exactly
        first += lines[len(first) % 97]
    first += b"x" * (files.CHUNK_BYTES - len(first) - 1) + b"\n"  # one reject, to fill it
    marked = BOM_BYTES + lines[5]
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    big.write_bytes(bytes(first) + marked + b"".join(lines[:50]) + marked + b"".join(lines[:50]))
    small.write_bytes(b"".join(lines[:10]) + marked + b"".join(lines[:10]))
    n_big = first.count(b"\n") + 102
    rejects = tmp_path / "rejects.jsonl"
    run = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                          "--format", "kdd", "--out", str(tmp_path / "out.parquet"),
                          "--rejects", str(rejects), str(big), str(small)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert run.returncode == 0, run.stderr
    assert f"{n_big + 21:,} lines read: {n_big + 21 - 4:,} parsed, 4 rejected" in run.stderr
    why = ("the line starts with a UTF-8 byte order mark (U+FEFF): a file joined to the one "
           "before it?")
    kept = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["source"], r["line"], r["reason"]) for r in kept[1:]] == [
        (str(big), n_big - 101, why), (str(big), n_big - 50, why), (str(small), 11, why)]
    assert {r["raw"] for r in kept[1:]} == {marked.decode().removesuffix("\n")}


# -- compression told by the first bytes -----------------------------------------------------
def test_a_gzip_file_without_a_gz_name_is_read_as_gzip(text: bytes, tmp_path: Path) -> None:
    """Rotated logs and downloads are not always named .gz: the magic bytes decide."""
    path = tmp_path / "access.log.1"
    path.write_bytes(gzip.compress(text))
    (spec,) = parse_input_spec(str(path))
    assert spec.gzip
    assert _data(list(iter_chunks(spec, chunk_bytes=64 << 10))) == text
    plain = tmp_path / "plain.csv"
    plain.write_bytes(text)
    assert not parse_input_spec(str(plain))[0].gzip


def _compressed(kind: str, data: bytes) -> bytes:
    import bz2
    import lzma

    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    if kind == "zip":
        import zipfile

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.csv", data)
        return buf.getvalue()
    # the frame magic numbers of formats the standard library cannot write, then anything
    return {"zstd": b"\x28\xb5\x2f\xfd", "lz4": b"\x04\x22\x4d\x18",
            "7-Zip": b"7z\xbc\xaf\x27\x1c"}[kind] + data


@pytest.mark.parametrize("kind", ["zstd", "lz4", "zip", "7-Zip"])
def test_other_compression_is_refused_in_one_line_not_read_as_text(
        kind: str, text: bytes, tmp_path: Path) -> None:
    """Read as text, a .zst file was a column of rejects and a warning blaming --format."""
    path = tmp_path / "traffic.csv.x"
    path.write_bytes(_compressed(kind, text))
    with pytest.raises(InputError, match=f"is compressed with {kind};") as err:
        parse_input_spec(str(path))
    command = {"zip": "unzip -p", "7-Zip": "7z x -so"}.get(kind, f"{kind} -dc")
    assert "\n" not in str(err.value)
    assert "reads plain text, and gzip, bzip2 and xz from files" in str(err.value)
    assert f"`{command} {path} | deepwatch ... -`" in str(err.value)
    # a glob that matches it is refused the same way
    with pytest.raises(InputError, match=f"compressed with {kind}"):
        parse_input_spec(str(tmp_path / "*.x"))


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_bzip2_and_xz_are_read_by_their_first_bytes_whatever_the_name(
        kind: str, text: bytes, tmp_path: Path) -> None:
    """Rotated logs are often .bz2 or .xz, and not always so named: they were refused ("compressed
    with bzip2; ... decompress it first"); now the magic bytes decide, over a name that says
    otherwise too, and the text read is the original's, byte for byte."""
    packed = _compressed(kind, text)
    for name in (f"traffic.csv.{'bz2' if kind == 'bzip2' else 'xz'}", "access.log.1",
                 "wrong.csv.gz"):
        path = tmp_path / name
        path.write_bytes(packed)
        (spec,) = parse_input_spec(str(path))
        assert spec.compression == kind and not spec.gzip
        assert _data(list(iter_chunks(spec, chunk_bytes=64 << 10))) == text
    # by its name alone (a caller that did not look at its first bytes)
    named = tmp_path / f"named.{'bz2' if kind == 'bzip2' else 'xz'}"
    named.write_bytes(packed)
    assert InputSpec(str(named)).compression == kind
    assert _data(_chunks(named)) == text
    table, rejects, stats = read_inputs([str(tmp_path / "access.log.1")], get_format("kdd"))
    assert rejects.num_rows == 0 and table.num_rows == stats.parsed == text.count(b"\n")


def _streams(kind: str, text: bytes, parts: int) -> list[bytes]:
    """``text`` in ``parts`` bzip2 or xz streams, cut at line breaks (what pbzip2 writes)."""
    import bz2
    import lzma

    lines = text.splitlines(keepends=True)
    step = -(-len(lines) // parts)
    pack = bz2.compress if kind == "bzip2" else lzma.compress
    return [pack(b"".join(lines[i : i + step])) for i in range(0, len(lines), step)]


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_a_file_of_many_bzip2_or_xz_streams_is_read_whole(
        kind: str, text: bytes, tmp_path: Path) -> None:
    """``pbzip2`` writes a stream for each block, ``cat a.xz b.xz`` two streams (xz may put NUL
    stream padding between and after them): every stream is read, in chunks of the usual size,
    with no damage; padding that is not a multiple of 4 bytes is damage, as ``xz -d`` says."""
    streams = _streams(kind, text, 7)
    sep = b"\x00" * 8 if kind == "xz" else b""
    path = tmp_path / "many.log"
    path.write_bytes(sep.join(streams) + sep)
    chunks = _sniffed(path, chunk_bytes=1 << 20)
    assert _data(chunks) == text and all(c.damage is None for c in chunks)
    assert len(chunks) <= len(text) // (1 << 20) + 2
    if kind == "xz":
        odd = tmp_path / "odd-padding.xz"
        odd.write_bytes(streams[0] + b"\x00" * 3 + streams[1])
        chunks = _sniffed(odd)
        first = lzma_text(streams[0])
        assert _data(chunks) == first
        assert "stream padding of 3 bytes, not a multiple of 4" in str(chunks[-1].damage)
        assert chunks[-1].first_line == first.count(b"\n") + 1


def lzma_text(stream: bytes) -> bytes:
    import lzma

    return lzma.decompress(stream)


def test_a_multi_block_xz_file_is_read_whole(text: bytes, tmp_path: Path) -> None:
    """What ``xz -T`` writes: one stream of many blocks, each with its own check."""
    import shutil
    import subprocess

    if shutil.which("xz") is None:
        pytest.skip("the xz command")
    packed = subprocess.run(["xz", "-T2", "--block-size=65536", "-c"], input=text,
                            capture_output=True, check=True).stdout
    path = tmp_path / "threads.xz"
    path.write_bytes(packed)
    assert _data(_sniffed(path)) == text


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_a_corrupt_bzip2_or_xz_stream_hands_out_no_line_of_it(
        kind: str, text: bytes, tmp_path: Path) -> None:
    """As a corrupt gzip member: the streams before it are handed out whole, none of it."""
    import bz2
    import lzma

    streams = _streams(kind, text, 4)
    path = tmp_path / "flipped.log"
    path.write_bytes(b"".join(streams[:2]) + _flip(streams[2], len(streams[2]) // 2)
                     + streams[3])
    chunks = _sniffed(path)
    good = (bz2.decompress if kind == "bzip2" else lzma.decompress)(b"".join(streams[:2]))
    assert _data(chunks) == good
    last = chunks[-1]
    assert last.data == b"" and last.first_line == good.count(b"\n") + 1
    assert last.damage is not None and last.damage.startswith("corrupt compressed data")
    assert [c.damage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


@pytest.mark.parametrize("kind", ["xz"])
def test_a_long_bzip2_or_xz_stream_is_verified_then_read_again(
        kind: str, text: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream longer than what is held back is decompressed to its end, then again from its
    start; a long corrupt one hands out nothing of it and is not read again. (bzip2 is read
    once, block by verified block: see the tests below.)"""
    monkeypatch.setattr(files, "HOLD_BYTES", 64 << 10)
    starts: list[int] = []
    unpack = files._unpack

    def counting(*args, **kw):  # type: ignore[no-untyped-def]
        starts.append(1)
        return unpack(*args, **kw)

    monkeypatch.setattr(files, "_unpack", counting)
    (whole,) = _streams(kind, text, 1)
    path = tmp_path / "long.log"
    path.write_bytes(whole)
    chunks = _sniffed(path)
    assert _data(chunks) == text and chunks[-1].damage is None
    assert len(starts) == 3  # verify, read again, and the end of the file
    starts.clear()
    cut = text.rfind(b"\n", 0, 50_000) + 1
    (short,), (rest,) = _streams(kind, text[:cut], 1), _streams(kind, text[cut:], 1)
    bad = tmp_path / "long-bad.log"
    bad.write_bytes(short + _flip(rest, len(rest) // 2))
    chunks = _sniffed(bad)
    assert _data(chunks) == text[:cut]  # the short stream, held back then handed out
    assert str(chunks[-1].damage).startswith("corrupt compressed data")
    assert chunks[-1].first_line == text[:cut].count(b"\n") + 1
    assert len(starts) == 2  # the long stream was not read a second time


class _CountingBz2:
    """A stand-in for ``bz2.BZ2Decompressor`` that counts the compressed bytes it is fed."""

    fed: list[int] = []
    real: Any = None

    def __init__(self) -> None:
        self._dec = self.real()

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        self.fed.append(len(data))
        return self._dec.decompress(data, max_length)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dec, name)


@pytest.fixture()
def bz2_fed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the compressed data fed to bzip2 decompressors while the test runs."""
    import bz2

    fed: list[int] = []
    monkeypatch.setattr(_CountingBz2, "fed", fed)
    monkeypatch.setattr(_CountingBz2, "real", bz2.BZ2Decompressor)
    monkeypatch.setattr(bz2, "BZ2Decompressor", _CountingBz2)
    return fed


def _no_runs(text: bytes) -> bytes:
    """The lines of ``text`` without a run of 4 equal bytes: bzip2 stores such a run shorter,
    so without them each block holds exactly ``100,000 * level - 19`` bytes of text."""
    import re

    return b"".join(line for line in text.splitlines(keepends=True)
                    if not re.search(rb"(.)\1\1\1", line))


def _block_bits(packed: bytes) -> list[int]:
    """The bit offsets of the block magic numbers in bzip2 data (a plain search of its bits)."""
    bits = bin(int.from_bytes(packed, "big"))[2:].zfill(8 * len(packed))
    magic = format(0x314159265359, "048b")
    found, at = [], bits.find(magic)
    while at >= 0:
        found.append(at)
        at = bits.find(magic, at + 1)
    return found


def test_a_long_bzip2_stream_is_read_once_block_by_verified_block(
        text: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        bz2_fed: list[int]) -> None:
    """A bzip2 stream longer than HOLD_BYTES was decompressed twice, to verify it, then to hand
    it out: twice the time of ``bzip2 -dc`` on a file of over 256 MiB of text (55.8 s against
    18.8 s for ``bzip2 -dc`` of 756 MB of KDD rows). Each block is now verified by its own CRC
    and handed out: the file is decompressed once, and its first lines come out when little of
    it has been read."""
    import bz2

    monkeypatch.setattr(files, "HOLD_BYTES", 64 << 10)
    monkeypatch.setattr(files, "_PIECE", 4 << 10)
    packed = bz2.compress(text, 1)  # 100 kB blocks: 15 of them
    path = tmp_path / "long.bz2"
    path.write_bytes(packed)
    told: list[int] = []
    chunks = iter_chunks(InputSpec(str(path)), chunk_bytes=64 << 10, on_bytes=told.append)
    first = next(chunks)
    assert first.data and sum(told) < len(packed) // 2
    rest = list(chunks)
    assert first.data + _data(rest) == text and all(c.damage is None for c in rest)
    assert sum(told) == len(packed)
    assert len(packed) <= sum(bz2_fed) < len(packed) * 1.1


def test_damage_in_a_bzip2_block_loses_that_block_and_what_follows_not_the_blocks_before(
        text: bytes, tmp_path: Path) -> None:
    """Damage anywhere in a file written by ``bzip2`` (one stream) withheld all of it; now the
    blocks before the damaged one are read, each verified by its own CRC."""
    import bz2

    plain = _no_runs(text)
    packed = bz2.compress(plain, 1)
    blocks = _block_bits(packed)
    assert len(blocks) > 8
    for damaged in (0, 1, 5, len(blocks) - 1):
        bad = bytearray(packed)
        at = blocks[damaged] + 80 + 300  # in the block's data, past its magic number and CRC
        bad[at // 8] ^= 0x80 >> at % 8
        path = tmp_path / f"bad{damaged}.bz2"
        path.write_bytes(bytes(bad))
        chunks = _chunks(path)
        kept = plain[: 99_981 * damaged]  # the text of the blocks before it
        kept = kept[: kept.rfind(b"\n") + 1]
        assert _data(chunks) == kept, damaged
        last = chunks[-1]
        assert last.first_line == kept.count(b"\n") + 1 and last.rest_lost
        assert str(last.damage).startswith("corrupt compressed data (")
        assert str(last.damage).endswith("could be read")
        assert [c.damage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_a_magic_number_found_by_chance_inside_a_bzip2_block_is_no_block_end(
        text: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 48 bits of a block's (or the stream's end) magic number may turn up inside a block's
    data: the block, cut there, does not decode, and is tried again with the next piece joined.
    Here such false marks are added inside every block, and the text is read whole."""
    import bz2

    from deepwatch.sources import _bzip2

    packed = bz2.compress(text, 1) + bz2.compress(text[:5000], 1)
    real = _block_bits(packed)
    add = _bzip2._Bits._add

    def with_false_marks(self: Any, data: bytes) -> None:
        add(self, data)
        fake = [b + 977 for b in real if b + 977 + 48 <= 8 * self.end]
        fake += [b + 3001 for b in real if b + 3001 + 48 <= 8 * self.end]
        self.ends.update(f for f in fake[::3])  # some as end-of-stream ones
        self.marks = sorted(set(self.marks) | set(fake))

    monkeypatch.setattr(_bzip2._Bits, "_add", with_false_marks)
    path = tmp_path / "false-marks.bz2"
    path.write_bytes(packed)
    chunks = _chunks(path)
    assert _data(chunks) == text + text[:5000]
    assert all(c.damage is None for c in chunks)


def test_bzip2_streams_without_blocks_are_read_through(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``bzip2 < /dev/null`` is a stream of no block: 20,000 of them around two lines are read
    through, with the compressed bytes let go as they are passed (not all kept till the end)."""
    import bz2

    from deepwatch.sources import _bzip2

    kept: list[int] = []
    more = _bzip2._Bits.more

    def watched(self: Any) -> bool:
        kept.append(len(self.buf))
        return more(self)  # type: ignore[no-any-return]

    monkeypatch.setattr(_bzip2._Bits, "more", watched)
    empty = bz2.compress(b"")
    path = tmp_path / "empties.bz2"
    path.write_bytes(empty * 200_000 + bz2.compress(b"one\n") + empty * 200_000
                     + bz2.compress(b"two\n"))
    chunks = _chunks(path)
    assert _data(chunks) == b"one\ntwo\n" and all(c.damage is None for c in chunks)
    assert max(kept) < 3 << 19 and path.stat().st_size > 5 << 20


def test_a_bad_combined_crc_after_good_bzip2_blocks_is_one_reject_after_their_lines(
        text: bytes, tmp_path: Path) -> None:
    """Each block was verified by its own CRC, so its lines are read; a stream's combined CRC
    that does not match them is damage all the same: what follows is not read."""
    import bz2

    one, two = bytearray(bz2.compress(text[:300_000], 1)), bz2.compress(text[300_000:], 1)
    one[-3] ^= 0x01  # in the combined CRC (the last 32 bits, then up to 7 bits of padding)
    path = tmp_path / "crc.bz2"
    path.write_bytes(bytes(one) + two)
    chunks = _chunks(path)
    assert _data(chunks) == text[:300_000][: text[:300_000].rfind(b"\n") + 1]
    assert chunks[-1].damage is not None
    assert chunks[-1].damage.startswith("corrupt compressed data (the combined CRC at the end of "
                                        "a bzip2 stream does not match its blocks'")


def test_text_that_merely_starts_like_a_magic_number_is_text(tmp_path: Path) -> None:
    path = tmp_path / "odd.log"
    path.write_bytes(b"BZh9 is not bzip2 without its block magic\nPK but no zip\n")
    (spec,) = parse_input_spec(str(path))
    assert not spec.gzip and spec.compression is None
    assert _data(list(iter_chunks(spec))) == path.read_bytes()


@pytest.mark.parametrize("name", ["traffic.csv.xz", "traffic.csv.lzma", "traffic.log"])
def test_an_lzma_alone_file_is_refused_in_one_line(name: str, text: bytes,
                                                   tmp_path: Path) -> None:
    """``xz --format=lzma`` (the legacy .lzma format, no magic number and no checksum) was a
    reject that said "corrupt compressed data (Input format not supported by decoder)" under
    a .xz name, and read as text under any other: a column of binary rejects and a warning
    that blamed --format."""
    import lzma

    path = tmp_path / name
    path.write_bytes(lzma.compress(text, format=lzma.FORMAT_ALONE))
    with pytest.raises(InputError) as err:
        parse_input_spec(str(path))
    assert str(err.value) == (
        f"{path} is compressed with lzma (the legacy .lzma format, not xz); deepwatch reads "
        "plain text, and gzip, bzip2 and xz from files (not from stdin or a pipe): decompress "
        f"it first, e.g. `xz -dc {path} | deepwatch ... -`")


@pytest.mark.parametrize(("suffix", "kind"), [(".gz", "gzip"), (".bz2", "bzip2"),
                                               (".xz", "xz")])
def test_plain_text_under_a_compressed_name_is_one_reject_that_says_so(
        suffix: str, kind: str, text: bytes, tmp_path: Path) -> None:
    """The reason was the decompressor's ("corrupt compressed data (Invalid data stream)",
    "(Input format not supported by decoder)"), which sent users after a damaged file; the file
    is simply not compressed. Binary data under such a name is told apart from text."""
    path = tmp_path / f"traffic.csv{suffix}"
    path.write_bytes(text)
    (spec,) = parse_input_spec(str(path))
    assert spec.compression == kind
    (chunk,) = list(iter_chunks(spec))
    assert chunk.data == b"" and chunk.first_line == 1 and chunk.rest_lost
    assert chunk.damage == (
        f"not {kind} data: the file is named {suffix} but does not start as {kind} data does; "
        f"it looks like plain text (to read it as text, name it without {suffix}, or read it "
        "from stdin: `deepwatch ... - < FILE`): nothing from line 1 on could be read")
    assert chunk.lost == text[: len(chunk.lost)] and chunk.lost
    binary = tmp_path / f"noise{suffix}"
    binary.write_bytes(bytes(range(256)) * 4)
    (chunk,) = _chunks(binary)
    assert chunk.damage == (
        f"not {kind} data: the file is named {suffix} but does not start as {kind} data does "
        "(damaged at its start, or compressed otherwise): nothing from line 1 on could be read")
    # a file cut inside its magic number is truncated, not another format
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes({"gzip": b"\x1f", "bzip2": b"BZh9", "xz": b"\xfd7zX"}[kind])
    (chunk,) = _chunks(cut)
    assert chunk.damage is not None and "truncated file" in chunk.damage


def test_compressed_data_on_a_pipe_is_refused_at_its_first_block(text: bytes,
                                                                  tmp_path: Path) -> None:
    """A pipe cannot be looked at before it is read: its first block is checked instead,
    gzip, bzip2 and xz included (they are read from files only)."""
    for payload, kind in ((gzip.compress(text), "gzip"), (_compressed("xz", text), "xz"),
                          (_compressed("bzip2", text), "bzip2")):
        fifo = tmp_path / f"pipe-{kind}"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda f=fifo, p=payload: _feed(f, p))
        writer.start()
        try:
            (spec,) = parse_input_spec(str(fifo))  # not read ahead: a pipe gives its bytes once
            with pytest.raises(InputError, match=f"compressed with {kind};.*not from stdin or a "
                                                 "pipe"):
                list(iter_chunks(spec))
            assert spec.compression is None  # after the read: a failure must not leave the writer
        finally:
            writer.join()


def _feed(fifo: Path, payload: bytes) -> None:
    try:
        with open(fifo, "wb") as f:
            f.write(payload)
    except BrokenPipeError:  # the reader stopped at the first block, as it should
        pass


def test_score_refuses_a_compressed_input_before_writing_anything(
        kdd_bundle: Path, text: bytes, tmp_path: Path) -> None:
    import subprocess
    import sys

    good = tmp_path / "good.csv"
    good.write_bytes(text)
    bad = tmp_path / "later.csv.zst"
    bad.write_bytes(_compressed("zstd", text))
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                          "--format", "kdd", "--out", str(out), str(good), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {bad} is compressed with zstd; deepwatch reads plain text, and gzip, bzip2 and "
        f"xz from files (not from stdin or a pipe): decompress it first, e.g. `zstd -dc {bad} | "
        "deepwatch ... -`"]
    assert not out.exists()
    run = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                          "--format", "kdd", "--out", str(out), "-"], input=gzip.compress(text),
                         capture_output=True, timeout=120)
    assert run.returncode == 2 and b"<stdin> is compressed with gzip" in run.stderr
    run = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                          "--format", "kdd", "--out", str(out), "-"],
                         input=_compressed("xz", text), capture_output=True, timeout=120)
    assert run.returncode == 2 and b"<stdin> is compressed with xz" in run.stderr
    assert not out.exists()


def test_bzip2_and_xz_files_score_exactly_as_the_plain_file(
        kdd_bundle: Path, text: bytes, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Real KDD rows as text, .bz2, .xz, several bzip2 streams and xz under a plain name: the
    same output, byte for byte, and the same counts."""
    from deepwatch.cli import main

    inputs = {"plain": text, "bz2": _compressed("bzip2", text), "xz": _compressed("xz", text),
              "pbzip2": b"".join(_streams("bzip2", text, 5)),
              "xz-named-log": _compressed("xz", text)}
    outputs = {}
    for name, data in inputs.items():
        path = tmp_path / {"plain": "in.csv", "bz2": "in.csv.bz2", "xz": "in.csv.xz",
                           "pbzip2": "in.bz2", "xz-named-log": "in.log"}[name]
        path.write_bytes(data)
        out = tmp_path / f"{name}.jsonl"
        capsys.readouterr()
        assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                     str(path)]) == 0
        n = text.count(b"\n")
        assert f"{n:,} lines read: {n:,} parsed, 0 rejected" in capsys.readouterr().err
        outputs[name] = out.read_bytes()
    assert outputs["plain"].count(b"\n") == text.count(b"\n")
    assert all(got == outputs["plain"] for got in outputs.values())


@pytest.mark.parametrize("block", [1, 4, 64])
def test_a_byte_order_mark_does_not_count_towards_the_line_limit(block: int) -> None:
    """A first line of exactly the limit, after a byte order mark, fed in small blocks (a
    pipe's reads), is a record, not an over-long line; one byte more is."""
    for extra, record in ((0, True), (1, False)):
        line = b"x" * (10 + extra)
        data = BOM_BYTES + line + b"\nnext\n"
        buf = LineBuffer(InputSpec("-"), max_line=10)
        chunks = [c for i in range(0, len(data), block) for c in buf.feed(data[i : i + block])]
        last = buf.finish()
        chunks += [last] if last is not None else []
        kept = b"".join(c.data for c in chunks)
        if record:
            assert kept == line + b"\nnext\n" and all(c.damage is None for c in chunks)
        else:
            assert kept == b"next\n" and [c.first_line for c in chunks if c.damage] == [1]


# -- zero bytes after the last member or stream; empty compressed files -------------------------


def _packed(kind: str, text: bytes, parts: int) -> bytes:
    """``text`` as ``parts`` gzip members or bzip2/xz streams, one after the other."""
    if kind == "gzip":
        return b"".join(_members(text, parts))
    return b"".join(_streams(kind, text, parts))


def _reader_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "deepwatch.sources.files" and r.levelname == "WARNING"]


@pytest.mark.parametrize("kind,parts", [("gzip", 1), ("gzip", 3), ("bzip2", 1), ("bzip2", 3),
                                        ("xz", 1)])
@pytest.mark.parametrize("zeros", [1, 512, (3 << 20) + 5])
def test_zero_bytes_after_the_last_member_or_stream_are_padding_not_damage(
        kind: str, parts: int, zeros: int, text: bytes, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """What tape or tar blocking and preallocating log shippers leave after a compressed file:
    every line is read, nothing is damage, and one warning names the file and the zero bytes
    ignored (GNU gzip: "decompression OK, trailing zero bytes ignored"). xz's own stream padding
    (a multiple of 4 bytes) is part of its format and read without a word, as ``xz -d`` does."""
    path = tmp_path / f"padded.{ {'gzip': 'gz', 'bzip2': 'bz2', 'xz': 'xz'}[kind]}"
    path.write_bytes(_packed(kind, text, parts) + bytes(zeros))
    chunks = _chunks(path, chunk_bytes=1 << 20)
    assert _data(chunks) == text and all(c.damage is None for c in chunks)
    warned = _reader_warnings(caplog)
    if kind == "xz" and zeros % 4 == 0:
        assert warned == []
    else:
        assert warned == [f"{path}: decompression OK, {zeros:,} trailing zero bytes ignored "
                          f"(after the last {'gzip member' if kind == 'gzip' else kind + ' stream'}"
                          ": padding, not data)"]


def test_padding_right_after_a_piece_boundary_is_padding(text: bytes, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A gzip member that ends exactly where a read ends: the zero bytes come with the next read."""
    member = gzip.compress(text[:20_000], mtime=0)
    monkeypatch.setattr(files, "_PIECE", len(member))
    path = tmp_path / "edge.gz"
    path.write_bytes(member + bytes(100))
    chunks = _chunks(path)
    assert _data(chunks) == text[:20_000] and all(c.damage is None for c in chunks)
    assert [w.split(": ", 1)[1] for w in _reader_warnings(caplog)] == [
        "decompression OK, 100 trailing zero bytes ignored (after the last gzip member: padding, "
        "not data)"]


def test_a_long_zero_padding_is_not_held_in_memory(text: bytes, tmp_path: Path) -> None:
    """A preallocated file: 256 MiB of zeros (a sparse file) after a small member are looked at a
    piece at a time, never held whole."""
    import tracemalloc

    path = tmp_path / "prealloc.gz"
    path.write_bytes(gzip.compress(text[:20_000], mtime=0))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + (256 << 20))
    tracemalloc.start()
    try:
        chunks = _chunks(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _data(chunks) == text[:20_000] and all(c.damage is None for c in chunks)
    assert peak < 16 << 20


@pytest.mark.parametrize("kind", ["gzip", "bzip2"])
@pytest.mark.parametrize("tail", [b"\x00" * 300 + b"x" + b"\x00" * 100, b"\x00" * 300 + b"\x01",
                                  b"\x00\x00\x00\x1f\x8b"])
def test_zero_bytes_with_any_other_byte_after_them_are_still_damage(
        kind: str, tail: bytes, text: bytes, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Garbage after the last member may be a damaged next member: one reject, as before, its
    reason the decompressor's (no padding warning)."""
    packed = _packed(kind, text, 2)
    path = tmp_path / f"garbage.{'gz' if kind == 'gzip' else 'bz2'}"
    path.write_bytes(packed + tail)
    chunks = _chunks(path, chunk_bytes=1 << 20)
    assert _data(chunks) == text
    lost = chunks[-1]
    assert lost.rest_lost and lost.first_line == text.count(b"\n") + 1
    why = ("corrupt compressed data (Error -3 while decompressing data: incorrect header check)"
           if kind == "gzip" else
           f"corrupt compressed data (the bytes at offset {len(packed):,} are not the start of a "
           "bzip2 stream)")
    assert lost.damage == f"{why}: nothing from line {lost.first_line:,} on could be read"
    assert [w.split(": ", 1)[1] for w in _reader_warnings(caplog)] == [lost.damage]


@pytest.mark.parametrize("suffix,kind", [(".gz", "gzip"), (".bz2", "bzip2"), (".xz", "xz")])
def test_an_empty_compressed_file_is_no_line_and_one_warning(
        suffix: str, kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A .gz, .bz2 or .xz file of 0 bytes (a failed transfer, a log not written yet; ``gzip -t``:
    "unexpected end of file") has no record, so no reject, but is not passed over in silence."""
    path = tmp_path / f"empty.log{suffix}"
    path.write_bytes(b"")
    (spec,) = parse_input_spec(str(path))
    assert list(iter_chunks(spec)) == []
    assert _reader_warnings(caplog) == [
        f"{path}: the file is empty (0 bytes) and holds no {kind} data, though it is named "
        f"{suffix} (a failed transfer, or a file not written yet?)"]


def test_an_empty_plain_file_is_read_in_silence(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "empty.log"
    path.write_bytes(b"")
    (spec,) = parse_input_spec(str(path))
    assert list(iter_chunks(spec)) == [] and _reader_warnings(caplog) == []
