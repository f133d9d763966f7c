"""Records sent as JSON objects of fields (``POST /v1/score`` with objects): type coercion, the
timestamp forms a client sends, and values no column can hold, each a reject with its reason,
never a failed request. Against a real uvicorn server serving a small Zeek bundle (Zeek has the
kinds of column the other formats have, and a timestamp)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
from conftest import ThreadServer

from deepwatch.formats import get_format

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
        5: "field 'ts' is not a timestamp (ISO-8601 text or seconds since the epoch): True",
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
