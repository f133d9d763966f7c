"""``score --engine spark`` on a real pyspark local[2]: the same rows, verdicts and rejects as the
local engine, in input order."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import random
import shutil
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import data_file, head_lines, need

from deepwatch.errors import BundleError, InputError, UsageError
from deepwatch.formats._base import MAX_RAW
from deepwatch.scoring import score_files
from deepwatch.sources.files import MAX_LINE_BYTES, Chunk, InputSpec, LineBuffer

BAD_LINES = ["garbage,line", "", "0,tcp,http,SF,not-a-number" + ",0" * 37 + ",normal."]


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    """One SparkSession for the module (starting Spark takes many seconds)."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        need(False, "pyspark (pip install 'deepwatch[spark]')")
    need(shutil.which("java") is not None, "java (Spark needs Java 17)")
    from deepwatch.spark import spark_session

    session, owned = spark_session("local[2]")
    yield session
    if owned:
        session.stop()


@pytest.fixture(scope="module")
def inputs(small_kdd_test: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A plain file with bad lines in the middle, CRLF endings and no final newline, and a .gz;
    their names hold a space, non-ASCII and glob characters (read as they are)."""
    root = tmp_path_factory.mktemp("spark_inputs")
    lines = small_kdd_test.read_text().splitlines()
    plain = root / "mixed [1] é{a}*?.csv"
    body = lines[:2000] + BAD_LINES + lines[2000:4000]
    plain.write_bytes("\r\n".join(body).encode())
    packed = root / "more.csv.gz"
    packed.write_bytes(gzip.compress(("\n".join(lines[4000:7000]) + "\n").encode()))
    return [str(plain), str(packed)]


def _score_cli(bundle: Path, inputs: list[str], engine: str, tmp_path: Path,
               capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
               ) -> tuple[list[dict], list[dict], str, list[str]]:
    """``deepwatch score`` of ``inputs`` on ``engine`` (JSONL out, rejects kept): the rows, the
    rejects, stderr, and what the input reader warned of."""
    from deepwatch.cli import main

    out, rej = tmp_path / f"{engine}.jsonl", tmp_path / f"{engine}-rejects.jsonl"
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepwatch.sources.files"):
        assert main(["score", str(bundle), "--format", "kdd", "--out", str(out),
                     "--rejects", str(rej), "--engine", engine, *inputs]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "deepwatch.sources.files"]
    return _rejects(out), _rejects(rej), capfd.readouterr().err, warned


def _rejects(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_spark_gives_the_local_engines_rows_verdicts_and_rejects(
        spark: object, kdd_bundle: Path, inputs: list[str], tmp_path: Path) -> None:
    from deepwatch.spark import score_spark

    local = score_files(str(kdd_bundle), "kdd", inputs, str(tmp_path / "local.parquet"),
                        rejects=str(tmp_path / "local.jsonl"))
    dist = score_spark(str(kdd_bundle), "kdd", inputs, str(tmp_path / "spark.parquet"),
                       rejects=str(tmp_path / "spark.jsonl"))
    assert dist.engine.startswith("spark local[2]")
    a = pq.read_table(tmp_path / "spark.parquet")
    b = pq.read_table(tmp_path / "local.parquet")
    assert a.num_rows == b.num_rows == 7000
    assert a.schema.equals(b.schema)
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()
    assert a.column("attack_type").to_pylist() == b.column("attack_type").to_pylist()
    assert a.column("label").to_pylist() == b.column("label").to_pylist()  # input order
    sa, sb = a.column("score").to_numpy(), b.column("score").to_numpy()
    assert abs(sa - sb).max() < 1e-6
    assert 0 < dist.alerts == local.alerts < 7000
    # every rejected line is kept, with the same line number, text, reason and source
    rejects = _rejects(tmp_path / "spark.jsonl")
    assert rejects == _rejects(tmp_path / "local.jsonl")
    assert [r["line"] for r in rejects] == [2001, 2002, 2003]
    assert [r["raw"] for r in rejects] == BAD_LINES
    assert {r["source"] for r in rejects} == {inputs[0]}
    assert (dist.stats.lines, dist.stats.parsed, dist.stats.rejected) == (7003, 7000, 3)
    assert dist.stats.by_source == local.stats.by_source


@pytest.mark.slow
def test_cli_spark_alerts_only_jsonl_with_path_labels(
        spark: object, kdd_bundle: Path, inputs: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from deepwatch.cli import main

    labelled = [f"{inputs[1]}=campaign"]
    args = ["score", str(kdd_bundle), "--format", "kdd", "--alerts-only", *labelled]
    assert main([*args, "--out", str(tmp_path / "local.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "spark.jsonl"), "--engine", "spark"]) == 0
    err = capsys.readouterr().err
    assert "(spark local[2]" in err and "3,000 lines read: 3,000 parsed, 0 rejected" in err
    spark_rows = _rejects(tmp_path / "spark.jsonl")
    local_rows = _rejects(tmp_path / "local.jsonl")
    assert spark_rows and len(spark_rows) < 3000
    assert {r["verdict"] for r in spark_rows} == {"malicious"}
    assert {r["label"] for r in spark_rows} == {"campaign"}
    assert [r["score"] for r in spark_rows] == pytest.approx([r["score"] for r in local_rows],
                                                             abs=1e-6)
    assert [r["attack_type"] for r in spark_rows] == [r["attack_type"] for r in local_rows]
    assert [r["src_bytes"] for r in spark_rows] == [r["src_bytes"] for r in local_rows]


@pytest.mark.slow
def test_cli_spark_explains_and_scores_on_the_backend_asked_for(
        spark: object, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``score --engine spark --explain --backend torch`` gave no ``explanation`` column and
    scored through ONNX Runtime: both options were dropped without a word. The executors now
    score as the local engine does with them."""
    from deepwatch.cli import main

    part = tmp_path / "part.csv"
    part.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:400]))
    args = ["score", str(kdd_bundle), "--format", "kdd", "--explain", "--backend", "torch",
            str(part)]
    assert main([*args, "--out", str(tmp_path / "local.jsonl")]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "spark.jsonl"), "--engine", "spark"]) == 0
    err = capsys.readouterr().err
    assert "(spark local[2], torch:cpu)" in err, err
    spark_rows = _rejects(tmp_path / "spark.jsonl")
    local_rows = _rejects(tmp_path / "local.jsonl")
    assert len(spark_rows) == len(local_rows) == 400
    explained = [r["explanation"] for r in local_rows]
    assert any(explained) and [r.get("explanation") for r in spark_rows] == explained


def test_bad_bundle_and_stdin_are_refused_before_spark_starts(
        kdd_bundle: Path, inputs: list[str], tmp_path: Path) -> None:
    from deepwatch.spark import score_spark

    with pytest.raises(UsageError, match="not stdin"):
        score_spark(str(kdd_bundle), "kdd", ["-"], str(tmp_path / "o.parquet"))
    # a named pipe (or <(...)): its head was read for the schema, then its executors found it
    # of size 0 and read no line, or waited for ever for a writer; it is refused as stdin is
    import os
    import threading

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    text = Path(inputs[0]).read_bytes()[:50_000]  # (within a pipe's buffer)
    writer = threading.Thread(target=fifo.write_bytes, args=(text,), daemon=True)
    writer.start()
    try:
        with pytest.raises(UsageError, match=r"reads regular files, and .*pipe\.csv is not one"):
            score_spark(str(kdd_bundle), "kdd", [inputs[1], str(fifo)], str(tmp_path / "o.jsonl"))
    finally:
        with open(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), "rb") as reader:  # the writer's end
            writer.join(10)
            assert reader.read() == text  # nothing of it was read
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(UsageError, match="trained on format 'kdd'"):
        score_spark(str(kdd_bundle), "nslkdd", inputs, str(tmp_path / "o.parquet"))
    broken = tmp_path / "broken"
    shutil.copytree(kdd_bundle, broken)
    with open(broken / "featurizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="does not match its checksum"):
        score_spark(str(broken), "kdd", inputs, str(tmp_path / "o.parquet"))


def test_a_lake_is_refused_by_the_spark_engine_not_ignored(
        kdd_bundle: Path, inputs: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``score --engine spark --lake L`` scored the files and left the lake's records out
    without a word; it is refused before Spark starts."""
    from deepwatch.cli import main
    from deepwatch.lake import LakeWriter

    LakeWriter(tmp_path / "lake", "kdd")
    out = tmp_path / "o.parquet"
    code = main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--engine", "spark", "--lake", str(tmp_path / "lake"), *inputs])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--lake works with --engine local only" in err and "Traceback" not in err
    assert not out.exists()


def _decodable_lines(compressed: bytes) -> int:
    """The whole lines zlib can decompress from the start of a truncated gzip member."""
    return zlib.decompressobj(wbits=31).decompress(compressed).count(b"\n")


@pytest.mark.slow
def test_a_damaged_gz_is_scored_up_to_the_damage_and_counted_as_the_local_engine_does(
        spark: object, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A truncated .gz, a .gz whose second member fails its CRC and a plain file with a line
    over MAX_LINE_BYTES: the Spark job does not fail (it did, with the cause in one line and no
    output); every line before the damage is scored, the damage is one counted reject with the
    file and the reason, the files after it are scored, and rows, rejects and counts are the
    local engine's."""

    text = small_kdd_test.read_bytes()
    lines = text.splitlines(keepends=True)
    whole = gzip.compress(text)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    second = bytearray(gzip.compress(b"".join(lines[3000:3100])))
    second[-8:-4] = bytes(b ^ 0xFF for b in second[-8:-4])  # the trailer's CRC-32
    crc = tmp_path / "crc.csv.gz"
    crc.write_bytes(gzip.compress(b"".join(lines[:3000])) + bytes(second))
    long = tmp_path / "long.csv"
    long.write_bytes(b"".join(lines[:5]) + b"B" * (MAX_LINE_BYTES + 10) + b"\n"
                     + b"".join(lines[5:10]))
    inputs = [str(cut), str(crc), str(long)]

    rows, rejects, err, warned = _score_cli(kdd_bundle, inputs, "spark", tmp_path, capfd, caplog)
    local_rows, local_rejects, local_err, local_warned = _score_cli(
        kdd_bundle, inputs, "local", tmp_path, capfd, caplog)
    salvaged = _decodable_lines(whole[: len(whole) // 2])
    assert 1000 < salvaged < len(lines)  # the test is about real salvage
    assert len(rows) == salvaged + 3000 + 10
    assert [r["src_bytes"] for r in rows] == [r["src_bytes"] for r in local_rows]
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in local_rows]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in local_rows],
                                                       abs=1e-6)
    # one reject per damage, with its file, line, reason and the text that could not be trusted
    assert rejects == local_rejects
    assert [(r["source"], r["line"]) for r in rejects] == [
        (str(cut), salvaged + 1), (str(crc), 3001), (str(long), 6)]
    assert "truncated file" in rejects[0]["reason"] and "cut short" in rejects[0]["reason"]
    assert rejects[0]["raw"] and not rejects[0]["raw"].endswith("\n")
    assert "incorrect data check" in rejects[1]["reason"]
    assert f"over the limit of {MAX_LINE_BYTES:,} bytes" in rejects[2]["reason"]
    assert rejects[2]["raw"] == "B" * MAX_RAW
    n = len(rows) + 3
    assert f"{n:,} lines read: {len(rows):,} parsed, 3 rejected" in err
    assert f"{n:,} lines read: {len(rows):,} parsed, 3 rejected" in local_err
    # a warning names each damaged file and why, once, as the local engine's does
    assert warned == local_warned
    assert [w.split(": ")[0] for w in warned] == [str(cut), str(crc)]
    assert "Exception" not in err  # no executor stack traces


@pytest.mark.slow
def test_warnings_about_zero_padding_and_empty_files_reach_the_driver_once_each(
        spark: object, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Zero padding after the last gzip member and a .bz2 of 0 bytes are no reject, but the
    reader warns of them: read on an executor, its warnings are logged by the driver, with the
    names given on the command line, once each and in input order with a damaged file's warning,
    as the local engine logs them (they were lost); rows, rejects and counts are the local
    engine's."""

    lines = small_kdd_test.read_bytes().splitlines(keepends=True)
    padded = tmp_path / "padded.csv.gz"
    padded.write_bytes(gzip.compress(b"".join(lines[:1500]))
                       + gzip.compress(b"".join(lines[1500:2000])) + bytes(4096))
    whole = gzip.compress(b"".join(lines[2000:4000]))
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    empty = tmp_path / "empty.csv.bz2"
    empty.write_bytes(b"")
    inputs = [str(padded), str(cut), str(empty)]

    rows, rejects, err, warned = _score_cli(kdd_bundle, inputs, "spark", tmp_path, capfd, caplog)
    local_rows, local_rejects, local_err, local_warned = _score_cli(
        kdd_bundle, inputs, "local", tmp_path, capfd, caplog)
    salvaged = _decodable_lines(whole[: len(whole) // 2])
    assert len(rows) == len(local_rows) == 2000 + salvaged
    assert [r["src_bytes"] for r in rows] == [r["src_bytes"] for r in local_rows]
    assert rejects == local_rejects and [(r["source"], r["line"]) for r in rejects] == [
        (str(cut), salvaged + 1)]
    summary = f"{len(rows) + 1:,} lines read: {len(rows):,} parsed, 1 rejected"
    assert summary in err and summary in local_err
    assert warned == local_warned == [
        f"{padded}: decompression OK, 4,096 trailing zero bytes ignored (after the last gzip "
        "member: padding, not data)",
        f"{cut}: {rejects[0]['reason']}",
        f"{empty}: the file is empty (0 bytes) and holds no bzip2 data, though it is named "
        ".bz2 (a failed transfer, or a file not written yet?)"]
    assert "Exception" not in err


def _swapped_zeek_log() -> tuple[str, list[dict[str, str]]]:
    """A conn.log header whose #fields name the columns in another order than Zeek's, and
    3,000 records (durations varied, so that an autoencoder can train on them)."""
    from test_zeek import FIELDS, HEADER, SWAPPED, _conn

    rows = [_conn(i) for i in range(3000)]
    for i, r in enumerate(rows):
        r["duration"] = str(0.1 * (i % 7))
    return HEADER.replace("\t".join(FIELDS), "\t".join(SWAPPED)), rows


def _zeek_scored_both_ways(text: str, tmp_path: Path) -> tuple[Any, Any]:
    """``text`` as a .gz conn.log, an autoencoder trained on it, and the log scored by the
    local engine (local.parquet) and on Spark (spark.parquet): both reports."""
    from deepwatch.spark import score_spark
    from deepwatch.train.api import train

    log = tmp_path / "conn.log.gz"
    log.write_bytes(gzip.compress(text.encode()))
    bundle = tmp_path / "ae"
    train("zeek", "autoencoder", [f"{log}=normal"], bundle, epochs=1, seed=0)
    local = score_files(str(bundle), "zeek", [str(log)], str(tmp_path / "local.parquet"))
    dist = score_spark(str(bundle), "zeek", [str(log)], str(tmp_path / "spark.parquet"))
    return local, dist


@pytest.mark.slow
def test_zeek_headers_reach_every_partition(spark: object, tmp_path: Path) -> None:
    """A .gz conn.log is one Hadoop split, spread over the cores in line ranges: the ranges
    after the first must still read the fields in the order of the file's #fields header."""
    from test_zeek import FIELDS, SWAPPED, _tsv

    header, rows = _swapped_zeek_log()
    text = "\n".join([header, *(_tsv(SWAPPED, r) for r in rows[:2000]),
                      "#fields\t" + "\t".join(FIELDS),  # a second log, the standard order
                      *(_tsv(list(FIELDS), r) for r in rows[2000:])]) + "\n"
    local, dist = _zeek_scored_both_ways(text, tmp_path)
    a = pq.read_table(tmp_path / "spark.parquet")
    b = pq.read_table(tmp_path / "local.parquet")
    assert (dist.stats.parsed, dist.stats.rejected) == (local.stats.parsed, 0) == (3000, 0)
    assert set(a.column("resp_bytes").to_pylist()) == {999999}
    assert set(a.column("orig_h").to_pylist()) == {"10.0.0.1"}
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    assert a.schema.equals(b.schema)  # the times too, in milliseconds as the local engine
    assert a.column("ts").to_pylist() == b.column("ts").to_pylist()
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()


@pytest.mark.slow
def test_zeek_tsv_headers_reach_every_partition(spark: object, tmp_path: Path) -> None:
    """The same for logs written with ``LogAscii::tsv=T``, whose one header line is the field
    names (no ``#fields``): two such logs concatenated, each with its own columns, read by the
    local engine and on Spark alike, the header lines neither records nor rejects."""
    from test_zeek_tsv_header import EXTRA, FEWER, _log

    text = _log(FEWER, range(2000)) + _log(EXTRA, range(2000, 3000))
    local, dist = _zeek_scored_both_ways(text, tmp_path)
    a = pq.read_table(tmp_path / "spark.parquet")
    b = pq.read_table(tmp_path / "local.parquet")
    assert (dist.stats.parsed, dist.stats.rejected) == (local.stats.parsed, 0) == (3000, 0)
    assert dist.stats.lines == local.stats.lines == 3000
    assert set(a.column("resp_bytes").to_pylist()) == {999999}
    assert a.column("orig_p").to_pylist() == [None] * 2000 + list(range(40000, 41000))
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()

def _rows(chunks: Iterator[Chunk]) -> list[tuple[int, bytes | None, str | None, bytes]]:
    """(line, text, damage, the kept head of an over-long line) of every line of ``chunks``."""
    out: list[tuple[int, bytes | None, str | None, bytes]] = []
    for chunk in chunks:
        if chunk.damage is not None:
            out.append((chunk.first_line, None, chunk.damage, chunk.lost))
            continue
        texts = chunk.data.split(b"\n")
        if chunk.data.endswith(b"\n"):
            texts.pop()
        out.extend((chunk.first_line + i, t, None, b"") for i, t in enumerate(texts))
    return out


def _whole(data: bytes, spec: InputSpec, max_line: int) -> list[tuple]:
    """The lines of ``data`` as the local engine's reader cuts the whole input."""
    lines = LineBuffer(spec, max_line)
    chunks = lines.feed(data) if data else []
    last = lines.finish()
    return _rows(iter([*chunks, *([last] if last else [])]))


def test_byte_ranges_give_the_local_readers_lines_whatever_the_cuts(tmp_path: Path) -> None:
    """A plain input cut into byte ranges anywhere (inside a line, on a line break, inside a
    line over the limit or a byte order mark), each range numbered from the lines counted in
    the ranges before it: together they give every line, over-long line and line number that
    the local engine's reader gives, each once and in order."""
    from deepwatch.errors import InputError
    from deepwatch.spark import lines_starting_in, range_chunks

    rng = random.Random(7)
    max_line = 16
    path = tmp_path / "in.csv"
    spec = InputSpec(str(path))
    pieces = [b"a,b", b"", b"x" * 16, b"y" * 17, b"z" * 60, b"c\r", b"\xef\xbb\xbfd", b"12345"]
    files = [b"", b"\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n", b"\xef\xbb", b"no break",
             b"w" * 40, b"\n\n\n"]
    for _ in range(150):
        body = b"\n".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        # (not a byte order mark before a first line of just max_line bytes: LineBuffer counts
        # the mark in that line's length when the line comes in blocks shorter than the limit,
        # which the 8 MiB blocks of both engines never are)
        bom = b"" if body.split(b"\n")[0] == b"x" * 16 else rng.choice([b"", b"\xef\xbb\xbf"])
        files.append(bom + body + rng.choice([b"", b"\n"]))
    for data in files:
        path.write_bytes(data)
        expected = _whole(data, spec, max_line)
        size = len(data)
        for split in sorted({1, 2, 3, rng.randint(4, 40), size or 1}):
            block = rng.choice([1, 2, 5, 64])
            got: list[tuple] = []
            first = 1
            for start in range(0, max(size, 1), split):
                end = min(start + split, size)
                mine = _rows(range_chunks(spec, start, end, size, first, block, max_line))
                assert len(mine) == lines_starting_in(str(path), start, end, block)
                got.extend(mine)
                first += len(mine)
            assert got == expected, (data, split, block)
    path.write_bytes(b"one\ntwo\nthree\n")  # rewritten after its lines were counted
    with pytest.raises(InputError, match=r"changed while it was read \(5 bytes, now 14\)"):
        list(range_chunks(spec, 0, 5, 5, 1))


def test_a_line_far_over_the_limit_is_one_reject_read_in_bounded_memory(tmp_path: Path) -> None:
    """The executors' reader skips a line of 24 times MAX_LINE_BYTES as it reads it, whichever
    range it starts in or runs through: the Python memory it takes at its peak stays a small
    multiple of the limit (reading the line whole, as Hadoop's reader did, takes 24 MiB), and
    the line is one row standing for a reject, with the local engine's reason and raw text."""
    from deepwatch.spark import LINES, PIECES, lines_starting_in, read_partition

    long = 24 * MAX_LINE_BYTES
    path = tmp_path / "long.csv"
    with open(path, "wb") as f:
        f.write(b"first\nsecond\n")
        for _ in range(24):
            f.write(b"B" * MAX_LINE_BYTES)
        f.write(b"\nthird\nfourth\n")
    size = path.stat().st_size
    cuts = [0, 7, 5 * MAX_LINE_BYTES, 20 * MAX_LINE_BYTES, size - 3, size]
    pieces, first = [], 1
    for a, b in zip(cuts, cuts[1:], strict=False):
        pieces.append({"file": 0, "path": str(path), "compression": None, "start": a, "end": b,
                       "size": size, "first_line": first})
        first += lines_starting_in(str(path), a, b)
    batch = pa.RecordBatch.from_pylist(pieces, schema=PIECES)
    list(read_partition(iter([batch.slice(0, 1)])))  # the modules it imports, imported once
    tracemalloc.start()
    try:
        out = list(read_partition(iter([batch]), block_bytes=64 << 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_LINE_BYTES
    rows = pa.Table.from_batches(out, schema=LINES).to_pylist()
    assert [(r["line"], r["text"][:6], r["damage"] is None) for r in rows] == [
        (1, "first", True), (2, "second", True), (3, "BBBBBB", False), (4, "third", True),
        (5, "fourth", True)]
    assert rows[2]["damage"] == (f"the line is {long:,} bytes long, over the limit of "
                                 f"{MAX_LINE_BYTES:,} bytes for one record")
    assert rows[2]["text"] == "B" * MAX_RAW and rows[2]["rest_lost"] is False
    assert rows[2]["reason"] == (f"{rows[2]['damage']} (the raw text keeps its first "
                                 f"{MAX_RAW:,} bytes)")


@pytest.mark.slow
def test_plain_and_other_compressed_files_in_byte_ranges_give_the_local_engines_output(
        spark: object, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain inputs read by many tasks in small byte ranges (lines, a byte order mark, CRLF
    endings, lines of three times the limit and just over it, one of them last and without a
    line break, a name with a comma), a gzip file without a .gz name (gzip by its first bytes)
    and an empty file: the same rows, rejects, reasons and counts as the local engine, in input
    order. A zstd file is refused by both, before anything is read."""
    import deepwatch.spark
    from deepwatch.spark import score_spark

    monkeypatch.setattr(deepwatch.spark, "SPLIT_BYTES", 128 << 10)
    lines = small_kdd_test.read_bytes().splitlines()
    over = b"B" * (3 * MAX_LINE_BYTES)
    plain = tmp_path / "a,b [1]*?.csv"
    plain.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines[:1500]) + b"\r\n" + over + b"\n"
                      + b"\n".join(x.encode() for x in BAD_LINES) + b"\n"
                      + b"\n".join(lines[1500:3000]) + b"\n" + b"C" * (MAX_LINE_BYTES + 1))
    packed = tmp_path / "more.log"
    packed.write_bytes(gzip.compress(b"\n".join(lines[3000:3500]) + b"\n"))
    other = tmp_path / "more.csv.zst"
    other.write_bytes(b"\x28\xb5\x2f\xfd" + b"\n".join(lines[3000:3500]) + b"\n")
    for engine in (score_files, score_spark):
        with pytest.raises(InputError, match="compressed with zstd"):
            engine(str(kdd_bundle), "kdd", [str(plain), str(other)],
                   str(tmp_path / "never.jsonl"))
    assert not (tmp_path / "never.jsonl").exists()
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    only_long = tmp_path / "only-long.csv"
    only_long.write_bytes(b"D" * (MAX_LINE_BYTES + 5) + b"\n")
    inputs = [str(plain), str(packed), str(empty), str(only_long)]
    local = score_files(str(kdd_bundle), "kdd", inputs, str(tmp_path / "local.jsonl"),
                        rejects=str(tmp_path / "local-rejects.jsonl"))
    dist = score_spark(str(kdd_bundle), "kdd", inputs, str(tmp_path / "spark.jsonl"),
                       rejects=str(tmp_path / "spark-rejects.jsonl"))
    rows, local_rows = _rejects(tmp_path / "spark.jsonl"), _rejects(tmp_path / "local.jsonl")
    assert len(rows) == len(local_rows) == 3500
    assert [r["src_bytes"] for r in rows] == [r["src_bytes"] for r in local_rows]
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in local_rows]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in local_rows],
                                                       abs=1e-6)
    rejects = _rejects(tmp_path / "spark-rejects.jsonl")
    assert rejects == _rejects(tmp_path / "local-rejects.jsonl")
    mine = [(r["line"], r["reason"]) for r in rejects if r["source"] == str(plain)]
    assert [line for line, _ in mine] == [1501, 1502, 1503, 1504, 3005]
    assert f"the line is {len(over):,} bytes long" in mine[0][1]
    assert f"the line is {MAX_LINE_BYTES + 1:,} bytes long" in mine[-1][1]
    assert (dist.stats.lines, dist.stats.parsed, dist.stats.rejected) == (
        local.stats.lines, local.stats.parsed, local.stats.rejected)
    assert dist.stats.by_source == local.stats.by_source
    assert dist.stats.by_source[str(packed)]["parsed"] == 500  # its text, not its bytes
    # the over-long lines are damage, not a hint that --format is wrong, for both engines
    assert dist.stats.damaged == local.stats.damaged == {str(plain): 2, str(only_long): 1}
    assert dist.stats.format_warnings("kdd") == local.stats.format_warnings("kdd") == []


@pytest.mark.slow
def test_bzip2_and_xz_files_whole_or_damaged_give_the_local_engines_output(
        spark: object, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A .bz2 of several streams (pbzip2), an xz file under a plain name (xz by its first
    bytes), a truncated .xz and a .bz2 whose second stream is corrupt: each is one task, read by
    the local engine's reader, so rows, scores, rejects, counts and warnings are the local
    engine's (bzip2 and xz were refused by both)."""
    import lzma

    from deepwatch.spark import score_spark

    lines = small_kdd_test.read_bytes().splitlines(keepends=True)
    streams = tmp_path / "pbzip2.csv.bz2"
    streams.write_bytes(b"".join(bz2.compress(b"".join(lines[i : i + 600]), 1)
                                 for i in range(0, 3000, 600)))
    named = tmp_path / "rotated.log.1"
    named.write_bytes(lzma.compress(b"".join(lines[3000:5000])))
    packed = lzma.compress(b"".join(lines[5000:8000]))
    cut = tmp_path / "cut.csv.xz"
    cut.write_bytes(packed[: len(packed) // 2])
    second = bytearray(bz2.compress(b"".join(lines[9000:9500])))
    second[len(second) // 2] ^= 0xFF
    bad = tmp_path / "bad.csv.bz2"
    bad.write_bytes(bz2.compress(b"".join(lines[8000:9000])) + bytes(second))
    inputs = [str(streams), str(named), str(cut), str(bad)]

    def run(engine: object, name: str) -> tuple[object, list[dict], list[dict], list[str]]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepwatch.sources.files"):
            result = engine(str(kdd_bundle), "kdd", inputs,  # type: ignore[operator]
                            str(tmp_path / f"{name}.jsonl"),
                            rejects=str(tmp_path / f"{name}-rejects.jsonl"))
        warned = [r.getMessage() for r in caplog.records if r.name == "deepwatch.sources.files"]
        return (result, _rejects(tmp_path / f"{name}.jsonl"),
                _rejects(tmp_path / f"{name}-rejects.jsonl"), warned)

    local, local_rows, local_rejects, local_warned = run(score_files, "local")
    dist, rows, rejects, warned = run(score_spark, "spark")
    kept = lzma.LZMADecompressor().decompress(packed[: len(packed) // 2]).count(b"\n")
    assert 0 < kept < 3000
    assert len(rows) == len(local_rows) == 3000 + 2000 + kept + 1000
    assert [r["src_bytes"] for r in rows] == [r["src_bytes"] for r in local_rows]
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in local_rows]
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in local_rows],
                                                       abs=1e-6)
    assert rejects == local_rejects
    assert [(r["source"], r["line"]) for r in rejects] == [(str(cut), kept + 1),
                                                           (str(bad), 1001)]
    assert "truncated file" in rejects[0]["reason"]
    assert rejects[1]["reason"].startswith("corrupt compressed data")
    for result in (dist, local):
        stats = result.stats  # type: ignore[attr-defined]
        assert (stats.lines, stats.parsed, stats.rejected) == (len(rows) + 2, len(rows), 2)
    assert dist.stats.by_source == local.stats.by_source  # type: ignore[attr-defined]
    assert warned == local_warned and [w.split(": ")[0] for w in warned] == [str(cut), str(bad)]


def test_a_zeek_header_run_into_a_record_by_a_cr_is_no_header_on_spark(
        spark: object, tmp_path: Path) -> None:
    """A ``#fields`` line with a record after a CR in it is a reject, locally and on Spark: the
    line ranges after it keep reading the fields in the order of the header before it."""
    from test_zeek import FIELDS, SWAPPED, _tsv

    header, rows = _swapped_zeek_log()
    text = "\n".join([header, *(_tsv(SWAPPED, r) for r in rows[:1000]),
                      "#fields\t" + "\t".join(FIELDS) + "\r" + _tsv(SWAPPED, rows[1000]),
                      *(_tsv(SWAPPED, r) for r in rows[1001:])]) + "\n"
    local, dist = _zeek_scored_both_ways(text, tmp_path)
    a = pq.read_table(tmp_path / "spark.parquet")
    assert (dist.stats.parsed, dist.stats.rejected) == (local.stats.parsed,
                                                        local.stats.rejected) == (2999, 1)
    assert set(a.column("orig_h").to_pylist()) == {"10.0.0.1"}
    assert a.column("uid").to_pylist() == pq.read_table(tmp_path / "local.parquet").column(
        "uid").to_pylist()


@pytest.fixture(scope="module")
def access_bundle(tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, list[str], list[str]]:
    """A tiny access bundle (one epoch), and the real site and scan lines it was trained on the
    end of: (bundle, the site log's first 450 lines, the w3af scan's first 100)."""
    from deepwatch.train.api import train

    root = tmp_path_factory.mktemp("spark_access")
    site = head_lines(data_file("weblogs/apache_access.log.gz"), 450)
    scan = head_lines(data_file("weblogs/scan_w3af.log.gz"), 100)
    (root / "site.log").write_text("".join(site[300:]))
    (root / "scan.log").write_text("".join(scan))
    bundle = root / "access"
    train("access", "mlp", [f"{root / 'site.log'}=normal", f"{root / 'scan.log'}=scan"],
          bundle, epochs=1, seed=0)
    return bundle, site, scan


@pytest.mark.slow
def test_client_windows_go_on_across_runs_and_batches_of_a_partition(
        spark: Any, access_bundle: tuple[Path, list[str], list[str]], tmp_path: Path) -> None:
    """An access log's derived features keep a window of each client's last requests, which the
    local engine carries through the whole run. On Spark every run of lines (cut at an over-long
    line) and every Arrow batch was scored from an empty window, so the requests after each cut
    got other scores, even other verdicts; the window now goes on through the partition. The
    log is one piece, whose lines Spark spreads over the cores (cut where it draws the cuts from
    a sample, anew for each job): each partition starts with the windows the partitions before
    it leave, and the scores are the local engine's."""
    from deepwatch.spark import score_spark

    bundle, site, scan = access_bundle
    log = tmp_path / "cut.log"
    log.write_text("".join(site[:150]) + "Y" * (MAX_LINE_BYTES + 3) + "\n" + "".join(site[150:300])
                   + "".join(scan[:100]))
    inputs = [str(log)]
    local = score_files(str(bundle), "access", inputs, str(tmp_path / "local.jsonl"))
    conf = spark.conf  # type: ignore[attr-defined]
    conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "37")
    try:
        dist = score_spark(str(bundle), "access", inputs, str(tmp_path / "spark.jsonl"))
    finally:
        conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "50000")
    rows, local_rows = _rejects(tmp_path / "spark.jsonl"), _rejects(tmp_path / "local.jsonl")
    assert len(rows) == len(local_rows) == 400
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in local_rows],
                                                       abs=1e-6)
    assert [r["verdict"] for r in rows] == [r["verdict"] for r in local_rows]
    assert (dist.alerts, dist.stats.rejected) == (local.alerts, local.stats.rejected) == (
        local.alerts, 1)


def _client(line: str) -> str:
    return line.split(" ", 1)[0]


@pytest.mark.slow
def test_client_windows_go_on_across_partitions_and_files_as_with_the_local_engine(
        spark: Any, access_bundle: tuple[Path, list[str], list[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each partition started with empty client windows, so a client's first requests in a
    partition scored otherwise than with the local engine, which carries the windows through
    the whole run (across files too). The windows each partition starts with are now handed on
    from the partitions before it: Spark's scores equal the local engine's, row for row, for a
    plain file cut into byte ranges followed by a second file."""
    import deepwatch.spark
    from deepwatch.spark import score_spark

    bundle, site, scan = access_bundle
    # the site's requests, the scan's spread among them: clients come back after many lines
    body = [*site[:300], *scan[:60]]
    random.Random(7).shuffle(body)
    log = tmp_path / "site.log"
    log.write_text("".join(body[:120]))
    more = tmp_path / "more.log"  # (the local engine's windows go on into the next file)
    more.write_text("".join(body[120:]))
    split = 16 << 10
    monkeypatch.setattr(deepwatch.spark, "SPLIT_BYTES", split)
    # two ranges, and clients with requests on both sides of the cut and in the next file
    assert split < log.stat().st_size < 2 * split
    sizes = [len(line.encode()) for line in body[:120]]
    cut = next(i for i in range(len(sizes)) if sum(sizes[:i]) >= split)
    assert {_client(x) for x in body[:cut]} & {_client(x) for x in body[cut:cut + 20]}
    assert {_client(x) for x in body[:120]} & {_client(x) for x in body[120:140]}
    inputs = [str(log), str(more)]
    score_files(str(bundle), "access", inputs, str(tmp_path / "local.jsonl"))
    score_spark(str(bundle), "access", inputs, str(tmp_path / "spark.jsonl"))
    rows, local_rows = _rejects(tmp_path / "spark.jsonl"), _rejects(tmp_path / "local.jsonl")
    assert len(rows) == len(local_rows) == len(body)
    assert [(r["client_ip"], r["score"], r["verdict"]) for r in rows] == [
        (r["client_ip"], pytest.approx(r["score"], abs=1e-6), r["verdict"]) for r in local_rows]


@pytest.mark.slow
def test_ctrl_c_and_sigterm_cancel_the_jobs_and_leave_nothing_behind(
        spark: Any, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A stop while the Spark jobs run ends the run as the local engine's does: one line
    (``interrupted``, exit 130; ``terminated``, 143), the jobs cancelled, no output, and no
    staging directory left beside --out. pyspark's own Ctrl-C handler called into the JVM from
    the main thread while it waited on the JVM, and failed with pages of tracebacks; SIGTERM
    killed the driver at once and left the staging directory behind."""
    import os
    import signal
    import threading

    from deepwatch.cli import main

    big = tmp_path / "big.csv"
    big.write_bytes(small_kdd_test.read_bytes() * 4)
    tracker = spark.sparkContext.statusTracker()

    finished = threading.Event()

    def stop_when_a_job_runs(sig: int) -> None:
        while not tracker.getActiveJobsIds():
            if finished.wait(0.02):
                return  # (no stop sent: the run then fails its assertions)
        os.kill(os.getpid(), sig)

    def died(*_: object) -> None:  # SIGTERM's default action, without ending the test run
        raise RuntimeError("SIGTERM was not taken: the process would have died here")

    before = signal.signal(signal.SIGTERM, died)
    try:
        for sig, code, word in ((signal.SIGINT, 130, "interrupted"),
                                (signal.SIGTERM, 143, "terminated")):
            capfd.readouterr()
            caplog.clear()
            out = tmp_path / f"{word}.parquet"
            finished.clear()
            sender = threading.Thread(target=stop_when_a_job_runs, args=(sig,))
            sender.start()
            try:
                got = main(["score", str(kdd_bundle), "--format", "kdd", "--engine", "spark",
                            "--out", str(out), str(big)])
            finally:
                finished.set()
                sender.join()
            err = capfd.readouterr().err
            assert got == code, err
            assert err.splitlines()[-1] == word and "Traceback" not in err
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not out.exists()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["big.csv"]
            assert not tracker.getActiveJobsIds()
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_ends_the_run_in_one_line(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """``timeout``, systemd and batch schedulers send SIGTERM to the whole process group, the
    JVM included, which dies at once: the run still ends with its one line and exit status 143,
    no staging directory left, and no traceback of the Spark session it can no longer stop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    need(shutil.which("java") is not None, "java (Spark needs Java 17)")
    big = tmp_path / "big.csv"
    big.write_bytes(small_kdd_test.read_bytes() * 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch", "score", str(kdd_bundle), "--format", "kdd",
         "--engine", "spark", "--out", str(tmp_path / "out.parquet"), str(big)],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".deepwatch-spark-") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the job under way
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "terminated"
    assert "ConnectionRefusedError" not in err and "Py4JNetworkError" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.csv"]


@pytest.mark.slow
def test_a_stop_while_the_output_is_merged_keeps_the_rows_written_and_says_so(
        spark: Any, kdd_bundle: Path, inputs: list[str], tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once the jobs are done, while the driver merges their parts into --out: the rows
    written are kept, closed whole, and the one line says how many and that they are not all,
    as the local engine's does."""
    import os
    import signal

    import deepwatch.spark
    from deepwatch.cli import main

    merged = []
    warn = deepwatch.spark._warn

    def warn_then_stop(*args: Any) -> None:  # (called for each batch merged, before its rows)
        merged.append(1)
        if len(merged) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        warn(*args)

    monkeypatch.setattr(deepwatch.spark, "_warn", warn_then_stop)
    out = tmp_path / "out.parquet"
    capfd.readouterr()
    code = main(["score", str(kdd_bundle), "--format", "kdd", "--engine", "spark", "--out",
                 str(out), *inputs])
    err = capfd.readouterr().err
    written = pq.read_table(out).num_rows
    assert code == 130 and 0 < written < 7000, err
    assert err.splitlines()[-1] == (f"interrupted: the {written:,} rows scored before it are "
                                    f"kept in {out}, which is incomplete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_stops_after_the_first_are_said_to_be_held_once(
        capfd: pytest.CaptureFixture[str]) -> None:
    """The Spark engine's stop handler said "already stopping" at every stop after the first:
    a key held down repeats Ctrl-C many times a second, a line each. Said once now, as the
    local engine says it."""
    import signal

    from deepwatch.spark import _Stops

    class Context:
        cancelled = 0

        def cancelAllJobs(self) -> None:  # noqa: N802 - pyspark's name
            self.cancelled += 1

    sc = Context()
    stops = _Stops(sc)
    stops._on_stop(signal.SIGINT, None)  # the first: cancels the jobs, raised when they end
    for _ in range(5):
        stops._on_stop(signal.SIGINT, None)
    assert capfd.readouterr().err == "already stopping: the clean-up under way is finished first\n"
    with pytest.raises(KeyboardInterrupt):
        stops.jobs_done()


# ``score --engine spark`` of an access log reads its files once, not once per job.
#
# An access bundle's window features need two jobs (the partitions' tails, then the scoring, see
# ``deepwatch.spark``). The lines frame both run on was kept between them only where Spark spread
# the lines over the cores; where each input piece was a partition of its own (two files or more,
# a plain file of two ranges or more), the scoring job read every file again: twice the reading,
# and a file that changed in between failed the run (``changed while it was read``), or with a
# change of the same size, scored other bytes than the tails came from. Here two small real files
# are read through the same frame by two jobs, one of them appended to in between.
@pytest.mark.slow
# (pyspark's notice about pandas 3, which deepwatch never uses: score_spark ignores it too)
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_the_two_jobs_of_windowed_features_read_the_files_once(spark: object,
                                                               tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    from deepwatch.spark import _lines_frame, _specs

    site = head_lines(data_file("weblogs/apache_access.log.gz"), 300)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    first.write_text("".join(site[:200]))
    second.write_text("".join(site[200:]))
    # two files: two pieces, as many as local[2]'s cores, so the lines are not spread (nor,
    # before, kept): each job read the files itself
    lines = _lines_frame(spark, _specs([str(first), str(second)]), same_cuts=True)
    try:
        assert lines.count() == 300  # the first job (the tails job's place)
        with first.open("a") as f:  # a live log, written to between the two jobs
            f.write("".join(site[:5]))
        # the second job (the scoring job's place) sees the lines the first one read
        # (it failed: "... a.log changed while it was read (... bytes, now ...)")
        got = lines.groupBy("file").agg(F.count("*").alias("n"), F.max("line").alias("last"))
        assert sorted((r["file"], r["n"], r["last"]) for r in got.collect()) == [
            (0, 200, 200), (1, 100, 100)]
    finally:
        lines.unpersist()


def test_after_a_stop_with_the_jvm_gone_py4j_errors_print_nothing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM to the whole process group kills the JVM with the run: once in a CI run a py4j
    error ("Py4JNetworkError: Error while sending or receiving") was printed, a traceback, after
    the run's one line ``terminated``. Such errors from py4j's threads and finalisers are then
    dropped; any other error is still reported."""
    import sys
    import threading

    from py4j.protocol import Py4JNetworkError

    from deepwatch.spark import _quiet_py4j

    printed: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: printed.append(type(args.exc_value).__name__))
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda info: printed.append(type(info.exc_value).__name__))
    py4j_log = logging.getLogger("py4j")
    level = py4j_log.level
    try:
        _quiet_py4j()

        def fail(exc: BaseException) -> None:
            raise exc

        for exc in (Py4JNetworkError("Error while sending or receiving"), ValueError("ours")):
            t = threading.Thread(target=fail, args=(exc,))
            t.start()
            t.join()
            sys.unraisablehook(type("Info", (), {"exc_value": exc})())
        assert printed == ["ValueError", "ValueError"]
        assert py4j_log.level > logging.CRITICAL
    finally:
        py4j_log.setLevel(level)
