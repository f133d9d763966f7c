"""``parse_records`` of a table's rows (pandas, polars) whose rows hold a reject: KDD's rate
check looked the rejected row up in the frame by its number, which a DataFrame takes for a
column (``KeyError: 2``); the docstring of ``score_batch`` sends users to ``parse_records``."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import head_lines

from deepwatch.formats import get_format


@pytest.mark.parametrize("kind", ["pandas", "polars"])
def test_kdd_parse_records_of_a_frame_rejects_a_bad_rate_with_its_reason(
        kdd_test_file: Path, kind: str) -> None:
    kdd = get_format("kdd")
    table = kdd.parse("".join(head_lines(kdd_test_file, 5)).encode()).batch
    frame = table.to_pandas()
    frame.loc[2, "serror_rate"] = 5.0
    records = frame if kind == "pandas" else pl.from_pandas(frame)
    result = kdd.parse_records(records)
    assert result.batch.num_rows == 4
    assert result.rejects.column("line").to_pylist() == [3]
    assert "serror_rate" in result.rejects.column("reason")[0].as_py()
    assert result.line_numbers.to_pylist() == [1, 2, 4, 5]
