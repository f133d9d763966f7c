"""The access format's request protocol in lower case and a client written with its port: two
defects an earlier review found (the protocol read into the URL, the client read as a virtual
host)."""

from __future__ import annotations

import pytest

from deepwatch.formats import get_format

FMT = get_format("access")
_TIME = "[14/May/2024:10:00:00 +0000]"
_AMBIGUOUS = "unescaped quote in the request line: more than one place where it could end"


def _parsed(text: str) -> list[dict[str, object]]:
    """The rows of ``text``, checked to be the same from ``parse`` and ``parse_bulk`` (what
    ``score`` and ``stream`` read a chunk with) and to hold no reject."""
    result = FMT.parse(text)
    bulk = FMT.parse_bulk(text)
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert bulk.batch.to_pylist() == result.batch.to_pylist()
    assert bulk.rejects.num_rows == 0
    return result.batch.to_pylist()


@pytest.mark.parametrize(("request_line", "expected"), [
    # the protocol is kept as the client sent it: a case no real client sends is evidence
    ("GET /index.html http/1.1", ("GET", "/index.html", "/index.html", None, "http/1.1")),
    ("POST /login?next=/a Http/1.0", ("POST", "/login?next=/a", "/login", "next=/a", "Http/1.0")),
    ("GET /a b?x=1 2 hTTp/2.0", ("GET", "/a b?x=1 2", "/a b", "x=1 2", "hTTp/2.0")),
    ("GET /index.html HTTP/1.1", ("GET", "/index.html", "/index.html", None, "HTTP/1.1")),
])
def test_a_lowercase_protocol_is_the_protocol_not_part_of_the_url(
        request_line: str, expected: tuple[object, ...]) -> None:
    """``"GET /index.html http/1.1"`` read with ``url`` and ``path`` ``/index.html http/1.1``
    and no protocol: the path features saw a path no server served. The HTTP name is
    case-sensitive (RFC 9112), but a log holds the line the client sent."""
    line = f'203.0.113.5 - - {_TIME} "{request_line}" 400 150 "-" "curl/8.5.0"'
    row = _parsed(line)[0]
    assert (row["method"], row["url"], row["path"], row["query"], row["protocol"]) == expected
    assert row["request"] == request_line
    # a record given as a JSON object with only its request line is split the same way
    record = {"client_ip": "203.0.113.5", "timestamp": "2024-05-14T10:00:00Z",
              "request": request_line, "status": 400, "bytes": 150}
    objects = FMT.parse_records([record])
    assert objects.rejects.num_rows == 0
    got = objects.batch.to_pylist()[0]
    assert (got["method"], got["url"], got["path"], got["query"], got["protocol"]) == expected


@pytest.mark.parametrize("tail", [
    '"GET /a" 200 5 "-" "x" "y {} 404 0 "-" "ua"',  # in the extra fields after the agent
    '"GET /a" 200 5 "-" "x {} 404 0',  # at the agent's closing quote
])
def test_a_frame_forged_in_the_target_is_a_reject_whatever_the_case_of_its_protocol(
        tail: str) -> None:
    """A server that does not escape quotes writes the target ``/a" 200 5 "-" "x" "y`` as a
    whole frame of the client's: the line is a reject with ``HTTP/1.1`` after it, and was
    read, with the client's status and size, with ``http/1.1``."""
    for protocol in ("HTTP/1.1", "http/1.1"):
        line = f'198.51.100.4 - - {_TIME} ' + tail.format(protocol + '"')
        for result in (FMT.parse(line), FMT.parse_bulk(line)):
            assert result.batch.num_rows == 0, (protocol, result.batch.to_pylist())
            assert result.rejects.column("reason")[0].as_py().startswith(_AMBIGUOUS)


def test_a_client_with_its_port_is_the_client_not_a_virtual_host() -> None:
    """A client written with its port (NGINX's ``$remote_addr:$remote_port``, Apache's
    ``%a:%{remote}p``) before a user name with a space (the client's to send, in its
    Authorization header) read as a ``vhost_combined`` line: the client as the virtual host
    and ``-`` as the client, so that a client hid its address from every per-client feature
    by sending such a name. A ``vhost_combined`` line's client is an address or a host name,
    never ``-``."""
    rest = f'{_TIME} "GET / HTTP/1.1" 200 5 "-" "x"'
    lines = [
        f"203.0.113.5:51234 - john doe {rest}",
        f"[2001:db8::1]:51234 - a b c {rest}",
        f"203.0.113.5:51234 - - {rest}",  # read right before too
        f'203.0.113.5:51234 - john doe {_TIME} "GET /a"b HTTP/1.1" 200 5 "-" "x"',  # raw quote
        f'203.0.113.5:51234 - john doe {_TIME} "GET / HTTP/1.1" 200 5 "-" "Mozilla "e" x"',
        # the virtual host layouts still read as such, a user with a space among them
        f"www.example.com:443 203.0.113.9 - john doe {rest}",
        f"www.example.com:443 203.0.113.5:51234 - - {rest}",
        f"198.51.100.7:80 203.0.113.9 - - {rest}",
    ]
    rows = _parsed("\n".join(lines))
    assert [(r["vhost"], r["client_ip"], r["ident"], r["user"]) for r in rows] == [
        (None, "203.0.113.5:51234", None, "john doe"),
        (None, "[2001:db8::1]:51234", None, "a b c"),
        (None, "203.0.113.5:51234", None, None),
        (None, "203.0.113.5:51234", None, "john doe"),
        (None, "203.0.113.5:51234", None, "john doe"),
        ("www.example.com", "203.0.113.9", None, "john doe"),
        ("www.example.com", "203.0.113.5:51234", None, None),
        ("198.51.100.7", "203.0.113.9", None, None),
    ]
    assert rows[3]["url"] == '/a"b' and rows[4]["user_agent"] == 'Mozilla "e" x'
