"""The path and query of a request line's target in its four forms (RFC 9112 section 3.2):
origin-form (``/a/b?x=1``), absolute-form (``http://host:port/a/b?x=1``, what a proxy is sent
and scanners send), authority-form (``CONNECT host:443``) and asterisk-form (``OPTIONS *``).

An absolute-form target's scheme and host were read as part of its path (``url.path`` was
``http://example.com:8080/a/b``), in a log's lines and in records given as objects (REST) alike.
"""

from __future__ import annotations

from typing import Any

import pytest

from deepwatch.formats import get_format

FMT = get_format("access")


def _line(request: str) -> str:
    return (f'203.0.113.5 - - [10/Oct/2024:13:55:36 +0000] "{request}" 200 5 "-" '
            '"curl/8.5.0"')


def _parts(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["method"], row["url"], row["path"], row["query"], row["protocol"]


#: request line -> (method, url, path, query, protocol)
CASES = {
    "GET http://example.com:8080/a/b?x=1 HTTP/1.1":
        ("GET", "http://example.com:8080/a/b?x=1", "/a/b", "x=1", "HTTP/1.1"),
    # a fragment ends the path and the query, as in origin-form
    "GET http://example.com:8080/a/b?x=1#frag HTTP/1.1":
        ("GET", "http://example.com:8080/a/b?x=1#frag", "/a/b", "x=1", "HTTP/1.1"),
    "GET http://example.com/a.php#top HTTP/1.0":
        ("GET", "http://example.com/a.php#top", "/a.php", None, "HTTP/1.0"),
    # the scheme in any case, https too, a user and an IPv6 host in the authority
    "GET HTTP://Example.COM/index.php?id=2 HTTP/1.1":
        ("GET", "HTTP://Example.COM/index.php?id=2", "/index.php", "id=2", "HTTP/1.1"),
    "POST https://user:pw@[2001:db8::1]:8443/login HTTP/1.1":
        ("POST", "https://user:pw@[2001:db8::1]:8443/login", "/login", None, "HTTP/1.1"),
    # no path: "/", the path a server serves for it (RFC 9110 section 4.2.3)
    "GET http://example.com HTTP/1.1": ("GET", "http://example.com", "/", None, "HTTP/1.1"),
    "GET https://example.com?q=1 HTTP/1.1":
        ("GET", "https://example.com?q=1", "/", "q=1", "HTTP/1.1"),
    # authority-form: a host and a port, no path
    "CONNECT example.com:443 HTTP/1.1":
        ("CONNECT", "example.com:443", None, None, "HTTP/1.1"),
    "CONNECT [2001:db8::1]:443 HTTP/1.1":
        ("CONNECT", "[2001:db8::1]:443", None, None, "HTTP/1.1"),
    # asterisk-form: the target is its own path, as Apache's %U has it
    "OPTIONS * HTTP/1.1": ("OPTIONS", "*", "*", None, "HTTP/1.1"),
    # origin-form is as before, a URL in its query included
    "GET /go?to=http://evil.example/x HTTP/1.1":
        ("GET", "/go?to=http://evil.example/x", "/go", "to=http://evil.example/x", "HTTP/1.1"),
    "GET //example.com/a HTTP/1.1": ("GET", "//example.com/a", "//example.com/a", None,
                                     "HTTP/1.1"),
    # a host and port sent with another method is no authority-form: kept as sent
    "GET example.com:443 HTTP/1.1":
        ("GET", "example.com:443", "example.com:443", None, "HTTP/1.1"),
}


@pytest.mark.parametrize("request_line", list(CASES))
def test_a_line_splits_its_target(request_line: str) -> None:
    res = FMT.parse(_line(request_line) + "\n")
    assert res.rejects.num_rows == 0
    (row,) = res.batch.to_pylist()
    assert _parts(row) == CASES[request_line]


def test_records_given_as_objects_split_as_lines_do() -> None:
    """A REST record that gives only its request line gets the parts a log line gets: the
    same split, in ``parse_records``'s own pass (``_split_requests``)."""
    requests = list(CASES)
    records = [{"client_ip": "203.0.113.5", "timestamp": "2024-10-10T13:55:36Z",
                "request": r, "status": 200, "bytes": 5} for r in requests]
    objects = FMT.parse_records(records)
    lines = FMT.parse("".join(_line(r) + "\n" for r in requests))
    assert objects.rejects.num_rows == 0 and lines.rejects.num_rows == 0
    got = [_parts(row) for row in objects.batch.to_pylist()]
    assert got == [_parts(row) for row in lines.batch.to_pylist()]
    assert got == [CASES[r] for r in requests]


def test_a_record_that_gives_its_parts_keeps_them() -> None:
    (row,) = FMT.parse_records([
        {"client_ip": "203.0.113.5", "timestamp": "2024-10-10T13:55:36Z",
         "request": "GET http://example.com/a HTTP/1.1", "method": "GET",
         "url": "http://example.com/a", "path": "/given", "status": 200, "bytes": 5},
    ]).batch.to_pylist()
    assert (row["path"], row["url"]) == ("/given", "http://example.com/a")
