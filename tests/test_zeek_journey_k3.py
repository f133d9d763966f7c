"""An analyst's IoT-23 journey (labelled Zeek conn.log): what it found, kept cheap (no training).

A frame read from an IoT-23 log written as JSON (``pd.read_json(..., lines=True)``), given to
``Detector.score_batch``, kept its labels as the log writes them (``Benign``, ``Malicious``): its
benign records were attacks to deepwatch's metrics and its attacks had lost their names, where
the same records given as objects (``parse_records``, the REST API), lines or files were read as
``normal`` and ``C&C``... ``score_batch`` reads a table through ``Format.with_column_names``.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow as pa

from deepwatch.formats import get_format


def _records() -> list[dict]:
    """IoT-23 records as Zeek's JSON writer would log a conn.log.labeled's lines."""
    kinds = [("Benign", "-"), ("Malicious", "PartOfAHorizontalPortScan"), ("Malicious", "C&C"),
             ("benign", "-"), ("Malicious", "-"), ("Normal", "-"), ("Malicious", "Okiru")]
    out = []
    for i, (label, detailed) in enumerate(kinds * 3):
        out.append({"ts": 1545404603.5 + i, "uid": f"C{i:017d}", "id.orig_h": "192.168.1.195",
                    "id.orig_p": 41040 + i, "id.resp_h": f"185.244.25.{1 + i}", "id.resp_p": 23,
                    "proto": "tcp", "duration": 0.5, "orig_bytes": 0, "resp_bytes": 0,
                    "conn_state": "S0", "missed_bytes": 0, "history": "S", "orig_pkts": 3,
                    "orig_ip_bytes": 180, "resp_pkts": 0, "resp_ip_bytes": 0,
                    "label": label, "detailed-label": detailed})
    return out


def test_a_frame_of_an_iot23_log_has_the_labels_its_records_have() -> None:
    records = _records()
    frame = pd.read_json(io.StringIO("".join(json.dumps(r) + "\n" for r in records)),
                         lines=True)
    zeek = get_format("zeek")
    read = zeek.with_column_names(pa.RecordBatch.from_pandas(frame, preserve_index=False))
    expected = zeek.parse_records(records).batch.column("label").to_pylist()
    assert expected[:7] == ["normal", "PartOfAHorizontalPortScan", "C&C", "normal",
                            "malicious", "normal", "Okiru"]
    assert read.column("label").to_pylist() == expected


def test_a_frame_naming_the_detailed_label_with_an_underscore_reads_it_too() -> None:
    frame = pa.table({"label": ["Malicious", " benign ", None, "DDoS"],
                      "detailed_label": ["C&C-HeartBeat", "-", "-", None]})
    read = get_format("zeek").with_column_names(frame.to_batches()[0])
    assert read.column("label").to_pylist() == ["C&C-HeartBeat", "normal", None, "DDoS"]


def test_a_batch_deepwatch_parsed_keeps_its_labels() -> None:
    """A parsed batch (``score``, ``stream``) passes through unchanged, a PATH=LABEL ``-``
    included."""
    zeek = get_format("zeek")
    batch = zeek.parse_records(_records()).batch
    assert zeek.with_column_names(batch).equals(batch)
    dash = batch.set_column(batch.schema.get_field_index("label"), "label",
                            pa.array(["-"] * batch.num_rows))
    assert zeek.with_column_names(dash).equals(dash)
