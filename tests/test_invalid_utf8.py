"""Bytes that are not UTF-8 in an input line: kept as ``\\xHH`` (upper-case, one escape per byte,
as NGINX writes such bytes) in the parsed fields and in a reject's raw text, in every format and
from every entry point. They were replaced by U+FFFD, which kept no trace of
their values: for a security tool the bytes of a payload are evidence."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepwatch.formats import get_format
from deepwatch.formats._base import MAX_RAW, cut_lost, decode_text
from deepwatch.lake import read_lake, read_rejects

ACCESS = (b'203.0.113.9 - - [17/May/2015:10:05:03 +0000] "GET /a\xff\xfeb HTTP/1.0" 200 5 '
          b'"-" "Mozilla\xc3"')
KDD = (b"0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
       b"0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.")
ZEEK_TSV = (b"1700000000.5\tC\xff1\t10.0.0.1\t5353\t10.0.0.2\t80\ttcp\thttp\t1.0\t1\t2\tSF\t-\t-\t0"
            b"\tSh\xfe\t1\t2\t3\t4")
ZEEK_JSON = (b'{"ts":1700000000.5,"uid":"C\xff1","id.orig_h":"10.0.0.1","id.orig_p":5353,'
             b'"id.resp_h":"10.0.0.2","id.resp_p":80,"proto":"tcp","history":"Sh\xfe"}')


def test_the_escapes_are_upper_case_one_per_byte_and_valid_text_is_untouched() -> None:
    assert decode_text(b"a\xff\xfeb \xe2\x82z \xed\xa0\x80 \xc3\xa9 \\x41") == (
        "a\\xFF\\xFEb \\xE2\\x82z \\xED\\xA0\\x80 \xe9 \\x41")
    # the rest of a damaged input: the bytes kept show the same escapes
    assert cut_lost(b"ab\xff", "why") == ("ab\\xFF", "why")
    raw, why = cut_lost(b"\xfe" * (MAX_RAW + 5), "why")
    assert raw == "\\xFE" * MAX_RAW and why == "why (the raw text keeps its first 10,000 bytes)"


def test_access_keeps_the_bytes_of_the_url_and_agent_and_of_a_rejects_raw_text() -> None:
    fmt = get_format("access")
    bad_status = ACCESS.replace(b" 200 ", b" 2\xff0 ")
    res = fmt.parse(ACCESS + b"\n" + bad_status + b"\n" + ACCESS.replace(b"GET", b"GE\xff"))
    assert res.lines == 3 and res.batch.num_rows + res.rejects.num_rows == 3
    rows = res.batch.to_pylist()
    assert [(r["request"], r["method"], r["url"], r["user_agent"]) for r in rows] == [
        ("GET /a\\xFF\\xFEb HTTP/1.0", "GET", "/a\\xFF\\xFEb", "Mozilla\\xC3"),
        ("GE\\xFF /a\\xFF\\xFEb HTTP/1.0", None, None, "Mozilla\\xC3")]
    (reject,) = res.rejects.to_pylist()
    assert reject["line"] == 2
    assert reject["raw"] == decode_text(bad_status) and "2\\xFF0" in reject["raw"]
    assert reject["reason"] == "status is not a code 100-599: '2\\xFF0'"


@pytest.mark.parametrize("name", ["kdd", "nslkdd"])
def test_kdd_keeps_the_bytes_of_a_text_field_and_a_bad_number_is_a_reject_showing_them(
        name: str) -> None:
    fmt = get_format(name)
    lines = [KDD, KDD.replace(b"http", b"ht\xfftp"), KDD.replace(b",181,", b",18\xff1,"),
             KDD.replace(b"normal.", b"nor\xe9mal.")]
    data = b"\n".join(lines) + b"\n"
    for res in (fmt.parse(data), fmt.parse_bulk(data * 2000)):  # the latter: repeated lines
        assert res.batch.num_rows + res.rejects.num_rows == res.lines
        assert res.batch.column("service").to_pylist()[:3] == ["http", "ht\\xFFtp", "http"]
        assert res.batch.column("label").to_pylist()[:3] == ["normal", "normal", "nor\\xE9mal"]
        reject = res.rejects.to_pylist()[0]
        assert reject["line"] == 3
        assert reject["raw"] == KDD.decode().replace(",181,", ",18\\xFF1,")
        assert reject["reason"] == "field 5 (src_bytes) is not a non-negative integer: '18\\xFF1'"


def test_zeek_keeps_the_bytes_in_tsv_fields_and_json_strings_alike() -> None:
    """A JSON parser takes UTF-8 only: such a line was a record holding U+FFFD, and read as
    its text is now (``\\xFF`` is no JSON escape) every one would be a reject. A byte in a
    JSON string reads as the TSV field's; one outside a string is a reject that says why."""
    fmt = get_format("zeek")
    outside = ZEEK_JSON.replace(b',"proto"', b',\xff"proto"')
    bad_port = ZEEK_TSV.replace(b"\t5353\t", b"\t53\xff\t")
    lines = [ZEEK_TSV, ZEEK_JSON, outside, bad_port, ZEEK_JSON.replace(b"\xff", b"")]
    res = fmt.parse(b"\n".join(lines) + b"\n")
    assert res.lines == 5 and res.batch.num_rows + res.rejects.num_rows == 5
    assert res.line_numbers.to_pylist() == [1, 2, 5]
    assert [(r["uid"], r["history"]) for r in res.batch.to_pylist()] == [
        ("C\\xFF1", "Sh\\xFE"), ("C\\xFF1", "Sh\\xFE"), ("C1", "Sh\\xFE")]
    rejects = res.rejects.to_pylist()
    assert [(r["line"], r["raw"]) for r in rejects] == [
        (3, decode_text(outside)), (4, decode_text(bad_port))]
    assert rejects[0]["reason"].startswith(
        "not valid JSON (it holds bytes that are not UTF-8, shown \\xHH")
    assert rejects[1]["reason"] == "field orig_p is not a non-negative integer: '53\\xFF'"
    # the same lines as text, their bytes escaped already (as Spark hands its lines to the
    # parser) read the same: the JSON line was a reject "not valid JSON" there
    as_text = fmt.parse(decode_text(b"\n".join(lines) + b"\n"))
    assert as_text.batch.to_pylist() == res.batch.to_pylist()
    assert as_text.rejects.to_pylist() == rejects
    # an escaped backslash before an x is JSON's own, left as it is
    kept = fmt.parse(ZEEK_JSON.replace(b"\xff", b"\\\\x41").replace(b"\xfe", b"").decode())
    assert [r["uid"] for r in kept.batch.to_pylist()] == ["C\\x411"]


def test_zeek_header_with_such_bytes_reads_the_same_in_one_chunk_or_carried() -> None:
    fmt = get_format("zeek")
    header = b"#fields\tts\tuid\tid.orig_h\tid.resp_h\tproto\tx\xff"
    record = b"1700000000.5\tC\xff1\t10.0.0.1\t10.0.0.2\ttcp\ty\xfe"
    assert fmt.context_after(header + b"\n", None) == decode_text(header)
    whole = fmt.parse(header + b"\n" + record + b"\n")
    carried = fmt.parse_bulk(record + b"\n", context=fmt.context_after(header + b"\n", None))
    assert whole.rejects.num_rows == carried.rejects.num_rows == 0
    assert whole.batch.column("uid").to_pylist() == carried.batch.column("uid").to_pylist() == [
        "C\\xFF1"]


def test_ingest_keeps_the_bytes_from_a_file_a_gzip_file_and_stdin(tmp_path: Path) -> None:
    """``deepwatch ingest`` as a user runs it: the same lines from a plain file, a .gz file and
    stdin are stored with ``\\xHH`` in their fields, and their rejects keep them in raw."""
    good = ACCESS
    bad = ACCESS.replace(b" 200 ", b" 2\xff0 ")
    data = good + b"\n" + bad + b"\n"
    plain, packed = tmp_path / "site.log", tmp_path / "site.log.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    lake = tmp_path / "lake"
    done = subprocess.run([sys.executable, "-m", "deepwatch", "ingest", "--format", "access",
                           "--lake", str(lake), str(plain), str(packed), "-"], input=data,
                          capture_output=True, timeout=120,
                          env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr.decode()
    assert b"6 lines read: 3 parsed, 3 rejected" in done.stderr
    table = read_lake(lake)
    assert table.column("url").to_pylist() == ["/a\\xFF\\xFEb"] * 3
    assert table.column("user_agent").to_pylist() == ["Mozilla\\xC3"] * 3
    rejects = read_rejects(lake)
    assert rejects is not None
    assert rejects.column("raw").to_pylist() == [decode_text(bad)] * 3
