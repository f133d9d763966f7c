"""Zeek conn.log records given as objects: as the rows of a table."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from deepwatch.formats import get_format


def test_a_table_of_zeek_records_parses_as_its_rows() -> None:
    # a Format's parse_records takes the rows of a table; iterated, a frame gave its column names
    rows = [{"ts": 1700000000.5, "orig_h": "10.0.0.1", "orig_p": 50465, "resp_h": "10.0.0.2",
             "resp_p": 80, "proto": "tcp", "local_orig": True}]
    for table in (pd.DataFrame(rows), pa.Table.from_pylist(rows)):
        res = get_format("zeek").parse_records(table)
        assert res.rejects.num_rows == 0 and res.batch.num_rows == 1
        assert res.batch.select(["orig_h", "resp_p", "local_orig"]).to_pylist() == [
            {"orig_h": "10.0.0.1", "resp_p": 80, "local_orig": "T"}]
