"""The access-log parser: real-world lines, rejects with reasons, and property tests."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import data_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwatch.formats import get_format
from deepwatch.formats.access import SCHEMA
from deepwatch.lake import read_lake, read_rejects

FMT = get_format("access")

COMBINED = ('203.0.113.9 - - [17/May/2015:10:05:03 +0000] "GET /shop/item?id=7&q=a%20b HTTP/1.1" '
            '200 5123 "http://example.com/shop/" "Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0"')


def parse(text: str, first_line: int = 1):  # type: ignore[no-untyped-def]
    result = FMT.parse(text, first_line=first_line)
    assert result.batch.num_rows + result.rejects.num_rows == result.lines
    return result


def test_combined_line_fields() -> None:
    row = parse(COMBINED).batch.to_pylist()[0]
    assert row["client_ip"] == "203.0.113.9"
    assert row["timestamp"] == datetime(2015, 5, 17, 10, 5, 3, tzinfo=UTC)
    assert (row["method"], row["path"], row["query"]) == ("GET", "/shop/item", "id=7&q=a%20b")
    assert row["protocol"] == "HTTP/1.1"
    assert (row["status"], row["bytes"]) == (200, 5123)
    assert row["referer"] == "http://example.com/shop/"
    assert row["user_agent"].endswith("Firefox/125.0")
    assert row["ident"] is None and row["user"] is None and row["label"] is None


def test_common_format_ipv6_and_dash_fields() -> None:
    lines = [
        '2001:db8::17 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326',
        '::1 - - [10/Oct/2000:13:55:36 +0200] "HEAD / HTTP/1.1" 304 - "-" "-"',
    ]
    rows = parse("\n".join(lines)).batch.to_pylist()
    assert rows[0]["client_ip"] == "2001:db8::17" and rows[0]["user"] == "frank"
    assert rows[0]["timestamp"] == datetime(2000, 10, 10, 20, 55, 36, tzinfo=UTC)
    assert rows[0]["referer"] is None and rows[0]["user_agent"] is None
    assert rows[1]["bytes"] == 0  # '-' means no body
    assert rows[1]["referer"] is None and rows[1]["user_agent"] is None
    assert rows[1]["timestamp"] == datetime(2000, 10, 10, 11, 55, 36, tzinfo=UTC)


def test_escapes_and_malformed_request_lines_are_kept() -> None:
    lines = [
        r'1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "\x16\x03\x01\x00\xa5\x01" 400 166 "-" "-"',
        '1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "-" 408 0 "-" "-"',
        r'1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET /a\"b HTTP/1.1" 404 9 "-" "say \"hi\""',
        '1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET /nothttp" 200 1 "-" "x"',
        '1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 1 "-" "x" "10.0.0.1" 0.004',
    ]
    res = parse("\n".join(lines))
    assert res.rejects.num_rows == 0
    rows = res.batch.to_pylist()
    assert rows[0]["method"] is None and rows[0]["request"].startswith(r"\x16\x03")
    assert rows[1]["method"] is None and rows[1]["request"] == "-"
    assert rows[2]["url"] == r'/a\"b' and rows[2]["user_agent"] == r'say \"hi\"'
    assert rows[3]["method"] == "GET" and rows[3]["protocol"] is None
    assert rows[4]["user_agent"] == "x"


def test_very_long_url() -> None:
    url = "/search?q=" + "A" * 200_000
    line = f'1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET {url} HTTP/1.1" 414 0 "-" "x"'
    row = parse(line).batch.to_pylist()[0]
    assert row["url"] == url and row["status"] == 414


def test_rejects_keep_line_number_raw_and_reason() -> None:
    lines = [
        COMBINED,
        "",
        "just some text",
        '1.2.3.4 - - [31/Foo/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 1',
        '1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 999 1',
        '1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET / HTTP/1.1" 200 -5',
        COMBINED,
    ]
    res = parse("\n".join(lines) + "\n", first_line=101)
    assert res.batch.num_rows == 2
    assert res.line_numbers.to_pylist() == [101, 107]
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == [102, 103, 104, 105, 106]
    assert rej[1]["raw"] == "just some text"
    reasons = [r["reason"] for r in rej]
    assert reasons[0] == "empty line"
    assert "not in common or combined" in reasons[1]
    assert "unreadable time" in reasons[2]
    assert "status" in reasons[3] and "999" in reasons[3]
    assert "size" in reasons[4]


def test_a_time_past_9999_or_before_year_1_in_utc_is_a_reject() -> None:
    """``31/Dec/9999:23:30:00 -0100`` is 10000-01-01 in UTC: it parsed, and a lake filed it
    under ``day=10000-01-01`` (sorted before the other days, not nameable in ``--days``, the
    lake's day column then read as text). Such a time, and one before year 1, is now a reject;
    the last minutes of 9999 and the first of year 1 in UTC still read."""
    times = ["31/Dec/9999:23:30:00 -0100", "01/Jan/0001:00:30:00 +0100",
             "31/Dec/9999:22:30:00 -0100", "01/Jan/0001:00:30:00 -0100"]
    res = parse("".join(f'1.2.3.4 - - [{t}] "GET / HTTP/1.1" 200 1\n' for t in times))
    assert [str(t) for t in res.batch.column("timestamp").to_pylist()] == [
        "9999-12-31 23:30:00+00:00", "0001-01-01 01:30:00+00:00"]
    assert [(r["line"], r["reason"]) for r in res.rejects.to_pylist()] == [
        (i + 1, f"time outside the years 1-9999 in UTC '{times[i]}'") for i in (0, 1)]


def test_invalid_utf8_and_crlf() -> None:
    data = COMBINED.encode() + b"\r\n" + COMBINED.replace("GET", "GE\xff").encode("latin-1")
    res = FMT.parse(data)
    assert res.lines == 2 and res.rejects.num_rows == 0
    assert res.batch.column("user_agent")[0].as_py().endswith("Firefox/125.0")
    # the byte is kept as NGINX writes one, not replaced by U+FFFD (tests/test_invalid_utf8.py)
    assert res.batch.column("request")[1].as_py().startswith("GE\\xFF /shop")


def test_empty_input() -> None:
    res = parse("")
    assert res.lines == 0 and res.batch.schema.equals(SCHEMA)


def test_real_logs_parse_completely() -> None:
    """Every line of the real logs is a record but one: line 8,899 of the Apache log ends inside
    its user agent (``... +http://www.google.com/bot.html`` without ``)"``), cut short."""
    for name in ("apache_access.log.gz", "scan_w3af.log.gz"):
        with gzip.open(data_file(f"weblogs/{name}")) as fh:
            data = fh.read()
        res = FMT.parse(data)
        cut = [8899] if name == "apache_access.log.gz" else []
        assert res.rejects.column("line").to_pylist() == cut
        assert all(r.startswith("unterminated quoted field")
                   for r in res.rejects.column("reason").to_pylist())
        assert res.batch.num_rows == data.count(b"\n") - len(cut)


def test_an_open_quote_after_the_size_is_a_reject() -> None:
    """A line cut short inside its user agent is not read as a common-format record with the
    rest as extra fields; whole quoted strings and plain words after the agent still are."""
    head = '5.6.7.8 - - [17/May/2015:10:05:04 +0000] "GET /admin HTTP/1.1" 200 7'
    lines = [
        head + ' "http://evil.example/" "sqlmap/1.',
        head + ' "http://evil.example/"',
        head + ' "-" "ua" "extra',
        head + ' "-" "ua" rt=0.004 uct="0.000" "10.0.0.1"',
        head + ' "-" "say \\"hi\\""',
        head,
    ]
    res = parse("\n".join(lines))
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == [1, 3]
    assert all(r["reason"].startswith("unterminated quoted field") for r in rej)
    assert rej[0]["raw"] == lines[0]
    rows = res.batch.to_pylist()
    assert [(r["referer"], r["user_agent"]) for r in rows] == [
        (None, None), (None, "ua"), (None, 'say \\"hi\\"'), (None, None)]


# -- properties ------------------------------------------------------------------------------
_FIELD = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=30)
_LOGLIKE = st.builds(
    lambda host, ip, user, day, zone, req, status, size, ref, ua: (
        f'{host}{ip} - {user} [{day}/May/2015:10:05:03 {zone}] "{req}" {status} {size} "{ref}" '
        f'"{ua}"'),
    st.sampled_from(["", "www.example.com:443 ", "www.example.com ", "[::1]:80 ", "a:b "]),
    st.sampled_from(["1.2.3.4", "::1", "-", "a b", ""]),
    st.sampled_from(["-", "bob", "x y"]),
    st.integers(0, 40), st.sampled_from(["+0000", "-0700", "+0530", "+99", "0100"]),
    _FIELD, st.integers(-5, 1000), st.one_of(st.integers(-3, 10**6), st.just("-")),
    _FIELD, _FIELD,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_LOGLIKE, _FIELD), max_size=12), st.integers(1, 10**6))
def test_property_counts_reconcile(lines: list[str], first: int) -> None:
    text = "\n".join(lines)
    res = FMT.parse(text, first_line=first)
    expected = 0 if text == "" else text.count("\n") + (not text.endswith("\n"))
    assert res.lines == expected
    assert res.batch.num_rows + res.rejects.num_rows == res.lines
    numbers = sorted(res.line_numbers.to_pylist() + res.rejects.column("line").to_pylist())
    assert numbers == list(range(first, first + res.lines))
    assert res.batch.schema.equals(SCHEMA)
    assert all(r for r in res.rejects.column("reason").to_pylist())
    for row in res.batch.to_pylist():  # a host is text of the line; every time has an offset
        assert row["vhost"] is None or row["vhost"] in text or "\\x" in row["vhost"]
        assert row["utc_offset_minutes"] is not None


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_property_no_bytes_crash_it(data: bytes) -> None:
    res = FMT.parse(data)
    assert res.batch.num_rows + res.rejects.num_rows == res.lines
    assert isinstance(res.batch, pa.RecordBatch)


def test_records_as_objects_split_their_request_line() -> None:
    res = FMT.parse_records([
        {"client_ip": "1.2.3.4", "timestamp": "2024-05-14T10:00:00Z",
         "request": "POST /login?next=%2F HTTP/1.1", "status": 302, "bytes": 0},
        {"client_ip": "1.2.3.4", "timestamp": "2024-05-14T10:00:01Z", "request": "\\x16\\x03",
         "status": 400, "bytes": 0},
        {"client_ip": "1.2.3.4", "request": "GET / HTTP/1.1", "status": 200, "bytes": 1},
        {"client_ip": "1.2.3.4", "timestamp": "2024-05-14T10:00:01Z", "request": "GET /",
         "status": 200, "bytes": -1},
    ])
    assert res.batch.num_rows == 2 and res.rejects.num_rows == 2
    first, second = res.batch.to_pylist()
    assert (first["method"], first["path"], first["query"]) == ("POST", "/login", "next=%2F")
    assert second["method"] is None and second["url"] is None
    assert "timestamp" in res.rejects.column("reason")[0].as_py()


def test_a_long_rejected_line_says_it_was_cut() -> None:
    res = FMT.parse("GET /" + "a" * 30_000 + "\n")
    assert res.rejects.num_rows == 1
    assert len(res.rejects.column("raw")[0].as_py()) == 10_000
    assert "cut to its first 10,000 of 30,005 characters" in res.rejects.column("reason")[0].as_py()


# -- the client field ------------------------------------------------------------------------
def _line(client: str) -> str:
    return COMBINED.replace("203.0.113.9", client, 1)


def test_a_client_with_a_control_or_invisible_character_is_a_reject() -> None:
    """Servers write a client as an address or a host name and escape what is not printable
    (``\\xHH``), so a raw NUL, control character or byte order mark there is damage: a reject
    that names the character, which the raw text does not show. It was parsed, and the client
    counted as one more address."""
    good = ["198.51.100.7", "2001:db8::17", "::1", "::ffff:192.0.2.1",
            "crawl-66-249-66-1.googlebot.com", "localhost", "unix:", "-"]
    bad = {
        "198.51.100.7\x00": "a control character (U+0000)",
        "\x00\x00198.51.100.7": "a control character (U+0000)",
        "198.51\x01.100.7": "a control character (U+0001)",
        "\x7f198.51.100.7": "a control character (U+007F)",
        "198.51.100.7\x9b": "a control character (U+009B)",
        "198.51.100.7\ufeff": "a byte order mark (U+FEFF)",
        "  \ufeff198.51.100.7": "a byte order mark (U+FEFF)",  # after spaces a line may open with
        "198.51.100\u200b.7": "an invisible format character (U+200B)",
    }
    lines = [_line(c) for c in good] + [_line(c) for c in bad]
    res = parse("\n".join(lines) + "\n")
    assert res.batch.column("client_ip").to_pylist() == [*good]
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == list(range(len(good) + 1, len(lines) + 1))
    for r, (client, what) in zip(rej, bad.items(), strict=True):
        assert r["raw"] == _line(client)
        assert r["reason"] == (f"client holds {what}, never part of an address or host name: "
                               f"'{client.lstrip(' ')}'")


def test_a_line_opened_by_a_byte_order_mark_is_a_reject_whatever_follows() -> None:
    """In the middle of a text (``cat`` of two logs that each open with one): the reason KDD
    lines get, whether the rest of the line reads as a record or not."""
    why = ("the line starts with a UTF-8 byte order mark (U+FEFF): a file joined to the one "
           "before it?")
    res = parse("\n".join([COMBINED, "\ufeff" + COMBINED, "\ufeffnot a log line", COMBINED]))
    assert res.line_numbers.to_pylist() == [1, 4]
    assert [(r["line"], r["reason"]) for r in res.rejects.to_pylist()] == [(2, why), (3, why)]


def test_a_record_object_with_a_control_character_in_its_client_is_a_reject() -> None:
    """A record given as a JSON object (REST) gets the verdict its log line gets."""
    def record(client: str) -> dict[str, object]:
        return {"client_ip": client, "timestamp": "2024-05-14T10:00:00Z",
                "request": "GET / HTTP/1.1", "status": 200, "bytes": 1}

    res = FMT.parse_records([record("1.2.3.4"), record("1.2.3.4\x00"), {"status": 200},
                             record("\ufeff1.2.3.4"), record("2001:db8::1")])
    assert res.batch.column("client_ip").to_pylist() == ["1.2.3.4", "2001:db8::1"]
    assert res.line_numbers.to_pylist() == [1, 5]
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == [2, 3, 4]
    assert rej[0]["reason"].startswith("client holds a control character (U+0000)")
    assert rej[2]["reason"].startswith("client holds a byte order mark (U+FEFF)")
    assert rej[0]["raw"] == json.dumps(record("1.2.3.4\x00"), ensure_ascii=False)


def _ingest(log: Path, lake: Path) -> subprocess.CompletedProcess[str]:
    """``deepwatch ingest --format access`` of ``log`` into ``lake``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "deepwatch", "ingest", "--format", "access",
                           "--lake", str(lake), str(log)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})


def test_ingest_rejects_damaged_clients_and_keeps_the_mark_that_opens_the_file(
        tmp_path: Path) -> None:
    """``deepwatch ingest`` of a log that opens with a byte order mark (dropped: its first
    record parses) and holds another at the start of a later line, and clients with a NUL, a
    control character and a zero-width space: each is a counted reject with its reason, kept
    in the lake; the good records, IPv6 and host names among them, are all stored."""
    lines = [COMBINED, "\ufeff" + COMBINED, _line("203.0.113.9\x00"), _line("203.0\x01.113.9"),
             _line("203.0.113.9\u200b"), _line("2001:db8::17"), _line("host.example.com"),
             COMBINED]
    log = tmp_path / "site.log"
    log.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    lake = tmp_path / "lake"
    done = _ingest(log, lake)
    assert done.returncode == 0, done.stderr
    assert "8 lines read: 4 parsed, 4 rejected" in done.stderr
    assert read_lake(lake).column("client_ip").to_pylist() == [
        "203.0.113.9", "2001:db8::17", "host.example.com", "203.0.113.9"]
    rejects = read_rejects(lake)
    assert rejects is not None
    kept = rejects.to_pylist()
    assert [(r["line"], r["raw"]) for r in kept] == [(n, lines[n - 1]) for n in (2, 3, 4, 5)]
    reasons = [r["reason"] for r in kept]
    assert reasons[0].startswith("the line starts with a UTF-8 byte order mark (U+FEFF)")
    assert reasons[1].startswith("client holds a control character (U+0000)")
    assert reasons[2].startswith("client holds a control character (U+0001)")
    assert reasons[3].startswith("client holds an invisible format character (U+200B)")


# -- what servers that do not escape, and other layouts, write ------------------------------
_HEAD = '198.51.100.4 - - [14/May/2024:10:00:00 +0000] "GET /shop HTTP/1.1" 200 512'


def test_a_raw_quote_in_the_user_agent_keeps_the_referer_and_agent() -> None:
    """A logger that does not escape ``"`` (``escape=none``, an old server) writes it raw in
    the user agent: the agent runs to the last quote of the line. It was read as a common
    line whose referer and agent were extra fields, and both were lost without a reject."""
    lines = [
        _HEAD + ' "http://a.example/" "Mozilla/5.0 "evil" x"',
        _HEAD + ' "-" "say "hi"" 0.004 rt=1',
        _HEAD + ' "-" "ends with a quote""',
    ]
    res = parse("\n".join(lines))
    assert res.rejects.num_rows == 0
    assert [(r["referer"], r["user_agent"]) for r in res.batch.to_pylist()] == [
        ("http://a.example/", 'Mozilla/5.0 "evil" x'), (None, 'say "hi"'),
        (None, 'ends with a quote"')]


def test_a_raw_quote_in_the_referer_splits_where_only_one_boundary_is() -> None:
    """A raw quote in the referer is read when the line has exactly one ``" "`` between the
    referer and the agent (the only place the two can part); with more, the split is
    ambiguous (a raw ``" "`` could be a boundary) and the line is a reject that says so,
    not a record with text moved between the fields."""
    lines = [
        _HEAD + ' "http://a.example/?q="x"" "Mozilla/5.0"',
        _HEAD + ' "http://a.example/"x" "Mozilla "y"" "10.0.0.1"',
        _HEAD + ' "-" "Mozilla "y" z" "10.0.0.1"',
    ]
    res = parse("\n".join(lines))
    rows = res.batch.to_pylist()
    assert [(r["referer"], r["user_agent"]) for r in rows] == [
        ('http://a.example/?q="x"', "Mozilla/5.0")]
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == [2, 3]
    assert all(r["reason"].startswith("unescaped quote after the size") for r in rej)


def test_a_raw_quote_in_the_request_line_is_read_where_only_one_end_is() -> None:
    """A logger that does not escape ``"`` writes one in the request line raw: the request ends
    at the server's closing quote, the one before the status and size. A line that holds a
    quote, a status and a size once is read so (its referer and agent as any line's); one
    where the target, referer or agent holds another (the client's to write) is a reject that
    says so: the client does not choose the status, size, referer or agent read. Such a line
    was a reject, "not in common or combined log format", and the second line below a record
    with the client's status and referer."""
    head = '198.51.100.4 - - [14/May/2024:10:00:00 +0000] "GET '
    read = [
        head + '/a"b HTTP/1.1" 200 5 "-" "ua"',
        head + '/a"b HTTP/1.1" 404 0',
        head + '/"x" HTTP/1.1" 200 5 "http://r.example/"x" "Mozilla "q" z"',
        head + '/b HTTP/1.1" 200 5 "-" "ua" "example.com" 443 512',  # "$host" $server_port ...
    ]
    forged = [
        head + '/a" 200 5 "x HTTP/1.1" 404 0 "-" "ua"',
        head + '/a"x" 200 5 "-" "forged HTTP/1.1" 404 0 "-" "ua"',
        head + '/a"b HTTP/1.1" 200 5 "r" 500 9 "x" "ua"',
        head + '/a"b HTTP/1.1" 200 5 "-" "ua" "x" 500 9',
        # a whole frame in the target, opening a quote that the server's closing quote ends
        head + '/a" 200 5 "-" "forged" "x HTTP/1.1" 404 0 "-" "ua"',
        head + '/a HTTP/1.1" 200 5 "x HTTP/1.1" 404 0',
    ]
    res = parse("\n".join(read + forged))
    rows = res.batch.to_pylist()
    assert [(r["request"], r["method"], r["url"], r["protocol"], r["status"], r["bytes"],
             r["referer"], r["user_agent"]) for r in rows] == [
        ('GET /a"b HTTP/1.1', "GET", '/a"b', "HTTP/1.1", 200, 5, None, "ua"),
        ('GET /a"b HTTP/1.1', "GET", '/a"b', "HTTP/1.1", 404, 0, None, None),
        ('GET /"x" HTTP/1.1', "GET", '/"x"', "HTTP/1.1", 200, 5, 'http://r.example/"x',
         'Mozilla "q" z'),
        ("GET /b HTTP/1.1", "GET", "/b", "HTTP/1.1", 200, 5, None, "ua"),
    ]
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == [5, 6, 7, 8, 9, 10]
    assert all(r["reason"].startswith("unescaped quote in the request line: more than one "
                                      "place where it could end") for r in rej)


def test_a_raw_quote_before_a_space_in_the_target_is_read_as_any_raw_quote() -> None:
    """A target whose quote is followed by a space (``/?id=1"``, the commonest SQL injection
    probe, then `` HTTP/1.1``) let the frame read: the request ended at that quote, the protocol
    was read as the status and the real status as the size, and the line was a reject, "status
    is not a code 100-599: 'HTTP/1.1"'", though it holds a quote, a status and a size once as
    every raw quote in a request line that is read does. It is read so now; with that pattern
    twice it is the reject such a line is."""
    head = '198.51.100.4 - - [14/May/2024:10:00:00 +0000] "GET '
    lines = [
        head + '/?id=1" HTTP/1.1" 200 5 "-" "sqlmap"',
        head + '/?id=1" HTTP/1.1" 403 -',
        head + '/a" 200 HTTP/1.1" 404 0',  # its " 200 is no end: no size after it
        head + '/a" x" 200 5 "-" "ua" 404 0',  # two ends: a reject
    ]
    res = parse("\n".join(lines))
    assert [(r["request"], r["url"], r["protocol"], r["status"], r["bytes"], r["user_agent"])
            for r in res.batch.to_pylist()] == [
        ('GET /?id=1" HTTP/1.1', '/?id=1"', "HTTP/1.1", 200, 5, "sqlmap"),
        ('GET /?id=1" HTTP/1.1', '/?id=1"', "HTTP/1.1", 403, 0, None),
        ('GET /a" 200 HTTP/1.1', '/a" 200', "HTTP/1.1", 404, 0, None)]
    (rej,) = res.rejects.to_pylist()
    assert rej["line"] == 4 and rej["reason"].startswith("unescaped quote in the request line")


def test_a_frame_forged_in_the_target_up_to_the_agent_is_a_reject() -> None:
    """The target ``/a" 200 999 "-" "forged`` (a 400 NGINX logs raw with ``escape=none``) makes
    the line end ``"GET /a" 200 999 "-" "forged HTTP/1.1" 400 0 ...``: the server's quote
    closing the request line closes the client's agent, and the line read as a record with the
    client's status, size and agent, the server's own read as extra fields. It holds the end of
    a request line with a protocol at the agent's closing quote, as a line whose extra fields
    hold one does: a reject, whether the real referer and agent follow (no quote in them, or
    one) or not. An agent that merely ends in ``HTTP/1.1`` is read."""
    head = '198.51.100.4 - - [14/May/2024:10:00:00 +0000] "GET /a" 200 999 "-" "forged'
    forged = [
        head + ' HTTP/1.1" 400 0',
        head + ' HTTP/1.1" 400 0 "-" "curl"',
        head + ' HTTP/1.1" 404 - "-" "-" rt="0.003"',
        head + '\\" HTTP/1.1" 400 0',  # its `\"`, read as an escaped quote
        head.replace('"forged', '"for"ged') + ' HTTP/1.1" 400 0',  # a raw quote in its agent
    ]
    read = [_HEAD + ' "-" "probe HTTP/1.1"', _HEAD + ' "-" "probe HTTP/1.1" 0.003']
    res = parse("\n".join(forged + read))
    rej = res.rejects.to_pylist()
    assert [r["line"] for r in rej] == [1, 2, 3, 4, 5]
    assert all(r["reason"].startswith("unescaped quote in the request line: more than one "
                                      "place where it could end") for r in rej)
    assert [r["user_agent"] for r in res.batch.to_pylist()] == ["probe HTTP/1.1"] * 2


def test_a_raw_quote_in_the_agent_stops_before_the_keyed_fields_a_server_adds() -> None:
    """NGINX timings after the agent (``rt="0.003" uct="-" urt="0.001, 0.002"``) are not part of
    an agent with a raw quote; they were taken into it. Text of the client's own that looks
    like such a field stays in its agent: a ``x="y"`` of its own is followed by the server's
    quote, and a value with more than numbers (room for a payload) is never read as a field
    the server added, so all the client can drop from its agent is text it could have left
    out (``" rt="1``)."""
    lines = [
        _HEAD + ' "-" "Mozilla "evil" x" rt="0.003"',
        _HEAD + ' "http://a.example/"q" "Mozilla "evil" x" rt="0.003" uct="-" '
        'urt="0.001, 0.002" 0.5',
        _HEAD + ' "-" "Mozilla x="y"" rt="0.003"',  # the client's x="y" in its agent
        _HEAD + ' "-" "Mozilla "a" b" rt="1 UNION SELECT" rt="0.003"',  # its b" rt="1 UNI...
        _HEAD + ' "-" "Mozilla "a" b" rt="1" rt="0.003"',  # its b" rt="1, or just b
    ]
    res = parse("\n".join(lines))
    assert res.rejects.num_rows == 0
    assert [(r["referer"], r["user_agent"]) for r in res.batch.to_pylist()] == [
        (None, 'Mozilla "evil" x'), ('http://a.example/"q', 'Mozilla "evil" x'),
        (None, 'Mozilla x="y"'), (None, 'Mozilla "a" b" rt="1 UNION SELECT'),
        (None, 'Mozilla "a" b')]


def test_an_apache_vhost_prefix_is_not_read_as_the_client() -> None:
    """Apache's ``vhost_combined`` (``%v:%p %h %l %u ...``, Debian's
    ``other_vhosts_access.log``) opens with the virtual host and port, ``vcommon`` with the
    host alone: the client is the field after it. It was read as the client, the address as
    the ident and ``- -`` as the user."""
    lines = [
        "www.example.com:443 " + COMBINED,
        "shop.example.org:80 2001:db8::7 - frank " + COMBINED.split(" - - ", 1)[1],
        "[2001:db8::1]:8443 " + COMBINED,
        "www.example.com " + COMBINED,  # vcommon: %v %h %l %u, no port
        "www.example.com 2001:db8::7 - frank " + COMBINED.split(" - - ", 1)[1],
        "203.0.113.9 - john doe " + COMBINED.split(" - - ", 1)[1],  # a user with a space
    ]
    rows = parse("\n".join(lines)).batch.to_pylist()
    assert [(r["client_ip"], r["ident"], r["user"]) for r in rows] == [
        ("203.0.113.9", None, None), ("2001:db8::7", None, "frank"), ("203.0.113.9", None, None),
        ("203.0.113.9", None, None), ("2001:db8::7", None, "frank"),
        ("203.0.113.9", None, "john doe")]
    assert all(r["user_agent"].endswith("Firefox/125.0") for r in rows)
    # the host is kept (it was dropped): which site of a multi-site server a request hit
    assert [r["vhost"] for r in rows] == [
        "www.example.com", "shop.example.org", "2001:db8::1", "www.example.com",
        "www.example.com", None]


def test_the_vhost_is_kept_as_the_line_wrote_it_and_null_without_one() -> None:
    """``vhost``: the host of a ``vhost_combined`` or ``vcommon`` line, null for a plain line;
    read so in a line with raw quotes too, and a raw control character in it escaped as in a
    quoted field (it is the client's Host header with ``UseCanonicalName Off``)."""
    lines = [
        COMBINED,
        "www.example.com:443 " + COMBINED,
        "www.example.com:80 " + _HEAD + ' "-" "Mozilla "evil" x"',  # a raw quote in the agent
        "www.example.com:80 " + _HEAD.replace("/shop", '/a"b') + ' "-" "x"',  # ... the request
        "ev\x1bil.example:80 " + COMBINED,
        "a.example " + COMBINED.split(" - - ", 1)[0] + " - - " + COMBINED.split(" - - ", 1)[1],
        "www.example.com:443 1.2.3.4 - [17/May/2015:10:05:03 +0000] \"GET / HTTP/1.1\" 200 5",
    ]
    res = parse("\n".join(lines))
    assert res.rejects.num_rows == 0
    rows = res.batch.to_pylist()
    assert [r["vhost"] for r in rows] == [
        None, "www.example.com", "www.example.com", "www.example.com", "ev\\x1Bil.example",
        "a.example",
        # three fields after the host:port: it is the client, as before (no host then)
        None]
    assert rows[2]["user_agent"] == 'Mozilla "evil" x' and rows[3]["url"] == '/a"b'
    assert rows[-1]["client_ip"] == "www.example.com:443"
    assert res.batch.schema.field("vhost").nullable


def test_the_utc_offset_of_the_time_is_kept() -> None:
    """The time zone of ``[10/Oct/2000:13:55:36 -0700]`` is kept, in minutes east of UTC, beside
    the UTC ``timestamp`` (the server's local clock: what the hour-of-day features read)."""
    zones = ["-0700", "+0000", "+0530", "-0930", "+1400"]
    rows = parse("\n".join(COMBINED.replace("+0000", z) for z in zones)).batch.to_pylist()
    assert [r["utc_offset_minutes"] for r in rows] == [-420, 0, 330, -570, 840]
    assert rows[0]["timestamp"] == datetime(2015, 5, 17, 17, 5, 3, tzinfo=UTC)
    objects = FMT.parse_records([
        {"client_ip": "1.2.3.4", "timestamp": "2024-05-14T10:00:00Z", "request": "GET / HTTP/1.1",
         "status": 200, "bytes": 1, "vhost": "www.example.com", "utc_offset_minutes": -420},
        {"client_ip": "1.2.3.4", "timestamp": "2024-05-14T10:00:00Z", "request": "GET / HTTP/1.1",
         "status": 200, "bytes": 1}])  # both optional in records given as JSON objects
    assert objects.rejects.num_rows == 0
    assert [(r["vhost"], r["utc_offset_minutes"]) for r in objects.batch.to_pylist()] == [
        ("www.example.com", -420), (None, None)]


def test_a_target_with_raw_spaces_keeps_its_method_and_protocol() -> None:
    """A request line with spaces in its target (servers before NGINX 1.21.1 took them) is
    still ``METHOD TARGET PROTOCOL``: the target is all between the two."""
    line = _HEAD.replace("/shop", "/a b/c d?x=1 2") + ' "-" "ua"'
    row = parse(line).batch.to_pylist()[0]
    assert (row["method"], row["url"], row["path"], row["query"], row["protocol"]) == (
        "GET", "/a b/c d?x=1 2", "/a b/c d", "x=1 2", "HTTP/1.1")


def test_ingest_keeps_agents_with_raw_quotes_and_counts_ambiguous_lines(tmp_path: Path) -> None:
    """Through ``deepwatch ingest``: a raw quote in the agent is kept in the lake with the
    referer; an ambiguous line is a counted reject with its reason; a vhost-prefixed line
    stores the client, not the virtual host."""
    lines = [
        _HEAD + ' "http://a.example/" "Mozilla/5.0 "evil" x"',
        _HEAD + ' "-" "Mozilla "y" z" "10.0.0.1"',
        "www.example.com:443 " + COMBINED,
    ]
    log = tmp_path / "site.log"
    log.write_text("\n".join(lines) + "\n")
    lake = tmp_path / "lake"
    done = _ingest(log, lake)
    assert done.returncode == 0, done.stderr
    assert "3 lines read: 2 parsed, 1 rejected" in done.stderr
    rows = {r["client_ip"]: r for r in read_lake(lake).to_pylist()}  # by day: 2015 first
    assert sorted(rows) == ["198.51.100.4", "203.0.113.9"]
    assert rows["198.51.100.4"]["referer"] == "http://a.example/"
    assert rows["198.51.100.4"]["user_agent"] == 'Mozilla/5.0 "evil" x'
    assert rows["203.0.113.9"]["user_agent"].endswith("Firefox/125.0")
    rejects = read_rejects(lake)
    assert rejects is not None
    assert [(r["line"], r["raw"]) for r in rejects.to_pylist()] == [(2, lines[1])]
    assert rejects.column("reason")[0].as_py().startswith("unescaped quote after the size")


def test_score_output_and_alerts_carry_the_vhost_and_offset(
        bundle_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ``deepwatch score`` of a multi-site server's log: each scored record names the
    site it hit (``vhost``, dropped before) and its time's UTC offset, and an alert made from it
    carries the site as ECS's ``url.domain``."""
    from conftest import head_lines, trained_bundle

    from deepwatch.alerts import AlertContext, alert_lines

    monkeypatch.setenv("DEEPWATCH_TORCH_THREADS", "1")
    site = tmp_path / "site.log"
    site.write_text("".join(head_lines(data_file("weblogs/apache_access.log.gz"), 400)))
    bundle = trained_bundle("autoencoder", site, bundle_root, epochs=1, fmt="access")
    log = tmp_path / "sites.log"
    log.write_text("\n".join([
        "shop.example.org:443 " + COMBINED.replace("+0000", "-0700"),
        "www.example.com " + COMBINED.replace("GET /shop", "GET /../../etc/passwd"),
        COMBINED.replace("+0000", "+0530"),
    ]) + "\n")
    out = tmp_path / "scored.jsonl"
    done = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(bundle), "--format",
                           "access", "--out", str(out), str(log)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["client_ip"], r["vhost"], r["utc_offset_minutes"]) for r in rows] == [
        ("203.0.113.9", "shop.example.org", -420), ("203.0.113.9", "www.example.com", 0),
        ("203.0.113.9", None, 330)]
    names = list(rows[0])  # the parsed fields, then the score's
    assert names[:len(SCHEMA)] == SCHEMA.names and names[len(SCHEMA)] == "score"
    scored = pa.Table.from_pylist(rows).drop_columns(["timestamp"])
    ctx = AlertContext("deepwatch-autoencoder", "1", "access", FMT.ecs_fields)
    alerts = [json.loads(a) for a in alert_lines(scored, ctx)]
    assert [a["url"]["domain"] for a in alerts] == ["shop.example.org", "www.example.com", None]
