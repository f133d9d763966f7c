"""Records sent as JSON objects of fields (``POST /v1/score`` with objects): type coercion, the
timestamp forms a client sends, and values no column can hold, each a reject with its reason,
never a failed request. Against a real uvicorn server serving a small Zeek bundle (Zeek has the
kinds of column the other formats have, and a timestamp). KDD objects read their text fields as
KDD lines do: spaces around a value dropped, a value of spaces only a reject with the line's
reason."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from conftest import ThreadServer

from deepwatch.formats import get_format
from deepwatch.sinks import write_jsonl

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app  # noqa: E402

ZEEK = get_format("zeek")
FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service",
          "duration", "orig_bytes", "resp_bytes", "conn_state", "local_orig", "local_resp",
          "missed_bytes", "history", "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes")
#: 2024-01-02T03:04:05.123Z in seconds since the epoch
TS = 1704164645.123


def _record(**fields: Any) -> dict[str, Any]:
    """A good conn record as an object of the format's fields, ``fields`` replacing some."""
    base: dict[str, Any] = {
        "ts": TS, "uid": "C1", "orig_h": "10.0.0.1", "orig_p": 40000, "resp_h": "10.0.0.2",
        "resp_p": 80, "proto": "tcp", "service": "http", "duration": 0.5, "orig_bytes": 100,
        "resp_bytes": 2000, "conn_state": "SF", "missed_bytes": 0, "history": "ShADfF",
        "orig_pkts": 3, "orig_ip_bytes": 200, "resp_pkts": 5, "resp_ip_bytes": 2200}
    return {**base, **fields}


@pytest.fixture(scope="module")
def zeek_bundle(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepwatch.train.api import train

    rows = []
    for i in range(400):
        rows.append("\t".join([
            f"{1700000000 + i}.5", f"C{i}", "10.0.0.1", str(40000 + i), "10.0.0.2",
            str((80, 443, 53)[i % 3]), ("tcp", "udp")[i % 2], "http", str(0.1 * (i % 7)),
            str(100 + i), str(2000 + 3 * i), "SF", "-", "-", "0", "ShADfF", str(1 + i % 5),
            "200", "5", "2200"]))
    path = tmp_path_factory.mktemp("zeek") / "conn.log"
    path.write_text("#fields\t" + "\t".join(FIELDS) + "\n" + "\n".join(rows) + "\n")
    out = bundle_root / "bundle_zeek_objects"
    train("zeek", "autoencoder", [f"{path}=normal"], out, epochs=1, seed=0)
    return out


@pytest.fixture(scope="module")
def client(zeek_bundle: Path) -> Iterator[httpx.Client]:
    with ThreadServer(create_app(zeek_bundle)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def _score(client: httpx.Client, records: list[Any]) -> dict[str, Any]:
    r = client.post("/v1/score", json={"records": records})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert len(body["results"]) + len(body["rejects"]) == len(records)
    return body


def test_every_timestamp_form_a_client_sends_is_the_same_instant(client: httpx.Client) -> None:
    """Seconds since the epoch, ISO-8601 with an offset, with ``Z``, without one (UTC), and with
    more fractional digits than the column keeps (Python's ``isoformat`` writes microseconds):
    all accepted by the server, all read as one instant."""
    forms: list[Any] = [TS, "2024-01-02T03:04:05.123Z", "2024-01-02T03:04:05.123456+00:00",
                        "2024-01-02T04:04:05.123999+01:00", "2024-01-02T03:04:05.123",
                        "2024-01-02 03:04:05.123", "2024-01-02", 1704153600]
    body = _score(client, [_record(ts=t) for t in forms])
    assert body["rejects"] == []
    assert [r["index"] for r in body["results"]] == list(range(len(forms)))
    parsed = ZEEK.parse_records([_record(ts=t) for t in forms])
    assert parsed.rejects.num_rows == 0
    instants = parsed.batch.column("ts").cast(pa.int64()).to_pylist()
    assert instants == [1704164645123] * 6 + [1704153600000] * 2


def test_values_no_column_can_hold_are_rejects_with_their_reason(client: httpx.Client) -> None:
    records: list[Any] = [
        _record(),                              # 0 good
        _record(ts=1e30),                       # 1 a timestamp beyond any date
        _record(ts=10**19),                     # 2 as an integer
        _record(ts=-1e17),                      # 3 before the year 1
        _record(ts="10/Oct/2000:13:55:36 -0700"),  # 4 not ISO-8601
        _record(ts=True),                       # 5 not a timestamp at all
        _record(orig_bytes=2**64 - 1),          # 6 over int64 (a JSON integer the parser keeps)
        _record(orig_bytes=3.5),                # 7 not an integer
        _record(orig_bytes=-1),                 # 8 negative where the format forbids it
        _record(duration="0.5"),                # 9 text for a number
        _record(proto=""),                      # 10 an empty required field
        _record(service=["http"]),              # 11 a list for a string
        _record(orig_h=None),                   # 12 a required field null
        _record(orig_bytes=3.0, proto=6),       # 13 good: 3.0 is 3, 6 is "6"
        {k: v for k, v in _record().items() if k != "ts"},  # 14 the timestamp missing
    ]
    body = _score(client, records)
    assert [r["index"] for r in body["results"]] == [0, 13]
    reasons = {r["index"]: r["reason"] for r in body["rejects"]}
    assert reasons == {
        1: "field 'ts' is out of range: 1e+30",
        2: "field 'ts' is out of range: 10000000000000000000",
        3: "field 'ts' is out of range: -1e+17",
        4: "field 'ts' is not an ISO-8601 timestamp: '10/Oct/2000:13:55:36 -0700'",
        5: "field 'ts' is not a timestamp (ISO-8601 text, a datetime or seconds since the "
           "epoch): True",
        6: "field 'orig_bytes' is out of range: 18446744073709551615",
        7: "field 'orig_bytes' is not an integer: 3.5",
        8: "field 'orig_bytes' is negative: -1",
        9: "field 'duration' is not a number: '0.5'",
        10: "field 'proto' is an empty string",
        11: "field 'service' is not a string: ['http']",
        12: "missing field 'orig_h'",
        14: "missing field 'ts'",
    }
    alone = _score(client, [_record(), _record(orig_bytes=3, proto="6")])["results"]
    assert [r["score"] for r in body["results"]] == [r["score"] for r in alone]


def test_numbers_beyond_a_double_and_non_finite_numbers_are_rejects() -> None:
    """What Python's own JSON parser gives (integers of any size, NaN, Infinity) and the
    server's does not: the parse function stands on its own."""
    records = [_record(duration=10**400), _record(duration=float("nan")),
               _record(ts=float("inf")), _record(ts=10**400), _record(orig_p=float("-inf")),
               _record(), "not an object"]
    result = ZEEK.parse_records(records)  # type: ignore[arg-type]
    assert result.lines == 7 and result.batch.num_rows == 1
    assert result.line_numbers.to_pylist() == [6]
    reasons = result.rejects.column("reason").to_pylist()
    assert result.rejects.column("line").to_pylist() == [1, 2, 3, 4, 5, 7]
    assert reasons[0].startswith("field 'duration' is out of range: 1000")
    assert reasons[1] == "field 'duration' is not a finite number: nan"
    assert reasons[2] == "field 'ts' is not a finite timestamp: inf"
    assert reasons[3].startswith("field 'ts' is out of range: 1000")
    assert reasons[4] == "field 'orig_p' is not an integer: -inf"
    assert reasons[5] == "record is not a JSON object"
    assert result.rejects.column("raw").to_pylist()[5] == '"not an object"'


def test_a_finite_time_past_every_column_unit_is_out_of_range() -> None:
    """1e308 seconds is a finite double, but not in microseconds: the reader raised
    OverflowError (a request's other records were lost with it); it is the record's reject."""
    result = ZEEK.parse_records([_record(ts=1e308), _record()])
    assert result.line_numbers.to_pylist() == [2]
    assert result.rejects.column("reason").to_pylist() == ["field 'ts' is out of range: 1e+308"]


# -- KDD objects read their text fields as lines do ----------------------------------------------

KDD_LINES = [
    "0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,0.00,"
    "0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.",
    "0,icmp,ecr_i,SF,1032,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,511,511,0.00,0.00,0.00,0.00,1.00,"
    "0.00,0.00,255,255,1.00,0.00,1.00,0.00,0.00,0.00,0.00,0.00,smurf.",
]
#: each text field padded differently: spaces, a tab, a trailing line feed
PADDED = {"protocol_type": " {} ", "service": "\t{}", "flag": "{}  ", "label": " {}. \n"}


def _kdd_objects(fmt: str) -> list[dict[str, Any]]:
    """The parsed fields of ``KDD_LINES`` (with a difficulty for NSL-KDD), as objects."""
    tail = ",21" if fmt == "nslkdd" else ""
    return get_format(fmt).parse("".join(ln + tail + "\n" for ln in KDD_LINES)).batch.to_pylist()


def _padded(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, **{k: form.format(record[k]) for k, form in PADDED.items()}}


def _blank_line(fmt: str, field: int, value: str) -> str:
    """``KDD_LINES[0]`` with field number ``field`` (0-based) written ``value``."""
    fields = (KDD_LINES[0] + (",21" if fmt == "nslkdd" else "")).split(",")
    fields[field] = value
    return ",".join(fields)


@pytest.mark.parametrize("fmt", ["kdd", "nslkdd"])
def test_kdd_objects_with_padded_text_fields_parse_as_the_clean_ones(fmt: str) -> None:
    """``{"protocol_type": " tcp"}`` kept its space, which the featurizer knows as no protocol
    (its ``other`` slot), where the line ``0, tcp, ...`` has been read as ``tcp``; the label
    loses its spaces and dot as in a line."""
    f = get_format(fmt)
    clean = _kdd_objects(fmt)
    assert [r["protocol_type"] for r in clean] == ["tcp", "icmp"]
    assert [r["label"] for r in clean] == ["normal", "smurf"]
    want = f.parse_records(clean)
    got = f.parse_records([_padded(r) for r in clean])
    assert got.rejects.num_rows == 0
    assert got.batch.equals(want.batch)
    lines = f.parse("".join(ln + (",21" if fmt == "nslkdd" else "") + "\n" for ln in KDD_LINES))
    assert got.batch.equals(lines.batch)


@pytest.mark.parametrize("fmt", ["kdd", "nslkdd"])
@pytest.mark.parametrize(("name", "field", "value"), [
    ("protocol_type", 1, "   "), ("service", 2, "\t"), ("flag", 3, " "), ("label", 41, " . "),
    ("label", 41, "..")])
def test_a_kdd_object_text_field_of_spaces_only_is_the_reject_a_line_gets(
        fmt: str, name: str, field: int, value: str) -> None:
    f = get_format(fmt)
    good = _kdd_objects(fmt)[0]
    from_line = f.parse(_blank_line(fmt, field, value) + "\n").rejects.to_pylist()
    from_object = f.parse_records([good, {**good, name: value}, good])
    assert from_object.line_numbers.to_pylist() == [1, 3]
    [reject] = from_object.rejects.to_pylist()
    assert reject["line"] == 2 and reject["raw"].startswith('{"duration": 0')
    assert [x["reason"] for x in from_line] == [reject["reason"]]
    said = "the spaces around it are" if name != "label" else "its trailing dot is"
    assert reject["reason"] == f"field {field + 1} ({name}) is empty once {said} removed: '{value}'"


def test_padded_kdd_objects_score_exactly_as_the_clean_ones(kdd_bundle: Path) -> None:
    """Over the REST API: clean objects, padded objects, clean lines and lines written with
    ``, `` between fields all get the same results, to the last digit; a text field of spaces
    only is the same reject in an object as in a line."""
    clean = _kdd_objects("kdd")
    spaced = [", ".join(ln.split(",")) for ln in KDD_LINES]
    blank_object = {**clean[0], "protocol_type": "   "}
    blank_line = _blank_line("kdd", 1, "   ")
    records: list[Any] = [*clean, *map(_padded, clean), *KDD_LINES, *spaced, blank_object,
                          blank_line]
    with ThreadServer(create_app(kdd_bundle)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        body = _score(c, records)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(8))
    verdicts = [{k: v for k, v in r.items() if k != "index"} for r in results]
    assert verdicts == verdicts[:2] * 4
    reason = "field 2 (protocol_type) is empty once the spaces around it are removed: '   '"
    assert body["rejects"] == [{"index": 8, "reason": reason}, {"index": 9, "reason": reason}]


def test_an_integer_past_a_narrower_column_is_a_reject_not_a_failed_request() -> None:
    """``utc_offset_minutes`` (access) is an int32 column: a value past it, alone or among good
    ones, was checked against int64's range only, so Arrow raised on building the column and
    ``POST /v1/score`` answered 500 for the whole request. It is a reject naming the field; a
    value inside int32 but past any time zone's offset is a reject too (see below)."""
    access = get_format("access")
    base = {"client_ip": "10.0.0.1", "timestamp": "2024-05-14T00:12:43Z",
            "request": "GET / HTTP/1.1", "status": 200, "bytes": 10}
    offsets: list[Any] = [2**31, -60, 2**40, -(2**31) - 1, 2**31 - 1, -(2**31), None, 2.0**31]
    result = access.parse_records([{**base, "utc_offset_minutes": v} for v in offsets])
    assert result.line_numbers.to_pylist() == [2, 7]
    assert result.batch.column("utc_offset_minutes").to_pylist() == [-60, None]
    assert result.rejects.column("line").to_pylist() == [1, 3, 4, 5, 6, 8]
    assert result.rejects.column("reason").to_pylist() == [
        *(f"field 'utc_offset_minutes' is out of range: {v}"
          for v in ("2147483648", "1099511627776", "-2147483649")),
        *(OFFSET_REASON + str(v) for v in (2**31 - 1, -(2**31))),
        "field 'utc_offset_minutes' is out of range: 2147483648.0"]
    alone = access.parse_records([{**base, "utc_offset_minutes": 2**31}])
    assert alone.batch.num_rows == 0 and alone.rejects.num_rows == 1


# -- access objects are checked as access lines are ----------------------------------------------

ACCESS = get_format("access")
#: an access line with its status, its time's offset and a virtual host to fill in
ACCESS_LINE = ('{vhost}203.0.113.9 - - [17/May/2015:10:05:03 {zone}] "GET /shop?id=7 HTTP/1.1" '
               '{status} 5123 "-" "Mozilla/5.0"')
OFFSET_REASON = ("field 'utc_offset_minutes' is not the offset of a time zone (-1439 to 1439 "
                 "minutes, as -23:59 to +23:59): ")


def _access_line(status: Any = 200, zone: str = "+0000", vhost: str = "") -> str:
    return ACCESS_LINE.format(status=status, zone=zone, vhost=vhost + " " if vhost else "")


def _access_object(**fields: Any) -> dict[str, Any]:
    base = {"client_ip": "203.0.113.9", "timestamp": "2015-05-17T10:05:03Z",
            "request": "GET /shop?id=7 HTTP/1.1", "status": 200, "bytes": 5123}
    return {**base, **fields}


def _counted(result: Any, sent: int) -> None:
    assert result.batch.num_rows + result.rejects.num_rows == result.lines == sent
    numbers = result.line_numbers.to_pylist() + result.rejects.column("line").to_pylist()
    assert sorted(numbers) == list(range(1, sent + 1))


def test_an_access_object_status_outside_100_599_is_the_reject_a_line_gets() -> None:
    """A status of 0, 5, 600 or a million was scored from an object, where a line with it is a
    reject: the same reason now, from the one rule (-1 too, which was "is negative"); 100 and
    599 are codes in both."""
    statuses: list[Any] = [0, 5, 600, 10**6, -1, 100, 599, 200]
    lines = ACCESS.parse("\n".join(_access_line(s) for s in statuses) + "\n")
    objects = ACCESS.parse_records([_access_object(status=s) for s in statuses])
    _counted(objects, len(statuses))
    assert objects.line_numbers.to_pylist() == lines.line_numbers.to_pylist() == [6, 7, 8]
    assert objects.batch.column("status").to_pylist() == [100, 599, 200]
    reasons = objects.rejects.column("reason").to_pylist()
    assert reasons == lines.rejects.column("reason").to_pylist()
    assert reasons[2] == "status is not a code 100-599: '600'"
    # a float that is an integer is one (3.0 is 3), shown as the object wrote it
    [reject] = ACCESS.parse_records([_access_object(status=1e6)]).rejects.to_pylist()
    assert reject["reason"] == "status is not a code 100-599: '1000000.0'"
    assert reject["raw"].startswith('{"client_ip": "203.0.113.9"')


def test_an_access_object_utc_offset_is_bounded_as_a_line_time_offset_is() -> None:
    """``utc_offset_minutes`` of 1441 or 100000 was taken from an object (and shifted the local
    hour the features read by days), where a line's time past +-23:59 is unreadable: both
    now stop at +-23:59 (1439 minutes), beyond it a reject naming the field."""
    zones = ["+2359", "-2359", "+2400", "-2400", "+9999"]
    lines = ACCESS.parse("\n".join(_access_line(zone=z) for z in zones) + "\n")
    assert lines.batch.column("utc_offset_minutes").to_pylist() == [1439, -1439]
    assert [r.startswith("unreadable time") for r in lines.rejects.column("reason").to_pylist()
            ] == [True] * 3
    offsets = [1439, -1439, 1440, -1440, 1441, 100_000, -100_000, 0, None]
    objects = ACCESS.parse_records([_access_object(utc_offset_minutes=o) for o in offsets])
    _counted(objects, len(offsets))
    assert objects.line_numbers.to_pylist() == [1, 2, 8, 9]
    assert objects.batch.column("utc_offset_minutes").to_pylist() == [1439, -1439, 0, None]
    assert objects.rejects.column("reason").to_pylist() == [
        OFFSET_REASON + str(o) for o in offsets[2:7]]


def test_an_access_object_vhost_is_stored_as_a_line_stores_it() -> None:
    """A line's ``%v:%p`` keeps the host alone (``url.domain`` in alerts); an object's
    ``h:8080`` kept its port. It is stored so now: the port dropped, an IPv6 host's brackets
    too, and a host given bare (an IPv6 one among them, as ``score`` writes it) as it is."""
    hosts = ["h:8080", "www.example.com:443", "[2001:db8::1]:8443"]
    lines = ACCESS.parse("\n".join(_access_line(vhost=h) for h in hosts) + "\n")
    want = ["h", "www.example.com", "2001:db8::1"]
    assert lines.batch.column("vhost").to_pylist() == want
    given = [*hosts, "[2001:db8::1]", "2001:db8::1", "www.example.com", "h:", None]
    objects = ACCESS.parse_records([_access_object(vhost=h) for h in given])
    _counted(objects, len(given))
    assert objects.batch.column("vhost").to_pylist() == [
        *want, "2001:db8::1", "2001:db8::1", "www.example.com", "h:", None]


def test_an_access_object_timestamp_offset_is_its_utc_offset() -> None:
    """An object whose ISO ``timestamp`` says ``-07:00`` and gives no ``utc_offset_minutes``
    had its local hour read as UTC by the features: the offset is taken from the text, so the
    object is the record its line is. An offset given beside it wins where they agree and is a
    reject where they do not; a zero offset (``Z``, ``+00:00``: an instant in UTC) leaves the
    given one, or none, as it is."""
    line = _access_line(zone="-0700", vhost="h:8080")
    want = ACCESS.parse(line + "\n").batch
    [row] = want.to_pylist()
    assert row["utc_offset_minutes"] == -420
    local = {**row, "timestamp": "2015-05-17T10:05:03-07:00", "vhost": "h:8080"}
    del local["utc_offset_minutes"]
    assert ACCESS.parse_records([local]).batch.equals(want)
    # as `score` writes the record (UTC time, +00:00, and the line's offset) it reads back
    out = io.BytesIO()
    write_jsonl(want, out)
    written = json.loads(out.getvalue())
    assert written["timestamp"].endswith("+00:00") and written["utc_offset_minutes"] == -420
    assert ACCESS.parse_records([written]).batch.equals(want)
    stamps: list[tuple[str, Any]] = [
        ("2015-05-17T10:05:03-07:00", None), ("2015-05-17T10:05:03-07:00", -420),
        ("2015-05-17T10:05:03-07:00", 60), ("2015-05-17T17:05:03Z", -420),
        ("2015-05-17T17:05:03+00:00", None), ("2015-05-17T22:35:03+05:30", None),
        ("2015-05-17T17:05:03", None), ("2015-05-17T10:05:03-07:00", 0)]
    objects = ACCESS.parse_records([_access_object(timestamp=t, utc_offset_minutes=o)
                                    for t, o in stamps])
    _counted(objects, len(stamps))
    assert objects.line_numbers.to_pylist() == [1, 2, 4, 5, 6, 7]
    assert objects.batch.column("utc_offset_minutes").to_pylist() == [-420, -420, -420, None,
                                                                      330, None]
    assert len(set(objects.batch.column("timestamp").to_pylist())) == 1
    assert objects.rejects.column("reason").to_pylist() == [
        f"field 'utc_offset_minutes' ({o}) disagrees with the offset of the timestamp (-420 "
        f"minutes): '2015-05-17T10:05:03-07:00'" for o in (60, 0)]


def test_records_made_in_python_may_give_the_time_as_a_datetime() -> None:
    """Records built in Python (or rows of a pandas frame) hold their time as a ``datetime``:
    every such record was a reject 'is not a timestamp'. It is the same instant as its ISO
    text, naive taken as UTC, and an access record's offset comes from it as from the text."""
    from datetime import timedelta, timezone

    pacific = timezone(timedelta(hours=-7))
    stamps: list[Any] = [datetime(2015, 5, 17, 3, 5, 3, tzinfo=pacific),
                         datetime(2015, 5, 17, 10, 5, 3), "2015-05-17T03:05:03-07:00"]
    result = ACCESS.parse_records([_access_object(timestamp=t) for t in stamps])
    _counted(result, 3)
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    rows = result.batch.to_pylist()
    assert len({r["timestamp"] for r in rows}) == 1
    assert [r["utc_offset_minutes"] for r in rows] == [-420, None, -420]
    zeek = ZEEK.parse_records([_record(ts=datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC))])
    assert zeek.batch.column("ts").cast(pa.int64()).to_pylist() == [1704164645123]
