"""Repeated records are parsed and scored once: the results must equal scoring every line.

Three layers do this (per-chunk line dedupe in parsing, the detector's result cache, and the
line cache of ``deepwatch score``); each is checked against the plain path on real KDD lines
mixed with repeated and unique garbage, a final line without a line break, and a cache small
enough to start over mid-run.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import head_lines

from deepwatch._line_cache import ScoredLineCache
from deepwatch.formats import get_format
from deepwatch.formats._repeats import REPEAT_MIN_BYTES, parse_repeated
from deepwatch.models.detector import Detector
from deepwatch.sinks import plain_schema

GARBAGE = ["", "tcp,http,SF", "not,a,record", "0,tcp,http,SF,-5" + ",0" * 37 + ",normal."]


def _mixed_lines(kdd_test_file: Path, n_distinct: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = [ln.rstrip("\n") for ln in head_lines(kdd_test_file, n_distinct, every=7)]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.01:
            out.append(rng.choice(GARBAGE))  # repeated garbage
        elif r < 0.012:
            out.append(f"garbage line {i}")  # unique garbage
        else:
            out.append(rng.choice(pool))
    return out


def _chunks(text: bytes, size: int) -> list[tuple[bytes, int]]:
    """Whole-line chunks of about ``size`` bytes with their first line numbers."""
    out, start, line = [], 0, 1
    while start < len(text):
        cut = text.rfind(b"\n", start, start + size)
        end = len(text) if cut < 0 or start + size >= len(text) else cut + 1
        out.append((text[start:end], line))
        line += text[start:end].count(b"\n")
        start = end
    return out


@pytest.fixture(scope="module")
def mixed(kdd_test_file: Path) -> bytes:
    lines = _mixed_lines(kdd_test_file, 3000, 60_000, seed=1)
    return ("\n".join(lines)).encode()  # the last line has no line break


def _same_result(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.lines == b.lines
    assert a.batch.equals(b.batch)
    assert a.rejects.equals(b.rejects)
    assert a.line_numbers.equals(b.line_numbers)


def test_parse_repeated_equals_parse(mixed: bytes) -> None:
    fmt = get_format("kdd")
    assert len(mixed) > REPEAT_MIN_BYTES
    plain = fmt.parse(mixed, first_line=11)
    once = parse_repeated(fmt.parse, mixed, 11)
    assert plain.rejects.num_rows > 500  # the garbage is there, and counted
    _same_result(plain, once)
    assert fmt.parse_bulk(mixed, 11).batch.equals(plain.batch)


def test_parse_repeated_mostly_distinct_takes_plain_path(kdd_test_file: Path) -> None:
    fmt = get_format("kdd")
    text = "".join(head_lines(kdd_test_file, 4000)).encode()
    _same_result(fmt.parse(text, 1), parse_repeated(fmt.parse, text, 1))


def _plain_scores(det: Detector, chunks: list[tuple[bytes, int]]):  # type: ignore[no-untyped-def]
    batches, rejects = [], []
    for data, first in chunks:
        r = get_format(det.format).parse(data, first)
        batches.append(_score_plain(det, r.batch))
        rejects.append(r.rejects)
    return pa.Table.from_batches(batches), pa.concat_tables(rejects)


def _score_plain(det: Detector, batch: pa.RecordBatch) -> pa.RecordBatch:
    """score_batch without any cache: decide every row of the batch itself."""
    from deepwatch.models.detector import _append

    return _append(batch, det._columns(det._decide(batch, None)))


@pytest.mark.parametrize("max_rows", [1 << 17, 1500])
def test_line_cache_equals_scoring_every_line(kdd_bundle: Path, mixed: bytes,
                                              max_rows: int) -> None:
    det = Detector(kdd_bundle)
    chunks = _chunks(mixed, 300_000)
    assert len(chunks) >= 4
    want, want_rejects = _plain_scores(det, chunks)
    cache = ScoredLineCache(get_format("kdd"), Detector(kdd_bundle), max_rows=max_rows)
    got = [cache.parse(data, first) for data, first in chunks]
    got_table = pa.Table.from_batches([g.batch for g in got])
    # (text columns come dictionary-encoded, every batch alike: see _line_cache.categorical)
    assert len({g.batch.schema for g in got}) == 1
    assert pa.types.is_dictionary(got_table.schema.field("service").type)
    assert got_table.cast(plain_schema(got_table.schema)).equals(want)
    assert pa.concat_tables([g.rejects for g in got]).equals(want_rejects)
    assert cache.hits > cache.misses  # later chunks were served from the cache
    assert sum(g.lines for g in got) == mixed.count(b"\n") + 1


def test_result_cache_equals_deciding_every_row(kdd_bundle: Path, small_kdd_test: Path) -> None:
    fmt = get_format("kdd")
    text = small_kdd_test.read_bytes()
    batch = fmt.parse(text * 2).batch  # every record twice
    det = Detector(kdd_bundle)
    det._cache.max_rows = 6000  # smaller than the distinct records: starts over mid-batch run
    want = _score_plain(det, batch)
    for start in range(0, batch.num_rows, 5000):  # batches above DEDUPE_MIN_ROWS use the cache
        part = batch.slice(start, 5000)
        assert det.score_batch(part).equals(want.slice(start, 5000))
    assert det._cache.hits > 0


def test_score_distinct_equals_scoring_and_leaves_the_result_cache_alone(
        kdd_bundle: Path, small_kdd_test: Path) -> None:
    """What the line cache scores its new lines with: the columns of score_batch, without a
    look for the records among those scored before (the detector's cache is not touched)."""
    batch = get_format("kdd").parse(small_kdd_test.read_bytes()).batch
    det = Detector(kdd_bundle)
    got = det.score_distinct(batch)
    assert det._cache.hits == det._cache.misses == 0 and len(det._cache) == 0
    assert got.equals(_score_plain(det, batch))
    assert got.equals(Detector(kdd_bundle).score_batch(batch))
    empty = det.score_distinct(batch.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema.equals(got.schema)


def test_score_command_output_equals_plain_scoring(kdd_bundle: Path, mixed: bytes,
                                                   tmp_path: Path) -> None:
    from deepwatch.scoring import score_files

    src = tmp_path / "mixed.csv"
    src.write_bytes(mixed * 3)
    out = tmp_path / "out.parquet"
    rejects = tmp_path / "rejects.jsonl"
    report = score_files(str(kdd_bundle), "kdd", [f"{src}=probe"], str(out),
                         rejects=str(rejects))
    det = Detector(kdd_bundle)
    fmt = get_format("kdd")
    plain = fmt.parse(src.read_bytes())
    want = _score_plain(det, plain.batch)
    got = pq.read_table(out)
    assert got.num_rows == plain.batch.num_rows == report.written
    assert set(got.column("label").to_pylist()) == {"probe"}  # PATH=LABEL still applies
    for name in ("score", "verdict", "attack_type", "category", "src_bytes", "service"):
        assert got.column(name).combine_chunks().equals(want.column(name)), name
    assert report.stats.rejected == plain.rejects.num_rows
    kept = rejects.read_text().splitlines()
    assert len(kept) == plain.rejects.num_rows


def test_key_index_finds_added_keys_only() -> None:
    import numpy as np

    from deepwatch._dedupe import KeyIndex

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 1000, dtype=np.uint64)
    b = rng.integers(0, 2**63, 1000, dtype=np.uint64)
    idx = KeyIndex()
    assert (idx.lookup(a, b) == -1).all()
    assert list(idx.add(a[:600], b[:600])) == list(range(600))
    assert list(idx.add(a[600:700], b[600:700])) == list(range(600, 700))
    got = idx.lookup(a, b)
    assert list(got[:700]) == list(range(700)) and (got[700:] == -1).all()
    assert (idx.lookup(a[:10], b[:10] + np.uint64(1)) == -1).all()  # same first half, other key
    idx.clear()
    assert len(idx) == 0 and (idx.lookup(a, b) == -1).all()
