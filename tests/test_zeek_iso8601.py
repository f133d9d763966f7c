"""Zeek JSON logs written with ``JSON::TS_ISO8601``: ``ts`` is UTC text, not epoch seconds."""

from __future__ import annotations

import gzip
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from deepwatch.formats import get_format

#: As Zeek 6 writes conn.log with LogAscii::use_json=T and JSON::TS_ISO8601: extra fields
#: (community_id, tunnel_parents as an array...), a JSON boolean, IPv6 and an ICMP type/code.
ISO = ('{"ts":"2026-11-24T10:00:00.123456Z","uid":"CHhAvVGS1DHFjwGM9","id.orig_h":"2001:db8::1",'
       '"id.orig_p":8,"id.resp_h":"2001:db8::2","id.resp_p":0,"proto":"icmp","duration":0.5,'
       '"orig_bytes":56,"resp_bytes":56,"conn_state":"OTH","local_orig":true,"missed_bytes":0,'
       '"orig_pkts":1,"orig_ip_bytes":104,"resp_pkts":1,"resp_ip_bytes":104,'
       '"tunnel_parents":[],"community_id":"1:x+k4=","orig_cc":"US"}')
WHOLE = ('{"ts":"2026-11-24T10:00:01Z","uid":"C2","id.orig_h":"10.0.0.1","id.orig_p":50465,'
         '"id.resp_h":"10.0.0.2","id.resp_p":443,"proto":"tcp"}')


def test_iso8601_ts_is_the_time_it_names() -> None:
    res = get_format("zeek").parse(ISO + "\n" + WHOLE + "\n")
    assert res.rejects.num_rows == 0 and res.batch.num_rows == 2
    assert res.batch.column("ts").to_pylist() == [
        datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=UTC),
        datetime(2026, 11, 24, 10, 0, 1, tzinfo=UTC)]
    assert res.batch.column("local_orig").to_pylist() == ["T", None]


def test_ingest_of_a_rotated_iso8601_log_keeps_every_record(tmp_path: Path) -> None:
    log = tmp_path / "conn.2026-11-24-10-00-00.log.gz"
    with gzip.open(log, "wt") as f:
        f.write(ISO + "\n" + WHOLE + "\n")
    lake = tmp_path / "lake"
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "ingest", "-f", "zeek", str(log),
                        "--lake", str(lake)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 parsed, 0 rejected" in r.stdout + r.stderr
    table = pq.read_table(next((lake / "records" / "day=2026-11-24").glob("*.parquet")))
    assert sorted(table.column("uid").to_pylist()) == ["C2", "CHhAvVGS1DHFjwGM9"]
