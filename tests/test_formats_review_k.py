"""Review of web and Zeek scoring: what alerts of these formats carry."""

from __future__ import annotations

import json

import pyarrow as pa

from deepwatch.alerts import AlertContext, alert_lines
from deepwatch.formats import get_format

_LINE = ('{client} - - [18/May/2015:08:51:57 +0000] "GET /admin.php?id=1 HTTP/1.1" 200 3279 "-" '
         '"sqlmap/1.0"')


def _access_alerts(clients: list[str]) -> list[dict]:
    fmt = get_format("access")
    res = fmt.parse("\n".join(_LINE.format(client=c) for c in clients) + "\n")
    assert res.rejects.num_rows == 0
    n = res.batch.num_rows
    scored = pa.Table.from_batches([res.batch]).append_column(
        "score", pa.array([0.9] * n)).append_column("verdict", pa.array(["malicious"] * n))
    ctx = AlertContext(rule_name="deepwatch-autoencoder", rule_version="x",
                       format_name=fmt.name, ecs_fields=dict(fmt.ecs_fields))
    return [json.loads(b) for b in alert_lines(scored, ctx)]


def test_an_access_alerts_source_ip_is_an_address() -> None:
    """A client written with its port, in brackets, or as a host name (all read by the access
    format) went into ECS ``source.ip`` as written: ``203.0.113.5:51234`` or a host name, which
    an index mapping ``source.ip`` as an IP refuses, losing the alert. The address goes to
    ``source.ip``, the port to ``source.port``, a host name to ``source.domain``."""
    docs = _access_alerts(["203.0.113.5:51234", "[2001:DB8::1]:443", "[2001:db8::2]",
                           "crawl-66-249-73-135.googlebot.com", "198.51.100.7",
                           "proxy.example.com:8080"])
    assert [d["source"] for d in docs] == [
        {"ip": "203.0.113.5", "port": 51234, "domain": None},
        {"ip": "2001:db8::1", "port": 443, "domain": None},
        {"ip": "2001:db8::2", "port": None, "domain": None},
        {"ip": None, "port": None, "domain": "crawl-66-249-73-135.googlebot.com"},
        {"ip": "198.51.100.7", "port": None, "domain": None},
        {"ip": None, "port": 8080, "domain": "proxy.example.com"},
    ]


def test_plain_addresses_keep_the_alerts_shape() -> None:
    docs = _access_alerts(["198.51.100.7", "2001:db8::1"])
    assert [d["source"] for d in docs] == [{"ip": "198.51.100.7"}, {"ip": "2001:db8::1"}]


def test_a_zeek_alert_keeps_its_ports_and_moves_a_damaged_address_out_of_ip() -> None:
    """Zeek's ports come from their own columns; a value of ``id.orig_h`` that is no address
    (a damaged byte, read as ``\\xFF``) is not put in ``source.ip``."""
    fmt = get_format("zeek")
    rows = [f"1700000100.0\tC{i}\t{h}\t5\t10.0.0.10\t80\ttcp\t-\t-\t-\t-\tS0\tT\tF\t0\tS\t1\t64"
            "\t0\t0\t(empty)" for i, h in enumerate(["10.0.0.9", "10.0.0.\xff9"])]
    res = fmt.parse(("\n".join(rows) + "\n").encode("latin-1"))
    assert res.rejects.num_rows == 0
    scored = pa.Table.from_batches([res.batch]).append_column(
        "score", pa.array([0.9, 0.9])).append_column("verdict", pa.array(["malicious"] * 2))
    ctx = AlertContext(rule_name="r", rule_version="x", format_name="zeek",
                       ecs_fields=dict(fmt.ecs_fields))
    docs = [json.loads(b) for b in alert_lines(scored, ctx)]
    assert [d["source"] for d in docs] == [
        {"ip": "10.0.0.9", "domain": None, "port": 5},
        {"ip": None, "domain": "10.0.0.\\xFF9", "port": 5},
    ]
    assert docs[0]["destination"] == {"ip": "10.0.0.10", "port": 80}


def test_an_alert_with_text_beyond_ascii_and_an_explanation_is_one_json_document() -> None:
    """The explanation (JSON text) was spliced in after cutting the alert's last two
    *bytes*' worth of characters: with one 'é' in a URL the cut left a '}' too many, and the
    alert (``stream`` on an access line ``GET /café``, an autoencoder bundle) was no JSON."""
    fmt = get_format("access")
    lines = [_LINE.format(client="198.51.100.7").replace("/admin.php", path)
             for path in ("/café", "/路径/😀", "/plain")]
    res = fmt.parse("\n".join(lines) + "\n")
    scored = pa.Table.from_batches([res.batch]).append_column(
        "score", pa.array([0.9] * 3)).append_column(
        "verdict", pa.array(["malicious"] * 3)).append_column(
        "explanation", pa.array(['[{"feature": "url_non_ascii", "share": 0.6}]'] * 3))
    ctx = AlertContext(rule_name="r", rule_version="x", format_name="access",
                       ecs_fields=dict(fmt.ecs_fields))
    docs = [json.loads(b) for b in alert_lines(scored, ctx)]
    assert [d["url"]["path"] for d in docs] == ["/café", "/路径/😀", "/plain"]
    assert all(d["deepwatch"]["explanation"] == [{"feature": "url_non_ascii", "share": 0.6}]
               for d in docs)


def test_a_request_method_is_kept_as_sent() -> None:
    """``get /index.php`` (a scanner's or fuzzer's, answered 501) was read, scored and
    alerted on as ``GET``: the method's case was lost, from a line and from a JSON record's
    ``request`` alike, while the raw ``request`` and the protocol keep theirs. HTTP's methods
    are case-sensitive and ECS keeps ``http.request.method`` as sent."""
    fmt = get_format("access")
    line = ('198.51.100.7 - - [18/May/2015:08:51:57 +0000] "{req}" 501 0 "-" "Mozilla/5.0"')
    res = fmt.parse("\n".join(line.format(req=r) for r in (
        "get /index.php HTTP/1.1", "GeT /a HTTP/1.1", "POST /login HTTP/1.1")) + "\n")
    assert res.batch.column("method").to_pylist() == ["get", "GeT", "POST"]
    rec = fmt.parse_records([{"client_ip": "198.51.100.7", "timestamp": "2015-05-18T08:51:57Z",
                              "request": "post /login HTTP/1.1", "status": 200, "bytes": 1}])
    assert rec.batch.column("method").to_pylist() == ["post"]
