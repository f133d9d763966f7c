"""Zeek conn.log values Zeek never writes are rejects with their reason, not records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from deepwatch.formats import get_format

HEADER = "\n".join([
    "#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)", "#unset_field\t-",
    "#path\tconn", "#open\t2026-11-24-10-00-00",
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tduration",
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tinterval",
])


def test_a_negative_duration_is_a_reject_from_the_cli(tmp_path: Path) -> None:
    log = tmp_path / "conn.log"
    log.write_text(HEADER + "\n"
                   + "1700000000.1\tC1\t10.0.0.1\t50465\t10.0.0.2\t80\ttcp\t0.25\n"
                   + "1700000000.2\tC2\t10.0.0.1\t50466\t10.0.0.2\t80\ttcp\t-1.5\n"
                   + "#close\t2026-11-24-11-00-00\n")
    lake = tmp_path / "lake"
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "ingest", "-f", "zeek", str(log),
                        "--lake", str(lake)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 lines read: 1 parsed, 1 rejected" in r.stdout + r.stderr
    rejects = pq.read_table(next((lake / "rejects").glob("*.parquet"))).to_pylist()
    assert len(rejects) == 1 and "\t-1.5" in rejects[0]["raw"]
    assert "field duration is not a finite non-negative number" in rejects[0]["reason"]


def test_a_negative_duration_posted_as_a_record_is_a_reject() -> None:
    res = get_format("zeek").parse_records([
        {"ts": 1700000000, "orig_h": "10.0.0.1", "resp_h": "10.0.0.2", "proto": "tcp",
         "duration": -1.5}])
    assert res.batch.num_rows == 0 and res.rejects.num_rows == 1
    assert "duration" in res.rejects.column("reason")[0].as_py()


def test_a_count_past_int64_is_a_reject_that_says_so() -> None:
    line = ("1700000000.1\tC1\t10.0.0.1\t50465\t10.0.0.2\t80\ttcp\t-\t0.5\t9223372036854775807"
            "\t18446744073709551615\tSF\t-\t-\t0\tS\t1\t1\t1\t1\n")
    res = get_format("zeek").parse(line)
    assert res.batch.num_rows == 0 and res.rejects.num_rows == 1
    assert res.rejects.column("reason")[0].as_py() == (
        "field resp_bytes is over 9223372036854775807: '18446744073709551615'")
