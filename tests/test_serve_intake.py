"""The request intake (``_intake``: request slots, bodies arriving, bytes held, clients) against
clients that leave, fail, refuse to finish or crowd in, on a real uvicorn server with the
settings ``deepwatch serve`` uses, spoken to over raw sockets.

What must never happen is a leak: a path that leaves a slot, an upload place, a client's count,
a place in a client's line or buffered bytes taken after its request is gone, until the service
answers 503/429 to everyone. After every scenario ``GET /v1/stats`` must show the intake empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ThreadServer

pytest.importorskip("uvicorn")
from deepwatch.serve._intake import Intake, Ticket  # noqa: E402
from deepwatch.serve._metrics import Metrics  # noqa: E402
from deepwatch.serve._request import RequestError  # noqa: E402
from deepwatch.serve._service import Limits  # noqa: E402
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

LINE = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00")
HEAD = "Host: localhost\r\nContent-Type: application/json\r\n"
SMALL = orjson.dumps({"records": [LINE] * 5})
BIG = orjson.dumps({"records": [LINE] * 400})  # over INLINE_BODY_BYTES: scored in the pool
IDLE = {"serving": 0, "uploading": 0, "buffered_bytes": 0, "clients": {}, "waiting": 0}
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


# what the client does (bytes: sent, then the answers read), and the statuses it gets
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
            closing = expected[-1] in (408, 413)  # refused unread: the connection is closed
            answer, closed = _answers(sock, 4, 0 if closing else len(expected))
            assert _statuses(answer) == expected, answer[:300]
            assert closed or not closing, answer[:300]
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
                answer, _ = _answers(sock, 5, 1)
                assert _statuses(answer) == [401], answer[:300]
            assert srv.intake(auth) == IDLE
        assert srv.settled(headers=auth) == IDLE


# -- a client past its cap waits for its turn -----------------------------------------------------

def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_a_request_past_its_clients_cap_waits_for_a_place(kdd_bundle: Path) -> None:
    """Two bodies from one address are arriving (the cap): a third request from it waits in
    line, holding nothing, instead of a 429, and is scored once one of the two comes in whole;
    nothing is left held afterwards."""
    limits = Limits(max_client_uploads=2, body_timeout_seconds=10.0)
    with Server(create_app(kdd_bundle, limits=limits)) as srv, contextlib.ExitStack() as stack:
        holding = [stack.enter_context(srv.connect("127.0.0.2")) for _ in range(2)]
        for sock in holding:
            sock.sendall(_post(len(SMALL)) + SMALL[:10])
        _wait_for(lambda: srv.intake()["uploading"] == 2)
        third = stack.enter_context(srv.connect("127.0.0.2"))
        third.sendall(_post(len(SMALL)) + SMALL)
        _wait_for(lambda: srv.intake()["waiting"] == 1)
        assert _answers(third, 0.3) == (b"", False), "no 429: it waits its turn"
        assert srv.intake() == {**IDLE, "uploading": 2, "buffered_bytes": 20, "waiting": 1,
                                "clients": {"127.0.0.2": 2}}
        holding[0].sendall(SMALL[10:])  # one body in whole: its place goes to the third
        for sock in (holding[0], third):
            answer, _ = _answers(sock, 5, 1)
            assert _statuses(answer) == [200], answer[:300]
            assert len(orjson.loads(answer.partition(b"\r\n\r\n")[2])["results"]) == 5
        holding[1].close()
    # (the server is stopped: its app's intake is read directly)
    assert srv.server.config.app.state.intake.snapshot() == IDLE


def test_a_busy_client_with_more_connections_than_the_cap_is_served(kdd_bundle: Path) -> None:
    """A client sending whole bodies as fast as it can on more connections than its cap (a log
    shipper, a proxy): its bodies overlap among the uploads for as long as the server takes to
    read them, which under load used to pass the cap and have some refused with 429. Every
    request is scored now."""
    limits = Limits(max_client_uploads=2)
    body = orjson.dumps({"records": [LINE] * 2000})  # ~280 kB: read in several turns
    request = _post(len(body)) + body

    async def client(port: int, n: int, statuses: Counter[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(n):
                writer.write(request)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                statuses[status] += 1
                length, closing = 0, False
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    closing |= name.lower() == "connection" and "close" in value
                await reader.readexactly(length)
                if closing:
                    return
        finally:
            writer.close()

    async def crowd(port: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        await asyncio.gather(*(client(port, 5, statuses) for _ in range(16)))
        return statuses

    with Server(create_app(kdd_bundle, limits=limits)) as srv:
        statuses = asyncio.run(crowd(srv.port))
        assert statuses == {200: 80}, statuses
        assert srv.settled() == IDLE


def test_a_client_holding_its_places_with_slow_bodies_is_still_refused(kdd_bundle: Path) -> None:
    """The cap still holds against a slow sender: a request waiting for a place that none of
    its client's bodies frees within the wait gets 429 (counted, the connection closed), and
    the line is bounded: past ``max_uploads`` requests waiting, 429 at once."""
    limits = Limits(max_client_uploads=1, max_uploads=2, upload_wait_seconds=0.5,
                    body_timeout_seconds=10.0)
    with Server(create_app(kdd_bundle, limits=limits)) as srv, contextlib.ExitStack() as stack:
        slow = stack.enter_context(srv.connect("127.0.0.2"))
        slow.sendall(_post(len(SMALL)) + SMALL[:10])
        _wait_for(lambda: srv.intake()["uploading"] == 1)
        waiting = [stack.enter_context(srv.connect("127.0.0.2")) for _ in range(2)]
        t0 = time.monotonic()
        for sock in waiting:
            sock.sendall(_post(len(SMALL)) + SMALL)
        _wait_for(lambda: srv.intake()["waiting"] == 2)
        with srv.connect("127.0.0.2") as past_the_line:
            past_the_line.sendall(_post(len(SMALL)) + SMALL)
            answer, closed = _answers(past_the_line, 2)
            assert _statuses(answer) == [429] and closed, answer[:300]
            assert b"are arriving already, the most one client may send at once;" in answer
        for sock in waiting:
            answer, closed = _answers(sock, 3)
            assert _statuses(answer) == [429] and closed, answer[:300]
            assert (b'"1 request bodies from 127.0.0.2 are arriving already, the most one client'
                    b' may send at once, and none came in whole within 0.5 s; wait for their '
                    b'answers"') in answer
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
        assert 0.5 <= time.monotonic() - t0 < 3
        assert srv.intake() == {**IDLE, "uploading": 1, "buffered_bytes": 10,
                                "clients": {"127.0.0.2": 1}}
        metrics = httpx.get(srv.url + "/metrics", timeout=5).text
        assert 'deepwatch_rejected_requests_total{status="429"} 3.0' in metrics
        slow.close()
        assert srv.settled() == IDLE


def test_requests_waiting_in_line_that_leave_take_nothing(kdd_bundle: Path) -> None:
    """Requests in line whose clients go away (the body sent or not) are handed a place when
    their turn comes, find the client gone (a 400 nobody reads) and pass the place on; the
    one still there is scored."""
    limits = Limits(max_client_uploads=1, body_timeout_seconds=10.0)
    with Server(create_app(kdd_bundle, limits=limits)) as srv, contextlib.ExitStack() as stack:
        first = stack.enter_context(srv.connect("127.0.0.2"))
        first.sendall(_post(len(SMALL)) + SMALL[:10])
        _wait_for(lambda: srv.intake()["uploading"] == 1)
        leaving = [srv.connect("127.0.0.2") for _ in range(3)]
        leaving[0].sendall(_post(len(SMALL)))
        leaving[1].sendall(_post(len(SMALL)) + SMALL[:10])
        leaving[2].sendall(_post(len(SMALL)) + SMALL)
        last = stack.enter_context(srv.connect("127.0.0.2"))
        _wait_for(lambda: srv.intake()["waiting"] == 3)
        last.sendall(_post(len(SMALL)) + SMALL)
        _wait_for(lambda: srv.intake()["waiting"] == 4)
        leaving[0].close()
        _reset(leaving[1])
        leaving[2].close()
        first.sendall(SMALL[10:])
        answer, _ = _answers(last, 5, 1)
        assert _statuses(answer) == [200], answer[:300]
        assert srv.settled() == IDLE


# -- the line in the event loop: cancellation and hand-over races ---------------------------------

def test_the_line_gives_everything_back_when_waits_are_cut_short() -> None:
    """uvicorn cancels a request's task when it stops; a place handed over just as a wait ends
    (out of time or cancelled) must be kept by the request, and given back by its release."""
    intake = Intake(Limits(max_client_uploads=1, upload_wait_seconds=5.0), Metrics())
    client = ("127.0.0.1", 1)

    def idle() -> bool:
        return (intake.snapshot() == IDLE and intake.lines == {})

    async def scenario() -> None:
        first = Ticket(intake, client)
        await first.join_uploads()
        tickets = [Ticket(intake, client) for _ in range(3)]
        tasks = [asyncio.create_task(t.join_uploads()) for t in tickets]
        await asyncio.sleep(0)
        assert intake.waiting == 3 and intake.clients == {"127.0.0.1": 1}

        tasks[0].cancel()  # cancelled in line (a server stopping)
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        tickets[0].release()
        assert intake.waiting == 2

        first.release()  # its place goes to tickets[1] ...
        assert tickets[1].uploading == "127.0.0.1" and intake.waiting == 1
        tasks[1].cancel()  # ... whose task is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert intake.uploading == 1
        tickets[1].release()  # (IntakeGuard's finally): the place passes on to tickets[2]
        await tasks[2]
        assert tickets[2].uploading == "127.0.0.1" and intake.waiting == 0
        tickets[2].body_arrived()
        assert intake.snapshot() == {**IDLE, "serving": 1}
        tickets[2].release()
        assert idle()

        # out of time: a 429, nothing left in line
        short = Intake(Limits(max_client_uploads=1, upload_wait_seconds=0.05), Metrics())
        holder, late = Ticket(short, client), Ticket(short, client)
        await holder.join_uploads()
        with pytest.raises(RequestError) as refused:
            await late.join_uploads()
        assert refused.value.status == 429 and short.waiting == 0 and short.lines == {}
        late.release()
        holder.release()
        assert short.snapshot() == IDLE

    asyncio.run(scenario())


def test_the_old_behaviour_is_one_setting_away() -> None:
    """``upload_wait_seconds=0``: past the cap, 429 at once (as before the line existed)."""
    intake = Intake(Limits(max_client_uploads=1, upload_wait_seconds=0), Metrics())

    async def scenario() -> int:
        await Ticket(intake, ("::ffff:127.0.0.1", 1)).join_uploads()
        try:
            await Ticket(intake, ("127.0.0.1", 2)).join_uploads()
        except RequestError as exc:
            return exc.status
        return 0

    assert asyncio.run(scenario()) == 429 and intake.waiting == 0


def test_the_stats_name_the_answering_process(kdd_bundle: Path) -> None:
    """The counts are the answering process's (``pid``: each of ``--workers`` has its own), and
    the wait in line is among the limits shown (5 s by default, as documented)."""
    assert Limits().upload_wait_seconds == 5.0
    with Server(create_app(kdd_bundle)) as srv:
        stats = httpx.get(srv.url + "/v1/stats", timeout=5).json()
        assert stats["intake"]["pid"] == httpx.get(srv.url + "/healthz").json()["pid"]
        assert stats["limits"]["upload_wait_seconds"] == 5.0
