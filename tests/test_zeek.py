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


def _tsv(order: list[str], row: dict[str, str]) -> str:
    return "\t".join(row[f] for f in order)


def _conn(i: int) -> dict[str, str]:
    """One conn.log record by Zeek field name: orig_bytes 1 and resp_bytes 999999 always."""
    return {"ts": f"{1700000000 + i}.5", "uid": f"C{i}", "id.orig_h": "10.0.0.1",
            "id.orig_p": str(40000 + i % 1000), "id.resp_h": "10.0.0.2", "id.resp_p": "80",
            "proto": "tcp", "service": "http", "duration": "0.5", "orig_bytes": "1",
            "resp_bytes": "999999", "conn_state": "SF", "local_orig": "-", "local_resp": "-",
            "missed_bytes": "0", "history": "ShADfF", "orig_pkts": "3", "orig_ip_bytes": "200",
            "resp_pkts": "5", "resp_ip_bytes": "1000200", "tunnel_parents": "(empty)"}


#: Two field orders: the standard one, and one with the bytes and hosts swapped round.
SWAPPED = ["ts", "uid", "id.resp_h", "id.resp_p", "id.orig_h", "id.orig_p", "proto", "service",
           "duration", "resp_bytes", "orig_bytes", "conn_state"]


def test_each_fields_header_applies_to_the_lines_after_it() -> None:
    first, second = list(FIELDS), SWAPPED  # two logs concatenated, each with its header
    text = "\n".join(["#fields\t" + "\t".join(first), _tsv(first, _conn(0)), "#close\tx",
                      "#fields\t" + "\t".join(second), _tsv(second, _conn(1)),
                      _tsv(second, _conn(2))]) + "\n"
    res = FMT.parse(text, first_line=10)
    assert res.rejects.num_rows == 0 and res.lines == 3 and res.skipped == 3
    assert res.line_numbers.to_pylist() == [11, 14, 15]
    rows = res.batch.to_pylist()
    assert [(r["orig_bytes"], r["resp_bytes"], r["orig_h"]) for r in rows] == \
        [(1, 999999, "10.0.0.1")] * 3
    assert rows[1]["orig_ip_bytes"] is None  # not among the second header's fields


def test_the_header_reaches_later_chunks_of_the_input() -> None:
    head = "#fields\t" + "\t".join(SWAPPED)
    chunk1 = (head + "\n" + _tsv(SWAPPED, _conn(0)) + "\n").encode()
    chunk2 = (_tsv(SWAPPED, _conn(1)) + "\n").encode()
    context = FMT.context_after(chunk1, None)
    assert context == head
    assert FMT.context_after(chunk2, context) == head  # no header in it: the same one
    res = FMT.parse_bulk(chunk2, first_line=3, context=context)
    assert res.batch.column("resp_bytes").to_pylist() == [999999]
    # without the context, the standard order: the swapped fields land elsewhere
    plain = FMT.parse_bulk(chunk2, first_line=3).batch
    assert plain.column("resp_bytes").to_pylist() != [999999]
    # a header in a later chunk replaces the carried one, CRLF or not
    crlf = ("#fields\t" + "\t".join(FIELDS) + "\r\n").encode()
    assert FMT.context_after(crlf, context) == "#fields\t" + "\t".join(FIELDS)


def test_reader_keeps_the_header_order_over_many_chunks(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import functools

    import deepwatch.io as io_module
    from deepwatch.io import InputReader
    from deepwatch.sources.files import iter_chunks

    path = tmp_path / "conn.log"
    body = [_tsv(SWAPPED, _conn(i)) for i in range(3000)]
    path.write_text("\n".join([HEADER.replace("\t".join(FIELDS), "\t".join(SWAPPED)),
                               *body, "#not a header"]) + "\n")
    # small chunks: the header is in the first of many
    monkeypatch.setattr(io_module, "iter_chunks", functools.partial(iter_chunks,
                                                                     chunk_bytes=4096))
    table, rejects, stats = InputReader(FMT, [str(path)]).read_all()
    assert table.num_rows == 3000 and stats.parsed == 3000
    assert set(table.column("resp_bytes").to_pylist()) == {999999}
    assert set(table.column("orig_h").to_pylist()) == {"10.0.0.1"}
    assert rejects.num_rows == 1 and stats.rejected == 1
    assert "not a Zeek header" in rejects.column("reason")[0].as_py()


def test_stream_reads_headers_and_carries_them_across_batches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import threading

    from deepwatch.models.detector import Detector
    from deepwatch.serve._stream_core import StreamProcessor
    from deepwatch.serve._stream_io import FileSource
    from deepwatch.train.api import train

    rows = [_conn(i) for i in range(400)]
    for i, r in enumerate(rows):  # some variety for the featurizer
        r["duration"] = str(0.1 * (i % 7))
        r["orig_pkts"] = str(1 + i % 5)
    path = tmp_path / "conn.log"
    path.write_text("\n".join([HEADER.replace("\t".join(FIELDS), "\t".join(SWAPPED)),
                               *(_tsv(SWAPPED, r) for r in rows)]) + "\n")
    bundle = tmp_path / "ae"
    train("zeek", "autoencoder", [f"{path}=normal"], bundle, epochs=1, seed=0)
    processor = StreamProcessor(Detector(bundle), FMT)
    source = FileSource([str(path)], chunk_bytes=2048)
    outs = [processor.process(b) for b in source.batches(threading.Event())]
    assert len(outs) > 5  # many batches, the header in the first only
    assert sum(o.records for o in outs) == 400 and sum(o.scored for o in outs) == 400
    assert sum(o.rejected for o in outs) == 0


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


def test_a_json_number_out_of_range_is_named_in_the_reason() -> None:
    big = JSON.replace('"ts":1591367999.5', '"ts":1e400')
    res = FMT.parse("\n".join([big, '{"uid": "x"}', JSON]) + "\n")
    assert res.batch.num_rows == 1
    assert res.rejects.column("reason").to_pylist() == [
        "not valid JSON, or a number in it is out of range (such as a ts of 1e400)",
        "not a JSON object with a ts field"]


def test_booleans_read_the_same_from_tsv_json_lines_and_objects() -> None:
    """Zeek writes T/F in TSV logs and true/false in JSON logs; both are kept as T/F, so one
    connection gives the same fields whichever log it came from."""
    flagged = JSON.replace('"missed_bytes"', '"local_orig":true,"local_resp":false,'
                                             '"missed_bytes"')
    res = FMT.parse(HEADER + "\n" + UNSET + "\n" + flagged + "\n")
    assert res.rejects.num_rows == 0
    assert res.batch.column("local_orig").to_pylist() == ["T", "T"]
    assert res.batch.column("local_resp").to_pylist() == ["F", "F"]
    objects = FMT.parse_records([
        {"ts": 1.5, "orig_h": "10.0.0.1", "resp_h": "10.0.0.2", "proto": "tcp",
         "local_orig": True, "local_resp": "false"},
        {"ts": 1.5, "orig_h": "10.0.0.1", "resp_h": "10.0.0.2", "proto": "tcp",
         "local_orig": "T", "local_resp": None}])
    assert objects.rejects.num_rows == 0
    assert objects.batch.column("local_orig").to_pylist() == ["T", "T"]
    assert objects.batch.column("local_resp").to_pylist() == ["F", None]


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
    from deepwatch.formats._base import split_lines

    text = "\n".join(lines)
    res = FMT.parse(text, first_line=first)
    assert res.batch.num_rows + res.rejects.num_rows == res.lines
    assert res.lines + res.skipped == len(split_lines(text))
    numbers = res.line_numbers.to_pylist() + res.rejects.column("line").to_pylist()
    assert len(set(numbers)) == res.lines
    assert all(first <= n < first + max(len(lines), 1) for n in numbers)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_property_no_bytes_crash_it(data: bytes) -> None:
    res = FMT.parse(data)
    assert res.batch.num_rows + res.rejects.num_rows == res.lines


def test_a_long_rejected_line_keeps_its_start_and_says_it_was_cut() -> None:
    long = "x" * 20_000
    res = FMT.parse(long + "\n" + ROW + "\n")
    assert res.batch.num_rows == 1 and res.rejects.num_rows == 1
    assert res.rejects.column("raw")[0].as_py() == "x" * 10_000
    assert res.rejects.column("reason")[0].as_py().endswith(
        "(raw text cut to its first 10,000 of 20,000 characters)")
