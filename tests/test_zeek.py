"""Zeek conn.log: TSV with headers, JSON lines, unset fields, rejects, property tests."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from deepwatch.features import Featurizer
from deepwatch.formats import get_format

FMT = get_format("zeek")
FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service",
          "duration", "orig_bytes", "resp_bytes", "conn_state", "local_orig", "local_resp",
          "missed_bytes", "history", "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes",
          "tunnel_parents")
HEADER = "\n".join([
    "#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)", "#unset_field\t-",
    "#path\tconn", "#fields\t" + "\t".join(FIELDS),
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring"
    "\tbool\tbool\tcount\tstring\tcount\tcount\tcount\tcount\tset[string]",
])
ROW = ("1331901000.250000\tCHhAvVGS1DHFjwGM9\t192.168.202.79\t50465\t192.168.229.251\t80\ttcp"
       "\thttp\t0.010000\t166\t214\tSF\t-\t-\t0\tShADfFa\t4\t382\t3\t382\t(empty)")
UNSET = ("1331901000.5\tC1\t10.0.0.1\t50467\t10.0.0.2\t443\ttcp\t-\t-\t-\t-\tS0\tT\tF\t0\tS\t1\t48"
         "\t0\t0\t(empty)")
JSON = ('{"ts":1591367999.5,"uid":"CMd","id.orig_h":"192.168.4.76","id.orig_p":36844,'
        '"id.resp_h":"192.168.4.1","id.resp_p":53,"proto":"udp","service":"dns","duration":0.07,'
        '"orig_bytes":62,"resp_bytes":141,"conn_state":"SF","missed_bytes":0,"history":"Dd",'
        '"orig_pkts":2,"orig_ip_bytes":118,"resp_pkts":2,"resp_ip_bytes":197}')


def test_tsv_with_headers() -> None:
    res = FMT.parse(HEADER + "\n" + ROW + "\n" + UNSET + "\n#close\t2012-03-16-12-30-00\n")
    assert res.lines == 2 and res.rejects.num_rows == 0
    assert res.line_numbers.to_pylist() == [8, 9]
    a, b = res.batch.to_pylist()
    assert a["ts"] == datetime(2012, 3, 16, 12, 30, 0, 250000, tzinfo=UTC)
    assert (a["orig_h"], a["orig_p"], a["resp_h"], a["resp_p"]) == (
        "192.168.202.79", 50465, "192.168.229.251", 80)
    assert (a["service"], a["orig_bytes"], a["history"]) == ("http", 166, "ShADfFa")
    assert b["service"] is None and b["duration"] is None and b["orig_bytes"] is None
    assert b["local_orig"] == "T"


def test_chunk_without_header_uses_the_standard_order() -> None:
    res = FMT.parse(ROW + "\n", first_line=500)
    assert res.batch.num_rows == 1 and res.line_numbers.to_pylist() == [500]
    assert res.batch.column("resp_p").to_pylist() == [80]


def test_header_with_another_field_order() -> None:
    order = ["id.resp_p", "ts", "id.orig_h", "id.resp_h", "proto"]
    text = "#fields\t" + "\t".join(order) + "\n" + "22\t1700000000\t1.1.1.1\t2.2.2.2\ttcp\n"
    row = FMT.parse(text).batch.to_pylist()[0]
    assert (row["resp_p"], row["orig_h"], row["proto"]) == (22, "1.1.1.1", "tcp")
    assert row["orig_bytes"] is None


def test_json_lines_and_rejects() -> None:
    lines = [JSON, '{"ts": "soon"}', "{not json", '{"uid": "x"}', "short\tline",
             JSON.replace('"orig_bytes":62', '"orig_bytes":-5'), ""]
    res = FMT.parse("\n".join(lines) + "\n")
    assert res.batch.num_rows == 1 and res.rejects.num_rows == 6
    row = res.batch.to_pylist()[0]
    assert (row["proto"], row["service"], row["resp_p"]) == ("udp", "dns", 53)
    reasons = res.rejects.column("reason").to_pylist()
    assert "ts" in reasons[0] and "JSON" in reasons[1] and "JSON" in reasons[2]
    assert "fields" in reasons[3] and "orig_bytes" in reasons[4] and reasons[5] == "empty line"
    assert res.rejects.column("line").to_pylist() == [2, 3, 4, 5, 6, 7]


def test_featurizer_fits() -> None:
    res = FMT.parse("\n".join([ROW, UNSET, JSON] * 4))
    fz = Featurizer(FMT.feature_spec()).fit(res.batch)
    X = fz.transform(res.batch)
    assert X.shape[0] == 12 and (X == X).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from([ROW, UNSET, JSON, "#close", "#fields\tts\tid.orig_h"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=40),
    st.lists(st.sampled_from(["-", "1", "x", "1e300", "(empty)", "{", "\t"]), max_size=22)
    .map("\t".join)), max_size=10), st.integers(1, 1000))
def test_property_counts_reconcile(lines: list[str], first: int) -> None:
    text = "\n".join(lines)
    res = FMT.parse(text, first_line=first)
    assert res.batch.num_rows + res.rejects.num_rows == res.lines
    numbers = res.line_numbers.to_pylist() + res.rejects.column("line").to_pylist()
    assert len(set(numbers)) == res.lines
    assert all(first <= n < first + max(len(lines), 1) for n in numbers)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_property_no_bytes_crash_it(data: bytes) -> None:
    res = FMT.parse(data)
    assert res.batch.num_rows + res.rejects.num_rows == res.lines
