"""The gate in front of every endpoint: the optional bearer key, and per-request metrics.

A plain ASGI middleware (no per-request task or body buffering, unlike Starlette's
BaseHTTPMiddleware): it reads one header, compares the key in constant time, and times the
request.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ._metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Reachable without the key: load balancers and orchestrators probe it.
OPEN_PATHS = frozenset({"/healthz"})


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class Gate:
    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.key = api_key.encode() if api_key else None

    def _allowed(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in OPEN_PATHS:
            return True
        token = bearer_token(scope.get("headers", []))
        # compare_digest: the time taken does not depend on how much of the key matched
        return token is not None and hmac.compare_digest(token, self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._allowed(scope):
                await self.app(scope, receive, send_status)
            else:
                await _unauthorized(send_status)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - t0)


async def _unauthorized(send: Send) -> None:
    body = orjson.dumps({"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"})
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="deepwatch"')]})
    await send({"type": "http.response.body", "body": body})
