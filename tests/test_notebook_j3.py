"""A notebook's frames through ``Detector.score_batch`` (a data scientist's review)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import data_file, head_lines

from deepwatch.features import Featurizer
from deepwatch.formats import get_format
from deepwatch.models.detector import Detector

TEXT = ("protocol_type", "service", "flag")


@pytest.fixture(scope="module")
def kdd_records(kdd_test_file: Path) -> pa.RecordBatch:
    return get_format("kdd").parse("".join(head_lines(kdd_test_file, 300)).encode()).batch


@pytest.mark.parametrize("kind", ["categorical", "enum"])
@pytest.mark.parametrize("how", ["frame", "record batch"])
def test_polars_categorical_and_enum_columns_score_as_their_text(
        kdd_bundle: Path, kdd_records: pa.RecordBatch, kind: str, how: str) -> None:
    """A polars Categorical or Enum reaches pyarrow as a dictionary of ``string_view`` values,
    which pyarrow cannot cast to text: score_batch refused such a frame with "column
    'protocol_type' holds values that are not categories (text)"."""
    det = Detector(kdd_bundle)
    want = det.score_batch(kdd_records).column("score").to_numpy()
    frame = pl.from_arrow(kdd_records)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns([
        pl.col(c).cast(pl.Categorical if kind == "categorical"
                       else pl.Enum(sorted(frame[c].unique().to_list())))
        for c in TEXT])
    records = frame if how == "frame" else pa.table(frame).combine_chunks().to_batches()[0]
    got = det.score_batch(records)
    assert got.num_rows == kdd_records.num_rows
    assert np.array_equal(got.column("score").to_numpy(), want)
    assert got.column("service").to_pylist() == kdd_records.column("service").to_pylist()


def test_access_log_frame_with_category_columns_is_featurised_as_its_text() -> None:
    """An access-log frame whose text columns are pandas ``category`` (a notebook's way to save
    memory) or polars ``Categorical`` reached the access deriver as Arrow dictionaries, and
    scoring it failed with pyarrow's traceback (``ArrowNotImplementedError: Function
    'utf8_length' has no kernel matching input types (dictionary<...>)``)."""
    fmt = get_format("access")
    lines = "".join(head_lines(data_file("weblogs/apache_access.log.gz"), 400))
    parsed = fmt.parse(lines.encode()).batch
    featurizer = Featurizer(fmt.feature_spec()).fit(parsed)
    want = featurizer.transform(parsed)
    frame = parsed.to_pandas()
    text = [f.name for f in parsed.schema if pa.types.is_string(f.type)]
    assert {"path", "query", "user_agent", "client_ip", "referer"} <= set(text)
    as_category = frame.astype(dict.fromkeys(text, "category"))
    assert np.array_equal(featurizer.transform(as_category), want)
    polars_frame = pl.from_arrow(parsed)
    assert isinstance(polars_frame, pl.DataFrame)
    as_categorical = polars_frame.with_columns([pl.col(c).cast(pl.Categorical) for c in text])
    assert np.array_equal(featurizer.transform(as_categorical), want)


def test_polars_enum_frames_with_other_category_lists_get_their_own_results(
        kdd_bundle: Path, kdd_records: pa.RecordBatch) -> None:
    """A detector keeps the results of the records it scored, keyed by a hash of their fields;
    polars hashes an Enum by its position in the Enum's list of categories. Two frames whose
    Enums list their services in another order (each file's own ``sorted(unique())``, say) then
    gave a record of one service the results cached for another: ``private`` connections scored
    as the ``http`` ones of the frame before."""
    frame = pl.from_arrow(kdd_records)
    assert isinstance(frame, pl.DataFrame)
    frame = pl.concat([frame] * 14)  # (4,200 rows: past DEDUPE_MIN_ROWS, where the cache is)
    services = sorted(frame["service"].unique().to_list())
    assert {"http", "private"} <= set(services)
    swap = {"http": "private", "private": "http"}
    first = frame.with_columns(pl.col("service").cast(pl.Enum(services)))
    # the same connections on the other service, each service where the other was in the list
    second = frame.with_columns(pl.col("service").replace(swap)
                                .cast(pl.Enum([swap.get(s, s) for s in services])))
    det = Detector(kdd_bundle)
    det.score_batch(first)
    got = det.score_batch(second)
    want = Detector(kdd_bundle).score_batch(second)
    assert got.column("service").to_pylist() == want.column("service").to_pylist()
    wrong = got.column("score").to_numpy() != want.column("score").to_numpy()
    assert int(wrong.sum()) == 0  # (3,290 of the 4,200 before)
    assert got.column("attack_type").to_pylist() == want.column("attack_type").to_pylist()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_polars_nan_or_infinity_is_an_error_naming_it_not_a_normal_verdict(
        kdd_bundle: Path, kdd_records: pa.RecordBatch, bad: float) -> None:
    """A polars frame keeps a float NaN (pandas' becomes null): its record scored NaN, which no
    threshold reaches, so its verdict was ``normal`` without a word. It is one InputError
    naming the column and row, and saying how to have such records rejected instead."""
    from deepwatch.errors import InputError

    det = Detector(kdd_bundle)
    frame = pl.from_arrow(kdd_records)
    assert isinstance(frame, pl.DataFrame)
    assert det.score_batch(frame).num_rows == 300  # the same frame, every value finite
    rows = pl.int_range(pl.len())
    damaged = frame.with_columns(pl.when(rows == 7).then(bad).otherwise(pl.col("serror_rate"))
                                 .alias("serror_rate"))
    with pytest.raises(InputError, match=rf"column 'serror_rate' holds a value that is not a "
                       rf"finite number \({bad} at row 7\).*parse_records"):
        det.score_batch(damaged)
    parsed = get_format("kdd").parse_records(damaged)  # the way the error names
    assert parsed.rejects.num_rows == 1 and parsed.batch.num_rows == 299
    assert det.score_batch(parsed.batch).num_rows == 299
