"""How requests get in: request slots, bodies arriving, and the clients sending them.

A request slot is held only by work the service can do now. Were a slot taken when a request's
head arrives, 64 clients sending their bodies a few bytes at a time (slowloris) would hold every
slot for the whole ``--body-timeout`` and everyone else would be refused. So:

- a request without a body takes one of ``Limits.max_requests`` slots at once (503 when all are
  taken) and holds it until its answer is sent;
- a request with a body first joins the uploads: at most ``Limits.max_uploads`` bodies arriving
  at once (503 past it), at most ``Limits.max_client_uploads`` of them from one client address
  (IPv6 clients are counted by /64 network, which one host usually has); it takes its slot when
  the last byte of its body is in (503 then if all are taken);
- a request past its client's cap waits, in line behind the client's others, for one of its
  client's bodies to come in whole and takes that one's place (429 when none does within
  ``Limits.upload_wait_seconds``; at most ``Limits.max_uploads`` requests wait at once, 429 at
  once past that). Bodies that come at once still overlap among the uploads for as long as the
  event loop takes to read them (under load, long enough for a client with more connections
  than the cap, such as a log shipper or a buffering proxy, to pass it): such a client waits
  moments instead of being refused, while one holding its places with slow bodies still has
  the rest refused. A request waiting holds no upload place, no slot and no counted bytes (its
  body is not read meanwhile);
- a body must arrive in whole within ``Limits.body_timeout_seconds``, and once it has been
  arriving ``Limits.body_rate_grace_seconds``, at an average of ``Limits.body_min_rate`` bytes a
  second or more (408 otherwise, the connection closed);
- the bytes of request bodies held in memory, arriving or being scored, are at most
  ``Limits.max_buffered_bytes`` together (503 for the body that would go past it): the bound that
  the slots alone gave when bodies were read inside them.

Every refusal is JSON ``{"detail": reason}``, closes the connection, and is counted in
``deepwatch_rejected_requests_total{status}``; 429 and 503 carry ``Retry-After``.

The client address is the connection's peer. uvicorn replaces it with the address a reverse
proxy names in ``X-Forwarded-For`` only for the proxies ``serve --forwarded-allow-ips`` names
(see ``app.uvicorn_options``): a header any client can write does not pick its own count.

Everything here runs on the event loop's thread: plain counters, no locks.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import deque
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ._auth import ASGIApp, Receive, Scope, Send
from ._metrics import Metrics
from ._request import RequestError
from ._service import Limits

JSON = "application/json"
#: The scope key under which a request's :class:`Ticket` reaches the endpoints.
TICKET = "deepwatch.ticket"
#: Answers that end the connection: a body refused unread is not waited for, and a client
#: turned away for load is better reconnecting later than holding a socket meanwhile.
CLOSING_STATUSES = frozenset({408, 413, 429, 503})
RETRY_AFTER_SECONDS = 1


def error_response(status: int, reason: str) -> Response:
    """``{"detail": reason}`` with ``status``."""
    headers = {}
    if status in CLOSING_STATUSES:
        headers["connection"] = "close"
    if status in (429, 503):
        headers["retry-after"] = str(RETRY_AFTER_SECONDS)
    return Response(orjson.dumps({"detail": reason}), status_code=status, media_type=JSON,
                    headers=headers or None)


def client_key(client: Any) -> str:
    """What the per-client cap counts by: the address, or the /64 network of an IPv6 one."""
    if not client:
        return "unknown"
    host = str(client[0])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a unix socket's path, a test client's name
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request head announces a body (a length above 0, or chunks)."""
    for name, value in headers:
        if name == b"content-length":
            if value.strip() != b"0":
                return True
        elif name == b"transfer-encoding":
            return True
    return False


class Intake:
    """The counts of one process (one app): slots held, bodies arriving, bytes held."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.serving = 0  # requests holding a slot
        self.uploading = 0  # requests whose bodies are arriving
        self.buffered = 0  # bytes of request bodies held
        self.clients: dict[str, int] = {}  # bodies arriving, by client (no zero entries)
        self.waiting = 0  # requests waiting for a place among their client's uploads
        self.lines: dict[str, deque[Ticket]] = {}  # them, by client, in order (no empty lines)

    def snapshot(self, asking: Ticket | None = None) -> dict[str, Any]:
        """The counts now, less what the ``asking`` request holds itself: what ``/v1/stats``
        gives under ``intake`` (all 0 and no clients when no other request is in flight)."""
        serving, uploading, buffered = self.serving, self.uploading, self.buffered
        clients = dict(self.clients)
        if asking is not None:
            serving -= asking.serving
            buffered -= asking.buffered
            if asking.uploading is not None:
                uploading -= 1
                clients[asking.uploading] -= 1
                if not clients[asking.uploading]:
                    del clients[asking.uploading]
        return {"serving": serving, "uploading": uploading, "buffered_bytes": buffered,
                "clients": clients, "waiting": self.waiting}


class ScoringBudget:
    """Bytes of request bodies scored in worker threads at once: at most ``limit``, or one
    body of any size when nothing else is scored; the others wait their turn, first come first
    served. A body's records, once parsed from JSON, can take fifty times its bytes (16 MiB of
    nested arrays: 800 MB), so the body-byte bound alone let a few concurrent requests take
    gigabytes; this keeps what they expand to within a few bodies' worth. (Bodies scored on
    the event loop itself are small and one at a time: they do not come here.)"""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._line: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        return not self.used or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._line and self._fits(n):
            self.used += n
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, turn)
        self._line.append(entry)
        try:
            await turn  # (its bytes are counted when it is woken)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.release(n)  # woken and cancelled at once: give its place on
            else:
                self._line.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._line and self._fits(self._line[0][0]):
            n, turn = self._line.popleft()
            self.used += n
            turn.set_result(None)


class Ticket:
    """One request's place in the :class:`Intake`: an upload, then a slot (or a slot at once)."""

    __slots__ = ("intake", "client", "uploading", "serving", "buffered", "waiter")

    def __init__(self, intake: Intake, client: Any) -> None:
        self.intake = intake
        self.client = client  # scope["client"]
        self.uploading: str | None = None  # the client key, while counted as uploading
        self.serving = False
        self.buffered = 0
        #: while in line for a place among its client's uploads; done when handed one
        self.waiter: asyncio.Future[None] | None = None

    def take_slot(self) -> None:
        intake = self.intake
        most = intake.limits.max_requests
        if intake.serving >= most:
            raise RequestError(503, f"the service is answering its most requests at once "
                                    f"({most}); retry shortly")
        intake.serving += 1
        self.serving = True

    async def join_uploads(self) -> None:
        """A place among the uploads; past its client's cap, the next one its client frees
        (429 when none is freed within ``limits.upload_wait_seconds``)."""
        intake, limits = self.intake, self.intake.limits
        key = client_key(self.client)
        mine = intake.clients.get(key, 0)
        if 0 < limits.max_client_uploads <= mine:
            await self._wait_turn(key, mine)
            return
        if intake.uploading >= limits.max_uploads:
            raise RequestError(503, f"the service is receiving its most request bodies at once "
                                    f"({limits.max_uploads}); retry shortly")
        intake.uploading += 1
        intake.clients[key] = mine + 1
        self.uploading = key

    async def _wait_turn(self, key: str, mine: int) -> None:
        """Wait in ``key``'s line until one of its uploads hands this request its place."""
        intake, wait = self.intake, self.intake.limits.upload_wait_seconds
        if wait <= 0 or intake.waiting >= intake.limits.max_uploads:
            raise RequestError(429, f"{mine} request bodies from {key} are arriving already, "
                                    f"the most one client may send at once; wait for their "
                                    f"answers")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiter = turn
        intake.lines.setdefault(key, deque()).append(self)
        intake.waiting += 1
        try:
            async with asyncio.timeout(wait):
                await turn
        except TimeoutError:
            pass  # a place may have been handed over as the time ran out: kept (see below)
        finally:
            self._leave_line(key)  # out of time or cancelled: out of the line
        if self.uploading is None:
            raise RequestError(429, f"{mine} request bodies from {key} are arriving already, "
                                    f"the most one client may send at once, and none came in "
                                    f"whole within {wait:g} s; wait for their answers")

    def _leave_line(self, key: str) -> None:
        """Out of ``key``'s line, unless a place was handed over (which took it out)."""
        if self.waiter is None:
            return
        self.waiter = None
        intake = self.intake
        line = intake.lines[key]
        line.remove(self)
        if not line:
            del intake.lines[key]
        intake.waiting -= 1

    def hold(self, n: int) -> None:
        """``n`` more bytes of this request's body are in memory."""
        intake = self.intake
        intake.buffered += n
        self.buffered += n
        if intake.buffered > intake.limits.max_buffered_bytes:
            raise RequestError(503, f"the service holds its most bytes of request bodies "
                                    f"({intake.limits.max_buffered_bytes:,}); retry shortly")

    def body_arrived(self) -> None:
        """The whole body is in: from the uploads to a slot (503 when none is free)."""
        if self.uploading is not None:
            self._leave_uploads()
            self.take_slot()

    def _leave_uploads(self) -> None:
        """This request's place among the uploads to the first in its client's line (the
        counts stay as they are), or back."""
        intake, key = self.intake, self.uploading
        assert key is not None
        self.uploading = None
        line = intake.lines.get(key)
        if line:
            nxt = line.popleft()
            if not line:
                del intake.lines[key]
            intake.waiting -= 1
            turn, nxt.waiter = nxt.waiter, None
            # its place from now on, whatever becomes of its task: its release gives it back
            nxt.uploading = key
            if turn is not None and not turn.done():
                turn.set_result(None)
            return
        intake.uploading -= 1
        left = intake.clients[key] - 1
        if left:
            intake.clients[key] = left
        else:
            del intake.clients[key]

    def release(self) -> None:
        """The answer is sent (or the request failed): give back all this request held."""
        if self.waiter is not None:
            self._leave_line(client_key(self.client))
        if self.uploading is not None:
            self._leave_uploads()
        if self.serving:
            self.serving = False
            self.intake.serving -= 1
        self.intake.buffered -= self.buffered
        self.buffered = 0


class IntakeGuard:
    """ASGI middleware giving every HTTP request its :class:`Ticket` (in the scope under
    ``TICKET``) and refusing those that find no room; :func:`read_body` moves a request from
    the uploads to a slot."""

    def __init__(self, app: ASGIApp, intake: Intake) -> None:
        self.app = app
        self.intake = intake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ticket = Ticket(self.intake, scope.get("client"))
        try:  # a wait in line cut short, a refusal, the app failing: all is given back
            try:
                if has_body(scope.get("headers", [])):
                    await ticket.join_uploads()
                else:
                    ticket.take_slot()
            except RequestError as exc:
                self.intake.metrics.rejected_requests.labels(str(exc.status)).inc()
                await error_response(exc.status, exc.reason)(scope, receive, send)
                return
            scope[TICKET] = ticket
            await self.app(scope, receive, send)
        finally:
            ticket.release()


def check_json(content_type: str | None, has_body: bool) -> None:
    """A body must be declared ``application/json`` (what an HTML form or a "simple" cross-site
    request cannot send); a request without a body may leave the type out."""
    if content_type is None and not has_body:
        return
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != JSON:
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise RequestError(415, f"the body must be JSON sent as 'Content-Type: {JSON}' "
                                f"({sent} was sent)")


async def read_body(request: Request, limit: int, limits: Limits) -> bytes:
    """The body, refused with 415 unless it is JSON sent uncompressed, 413 past ``limit`` bytes
    (before reading it when it says so), 408 when it takes more than
    ``limits.body_timeout_seconds`` to arrive in whole or, after
    ``limits.body_rate_grace_seconds``, averages under ``limits.body_min_rate`` bytes a
    second, and 503 when the service holds its most bytes of bodies. Then the request
    takes its slot (503 when none is free)."""
    declared = request.headers.get("content-length")
    body_announced = (declared not in (None, "0")
                      or "transfer-encoding" in request.headers)
    check_json(request.headers.get("content-type"), body_announced)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # (a log shipper's gzip: read as JSON, it was a 400
        # saying the body was not UTF-8)
        raise RequestError(415, f"the body must be sent uncompressed (Content-Encoding "
                                f"{encoding!r} is not read): turn compression off in the "
                                f"sender")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if size > limit:
            raise RequestError(413, f"the body is {size:,} bytes; the limit is {limit:,}")
    ticket: Ticket | None = request.scope.get(TICKET)
    loop = asyncio.get_running_loop()
    start = loop.time()
    whole = start + limits.body_timeout_seconds
    rate, grace = limits.body_min_rate, limits.body_rate_grace_seconds

    def due(received: int) -> float:
        """When the body is late if no more of it comes."""
        if rate <= 0:
            return whole
        return min(whole, start + max(grace, received / rate))

    chunks: list[bytes] = []
    total = 0
    deadline = due(0)
    try:
        async with asyncio.timeout_at(deadline) as timer:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
                if ticket is not None:
                    ticket.hold(len(chunk))
                chunks.append(chunk)
                deadline = due(total)
                timer.reschedule(deadline)
    except ClientDisconnect:  # nobody reads the answer; the refusal is counted
        raise RequestError(400, f"the connection closed before the whole body came "
                                f"({total:,} bytes came)") from None
    except TimeoutError:
        if deadline >= whole:
            raise RequestError(408, f"the body did not arrive within "
                                    f"{limits.body_timeout_seconds:g} s ({total:,} bytes "
                                    f"came)") from None
        took = loop.time() - start
        raise RequestError(408, f"the body arrived too slowly: {total:,} bytes in {took:.1f} s, "
                                f"under the minimum of {rate:,g} bytes a second") from None
    if ticket is not None:
        ticket.body_arrived()
    return b"".join(chunks)
