"""Text columns carried as dictionaries through ``score``'s line cache, written back as text.

The line cache hands its rows over with their text columns dictionary-encoded (a repeat then
copies indices, and the Parquet writer stores them without hashing every string again); what a
user reads back is the plain columns, as before, whatever mix of encodings the batches of a run
came in.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepwatch._line_cache import FREE_TEXT, ScoredLineCache, categorical
from deepwatch.formats import get_format
from deepwatch.models.decision import Decision
from deepwatch.models.detector import Detector
from deepwatch.scoring import score_files
from deepwatch.sinks import RecordSink, plain_schema, write_jsonl


def _plain_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({
        "service": ["http", "smtp", "http", None],
        "src_bytes": [1, 2, 3, 4],
        "verdict": ["normal", "malicious", "normal", "normal"],
        "explanation": ["a", "b", "c", "d"],
    })


def test_categorical_encodes_text_but_free_text() -> None:
    batch = _plain_batch()
    enc = categorical(batch)
    assert pa.types.is_dictionary(enc.schema.field("service").type)
    assert pa.types.is_dictionary(enc.schema.field("verdict").type)
    assert "explanation" in FREE_TEXT and enc.schema.field("explanation").type == pa.string()
    assert enc.schema.field("src_bytes").type == pa.int64()
    assert pa.Table.from_batches([enc]).cast(plain_schema(enc.schema)).equals(
        pa.Table.from_batches([batch]))
    numbers = pa.RecordBatch.from_pydict({"n": [1, 2]})
    assert categorical(numbers) is numbers  # nothing to encode: the batch as it is


def test_sink_writes_mixed_encodings_as_plain_text(tmp_path: Path) -> None:
    """Batches of one run may come plain (a PATH=LABEL input's label, a chunk scored as it is)
    or encoded, each with its own dictionary: the file holds them all as text, and its footer
    gives the plain types, exactly as pyarrow writes them for a plain table."""
    plain = _plain_batch()
    other = categorical(pa.RecordBatch.from_pydict({
        "service": ["ftp", "ftp", "ssh", "http"], "src_bytes": [5, 6, 7, 8],
        "verdict": ["malicious"] * 4, "explanation": ["e", "f", "g", "h"]}))
    out = tmp_path / "out.parquet"
    sink = RecordSink(str(out))
    for b in (categorical(plain), plain, other):
        sink.write(b)
    sink.close(categorical(plain).schema)
    got = pq.read_table(out)
    want = pa.Table.from_batches([plain, plain, other.cast(plain_schema(other.schema))])
    assert got.schema.equals(plain.schema) and got.equals(want)
    import pandas as pd

    assert not isinstance(got.to_pandas()["service"].dtype, pd.CategoricalDtype)  # text
    ref = tmp_path / "ref.parquet"
    pq.write_table(want, ref)
    footer = pq.ParquetFile(out).metadata.metadata
    assert footer == pq.ParquetFile(ref).metadata.metadata
    assert pa.ipc.read_schema(pa.py_buffer(base64.b64decode(footer[b"ARROW:schema"]))).equals(
        plain.schema)


def test_sink_plain_batches_after_an_encoded_first_one_keep_their_values(
        tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    sink = RecordSink(str(out))
    sink.write(categorical(_plain_batch()))
    late = pa.RecordBatch.from_pydict({"service": ["telnet"], "src_bytes": [9],
                                       "verdict": ["malicious"], "explanation": ["x"]})
    sink.write(late)
    sink.close()
    assert pq.read_table(out).column("service").to_pylist() == [
        "http", "smtp", "http", None, "telnet"]


def test_sink_empty_output_of_an_encoded_schema_is_plain(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    sink = RecordSink(str(out))
    sink.close(categorical(_plain_batch()).schema)
    got = pq.read_table(out)
    assert got.num_rows == 0 and got.schema.equals(_plain_batch().schema)


def test_jsonl_of_encoded_columns_is_the_plain_text() -> None:
    a, b = io.BytesIO(), io.BytesIO()
    write_jsonl(_plain_batch(), a)
    write_jsonl(categorical(_plain_batch()), b)
    assert a.getvalue() == b.getvalue() and b'"service":"smtp"' in a.getvalue()


def test_line_cache_batches_share_one_schema(kdd_bundle: Path, small_kdd_test: Path) -> None:
    """A chunk scored as it is (too small to look for repeats) and one served from the cache
    come out encoded alike, so that a sink's first batch fixes the columns of every later one."""
    fmt = get_format("kdd")
    cache = ScoredLineCache(fmt, Detector(kdd_bundle))
    small = b"".join(small_kdd_test.read_bytes().splitlines(keepends=True)[:20])
    big = small_kdd_test.read_bytes() * 3
    schemas = {cache.parse(small, 1).batch.schema, cache.parse(big, 21).batch.schema}
    assert len(schemas) == 1
    (schema,) = schemas
    assert all(pa.types.is_dictionary(schema.field(n).type)
               for n in ("protocol_type", "service", "flag", "verdict", "category"))


def test_score_output_reads_back_as_text(kdd_bundle: Path, small_kdd_test: Path,
                                         tmp_path: Path) -> None:
    """``score`` through the line cache, two inputs (one given a label): the file's text
    columns are text, and each row's values are those of scoring the record alone."""
    src = tmp_path / "rep.csv"
    src.write_bytes(small_kdd_test.read_bytes() * 4)
    out = tmp_path / "out.parquet"
    report = score_files(str(kdd_bundle), "kdd", [str(src), f"{src}=probe"], str(out))
    got = pq.read_table(out)
    assert all(not pa.types.is_dictionary(f.type) for f in got.schema)
    rows = get_format("kdd").parse(src.read_bytes()).batch
    want = Detector(kdd_bundle).score_batch(rows)
    n = rows.num_rows
    assert report.written == got.num_rows == 2 * n
    for name in ("service", "verdict", "attack_type", "category"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist() * 2, name
    assert got.column("label").to_pylist()[n:] == ["probe"] * n


def test_attack_type_argmax_keeps_float64_resolution() -> None:
    """The attack type is picked on float32 copies of float32 probabilities (exact), but never
    on a float32 rounding of float64 ones: two labels apart by less than float32 can tell."""
    d = Decision({"labels": ["normal", "ipsweep", "smurf"],
                  "label_category": ["normal", "probe", "dos"],
                  "categories": ["normal", "probe", "dos"], "threshold": 0.5})
    proba = np.array([[0.2, 0.4, 0.4 + 1e-12]], dtype=np.float64)
    assert np.float32(proba[0, 1]) == np.float32(proba[0, 2])
    assert d.apply({"proba": proba})["attack_type"].tolist() == ["smurf"]
    p32 = np.array([[0.1, 0.5, 0.4], [0.1, 0.2, 0.7]], dtype=np.float32)
    assert d.apply({"proba": p32})["attack_type"].tolist() == ["ipsweep", "smurf"]


def test_parquet_output_keeps_dictionary_pages_for_text_only(tmp_path: Path) -> None:
    """Numbers are written plain: dictionary-encoding every number cost the writer a fifth of
    its time on KDD's fields. Text keeps its dictionary pages, plain or encoded in Arrow."""
    out = tmp_path / "out.parquet"
    sink = RecordSink(str(out))
    for batch in (categorical(_plain_batch()), _plain_batch()):
        sink.write(batch)
    sink.close()
    meta = pq.ParquetFile(out).metadata
    for g in range(meta.num_row_groups):
        encodings = {meta.row_group(g).column(i).path_in_schema:
                     meta.row_group(g).column(i).encodings for i in range(meta.num_columns)}
        assert "RLE_DICTIONARY" not in encodings["src_bytes"]
        for text in ("service", "verdict", "explanation"):
            assert "RLE_DICTIONARY" in encodings[text], (g, text)
    assert pq.read_table(out).column("src_bytes").to_pylist() == [1, 2, 3, 4] * 2
