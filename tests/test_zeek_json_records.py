"""Zeek conn.log records as Zeek's JSON writer logs them (``id.orig_h``, ``id.orig_p``,
``id.resp_h``, ``id.resp_p``), given as objects: to a served bundle, and as the rows of a table.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pyarrow as pa
import pytest
from conftest import serving, trained_bundle

from deepwatch.formats import get_format


def _zeek_json(i: int) -> str:
    """One conn.log line as Zeek 6 writes it with ``LogAscii::use_json=T``: the endpoints under
    their ``id.`` names, intervals to the microsecond, unset fields left out, fields of policy
    scripts and packages too."""
    tcp = i % 3 != 0
    record: dict = {
        "ts": 1700000000.0 + i * 0.25, "uid": f"C{i:017d}",
        "id.orig_h": f"10.0.{i % 7}.{1 + i % 200}", "id.orig_p": 40000 + i,
        "id.resp_h": f"192.0.2.{1 + i % 50}", "id.resp_p": 443 if tcp else 53,
        "proto": "tcp" if tcp else "udp", "duration": round(0.01 * (1 + i % 90), 6),
        "orig_bytes": 100 + 7 * (i % 40), "resp_bytes": 900 + 31 * (i % 60),
        "conn_state": "SF", "local_orig": True, "local_resp": False, "missed_bytes": 0,
        "history": "ShADadFf" if tcp else "Dd", "orig_pkts": 2 + i % 9,
        "orig_ip_bytes": 300 + 7 * (i % 40), "resp_pkts": 2 + i % 11,
        "resp_ip_bytes": 1200 + 31 * (i % 60), "ip_proto": 6 if tcp else 17,
        "community_id": f"1:{i:08d}AAAAAAAAAAAAAAAAAA=", "orig_l2_addr": "00:0c:29:aa:bb:cc",
        "resp_l2_addr": "00:50:56:dd:ee:ff", "tunnel_parents": [],
    }
    if i % 4:  # a connection whose service Zeek did not identify has no service field
        record["service"] = "ssl" if tcp else "dns"
    return json.dumps(record, separators=(",", ":"))


LOG = "".join(_zeek_json(i) + "\n" for i in range(400))


@pytest.fixture(scope="module")
def zeek_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zeek")
    log = root / "conn.log"
    log.write_text(LOG)
    return trained_bundle("autoencoder", log, root, epochs=1, fmt="zeek")


def test_a_record_posted_as_zeek_logged_it_scores_as_its_line(zeek_bundle: Path) -> None:
    lines = LOG.splitlines()[:5]
    with serving(zeek_bundle) as (_, url):
        objects = [json.loads(line) for line in lines]
        # each object gets the verdict and scores of the same record sent as its raw line
        answers = [httpx.post(url + "/v1/score", json={"records": records}, timeout=30).json()
                   for records in (objects, lines)]
        assert answers[0]["rejects"] == [] and len(answers[0]["results"]) == 5
        assert answers[0] == answers[1]


def test_a_frame_read_from_a_zeek_json_log_parses_as_its_lines() -> None:
    fmt = get_format("zeek")
    # columns id.orig_h, id.orig_p...; precise_float: pandas rounds some decimals otherwise
    frame = pd.read_json(io.StringIO(LOG), lines=True, precise_float=True)
    from_rows = fmt.parse_records(frame)
    from_lines = fmt.parse(LOG)
    assert from_rows.rejects.num_rows == 0 and from_rows.lines == 400
    assert from_rows.batch.to_pylist() == from_lines.batch.to_pylist()


def test_a_column_name_and_its_zeek_name_given_both_keep_the_column_name() -> None:
    res = get_format("zeek").parse_records([
        {"ts": 1700000000, "orig_h": "10.0.0.1", "id.orig_h": "10.9.9.9", "id.resp_h": "10.0.0.2",
         "proto": "tcp"}])
    assert res.rejects.num_rows == 0
    assert res.batch.column("orig_h").to_pylist() == ["10.0.0.1"]
    assert res.batch.column("resp_h").to_pylist() == ["10.0.0.2"]


def test_a_table_of_zeek_records_parses_as_its_rows() -> None:
    # a Format's parse_records takes the rows of a table; iterated, a frame gave its column names
    rows = [{"ts": 1700000000.5, "orig_h": "10.0.0.1", "orig_p": 50465, "resp_h": "10.0.0.2",
             "resp_p": 80, "proto": "tcp", "local_orig": True}]
    for table in (pd.DataFrame(rows), pa.Table.from_pylist(rows)):
        res = get_format("zeek").parse_records(table)
        assert res.rejects.num_rows == 0 and res.batch.num_rows == 1
        assert res.batch.select(["orig_h", "resp_p", "local_orig"]).to_pylist() == [
            {"orig_h": "10.0.0.1", "resp_p": 80, "local_orig": "T"}]


def test_a_rejected_zeek_record_keeps_its_text_as_given() -> None:
    given = json.loads(_zeek_json(1)) | {"duration": -0.5}  # Zeek never logs a negative one
    res = get_format("zeek").parse_records([json.loads(_zeek_json(0)), given])
    assert res.batch.num_rows == 1
    assert res.rejects.column("line").to_pylist() == [2]
    assert "duration" in res.rejects.column("reason")[0].as_py()
    # its names and values as sent: not the columns (orig_h) and T/F they were read into
    assert json.loads(res.rejects.column("raw")[0].as_py()) == given


def _millis(line: str) -> str:
    """``line`` as Zeek writes it with ``JSON::TS_MILLIS``: ts in integer milliseconds."""
    record = json.loads(line)
    return json.dumps(record | {"ts": round(record["ts"] * 1000)}, separators=(",", ":"))


def test_a_json_log_with_millisecond_timestamps_scores_as_with_seconds(
        zeek_bundle: Path, tmp_path: Path) -> None:
    lines = LOG.splitlines()[:50]
    outs = []
    for name, text in (("seconds", lines), ("millis", [_millis(line) for line in lines])):
        log = tmp_path / f"conn.{name}.log"
        log.write_text("\n".join(text) + "\n")
        out = tmp_path / f"{name}.jsonl"
        r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "score", str(zeek_bundle),
                            "-f", "zeek", "--out", str(out), str(log)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "50 lines read: 50 parsed, 0 rejected" in r.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    assert json.loads(outs[1].splitlines()[1])["ts"] == "2023-11-14T22:13:20.250+00:00"


def test_a_record_with_millisecond_timestamps_reads_as_with_seconds() -> None:
    lines = LOG.splitlines()[:5]
    fmt = get_format("zeek")
    seconds = fmt.parse_records([json.loads(line) for line in lines])
    millis = fmt.parse_records([json.loads(_millis(line)) for line in lines])
    assert millis.rejects.num_rows == 0
    assert millis.batch.to_pylist() == seconds.batch.to_pylist()


def test_a_frame_read_from_a_zeek_json_log_scores_as_its_lines(zeek_bundle: Path,
                                                                 tmp_path: Path) -> None:
    """``Detector.score_batch`` of ``pd.read_json(conn.log, lines=True)``: the columns are
    Zeek's names (``id.resp_p``...), read as the columns ``resp_p``... (the error said they
    were missing); the scores are those of the log's parsed lines."""
    from deepwatch.models.detector import Detector

    log = tmp_path / "conn.log"
    log.write_text(LOG)
    det = Detector(zeek_bundle)
    frame = pd.read_json(log, lines=True)
    scored = det.score_batch(frame)
    parsed = det.score_batch(get_format("zeek").parse(LOG).batch)
    assert scored.column("score").to_pylist() == parsed.column("score").to_pylist()
    assert scored.column("verdict").to_pylist() == parsed.column("verdict").to_pylist()
    # the frame's columns are kept, and the ones read are added under their own names
    assert {"id.orig_h", "id.resp_p", "orig_h", "resp_p"} <= set(scored.schema.names)
    assert scored.column("resp_p").to_pylist() == frame["id.resp_p"].tolist()

    # a column given under both names: its own name is read (as parse_records reads a record)
    both = frame.assign(resp_p=frame["id.resp_p"], **{"id.resp_p": 1})  # a port never seen
    assert det.score_batch(both).column("score").to_pylist() == parsed.column(
        "score").to_pylist()


def test_a_table_mixing_both_names_reads_each_row_under_the_name_it_has(
        zeek_bundle: Path, tmp_path: Path) -> None:
    """A table concatenated from records written both ways (half as Zeek's JSON writer names
    the endpoints, half under the column names) has both columns, each null where a row used
    the other name. ``score_batch`` kept the column-name column whole, so the dotted half was
    scored with no endpoints at all; each row now reads as its own record does."""
    from deepwatch.models.detector import Detector

    det = Detector(zeek_bundle)
    parsed = det.score_batch(get_format("zeek").parse(LOG).batch)
    frame = pd.read_json(io.StringIO(LOG), lines=True)
    renamed = frame.rename(columns={"id.orig_h": "orig_h", "id.orig_p": "orig_p",
                                    "id.resp_h": "resp_h", "id.resp_p": "resp_p"})
    half = len(frame) // 2
    mixed = pd.concat([frame.iloc[:half], renamed.iloc[half:]], ignore_index=True)
    assert mixed["resp_p"].isna().sum() == half and mixed["id.resp_p"].isna().sum() == half
    scored = det.score_batch(mixed)
    assert scored.column("resp_p").to_pylist() == frame["id.resp_p"].astype(float).tolist()
    assert scored.column("score").to_pylist() == pytest.approx(
        parsed.column("score").to_pylist(), rel=1e-6)
    assert scored.column("verdict").to_pylist() == parsed.column("verdict").to_pylist()

    # a dotted column whose values cannot be the column's type is one clear error
    bad = mixed.assign(**{"id.resp_p": ["https"] * len(mixed)})
    from deepwatch.errors import InputError

    with pytest.raises(InputError, match="id.resp_p"):
        det.score_batch(bad)
