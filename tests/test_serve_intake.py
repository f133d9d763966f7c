"""The request intake (``_intake``: request slots, bodies arriving, bytes held, clients) against
clients that leave, fail, refuse to finish or crowd in, on a real uvicorn server with the
settings ``deepwatch serve`` uses, spoken to over raw sockets.

What must never happen is a leak: a path that leaves a slot, an upload place, a client's count
or buffered bytes taken after its request is gone, until the service
answers 503/429 to everyone. After every scenario ``GET /v1/stats`` must show the intake empty.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ThreadServer

pytest.importorskip("uvicorn")
from deepwatch.serve._service import Limits  # noqa: E402
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

LINE = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00")
HEAD = "Host: localhost\r\nContent-Type: application/json\r\n"
SMALL = orjson.dumps({"records": [LINE] * 5})
BIG = orjson.dumps({"records": [LINE] * 400})  # over INLINE_BODY_BYTES: scored in the pool
IDLE = {"serving": 0, "uploading": 0, "buffered_bytes": 0, "clients": {}}
KEY = "intake-key-0123456789"


class Server(ThreadServer):
    def __init__(self, app: Any) -> None:
        super().__init__(app, **{**uvicorn_options(), "timeout_graceful_shutdown": 2})

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                        source_address=(source, 0))

    def intake(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        got = httpx.get(self.url + "/v1/stats", headers=headers, timeout=5).json()["intake"]
        got.pop("pid")
        return dict(got)

    def settled(self, timeout: float = 5.0, headers: dict[str, str] | None = None
                ) -> dict[str, Any]:
        """The intake once nothing is held (a request lets go just after its answer), or as it
        is after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (got := self.intake(headers)) != IDLE and time.monotonic() < deadline:
            time.sleep(0.02)
        return got


def _post(length: int | str, extra: str = "", path: str = "/v1/score") -> bytes:
    return f"POST {path} HTTP/1.1\r\n{HEAD}{extra}Content-Length: {length}\r\n\r\n".encode()


def _answers(sock: socket.socket, timeout: float, count: int = 0) -> tuple[bytes, bool]:
    """What the server sent within ``timeout`` s (or until 0.1 s after the start of the
    ``count``-th answer), and whether it closed the connection."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
            if count and len(_statuses(got)) >= count:
                sock.settimeout(0.1)
    except TimeoutError:
        return got, False
    except ConnectionResetError:
        pass
    return got, True


def _statuses(answer: bytes) -> list[int]:
    return [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:]]


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[Server]:
    limits = Limits(body_timeout_seconds=1.0, body_min_rate=0, max_body_bytes=200_000)
    with Server(create_app(kdd_bundle, limits=limits)) as srv:
        yield srv


def test_stats_show_the_requests_in_flight(server: Server) -> None:
    """``/v1/stats`` gives the intake's counts, less the asking request's own (with or without
    a body), and they come back to nothing when the requests are gone."""
    assert server.intake() == IDLE
    r = httpx.request("GET", server.url + "/v1/stats", content=b"{}", headers={
        "content-type": "application/json"}, timeout=5)
    assert r.json()["intake"] | {"pid": 0} == IDLE | {"pid": 0}
    with server.connect("127.0.0.2") as sock:
        sock.sendall(_post(len(SMALL)) + SMALL[:10])
        deadline = time.monotonic() + 5
        while (got := server.intake())["uploading"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == {**IDLE, "uploading": 1, "buffered_bytes": 10,
                       "clients": {"127.0.0.2": 1}}
    assert server.settled() == IDLE


def _gone_while_scoring(sock: socket.socket) -> None:
    sock.sendall(_post(len(BIG)) + BIG)
    time.sleep(0.05)
    _reset(sock)


def _pipelined_then_gone(sock: socket.socket) -> None:
    sock.sendall((_post(len(BIG)) + BIG) * 3 + _post(len(SMALL)) + SMALL[:5])
    sock.recv(100)  # the first answer is coming
    sock.close()


# (what the client does, the statuses it gets in 1.5 s or None: not read, whether closed)
SCENARIOS: dict[str, tuple[Callable[[socket.socket], Any] | bytes, list[int] | None]] = {
    "head, then gone": (lambda s: (s.sendall(_post(1000)), time.sleep(0.1)), None),
    "half the body, then gone": (lambda s: (s.sendall(_post(len(SMALL)) + SMALL[:20]),
                                            time.sleep(0.1)), None),
    "half the body, then reset": (lambda s: (s.sendall(_post(len(SMALL)) + SMALL[:20]),
                                             time.sleep(0.1), _reset(s)), None),
    "the body, then gone unanswered": (lambda s: s.sendall(_post(len(SMALL)) + SMALL), None),
    "gone while scoring in the pool": (_gone_while_scoring, None),
    "pipelined, gone after the first answer": (_pipelined_then_gone, None),
    "body late (408)": (_post(len(SMALL)) + SMALL[:20], [408]),
    "Expect: 100-continue, body never sent": (_post(len(SMALL), "Expect: 100-continue\r\n"),
                                              [100, 408]),
    "too large, declared (413)": (_post(10_000_000), [413]),
    "too large, chunked (413)": (
        _post(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
        + (b"10000\r\n" + b" " * 0x10000 + b"\r\n") * 4, [413]),
    "bad Content-Length (400)": (_post("1x") + SMALL, [400]),
    "not JSON (415)": (_post(len(SMALL)).replace(b"application/json", b"text/plain") + SMALL,
                       [415]),
    "bad JSON (400)": (_post(5, "Connection: close\r\n") + b"{nope", [400]),
    "not the contract (422)": (_post(13, "Connection: close\r\n") + b'{"records":1}', [422]),
    "malformed chunk (400)": (
        _post(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked") + b"zz\r\n", [400]),
    "chunks and trailers": (
        _post(0, "Connection: close\r\n").replace(b"Content-Length: 0",
                                                  b"Transfer-Encoding: chunked")
        + f"{len(SMALL):x}\r\n".encode() + SMALL + b"\r\n0\r\nX-Trailer: 1\r\n\r\n", [200]),
    "chunks stalling (408)": (
        _post(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked") + b"5\r\n{\"rec\r\n",
        [408]),
    "unknown route, body unsent (404)": (_post(5000, path="/nowhere"), [404]),
    "GET with a body unsent": (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                               b"Content-Length: 5000\r\n\r\n", [200]),
    "PUT, body unsent (405)": (_post(5000).replace(b"POST", b"PUT"), [405]),
    "reload with a bad body (400)": (_post(5, "Connection: close\r\n", "/v1/reload") + b"{nope",
                                     [400]),
    "CORS preflight (405)": (b"OPTIONS /v1/score HTTP/1.1\r\nHost: localhost\r\nOrigin: "
                             b"http://evil.example\r\nAccess-Control-Request-Method: POST\r\n"
                             b"Connection: close\r\n\r\n", [405]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_nothing_is_held_after_any_request(server: Server, name: str) -> None:
    """Clients gone at every stage, bodies refused at every check, routes that never read the
    body: every slot, upload place, client count and byte is given back."""
    action, expected = SCENARIOS[name]
    sock = server.connect()
    with contextlib.closing(sock):
        if isinstance(action, bytes):
            sock.sendall(action)
            assert expected is not None
            answer, closed = _answers(sock, 1.5, len(expected))
            assert _statuses(answer) == expected, answer[:300]
            if expected[-1] in (408, 413):  # refused unread: the connection is closed
                assert closed, answer[:300]
        else:
            action(sock)
    assert server.settled() == IDLE


def test_failures_inside_scoring_give_everything_back(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the model path (an exception that is no refusal) is a 500, on the event loop
    and in the pool alike; what the request held is given back."""
    service = server.server.config.app.state.service

    def broken(body: bytes) -> bytes:
        raise RuntimeError("the model path failed")

    monkeypatch.setattr(service, "score", broken)
    for body in (SMALL, BIG):
        with server.connect() as sock:
            sock.sendall(_post(len(body), "Connection: close\r\n") + body)
            answer, _ = _answers(sock, 5)
        assert _statuses(answer) == [500], answer[:300]
        assert server.settled() == IDLE
    monkeypatch.undo()
    assert httpx.post(server.url + "/v1/score", content=SMALL, timeout=5,
                      headers={"content-type": "application/json"}).status_code == 200


def test_requests_without_the_key_take_nothing(kdd_bundle: Path) -> None:
    """With a key, a request without it is a 401 before the intake, whether its body comes or
    not."""
    auth = {"authorization": f"Bearer {KEY}"}
    with Server(create_app(kdd_bundle, api_key=KEY)) as srv:
        with srv.connect() as unsent, srv.connect() as sent:
            unsent.sendall(_post(5000))
            sent.sendall(_post(len(SMALL)) + SMALL)
            for sock in (unsent, sent):
                answer, _ = _answers(sock, 0.5, 1)
                assert _statuses(answer) == [401], answer[:300]
            assert srv.intake(auth) == IDLE
        assert srv.settled(headers=auth) == IDLE
