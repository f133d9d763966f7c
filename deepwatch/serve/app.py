"""The REST service: FastAPI on uvicorn (see the REST contract in ARCHITECTURE.md).

``POST /v1/score`` scores raw lines or JSON objects of fields through ``Detector.score_batch``;
``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /`` (the live dashboard, polling
``GET /v1/stats``), ``GET /docs``; ``POST /v1/reload`` and SIGHUP load a new bundle without
dropping a request. With an API key every endpoint but ``/healthz`` needs
``Authorization: Bearer <key>``. With ``--tls-cert``/``--tls-key`` it all goes over HTTPS (see
:func:`tls_options`); listening beyond loopback without them is warned about.

Browsers: POST bodies must be ``application/json`` (which a cross-site page cannot send without
a CORS preflight, and none is granted), a request that reached the server over loopback must
name a loopback host (no DNS rebinding), and a POST whose ``Origin`` is another site is refused.
Slow clients: a connection gets ``HEAD_TIMEOUT_SECONDS`` to deliver each request head
(connections waiting for one take no request slot, see ``_SlowClientGuard``), and with TLS as long
again for its handshake before that (see ``bound_tls_handshakes``); a body must arrive
within ``--body-timeout`` and, after ``--body-rate-grace``, at ``--body-min-rate`` or faster
(408 after), holds no request slot while it arrives, at most ``--max-uploads`` arrive at once
(503 past it), and one client may send at most ``--max-client-uploads`` at once (past it a
request waits its turn, 429 when none comes within ``--upload-wait``): see ``_intake``.

The score endpoint reads the body itself (no pydantic on the hot path) and answers with orjson
bytes; the request/response models below only document it in the OpenAPI page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from ..errors import DeepwatchError, InputError, UsageError
from ..sinks import escape_unsafe_text
from ..viz.figures import visible
from ._auth import OPEN_PATHS, ASGIApp, Gate, Receive, Scope, Send
from ._intake import TICKET, Intake, IntakeGuard, ScoringBudget, read_body
from ._intake import error_response as _error
from ._metrics import CONTENT_TYPE
from ._request import RequestError
from ._service import MAX_CONCURRENT_REQUESTS as MAX_CONCURRENT_REQUESTS  # re-exported
from ._service import Limits, ScoringService
from ._stats import merged_snapshot
from ._workers import WorkerGroup
from ._x509 import validity, validity_warning

log = logging.getLogger("deepwatch.serve")
JSON = "application/json"
#: Bodies up to this size (a few dozen records) are scored on the event loop itself: about a
#: millisecond of work, less than the two thread switches that handing it to the pool costs (and
#: those switches are what stretches the tail on busy cores). Larger bodies go to the pool, so
#: the loop keeps answering while they score.
INLINE_BODY_BYTES = 32 * 1024
#: Larger bodies are scored in worker threads, at most this many bodies' worth of bytes at once
#: (the rest wait their turn): parsed, a body's JSON can take fifty times its bytes.
SCORING_BODIES = 2
#: A connection has this long, from its opening or from its previous answer, to deliver a whole
#: request head; then it is closed. Connections still waiting for one take no request slot.
#: With TLS, the handshake before the first head has as long again (``bound_tls_handshakes``).
HEAD_TIMEOUT_SECONDS = 10.0
#: A request head (request line and headers) larger than this is refused with 431.
MAX_HEAD_BYTES = 64 * 1024
#: Extra host names (comma-separated) that loopback requests may carry in ``Host``.
ALLOWED_HOSTS_ENV = "DEEPWATCH_ALLOWED_HOSTS"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The name of the API key's security scheme in the OpenAPI schema (with a key only).
BEARER_SCHEME = "bearerKey"


#: /v1/stats quotes the records' text: opened as a page, it runs nothing and is never framed.
DATA_HEADERS = {"content-security-policy": "default-src 'none'; frame-ancestors 'none'",
                "x-content-type-options": "nosniff"}


def dashboard_policy(page: bytes) -> str:
    """The dashboard's Content-Security-Policy (and the API page's, ``/docs``): its own inline
    ``<script>`` and ``<style>`` run (allowed by their SHA-256), nothing else does; it may
    fetch only from this server, load nothing from elsewhere, and no other site may frame it.
    It draws the senders' text (user agents, URLs, labels) as text; the policy keeps any markup
    that got into the page from running all the same (an ``onerror`` attribute, an injected
    ``<script>``)."""

    def hashes(tag: bytes) -> str:
        found = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
                        for s in found) or "'none'"

    return (f"default-src 'none'; script-src {hashes(b'script')}; "
            f"style-src {hashes(b'style')}; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")


class ScoreRequest(BaseModel):
    format: str | None = Field(None, description="Input format; must be the bundle's (left out "
                                                 "or null: the bundle's)")
    records: list[str | dict[str, Any]] = Field(
        description="Raw lines (one record each) or JSON objects of parsed fields")
    explain: bool = Field(False, description="Add each alert's top features ('explanation'); "
                                             "costs extra inference passes")


class ScoreResult(BaseModel):
    index: int = Field(description="Position of the record in the request")
    score: float = Field(description="0..1, higher = more likely malicious")
    anomaly_score: float | None = Field(None, description="Where an autoencoder is in the bundle")
    verdict: str = Field(description="normal or malicious")
    attack_type: str | None = None
    category: str | None = None
    explanation: str | None = Field(None, description="With explain: JSON list of the top "
                                                      "features of a malicious record")


class Reject(BaseModel):
    index: int
    reason: str


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    rejects: list[Reject]


class ReloadRequest(BaseModel):
    bundle: str | None = Field(None, description="Bundle directory (default: the one served)")


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": False, "content": {
        JSON: {"schema": model.model_json_schema()}}}}


def _split_host(host: str) -> tuple[str, int | None]:
    """``Host`` header -> (lower-case name without brackets or final dot, port or None)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, sep, port = host.rpartition(":")
        if not sep or ":" in name:  # no port, or a bare IPv6 address
            name, port = host, ""
    return name.rstrip("."), (int(port) if port.isdigit() else None)


def _is_loopback_address(value: object) -> bool:
    try:
        ip = ipaddress.ip_address(str(value))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _is_loopback_name(name: str) -> bool:
    # *.localhost never leaves the machine (RFC 6761; browsers resolve it themselves)
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_address(name)


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether the ``Origin`` header names the site the request was sent to (its ``Host``);
    the scheme is not compared (a TLS proxy in front answers https for an http server)."""
    if host is None:
        return False
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return False
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if default is None or not parts.hostname:  # "null" (sandboxed pages, file:) among others
        return False
    name, port = _split_host(host)
    return parts.hostname.rstrip(".") == name and (origin_port or default) == (port or default)


class BrowserGuard:
    """Keeps web pages the operator happens to open from using the service behind its back.

    - DNS rebinding: a request that reached the server over loopback must name a loopback host
      (``localhost``, ``*.localhost``, ``127.x.x.x``, ``[::1]``, any port) or one of
      ``allowed_hosts`` in ``Host``, else 421; a page of another site that had its name
      resolve to 127.0.0.1 sends its own name.
    - Cross-site requests: a POST (or any unsafe method) whose ``Origin`` is not the server's
      own is refused with 403. (Bodies must also be JSON, see ``check_json``, which a page of
      another site cannot send without a CORS preflight that this server never grants.)

    ``/healthz`` is exempt from the host check: local probes may name the host as they like.

    A request with more than one ``Host`` header is invalid (RFC 9112, section 3.2) and gets
    400 on every path: this check read the last one while Starlette (``request.url``, the
    trailing-slash redirect) reads the first, so ``Host: evil.example`` then
    ``Host: localhost`` passed the check and was answered as ``evil.example``.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(_split_host(h)[0] for h in allowed_hosts if h.strip())

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        host = origin = None
        for name, value in scope.get("headers", []):
            if name == b"host":
                if host is not None:
                    return 400, "more than one Host header (a request names one host)"
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
        server = scope.get("server")
        if (host is not None and scope["path"] not in OPEN_PATHS and server
                and _is_loopback_address(server[0])):
            name = _split_host(host)[0]
            if not (_is_loopback_name(name) or name in self.allowed):
                return 421, (f"this server answers to localhost, 127.0.0.1 or [::1], not to "
                             f"the host {host!r} (set {ALLOWED_HOSTS_ENV} to allow a name)")
        if (origin is not None and scope.get("method", "GET") not in SAFE_METHODS
                and not _same_origin(origin, host)):
            return 403, f"cross-origin request refused: Origin {origin!r} is not this server"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, reason = refusal
        body = orjson.dumps({"detail": reason})
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def allowed_hosts_from_env() -> list[str]:
    return [h for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]


def create_app(bundle_path: str | Path, api_key: str | None = None, *, engine: str = "auto",
               limits: Limits | None = None, group: WorkerGroup | None = None,
               generation: int = 1, allowed_hosts: Iterable[str] | None = None,
               tls: TlsReload | None = None) -> FastAPI:
    """The REST app serving the bundle at ``bundle_path`` (loaded now: a bad bundle fails here).

    ``group``: this app is one of ``serve --workers`` (stats and reloads span the workers).
    ``allowed_hosts``: names besides the loopback ones that requests arriving over loopback
    may carry in ``Host`` (default: ``$DEEPWATCH_ALLOWED_HOSTS``, comma-separated).
    ``tls``: the server's certificate files, read again by ``POST /v1/reload`` (in one
    process: loaded into the running server; of several workers: checked before they are
    replaced).
    """
    service = ScoringService(bundle_path, engine=engine, limits=limits, generation=generation)
    dashboard = resources.files("deepwatch.serve").joinpath("dashboard.html").read_bytes()
    dashboard_headers = {"content-security-policy": dashboard_policy(dashboard),
                         "x-content-type-options": "nosniff"}
    # the API page: self-contained as the dashboard is (FastAPI's Swagger UI page loaded its
    # script and style from cdn.jsdelivr.net: blank offline, and a third party's script ran on
    # this origin, in the page where the key is typed)
    api_page = resources.files("deepwatch.serve").joinpath("apidocs.html").read_bytes()
    api_page_headers = {"content-security-policy": dashboard_policy(api_page),
                        "x-content-type-options": "nosniff"}
    app = FastAPI(title="deepwatch", version=__version__, docs_url=None, redoc_url=None,
                  description="Scores network records with a trained deepwatch bundle.")
    app.state.service = service
    scoring = app.state.scoring = ScoringBudget(SCORING_BODIES * service.limits.max_body_bytes)
    if tls is not None:
        tls.on_expiry(lambda at: service.metrics.set_certificate_expiry(at.timestamp()))

    @app.post("/v1/score", response_model=None, openapi_extra=_body_doc(ScoreRequest),
              responses={200: {"model": ScoreResponse}, 400: {}, 401: {}, 408: {}, 413: {},
                         422: {}, 429: {}, 503: {}},
              summary="Score records (raw lines or objects of fields)")
    async def score(request: Request) -> Response:
        try:
            body = await read_body(request, service.limits.max_body_bytes, service.limits)
            if len(body) <= INLINE_BODY_BYTES:
                out = service.score(body)
            else:  # within the bytes scored in threads at once (their JSON expands)
                await scoring.acquire(len(body))
                try:
                    out = await run_in_threadpool(service.score, body)
                finally:
                    scoring.release(len(body))
        except RequestError as exc:
            service.metrics.rejected_requests.labels(str(exc.status)).inc()
            return _error(exc.status, exc.reason)
        except DeepwatchError as exc:  # the data cannot be scored as sent
            service.metrics.rejected_requests.labels("422").inc()
            return _error(422, str(exc))
        return Response(out, media_type=JSON)

    @app.post("/v1/reload", response_model=None, openapi_extra=_body_doc(ReloadRequest),
              summary="Load a bundle (default: re-read the one served) without dropping requests")
    async def reload(request: Request) -> Response:
        try:
            body = await read_body(request, 64 * 1024, service.limits)
            target = _reload_target(body)
            # one of several workers: only check here; the workers are replaced together. One
            # process with TLS: counted once the certificate's outcome is known too
            model = await run_in_threadpool(
                service.check if group else service.reload, target,
                **({} if group is not None or tls is None else {"counted": False}))
        except RequestError as exc:
            service.metrics.rejected_requests.labels(str(exc.status)).inc()
            return _error(exc.status, exc.reason)
        except DeepwatchError as exc:
            # (the reason quotes the path sent: a character drawn as nothing, a bidirectional
            # control that would reorder the text around it, is written visibly, and a byte of
            # a served path that is not UTF-8 \xHH, where it made the answer a 500)
            reason = (f"the bundle was not loaded (still serving the previous one): "
                      f"{visible(str(exc))}")
            if tls is None or group is not None:
                return _error(422, reason)
            # one process: the certificate is read again all the same (it does not wait on
            # the bundle), and its outcome told
            certificate = await run_in_threadpool(tls.renew, "POST /v1/reload")
            service.count_reload(False)
            return Response(orjson.dumps({"detail": reason, "certificate": certificate}),
                            status_code=422, media_type=JSON)
        if group is not None:  # it loads: now every worker moves to it, one by one
            if tls is not None:  # unless the new workers could not load the certificate
                try:
                    await run_in_threadpool(tls.check)
                except DeepwatchError as exc:
                    service.metrics.reloads.labels("failed").inc()
                    log.warning("POST /v1/reload: the workers are not replaced (they serve on "
                                "with the bundle and certificate they have): %s", exc)
                    return _error(422, f"the workers were not replaced (they serve on with the "
                                       f"bundle and certificate they have): "
                                       f"{visible(str(exc))}")
            group.reload_all(model.path)  # (the parent counts the replacement's outcome)
            log.info("replacing the workers to serve %s", model.path)
            answer = {"status": "reloading", "model": model.describe(), "workers": "replacing"}
        else:
            log.info("reloaded %s (generation %d)", model.path, model.generation)
            answer = {"status": "reloaded", "model": model.describe()}
            if tls is not None:
                certificate = await run_in_threadpool(tls.renew, "POST /v1/reload")
                answer["certificate"] = certificate
                # a certificate refused is a failed reload, as of --workers (where it refuses
                # the whole reload): an alert on failed reloads sees a renewal gone wrong
                service.count_reload(certificate["status"] == "reloaded")
        # (the bundle's path as sent: escaped as /v1/stats writes it)
        return Response(escape_unsafe_text(orjson.dumps(answer)), media_type=JSON)

    @app.get("/healthz", response_model=None, summary="Liveness (no key needed)")
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok", "generation": service.model.generation,
                                      "pid": os.getpid()}), media_type=JSON)

    # HEAD too, as load balancers and uptime checkers often probe with it (a route of its own:
    # one route with both methods gives the OpenAPI schema a duplicate operation id)
    app.add_api_route("/healthz", healthz, methods=["HEAD"], response_model=None,
                      include_in_schema=False)

    @app.get("/metrics", response_model=None, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/stats", response_model=None, summary="Recent activity (the dashboard's data)")
    async def stats(request: Request) -> Response:
        snap = (merged_snapshot(group.all_stats() or [service.stats.raw()])
                if group is not None else service.stats.snapshot())
        snap["model"] = service.model.describe()
        limits = service.limits
        snap["limits"] = {"max_body_bytes": limits.max_body_bytes,
                          "max_records": limits.max_records,
                          "body_timeout_seconds": limits.body_timeout_seconds,
                          "body_min_rate": limits.body_min_rate,
                          "body_rate_grace_seconds": limits.body_rate_grace_seconds,
                          "max_requests": limits.max_requests,
                          "max_uploads": limits.max_uploads,
                          "max_client_uploads": limits.max_client_uploads,
                          "upload_wait_seconds": limits.upload_wait_seconds}
        # this process's requests in flight (each of --workers has its own, see _intake)
        snap["intake"] = {**app.state.intake.snapshot(request.scope.get(TICKET)),
                          "pid": os.getpid()}
        # recent alerts quote user agents and URLs: escaped as every JSON output of a record is
        # (and, opened on its own, never run as a page: no sniffing, no content, no framing)
        return Response(escape_unsafe_text(orjson.dumps(snap)), media_type=JSON,
                        headers=DATA_HEADERS)

    @app.get("/", response_class=HTMLResponse, summary="The live dashboard")
    async def index() -> HTMLResponse:
        return HTMLResponse(dashboard, headers=dashboard_headers)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(api_page, headers=api_page_headers)

    # innermost: a request refused by the gate or the browser guard takes no slot or upload
    app.state.intake = Intake(service.limits, service.metrics)
    app.add_middleware(IntakeGuard, intake=app.state.intake)
    app.add_middleware(BrowserGuard,  # inside the gate: a missing key is still a 401 first
                       allowed_hosts=allowed_hosts_from_env() if allowed_hosts is None
                       else allowed_hosts)
    app.add_middleware(Gate, metrics=service.metrics, api_key=api_key)
    if api_key:
        _declare_bearer_key(app)
    return app


def _declare_bearer_key(app: FastAPI) -> None:
    """The OpenAPI schema says what the gate asks for: ``Authorization: Bearer <key>`` on
    every operation but ``/healthz``. Without it the schema claimed the API open, the docs
    page had no "Authorize" button (its "Try it out" calls went without the key: 401), and
    clients made from the schema knew of no key. (The gate decides; this only documents.)"""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make_schema()
            schema.setdefault("components", {})["securitySchemes"] = {BEARER_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "The key of serve's --api-key-file"}}
            schema["security"] = [{BEARER_SCHEME: []}]
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    if path in OPEN_PATHS:
                        operation["security"] = []
                    else:
                        operation.setdefault("responses", {}).setdefault(
                            "401", {"description": "Missing or wrong API key"})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _reload_target(body: bytes) -> str | None:
    if not body.strip():
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or set(payload) - {"bundle"}:
        raise RequestError(422, "the body may only be {\"bundle\": \"<directory>\"}")
    target = payload.get("bundle")
    if target is not None and not isinstance(target, str):
        raise RequestError(422, "'bundle' must be a string (a bundle directory)")
    return target


def read_api_key(path: str | Path) -> str:
    p = Path(path)
    try:
        # utf-8-sig: a byte order mark an editor wrote first is no part of the key (it was:
        # every client sending the key in the file got 401)
        key = p.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        raise InputError(f"API key file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read API key file {p}: {exc}") from None
    if not key:
        raise UsageError(f"API key file {p} is empty")
    if any(c.isspace() for c in key):
        raise UsageError(f"API key file {p} holds whitespace inside the key; use one token")
    return key


def _install_sighup(service: ScoringService, tls: TlsReload | None = None) -> None:
    """SIGHUP re-reads the bundle, and the certificate files with ``tls``, in a thread of its
    own so requests keep being answered (each of the two whether or not the other loads)."""

    def reload() -> None:
        loaded = True
        try:  # (with TLS counted below, once the certificate's outcome is known)
            model = service.reload(counted=tls is None)
        except DeepwatchError as exc:
            loaded = False
            log.error("SIGHUP: bundle not reloaded, still serving the previous one: %s", exc)
        else:
            log.warning("SIGHUP: reloaded %s (generation %d)", model.path, model.generation)
        if tls is not None:
            # one reload, counted once: failed where the bundle or the certificate did not
            # load (--workers counts a certificate refused as a failed reload too)
            service.count_reload(loaded and tls.renew("SIGHUP")["status"] == "reloaded")

    def on_hup(signum: int, frame: Any) -> None:
        threading.Thread(target=reload, name="deepwatch-reload", daemon=True).start()

    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, on_hup)


def _exit_cleanly_on_stop() -> None:
    """uvicorn finishes the requests in flight on SIGTERM or SIGINT, then raises the signal
    again with the handler that was there before it: this one, so that a stop asked for is a
    clean exit (0; Ctrl-C ended with ``interrupted`` and 130). polars is imported first so
    that its own Ctrl-C hook, which failed the requests in flight with 500, is not chained to
    uvicorn's handlers (see :func:`~deepwatch.errors.keep_ctrl_c_from_polars`)."""
    from ..errors import keep_ctrl_c_from_polars

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        keep_ctrl_c_from_polars()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def _raw_response(status: bytes, reason: str) -> bytes:
    body = reason.encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
            + body)


# mypy checks the mixin as the protocol it is mixed into; at run time it is a plain class
if TYPE_CHECKING:
    _Protocol = H11Protocol
else:
    _Protocol = object


class _SlowClientGuard(_Protocol):
    """What uvicorn's HTTP protocols lack against clients that connect and then stall.

    uvicorn counts every open connection against ``limit_concurrency`` and has no timeout for a
    request head that never finishes arriving: 64 idle sockets would make it answer 503 to
    everyone for as long as they stay open. Here

    - uvicorn's ``limit_concurrency`` is off: the app counts requests (see ``_intake``), so a
      connection waiting for its next request head takes no slot and idle connections cannot
      starve the others;
    - a connection that has not delivered a whole request head ``HEAD_TIMEOUT_SECONDS`` after it
      opened, or after its previous answer, is closed (408 when it sent part of one);
    - with httptools, a request head over ``MAX_HEAD_BYTES`` is refused with 431 (httptools
      sets no limit; h11 refuses heads over 16 KiB itself).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's check, by connections: off
        self._head_deadline: asyncio.TimerHandle | None = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _partial_head(self) -> bool:
        """Whether part of the next request head has arrived."""
        return False

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_SECONDS, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if (self.transport.is_closing() or self.transport.get_protocol() is not self
                or not self._waiting_for_head()):
            return  # a request arrived (its answer re-arms the deadline), or a WebSocket
        if self._partial_head():
            self.transport.write(_raw_response(
                b"408 Request Timeout",
                f"the request head did not arrive within {HEAD_TIMEOUT_SECONDS:g} s"))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)


class GuardedH11(_SlowClientGuard, H11Protocol):
    """uvicorn's h11 protocol with the slow-client guard."""

    def _partial_head(self) -> bool:
        return bool(self.conn.trailing_data[0])  # bytes h11 holds until a whole head is in


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: uvicorn itself would use h11
    HttpProtocol: type[asyncio.Protocol] = GuardedH11
else:
    class GuardedHttpTools(_SlowClientGuard, HttpToolsProtocol):  # type: ignore[misc]
        """uvicorn's httptools protocol (its default) with the slow-client guard.

        httptools tells where a head begins and ends only by its callbacks, not by positions
        in the bytes it is fed, so the head limit is kept by feeding it in pieces: while a head
        is arriving, no more than it may still grow by (a head that ends within the piece is
        within the limit), otherwise at most ``MAX_HEAD_BYTES`` (a head that both begins and
        ends in the piece is within it). A head still open after a piece is counted from where
        it began in that piece, or from the piece's start when it began in an earlier one; a
        head that began after other bytes of the piece (pipelined requests, a body and the next
        head sent at once) is counted from a lower bound of those bytes (the bodies, and the
        heads before it as their request line and headers rebuilt with the least whitespace),
        so it is never counted short.
        """

        _in_head = False  # between the first byte of a request and the end of its head
        _head_bytes = 0  # of the head arriving, before the current piece (at most this many)
        _head_start = 0  # where it began in the current piece (at least; < 0: in an earlier one)
        _consumed = 0  # bytes of the current piece the parser has reported on (at least)
        _head_refused = False  # the head arriving is over the limit: nothing more is read

        def _partial_head(self) -> bool:
            return self._in_head

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_start = True, self._consumed

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._consumed = max(self._consumed, self._head_start + self._least_head_size())
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._consumed += len(body)
            super().on_body(body)

        def _least_head_size(self) -> int:
            """The fewest bytes the head just parsed can have taken: ``METHOD URL HTTP/x.y``
            and each ``name:value`` line, with no optional whitespace."""
            request_line = len(self.parser.get_method()) + len(self.url) + len(" HTTP/1.1\r\n") + 1
            return request_line + sum(len(n) + len(v) + 3 for n, v in self.headers) + 2

        def data_received(self, data: bytes) -> None:
            while (data and not self._head_refused and not self.transport.is_closing()
                   and self.transport.get_protocol() is self):  # not after a WebSocket upgrade
                room = MAX_HEAD_BYTES - self._head_bytes if self._in_head else MAX_HEAD_BYTES
                piece, data = data[:room], data[room:]
                self._consumed, self._head_start = 0, -self._head_bytes
                super().data_received(piece)
                if not self._in_head or self.transport.is_closing():
                    continue
                self._head_bytes = len(piece) - self._head_start
                if self._head_bytes >= MAX_HEAD_BYTES:  # and the head has not ended: it is over
                    self._head_refused = True
                    if self._answers_owed():
                        self.flow.pause_reading()  # the 431 follows them (see below)
                    else:
                        self._refuse_head()

        def _answers_owed(self) -> bool:
            """Whether requests before the one arriving have not had their whole answer."""
            return not self._waiting_for_head() or bool(self.pipeline)

        def _refuse_head(self) -> None:
            self.transport.write(_raw_response(
                b"431 Request Header Fields Too Large",
                f"the request head is over the limit of {MAX_HEAD_BYTES:,} bytes"))
            self.transport.close()

        def on_response_complete(self) -> None:
            """A head refused behind pipelined requests is answered after them, in order."""
            super().on_response_complete()
            if (self._head_refused and not self.transport.is_closing()
                    and not self._answers_owed()):
                self._refuse_head()

    HttpProtocol = GuardedHttpTools


def bound_tls_handshakes() -> None:
    """Give TLS handshakes ``HEAD_TIMEOUT_SECONDS`` (read as each server starts), not asyncio's
    60 s: the request-head deadline of ``_SlowClientGuard`` starts only once the handshake is
    done (the HTTP protocol sees the connection only then), so a client that opened a TCP
    connection and sent nothing, or part of a ClientHello, held it for a minute. For every
    uvicorn server of this process (``run_server``, and each worker of ``--workers``).

    The deadline is asyncio's own ``ssl_handshake_timeout`` of ``loop.create_server`` (uvloop's
    too), which uvicorn sets no value for and has no setting for. uvicorn calls
    ``loop.create_server(..., ssl=...)`` in ``Server.startup``, on the running loop; so for the
    time of that call (and only then) the loop's ``create_server`` is shadowed by one that adds
    the timeout where a server has ``ssl``. The other ways are more fragile: a copy of
    ``startup`` (most of 90 lines of uvicorn, which change between versions), or building the TLS
    transport ourselves from asyncio's private ``sslproto``. Should a uvicorn version make its
    listeners otherwise, the warning below says that handshakes are left with no deadline of
    ours (and the tests fail)."""
    from uvicorn.server import Server

    startup = Server.startup
    if getattr(startup, "bounds_handshakes", False):
        return

    async def startup_bounding_handshakes(self: Server, sockets: Any = None) -> None:
        if not self.config.is_ssl:
            await startup(self, sockets)
            return
        loop = asyncio.get_running_loop()
        create_server = loop.create_server
        bounded: list[float] = []

        def create_tls_server(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
                kwargs["ssl_handshake_timeout"] = HEAD_TIMEOUT_SECONDS
                bounded.append(HEAD_TIMEOUT_SECONDS)
            return create_server(*args, **kwargs)

        shadowed = vars(loop).get("create_server")  # (none: the loop class's method)
        loop.create_server = create_tls_server  # type: ignore[method-assign]
        try:
            await startup(self, sockets)
        finally:
            if shadowed is None:
                del loop.create_server
            else:
                loop.create_server = shadowed  # type: ignore[method-assign]
        if self.started and not bounded:
            log.warning("TLS handshakes have no deadline of deepwatch's (asyncio's 60 s "
                        "applies): this uvicorn version does not start its listeners with "
                        "loop.create_server(ssl=...)")

    startup_bounding_handshakes.bounds_handshakes = True  # type: ignore[attr-defined]
    Server.startup = startup_bounding_handshakes  # type: ignore[method-assign]


def uvicorn_options(forwarded_allow_ips: Iterable[str] = (),
                    tls: dict[str, Any] | None = None) -> dict[str, Any]:
    """The uvicorn settings of ``deepwatch serve`` (one process or each worker).

    ``forwarded_allow_ips``: addresses or networks of reverse proxies whose ``X-Forwarded-For``
    names the client (the address the per-client cap counts by); none by default, where
    uvicorn would trust the header from 127.0.0.1, so any local program could pick its own
    address. ``tls``: uvicorn's ``ssl_*`` settings, from :func:`tls_options` (none: plain
    HTTP).
    """
    proxies = [p.strip() for p in forwarded_allow_ips if p.strip()]
    return {"log_level": "warning", "access_log": False, "server_header": False,
            "timeout_graceful_shutdown": 10, "http": HttpProtocol,
            "proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None,
            **(tls or {})}


class _NoPassword(Exception):
    """An encrypted key and no password file: raised by the password callback instead of
    OpenSSL asking for the password on the terminal."""


def _read_tls_file(path: str, option: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{option} file {p} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read {option} file {p}: {exc.strerror or exc}") from None


def _read_key_password(path: str) -> str:
    """The first line of the file, as ``openssl -passin file:`` reads it (never echoed)."""
    first = _read_tls_file(path, "--tls-key-password-file").split(b"\n", 1)[0].rstrip(b"\r")
    try:
        password = first.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--tls-key-password-file {path} is not UTF-8 text") from None
    if not password:
        raise UsageError(f"--tls-key-password-file {path} is empty (its first line is the "
                         f"password)")
    return password


def _warn_if_others_read(files: list[tuple[str, str | None]]) -> None:
    """A warning for each secret file (the private key, its password) that users other than
    its owner may read, as ssh gives for a private key: the key lets anyone pose as this
    service."""
    for option, path in files:
        if path is None:
            continue
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue  # (reading it says what is wrong)
        if mode & 0o077:
            log.warning("%s %s may be read by other users (mode %04o): chmod 600 %s",
                        option, path, mode, path)


class _TlsPair:
    """The bytes of a certificate chain and its key, read once (and the key's password): what
    is checked is what is loaded, whatever happens to the files meanwhile."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, password: str | None) -> None:
        self.cert_pem, self.key_pem, self.password = cert_pem, key_pem, password

    @contextlib.contextmanager
    def files(self) -> Iterator[tuple[str, str]]:
        """The two as files OpenSSL can open (it reads nothing else): anonymous memory files
        where the system has them (Linux, with /proc), else in a private temporary
        directory."""
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            fds = [os.memfd_create(f"deepwatch-tls-{name}", 0) for name in ("cert", "key")]
            try:
                for fd, data in zip(fds, (self.cert_pem, self.key_pem), strict=True):
                    _write_all(fd, data)
                yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
            finally:
                for fd in fds:
                    os.close(fd)
            return
        with tempfile.TemporaryDirectory(prefix="deepwatch-tls-") as d:  # mode 0700
            paths = [os.path.join(d, name) for name in ("cert.pem", "key.pem")]
            for path, data in zip(paths, (self.cert_pem, self.key_pem), strict=True):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            yield paths[0], paths[1]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def tls_options(cert: str | None, key: str | None,
                password_file: str | None = None) -> dict[str, Any]:
    """uvicorn's ``ssl_*`` settings for ``serve --tls-cert/--tls-key`` ({} for neither),
    checked here the way uvicorn will load them, so that a file missing or unreadable, one that
    is not PEM, an encrypted key without its password (or with a wrong one) or a key that is
    not the certificate's is one error line before anything starts, not a traceback from the
    server or from each worker (or OpenSSL asking for the password on the terminal)."""
    if cert is None and key is None:
        if password_file is not None:
            raise UsageError("--tls-key-password-file goes with --tls-cert and --tls-key")
        return {}
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key",
                                                                        "--tls-cert")
        raise UsageError(f"{given} needs {missing}: give both (the certificate and its private "
                         f"key, PEM files), or neither")
    return checked_tls(cert, key, password_file)[0]


def checked_tls(cert: str, key: str, password_file: str | None = None
                ) -> tuple[dict[str, Any], _TlsPair]:
    """uvicorn's ``ssl_*`` settings for a certificate and key given (see :func:`tls_options`),
    and the bytes checked: ``--workers`` hands these to its workers, which load them where the
    files do not load when they start (a renewal half-way)."""
    pair = _read_tls_pair(cert, key, password_file)
    # absolute, symlinks kept: a reload reads what a link (Let's Encrypt's live/) points to then
    options: dict[str, Any] = {"ssl_certfile": os.path.abspath(cert),
                               "ssl_keyfile": os.path.abspath(key)}
    if pair.password is not None:  # (uvicorn passes it to OpenSSL only; it is never logged)
        options["ssl_keyfile_password"] = pair.password
    return options, pair


def _read_tls_pair(cert: str, key: str, password_file: str | None) -> _TlsPair:
    """The files read once and checked as uvicorn loads them (see :func:`tls_options`); the
    bytes checked, to be loaded as they are."""
    password = _read_key_password(password_file) if password_file is not None else None
    cert_pem = _read_tls_file(cert, "--tls-cert")
    key_pem = _read_tls_file(key, "--tls-key")
    _warn_if_others_read([("--tls-key", key), ("--tls-key-password-file", password_file)])
    if b"CERTIFICATE-----" not in cert_pem:
        raise UsageError(f"--tls-cert {cert} holds no PEM certificate (-----BEGIN "
                         f"CERTIFICATE-----)")
    if b"PRIVATE KEY-----" not in key_pem:
        raise UsageError(f"--tls-key {key} holds no PEM private key (-----BEGIN PRIVATE "
                         f"KEY-----)")
    pair = _TlsPair(cert_pem, key_pem, password)
    with pair.files() as (cert_file, key_file):
        _check_pair(pair, cert, key, password_file, cert_file, key_file)
    validity = certificate_validity(cert_pem)
    warning = None if validity is None else validity_warning("--tls-cert", cert, *validity)
    if warning is not None:
        log.warning("%s", warning)
    return pair


def _check_pair(pair: _TlsPair, cert: str, key: str, password_file: str | None,
                cert_file: str, key_file: str) -> None:
    """Load ``pair`` (from ``cert_file`` and ``key_file``) into a context of its own; errors
    name the files given (``cert``, ``key``, ``password_file``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert_file)  # parses the certificates alone
    except ssl.SSLError as exc:
        raise UsageError(f"--tls-cert {cert}: the certificate cannot be read "
                         f"({exc.reason or exc})") from None
    password = pair.password
    encrypted = b"ENCRYPTED" in pair.key_pem

    def ask() -> str:
        if password is None:
            raise _NoPassword
        return password

    try:
        context.load_cert_chain(cert_file, key_file, ask)
    except _NoPassword:
        raise UsageError(f"--tls-key {key} is encrypted: give its password (the first line of "
                         f"a file) with --tls-key-password-file") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise UsageError(f"--tls-key {key} is not the private key of the certificate in "
                             f"--tls-cert {cert}") from None
        if encrypted and password is not None:
            raise UsageError(f"--tls-key {key} cannot be decrypted with the password in "
                             f"--tls-key-password-file {password_file} (or it is damaged)"
                             ) from None
        raise UsageError(f"--tls-key {key}: the private key cannot be read with the "
                         f"certificate in {cert} ({exc.reason or exc})") from None


def certificate_validity(pem: bytes) -> tuple[datetime, datetime] | None:
    """When the first certificate of ``pem`` is valid (from, to), or None where its validity
    cannot be read (OpenSSL, which has loaded it, is then the judge)."""
    try:
        return validity(pem)
    except ValueError as exc:
        log.debug("the certificate's validity could not be read: %s", exc)
        return None


#: A renewal renames the certificate and then its key into place: a server (or a worker of
#: ``--workers``) that loads them in between finds a certificate without its key. It tries
#: again this many times, this far apart, before the error stands.
TLS_LOAD_TRIES = 10
TLS_LOAD_PAUSE_SECONDS = 0.2


def load_tls_context(default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's context for the certificate files (``default``, its own factory), tried again
    for a moment where they do not load: the files checked before the server (or worker)
    started may be half-way through a renewal by the time it reads them."""
    for attempt in range(1, TLS_LOAD_TRIES + 1):
        try:
            return default()
        except (ssl.SSLError, OSError) as exc:  # (OSError: a file missing for a moment)
            if attempt == TLS_LOAD_TRIES:
                raise
            if attempt == 1:  # once, not at every try
                log.info("the certificate files do not load (%s): trying again for %g s (a "
                         "renewal half-way?)", _ssl_reason(exc),
                         (TLS_LOAD_TRIES - 1) * TLS_LOAD_PAUSE_SECONDS)
            time.sleep(TLS_LOAD_PAUSE_SECONDS)
    raise AssertionError("unreachable")


def _ssl_reason(exc: OSError) -> str:
    """OpenSSL's short reason (``KEY_VALUES_MISMATCH``), or the system's (``No such file``)."""
    return str(getattr(exc, "reason", None) or exc.strerror or exc)


class TlsReload:
    """``--tls-cert``/``--tls-key`` (and ``--tls-key-password-file``) read again on a reload.

    :meth:`check` reads and checks the files as they are now, as :func:`tls_options` does at
    start (a pair that cannot work is the same one-line reason). In one process,
    :meth:`renew` then loads them into the running server's SSL context, the one uvicorn made
    (caught by :meth:`context_factory`, its ``ssl_context_factory``): new handshakes get the
    new certificate, connections already open keep theirs. Of ``--workers``, a worker only
    checks (the parent replaces the workers, which read the files when they start).
    """

    def __init__(self, cert: str, key: str, password_file: str | None = None, *,
                 served: bytes | None = None) -> None:
        """``served``: the certificate (PEM) the server loaded, where it is not the file as
        it is now (a worker of ``--workers`` that found the files broken loads the bytes its
        parent checked instead)."""
        self.cert, self.key, self.password_file = cert, key, password_file
        self._served = served
        self._context: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._renewing = threading.Lock()
        #: called with the served certificate's expiry (its notAfter) now and after each
        #: reload that loads one (the app's ``/metrics`` gauge)
        self._on_expiry: Callable[[datetime], None] | None = None

    def on_expiry(self, call: Callable[[datetime], None]) -> None:
        """Call ``call`` with the expiry of the certificate in the files now (what this server
        loads as it starts), and again after each reload that loads a new one."""
        self._on_expiry = call
        self._tell_expiry(self._served)

    def _tell_expiry(self, pem: bytes | None = None) -> None:
        """The expiry of the certificate ``pem`` (default: the one in the file now)."""
        if self._on_expiry is None:
            return
        if pem is None:
            try:
                pem = Path(self.cert).read_bytes()
            except OSError:
                return
        found = certificate_validity(pem)
        if found is not None:
            self._on_expiry(found[1])

    def context_factory(self, config: Any, default: Any) -> ssl.SSLContext:
        """uvicorn's ``ssl_context_factory``: its own context (``default()``), kept here with
        the event loop that serves it (uvicorn calls this in the loop, as the server starts)."""
        try:
            context = load_tls_context(default)
        except (ssl.SSLError, OSError) as exc:
            raise self._unloadable(exc) from None
        self._context = context
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        return context

    def _unloadable(self, exc: OSError) -> DeepwatchError:
        """The one-line error for files that passed the start-up check but no longer load as
        the server starts (past the tries of :func:`load_tls_context`): the check's own reason
        for them as they are now (its warnings not repeated), else OpenSSL's. It ended in
        uvicorn's traceback."""
        waited = (TLS_LOAD_TRIES - 1) * TLS_LOAD_PAUSE_SECONDS
        kind: type[DeepwatchError] = UsageError
        log.disabled = True  # (the check's warnings were given at start)
        try:
            self.check()
        except DeepwatchError as found:
            kind, reason = type(found), str(found)
        else:  # whole again by now: what OpenSSL said when it tried
            reason = f"they did not load ({_ssl_reason(exc)})"
        finally:
            log.disabled = False
        return kind(f"the certificate files changed after the start-up check and did not "
                    f"load for {waited:g} s as the server started: {reason}; put a whole "
                    f"certificate and key in place and start again")

    def check(self) -> dict[str, Any]:
        """uvicorn's ``ssl_*`` settings for the files as they are now; UsageError or InputError
        (one line, never the password) when they cannot work."""
        return tls_options(self.cert, self.key, self.password_file)

    def renew(self, asked_by: str) -> dict[str, Any]:
        """Check the files, then load them into the running server's context; the outcome
        (``{"status": "reloaded"}``, or ``"kept"`` with the ``reason``), logged. A pair that
        fails the check leaves the context alone: new connections still get the certificate
        before. What is loaded is the bytes checked, read once: files replaced between the
        check and the loading (a renewal renaming the certificate, then the key, into place)
        cannot get a certificate without its key into the context, which failed every new
        handshake. Reloads run one at a time, so the last files read are the ones served.
        Call it from a thread other than the event loop's (the loading itself is done in the
        loop, between handshakes)."""
        with self._renewing:
            try:
                pair = _read_tls_pair(self.cert, self.key, self.password_file)
            except DeepwatchError as exc:
                log.warning("%s: certificate not reloaded, new connections still get the "
                            "previous one: %s", asked_by, exc)
                return {"status": "kept", "reason": str(exc)}
            loop = self._loop
            try:
                if loop is not None and loop.is_running():
                    asyncio.run_coroutine_threadsafe(self._load(pair), loop).result(timeout=60)
                else:  # not serving (yet, or any more): nothing can be handshaking
                    self._load_now(pair)
            except (ssl.SSLError, OSError) as exc:  # (bytes that loaded once: not expected)
                log.error("%s: the certificate files passed the check but could not be "
                          "loaded (%s): new TLS connections may fail until a reload with a "
                          "good pair", asked_by, exc)
                return {"status": "failed",
                        "reason": f"the files passed the check but could not be loaded: {exc}"}
            log.info("%s: certificate reloaded from %s (new connections get it, open ones "
                     "keep theirs)", asked_by, self.cert)
            self._tell_expiry(pair.cert_pem)
            return {"status": "reloaded"}

    async def _load(self, pair: _TlsPair) -> None:
        self._load_now(pair)

    def _load_now(self, pair: _TlsPair) -> None:
        if self._context is None:  # the server has not started: it reads the files itself
            return
        with pair.files() as (cert_file, key_file):
            self._context.load_cert_chain(cert_file, key_file, pair.password)


def cleartext_warning(address: str, tls: bool, proxied: bool = False) -> str | None:
    """The warning for a service listening on ``address`` (the bound address, or a host name)
    without TLS beyond loopback; None where there is nothing to say."""
    name = address.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if tls or _is_loopback_name(name.rstrip(".")):
        return None
    hop = (" (with --forwarded-allow-ips: the hop from a proxy on another host to here is "
           "in clear text too)" if proxied else "")
    return (f"listening on {address} without TLS: API keys and records cross the network in "
            f"clear text, and a key seen on the way can be replayed{hop}; give --tls-cert and "
            f"--tls-key, or listen on loopback behind a TLS-terminating reverse proxy")


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, made here so that an address in use or one this machine
    does not have is one clear error (uvicorn would log it and exit as a startup failure)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_server(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000,
               api_key_file: str | None = None, *, engine: str = "auto",
               limits: Limits | None = None, workers: int = 1,
               forwarded_allow_ips: Iterable[str] = (), tls_cert: str | None = None,
               tls_key: str | None = None, tls_key_password_file: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (in-flight requests finish first).

    ``forwarded_allow_ips``: reverse proxies trusted to name the client (see
    :func:`uvicorn_options`). ``tls_cert``, ``tls_key`` (PEM files, both or neither) and
    ``tls_key_password_file``: serve HTTPS (see :func:`tls_options`)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {port}")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    limits = limits or Limits()
    _check_limits(limits)
    proxies = _check_proxies(forwarded_allow_ips)
    key = read_api_key(api_key_file) if api_key_file else None
    pair = None
    if workers > 1 and tls_cert is not None and tls_key is not None:
        # the bytes checked are the ones the workers load (see run_workers)
        tls, pair = checked_tls(tls_cert, tls_key, tls_key_password_file)
    else:
        tls = tls_options(tls_cert, tls_key, tls_key_password_file)
    if workers > 1:
        _check_bundle(bundle)  # one clear error here, not one per worker
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]  # the one the system chose, for --port 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    if key is None and not _is_loopback_address(sock.getsockname()[0]):  # the bound address
        log.warning("listening on %s without an API key: anyone who can reach it can score "
                    "and reload", host)
    cleartext = cleartext_warning(sock.getsockname()[0], bool(tls), proxied=bool(proxies))
    if cleartext is not None:
        log.warning("%s", cleartext)
    options = uvicorn_options(proxies, tls)
    scheme = "https" if tls else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/"
    if workers > 1:
        from ._workers import run_workers

        log.warning("serving %s at %s with %d workers", bundle, url, workers)
        run_workers(bundle, sock, workers, host=host, port=port, key_file=api_key_file,
                    engine=engine, limits=limits, uvicorn_options=options, tls_pair=pair,
                    tls_files=None if tls_cert is None or tls_key is None else {
                        "cert": os.path.abspath(tls_cert), "key": os.path.abspath(tls_key),
                        "password_file": None if tls_key_password_file is None
                        else os.path.abspath(tls_key_password_file)})
        return
    reloader = None if tls_cert is None or tls_key is None else TlsReload(
        tls_cert, tls_key, tls_key_password_file)
    app = create_app(bundle, api_key=key, engine=engine, limits=limits, tls=reloader)
    if reloader is not None:  # uvicorn makes the context; a reload loads new files into it
        options["ssl_context_factory"] = reloader.context_factory
    config = uvicorn.Config(app, host=host, port=port, **options)
    server = uvicorn.Server(config)
    bound_tls_handshakes()
    _install_sighup(app.state.service, reloader)
    _exit_cleanly_on_stop()
    model = app.state.service.model
    log.warning("serving %s (%s on %s, %s) at %s", model.path, model.detector.kind,
                model.format, model.detector.engine, url)
    server.run(sockets=[sock])


def _check_limits(limits: Limits) -> None:
    """The limits ``serve`` takes from its options, each refused in the option's words."""
    if not (math.isfinite(limits.body_timeout_seconds) and limits.body_timeout_seconds > 0):
        raise UsageError(f"--body-timeout must be a number of seconds above 0, not "
                         f"{limits.body_timeout_seconds:g}")
    if not (math.isfinite(limits.body_min_rate) and limits.body_min_rate >= 0):
        raise UsageError(f"--body-min-rate must be a number of bytes a second, 0 or more, not "
                         f"{limits.body_min_rate:g}")
    if not (math.isfinite(limits.body_rate_grace_seconds)
            and limits.body_rate_grace_seconds > 0):
        raise UsageError(f"--body-rate-grace must be a number of seconds above 0, not "
                         f"{limits.body_rate_grace_seconds:g}")
    if limits.max_uploads < 1:
        raise UsageError(f"--max-uploads must be 1 or more, not {limits.max_uploads}")
    if limits.max_client_uploads < 0:
        raise UsageError(f"--max-client-uploads must be 0 (no cap) or more, not "
                         f"{limits.max_client_uploads}")
    if not (math.isfinite(limits.upload_wait_seconds) and limits.upload_wait_seconds >= 0):
        raise UsageError(f"--upload-wait must be a number of seconds, 0 (429 at once) or "
                         f"more, not {limits.upload_wait_seconds:g}")


def _check_proxies(values: Iterable[str]) -> list[str]:
    """``--forwarded-allow-ips`` items (comma-separated in each value): addresses, networks
    or ``*``."""
    proxies = [p.strip() for v in values for p in v.split(",") if p.strip()]
    if "*" in proxies:
        return ["*"]  # uvicorn trusts every peer only for a lone "*"
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy)  # as uvicorn reads it (host bits set: refused)
        except ValueError:
            raise UsageError(f"--forwarded-allow-ips: {proxy!r} is not an IP address or "
                             f"network (nor *)") from None
    return proxies


def _check_bundle(bundle: str | Path) -> None:
    """Refuse a bundle the workers could not load before starting them: the same loading they
    do (checksums, format, an inference session), then let it go."""
    ScoringService(bundle)
