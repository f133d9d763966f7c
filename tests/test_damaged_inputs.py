"""Damaged compressed inputs (.gz, .bz2, .xz): every whole line before the damage that can be
trusted is read, the rest (the line cut short, a gzip member or bzip2/xz stream that fails its
check, what follows) is one counted reject with its reason, and the run goes on with the next
input."""

from __future__ import annotations

import bz2
import fcntl
import gzip
import json
import lzma
import os
import sys
import termios
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from deepwatch.cli import main
from deepwatch.sources.files import HeldBack, InputSpec, VerifiedStream, compression, iter_chunks


def _decodable(compressed: bytes) -> bytes:
    """Everything zlib can decompress from the start of ``compressed`` (one or more members)."""
    out, raw = [], compressed
    while raw:
        dec = zlib.decompressobj(wbits=31)
        try:
            out.append(dec.decompress(raw))
        except zlib.error:
            break
        if not dec.eof:
            break
        raw = dec.unused_data
    return b"".join(out)


@pytest.fixture(scope="module")
def text(small_kdd_test: Path) -> bytes:
    return small_kdd_test.read_bytes()


def _read(path: Path, chunk_bytes: int) -> tuple[bytes, list[int], list[str | None]]:
    chunks = list(iter_chunks(InputSpec(str(path)), chunk_bytes=chunk_bytes))
    return (b"".join(c.data for c in chunks), [c.first_line for c in chunks],
            [c.damage for c in chunks])


@pytest.mark.parametrize("chunk_bytes", [64 << 10, 1 << 20, 8 << 20])
def test_truncated_gzip_yields_every_decodable_line_then_the_damage(
        text: bytes, tmp_path: Path, chunk_bytes: int) -> None:
    whole = gzip.compress(text)
    cut = whole[: len(whole) * 2 // 3]
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(cut)
    data, first_lines, damage = _read(path, chunk_bytes)
    expected = _decodable(cut)
    assert len(expected) > len(text) // 3  # the test is about real salvage, not an empty file
    assert not expected.endswith(b"\n")  # a line is cut short: it is no record
    assert data == expected[: expected.rfind(b"\n") + 1]
    assert damage[:-1] == [None] * (len(damage) - 1)
    assert damage[-1] is not None and "truncated" in damage[-1]
    lost_from = expected.count(b"\n") + 1  # the line cut short
    assert first_lines[-1] == lost_from
    assert f"line {lost_from:,} is cut short" in damage[-1]


def test_corrupt_gzip_member_and_concatenated_members(text: bytes, tmp_path: Path) -> None:
    half = len(text) // 2
    one, two = gzip.compress(text[:half]), gzip.compress(text[half:])
    # two members read whole: no damage reported
    ok = tmp_path / "two.gz"
    ok.write_bytes(one + two)
    data, _, damage = _read(ok, 64 << 10)
    assert data == text and damage == [None] * len(damage)
    # the second member corrupted in its middle: the whole lines of the first member are read;
    # nothing of the second, not even what precedes the corruption (it cannot be verified)
    bad_two = bytearray(two)
    mid = len(bad_two) // 2
    bad_two[mid : mid + 64] = bytes(64)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(one + bytes(bad_two))
    data, first_lines, damage = _read(bad, 64 << 10)
    assert data == text[: text.rfind(b"\n", 0, half) + 1]
    assert damage[-1] is not None and "corrupt compressed data" in damage[-1]
    assert "come from a damaged gzip member and could not be verified" in damage[-1]
    assert first_lines[-1] == data.count(b"\n") + 1


def test_score_goes_on_after_a_damaged_file_and_counts_it(
        kdd_bundle: Path, text: bytes, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cut = gzip.compress(text)[: len(gzip.compress(text)) // 2]
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(cut)
    not_gzip = tmp_path / "plain.gz"  # a plain text file under a .gz name
    not_gzip.write_bytes(text[:1000])
    out, rejects = tmp_path / "v.parquet", tmp_path / "rejects.jsonl"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--rejects", str(rejects), str(damaged), str(not_gzip),
                 str(small_kdd_test)]) == 0
    salvaged = _decodable(cut)
    whole_lines = salvaged.count(b"\n")
    good_lines = len(text.splitlines())
    rows = pq.read_table(out).num_rows
    assert rows == whole_lines + good_lines  # every whole decodable line and the good file
    rej = [json.loads(line) for line in rejects.read_text().splitlines()]
    by_source = {r["source"]: [] for r in rej}
    for r in rej:
        by_source[r["source"]].append(r)
    damaged_rej = by_source[str(damaged)]
    # the torn last line and the unreadable rest: one reject (no parse of the torn line)
    assert [r["line"] for r in damaged_rej] == [whole_lines + 1]
    assert "truncated" in damaged_rej[0]["reason"] and "cut short" in damaged_rej[0]["reason"]
    # its raw text: the torn line as far as it could be read
    torn = salvaged[salvaged.rindex(b"\n") + 1:].decode()
    assert torn and damaged_rej[0]["raw"] == torn
    plain_rej = by_source[str(not_gzip)]
    assert len(plain_rej) == 1 and plain_rej[0]["line"] == 1
    assert plain_rej[0]["reason"].startswith("not gzip data: the file is named .gz but does not "
                                             "start as gzip data does; it looks like plain text")
    err = capsys.readouterr().err
    assert f"{rows + len(rej):,} lines read: {rows:,} parsed, {len(rej):,} rejected" in err


def test_a_bad_checksum_withholds_the_whole_member(text: bytes, tmp_path: Path) -> None:
    """The check fails only at the member's end: nothing decoded from the member can be
    trusted, so none of it is handed out, and the reason says how much there was."""
    comp = bytearray(gzip.compress(text))
    comp[-8:-4] = bytes(b ^ 0xFF for b in comp[-8:-4])  # the CRC32 of the trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(comp))
    data, first_lines, damage = _read(path, 8 << 20)
    assert data == b"" and first_lines == [1]
    assert damage[-1] is not None and "incorrect data check" in damage[-1]
    assert "bytes decompressed from line 1 on come from a damaged gzip member" in damage[-1]


# -- bzip2 and xz ------------------------------------------------------------------------------


def _pack(kind: str, data: bytes, level: int = 9) -> bytes:
    """``data`` as one bzip2 or xz stream; bzip2's ``level`` is its block size in 100 kB (a cut
    stream gives its whole blocks before the cut: small ones, so that there is some)."""
    return bz2.compress(data, level) if kind == "bzip2" else lzma.compress(data)


def _decodable_stream(kind: str, compressed: bytes) -> bytes:
    """Everything Python's own decompressor gives from the start of one cut bzip2 or xz stream."""
    dec = bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor()
    return dec.decompress(compressed)


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
@pytest.mark.parametrize("chunk_bytes", [64 << 10, 8 << 20])
def test_truncated_bzip2_or_xz_yields_every_decodable_line_then_the_damage(
        kind: str, text: bytes, tmp_path: Path, chunk_bytes: int) -> None:
    """A .bz2 or .xz cut short (a copy interrupted, a disk full) was refused whole; now, as a
    cut .gz, its whole lines up to the cut are read and the rest is one reject."""
    whole = _pack(kind, text, level=1)
    cut = whole[: len(whole) * 2 // 3]
    path = tmp_path / f"cut.csv.{'bz2' if kind == 'bzip2' else 'xz'}"
    path.write_bytes(cut)
    data, first_lines, damage = _read(path, chunk_bytes)
    expected = _decodable_stream(kind, cut)
    assert len(expected) > len(text) // 3  # the test is about real salvage
    assert not expected.endswith(b"\n")  # a line is cut short: it is no record
    assert data == expected[: expected.rfind(b"\n") + 1]
    assert damage[:-1] == [None] * (len(damage) - 1)
    lost_from = expected.count(b"\n") + 1
    assert first_lines[-1] == lost_from
    assert damage[-1] == ("the compressed stream ends early (truncated file): line "
                          f"{lost_from:,} is cut short, and nothing after it could be read")


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_a_bad_check_withholds_the_whole_bzip2_or_xz_stream(
        kind: str, text: bytes, tmp_path: Path) -> None:
    """The stream before is read; of the one whose check fails, nothing: the reason says so.
    (For bzip2, the unit is a block, each verified by its own CRC: here the first block of the
    second stream, so nothing of that stream either.)"""
    lines = text.splitlines(keepends=True)
    one, two = _pack(kind, b"".join(lines[:3000])), bytearray(_pack(kind, b"".join(lines[3000:])))
    if kind == "xz":
        two[-13] ^= 0xFF  # in the stream's index: every block decoded, then the check fails
    else:
        two[10] ^= 0xFF  # the first block's CRC (after BZh9 and the block's 48-bit magic)
    path = tmp_path / "bad.log"
    path.write_bytes(one + bytes(two))
    (spec,) = __import__("deepwatch.sources.files", fromlist=["x"]).parse_input_spec(str(path))
    chunks = list(iter_chunks(spec, chunk_bytes=8 << 20))
    assert b"".join(c.data for c in chunks) == b"".join(lines[:3000])
    last = chunks[-1]
    assert last.first_line == 3001 and last.damage is not None
    assert last.damage.startswith("corrupt compressed data")
    unit = "bzip2 block" if kind == "bzip2" else "xz stream"
    assert last.damage.endswith(f"come from a damaged {unit} and could not be verified, "
                                "and nothing after them could be read")
    assert last.lost == b"".join(lines[3000:])[: len(last.lost)] and last.lost


def test_score_counts_damaged_bzip2_and_xz_inputs_as_rejects_and_goes_on(
        kdd_bundle: Path, text: bytes, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A truncated .bz2, a truncated xz file under a plain name and a file of bzip2 streams the
    second of which is corrupt, then a good file: the whole lines before each damage are scored,
    each damage is one reject with its line and reason, and parsed + rejected == lines read."""
    lines = text.splitlines(keepends=True)
    bz = _pack("bzip2", text, level=1)
    cut_bz = tmp_path / "cut.csv.bz2"
    cut_bz.write_bytes(bz[: len(bz) // 2])
    xz = _pack("xz", text)
    cut_xz = tmp_path / "rotated.log.1"
    cut_xz.write_bytes(xz[: len(xz) // 2])
    second = bytearray(_pack("bzip2", b"".join(lines[2000:4000])))
    second[len(second) // 2] ^= 0xFF
    streams = tmp_path / "pbzip2.csv.bz2"
    streams.write_bytes(_pack("bzip2", b"".join(lines[:2000])) + bytes(second)
                        + _pack("bzip2", b"".join(lines[4000:])))
    out, rejects = tmp_path / "v.jsonl", tmp_path / "rejects.jsonl"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--rejects", str(rejects), str(cut_bz), str(cut_xz), str(streams),
                 str(small_kdd_test)]) == 0
    kept_bz = _decodable_stream("bzip2", bz[: len(bz) // 2]).count(b"\n")
    kept_xz = _decodable_stream("xz", xz[: len(xz) // 2]).count(b"\n")
    assert kept_bz > 0 and kept_xz > 0
    rows = len(out.read_text().splitlines())
    assert rows == kept_bz + kept_xz + 2000 + len(lines)
    rej = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["source"], r["line"]) for r in rej] == [
        (str(cut_bz), kept_bz + 1), (str(cut_xz), kept_xz + 1), (str(streams), 2001)]
    assert all("truncated file" in r["reason"] for r in rej[:2])
    assert rej[2]["reason"].startswith("corrupt compressed data")
    err = capsys.readouterr().err
    assert f"{rows + 3:,} lines read: {rows:,} parsed, 3 rejected" in err
    warned = [r.getMessage() for r in caplog.records if r.name == "deepwatch.sources.files"]
    assert [w.split(": ")[0] for w in warned] == [str(cut_bz), str(cut_xz), str(streams)]


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_bzip2_and_xz_cut_or_flipped_anywhere_give_trusted_lines_and_one_counted_reject(
        kind: str, text: bytes, tmp_path: Path) -> None:
    """The audit's loop, small: a file of two streams (bzip2 in 100 kB blocks) cut at 20 places
    and with a bit flipped at 16 others. Never an exception; the lines read are the original's
    first lines; a cut file gives what Python's own decompressor gives before the cut, in whole
    lines; anything short of the whole text comes with one reject that says why; and parsed +
    rejected == lines read."""
    import random

    from deepwatch.formats import get_format
    from deepwatch.sources.files import read_inputs

    part = text[: text.find(b"\n", 250_000) + 1]
    whole = _pack(kind, part, level=1) + _pack(kind, part[:50_000], level=1)
    expected = part + part[:50_000]
    rng = random.Random(7)
    cuts = sorted({1, 3, 4, 12, 13, len(whole) - 1, len(whole) - 5, len(whole) - 11}
                  | {rng.randrange(len(whole)) for _ in range(12)})
    flips = [rng.randrange(len(whole)) for _ in range(16)]
    suffix = ".bz2" if kind == "bzip2" else ".xz"
    for how, at in [("cut", c) for c in cuts] + [("flip", f) for f in flips]:
        bad = bytearray(whole[:at] if how == "cut" else whole)
        if how == "flip":
            bad[at] ^= 1 << rng.randrange(8)
        path = tmp_path / f"{how}{at}{suffix}"
        path.write_bytes(bytes(bad))
        chunks = list(iter_chunks(InputSpec(str(path)), chunk_bytes=64 << 10))
        got = b"".join(c.data for c in chunks)
        damage = [c.damage for c in chunks if c.damage is not None]
        assert got == expected[: len(got)] and got[-1:] in (b"", b"\n"), (how, at)
        if how == "cut":
            salvage = b""
            for stream in (whole[: len(_pack(kind, part, level=1))], whole[len(
                    _pack(kind, part, level=1)):]):
                one = _decodable_stream(kind, bytes(bad[: len(stream)]))
                salvage += one
                if len(bad) <= len(stream):
                    break
                bad = bad[len(stream):]
            assert got == salvage[: salvage.rfind(b"\n") + 1], (how, at)
        boundary = how == "cut" and at == len(_pack(kind, part, level=1))
        if got != expected and not boundary:  # (cut between the streams: a whole file of one)
            assert len(damage) == 1 and damage[0].startswith(
                ("the compressed stream ends early (truncated file)", "corrupt compressed data",
                 f"not {kind} data")), (how, at, damage)
        _, rejects, stats = read_inputs([str(path)], get_format("kdd"))
        assert stats.lines == stats.parsed + stats.rejected, (how, at)
        assert stats.parsed == got.count(b"\n") and stats.rejected == len(damage), (how, at)


def test_a_bzip2_file_cut_just_after_a_block_gives_that_block(text: bytes,
                                                               tmp_path: Path) -> None:
    """Cut inside the magic number after a block, the block is whole and verifiable: its text
    is read, as Python's own decompressor gives it. (Moved to a byte boundary to be decoded
    alone, the block's last bits could fall in a last byte that was left out: 100 kB of text
    lost, found by the audit's loop at 1 cut in 1,000.)"""
    blocks = []
    packed = _pack("bzip2", text[:600_000], level=1)
    bits = bin(int.from_bytes(packed, "big"))[2:].zfill(8 * len(packed))
    at = bits.find(format(0x314159265359, "048b"))
    while at >= 0:
        blocks.append(at)
        at = bits.find(format(0x314159265359, "048b"), at + 1)
    pairs = list(zip(blocks[:-1], blocks[1:], strict=True))
    # cases where the block's last bits are in the byte that moving it left out
    assert any((-start) % 8 > (-stop) % 8 for start, stop in pairs)
    for start, stop in pairs:
        for extra in (0, 1, 3):
            cut = packed[: -(-stop // 8) + extra]
            path = tmp_path / f"cut{stop}-{extra}.bz2"
            path.write_bytes(cut)
            data, _, damage = _read(path, 1 << 20)
            dec = bz2.BZ2Decompressor()
            expected = dec.decompress(cut)
            while more := dec.decompress(b""):  # what it still holds once its input is used
                expected += more
            assert data == expected[: expected.rfind(b"\n") + 1], (start, stop, extra)
            assert damage[-1] is not None and "truncated file" in damage[-1]


def test_score_reads_zero_padding_as_no_record_and_warns_of_it_and_of_empty_files(
        kdd_bundle: Path, text: bytes, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Zero bytes after the last gzip member or bzip2 stream (tape padding) and a .gz, .bz2 or
    .xz file of 0 bytes are no reject and no line read, but each is named in a warning; a
    non-zero byte after the padding is one reject, as any garbage after the last member is."""
    lines = text.splitlines(keepends=True)[:500]
    part = b"".join(lines)
    padded_gz = tmp_path / "padded.csv.gz"
    padded_gz.write_bytes(gzip.compress(part[:30_000]) + gzip.compress(part[30_000:]) + bytes(512))
    padded_bz = tmp_path / "padded.csv.bz2"
    padded_bz.write_bytes(bz2.compress(part) + bz2.compress(part) + bytes(10_240))
    garbage = tmp_path / "garbage.csv.gz"
    garbage.write_bytes(gzip.compress(part) + bytes(500) + b"\x01" + bytes(11))
    empties = [tmp_path / f"empty.csv{s}" for s in (".gz", ".bz2", ".xz")]
    for e in empties:
        e.write_bytes(b"")
    plain_empty = tmp_path / "empty.csv"
    plain_empty.write_bytes(b"")
    out, rejects = tmp_path / "v.jsonl", tmp_path / "rejects.jsonl"
    inputs = [padded_gz, padded_bz, garbage, *empties, plain_empty]
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--rejects", str(rejects), *map(str, inputs)]) == 0
    rows = len(out.read_text().splitlines())
    assert rows == 4 * len(lines)
    rej = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["source"], r["line"]) for r in rej] == [(str(garbage), len(lines) + 1)]
    assert rej[0]["reason"] == ("corrupt compressed data (Error -3 while decompressing data: "
                                f"incorrect header check): nothing from line {len(lines) + 1:,} "
                                "on could be read")
    err = capsys.readouterr().err
    assert f"{rows + 1:,} lines read: {rows:,} parsed, 1 rejected" in err
    warned = [r.getMessage() for r in caplog.records if r.name == "deepwatch.sources.files"]
    assert warned == [
        f"{padded_gz}: decompression OK, 512 trailing zero bytes ignored (after the last gzip "
        "member: padding, not data)",
        f"{padded_bz}: decompression OK, 10,240 trailing zero bytes ignored (after the last "
        "bzip2 stream: padding, not data)",
        f"{garbage}: {rej[0]['reason']}",
        *(f"{e}: the file is empty (0 bytes) and holds no {kind} data, though it is named "
          f"{e.suffix} (a failed transfer, or a file not written yet?)"
          for e, kind in zip(empties, ("gzip", "bzip2", "xz"), strict=True))]


def test_text_appended_to_a_compressed_file_is_kept_in_its_reject(
        kdd_bundle: Path, text: bytes, tmp_path: Path) -> None:
    """A log line appended as plain text to a .gz, .bz2 or .xz file (``echo ... >> log.gz``;
    ``gzip -d`` warns of trailing garbage): one reject after the file's lines, which keeps the
    appended text. Its raw text was empty, the record lost from the rejects file."""
    import subprocess
    import sys

    lines = text.splitlines(keepends=True)[:200]
    appended = lines[7].rstrip(b"\n") + b" appended\n"
    packers = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}
    paths = []
    for suffix, pack in packers.items():
        packed = pack(b"".join(lines))
        path = tmp_path / f"log{suffix}"
        path.write_bytes(packed + appended)
        paths.append((path, len(packed)))
    rejects = tmp_path / "rejects.jsonl"
    run = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                          "--format", "kdd", "--out", str(tmp_path / "out.jsonl"), "--rejects",
                          str(rejects), *(str(p) for p, _ in paths)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "603 lines read: 600 parsed, 3 rejected" in run.stderr
    kept = [json.loads(line) for line in rejects.read_text().splitlines()]
    units = {".gz": "a gzip member", ".bz2": "a bzip2 stream", ".xz": "an xz stream"}
    assert [(r["source"], r["line"], r["raw"], r["reason"]) for r in kept] == [
        (str(path), 201, appended.decode(),
         f"corrupt compressed data (the bytes at offset {at:,} are not the start of "
         f"{units[path.suffix]}): nothing from line 201 on could be read")
        for path, at in paths]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="named pipes as on Linux")
@pytest.mark.parametrize("hold", [None, 1000], ids=["held", "read-twice"])
@pytest.mark.parametrize("kind", ["gzip", "xz"])
def test_a_member_cut_by_a_stop_on_a_named_pipe_is_held_back_and_counted(
        text: bytes, tmp_path: Path, hold: int | None, kind: str) -> None:
    """A stop ends a compressed named pipe where it is. The members that arrived whole are
    handed out; the one it cut short is not (its checksum had not come: unverified), and what
    it held is told (bytes, line breaks), whether it was held in memory or, longer than
    ``hold_bytes``, only decompressed to be verified. It was handed out as a truncated file's
    last member is, the stop taken for the end of the input."""
    head, tail = text[:100_000], text[:300_000]
    pack = gzip.compress if kind == "gzip" else lzma.compress
    whole, cut = pack(head), pack(tail)
    cut = cut[: len(cut) // 2]
    dec: Any = zlib.decompressobj(wbits=31) if kind == "gzip" else lzma.LZMADecompressor()
    unverified = dec.decompress(cut) + (dec.flush() if kind == "gzip" else b"")
    assert 0 < len(unverified) < len(tail)
    fifo = tmp_path / ("live.gz" if kind == "gzip" else "live.xz")
    os.mkfifo(fifo)
    stop, done = threading.Event(), threading.Event()

    def write() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        try:
            os.write(fd, whole + cut)
            unread = bytearray(4)
            while fcntl.ioctl(fd, termios.FIONREAD, unread) or int.from_bytes(unread, "little"):
                time.sleep(0.01)  # until the reader has all of it
            stop.set()
            done.wait(30)  # the pipe kept open to the end: the stop, not its end, ends the input
        finally:
            os.close(fd)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        stream = VerifiedStream(str(fifo), hold_bytes=hold, kind=kind, stop=stop)
        got = b"".join(stream)
    finally:
        done.set()
        writer.join()
    assert got == head and stream.cut and stream.damage is None
    assert stream.held_back == HeldBack(len(unverified), unverified.count(b"\n"),
                                        unverified.endswith(b"\n"), compression(kind).unit)
