"""The REST service: FastAPI on uvicorn (see the REST contract in ARCHITECTURE.md).

``POST /v1/score`` scores raw lines or JSON objects of fields through ``Detector.score_batch``;
``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /`` (the live dashboard, polling
``GET /v1/stats``), ``GET /docs``; ``POST /v1/reload`` and SIGHUP load a new bundle without
dropping a request. With an API key every endpoint but ``/healthz`` needs
``Authorization: Bearer <key>``.

The score endpoint reads the body itself (no pydantic on the hot path) and answers with orjson
bytes; the request/response models below only document it in the OpenAPI page.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import DeepwatchError, InputError, UsageError
from ._auth import Gate
from ._metrics import CONTENT_TYPE
from ._request import RequestError
from ._service import Limits, ScoringService
from ._stats import merged_snapshot
from ._workers import WorkerGroup

log = logging.getLogger("deepwatch.serve")
JSON = "application/json"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: Bodies up to this size (a few dozen records) are scored on the event loop itself: about a
#: millisecond of work, less than the two thread switches that handing it to the pool costs (and
#: those switches are what stretches the tail on busy cores). Larger bodies go to the pool, so
#: the loop keeps answering while they score.
INLINE_BODY_BYTES = 32 * 1024
#: Connections and requests served at once; past it uvicorn answers 503 at once. With the body
#: limit this bounds the memory an overload can take (64 x 16 MiB of bodies at most).
MAX_CONCURRENT_REQUESTS = 64


class ScoreRequest(BaseModel):
    format: str | None = Field(None, description="Input format; must be the bundle's (default)")
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


def _error(status: int, reason: str) -> Response:
    return Response(orjson.dumps({"detail": reason}), status_code=status, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (before reading it when it says so)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if size > limit:
            raise RequestError(413, f"the body is {size:,} bytes; the limit is {limit:,}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(bundle_path: str | Path, api_key: str | None = None, *, engine: str = "auto",
               limits: Limits | None = None, group: WorkerGroup | None = None,
               generation: int = 1) -> FastAPI:
    """The REST app serving the bundle at ``bundle_path`` (loaded now: a bad bundle fails here).

    ``group``: this app is one of ``serve --workers`` (stats and reloads span the workers).
    """
    service = ScoringService(bundle_path, engine=engine, limits=limits, generation=generation)
    dashboard = resources.files("deepwatch.serve").joinpath("dashboard.html").read_bytes()
    app = FastAPI(title="deepwatch", version=__version__, redoc_url=None,
                  description="Scores network records with a trained deepwatch bundle.")
    app.state.service = service

    @app.post("/v1/score", response_model=None, openapi_extra=_body_doc(ScoreRequest),
              responses={200: {"model": ScoreResponse}, 400: {}, 401: {}, 413: {}, 422: {}},
              summary="Score records (raw lines or objects of fields)")
    async def score(request: Request) -> Response:
        try:
            body = await read_body(request, service.limits.max_body_bytes)
            if len(body) <= INLINE_BODY_BYTES:
                out = service.score(body)
            else:
                out = await run_in_threadpool(service.score, body)
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
            body = await read_body(request, 64 * 1024)
            target = _reload_target(body)
            # one of several workers: only check here; the workers are replaced together
            model = await run_in_threadpool(service.check if group else service.reload, target)
        except RequestError as exc:
            return _error(exc.status, exc.reason)
        except DeepwatchError as exc:
            return _error(422, f"the bundle was not loaded (still serving the previous "
                               f"one): {exc}")
        if group is not None:  # it loads: now every worker moves to it, one by one
            group.reload_all(model.path)
            service.metrics.reloads.labels("ok").inc()
            log.info("replacing the workers to serve %s", model.path)
            answer = {"status": "reloading", "model": model.describe(), "workers": "replacing"}
        else:
            log.info("reloaded %s (generation %d)", model.path, model.generation)
            answer = {"status": "reloaded", "model": model.describe()}
        return Response(orjson.dumps(answer), media_type=JSON)

    @app.get("/healthz", response_model=None, summary="Liveness (no key needed)")
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok", "generation": service.model.generation,
                                      "pid": os.getpid()}), media_type=JSON)

    @app.get("/metrics", response_model=None, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/stats", response_model=None, summary="Recent activity (the dashboard's data)")
    async def stats() -> Response:
        snap = (merged_snapshot(group.all_stats() or [service.stats.raw()])
                if group is not None else service.stats.snapshot())
        snap["model"] = service.model.describe()
        snap["limits"] = {"max_body_bytes": service.limits.max_body_bytes,
                          "max_records": service.limits.max_records}
        return Response(orjson.dumps(snap), media_type=JSON)

    @app.get("/", response_class=HTMLResponse, summary="The live dashboard")
    async def index() -> HTMLResponse:
        return HTMLResponse(dashboard)

    app.add_middleware(Gate, metrics=service.metrics, api_key=api_key)
    return app


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
        key = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise InputError(f"API key file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read API key file {p}: {exc}") from None
    if not key:
        raise UsageError(f"API key file {p} is empty")
    if any(c.isspace() for c in key):
        raise UsageError(f"API key file {p} holds whitespace inside the key; use one token")
    return key


def _install_sighup(service: ScoringService) -> None:
    """SIGHUP re-reads the bundle, in a thread of its own so requests keep being answered."""

    def reload() -> None:
        try:
            model = service.reload()
        except DeepwatchError as exc:
            log.error("SIGHUP: bundle not reloaded, still serving the previous one: %s", exc)
            return
        log.warning("SIGHUP: reloaded %s (generation %d)", model.path, model.generation)

    def on_hup(signum: int, frame: Any) -> None:
        threading.Thread(target=reload, name="deepwatch-reload", daemon=True).start()

    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, on_hup)


def _exit_cleanly_on_sigterm() -> None:
    """uvicorn finishes the requests in flight on SIGTERM, then raises the signal again with the
    handler that was there before it: this one, so that a stop asked for is a clean exit (0)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


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
               limits: Limits | None = None, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM (in-flight requests finish first)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {port}")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    key = read_api_key(api_key_file) if api_key_file else None
    if workers > 1:
        _check_bundle(bundle)  # one clear error here, not one per worker
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]  # the one the system chose, for --port 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    if host not in LOOPBACK and key is None:
        log.warning("listening on %s without an API key: anyone who can reach it can score "
                    "and reload", host)
    options: dict[str, Any] = {"log_level": "warning", "access_log": False,
                               "server_header": False, "timeout_graceful_shutdown": 10,
                               "limit_concurrency": MAX_CONCURRENT_REQUESTS}
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    if workers > 1:
        from ._workers import run_workers

        log.warning("serving %s at %s with %d workers", bundle, url, workers)
        run_workers(bundle, sock, workers, host=host, port=port, key_file=api_key_file,
                    engine=engine, limits=limits or Limits(), uvicorn_options=options)
        return
    app = create_app(bundle, api_key=key, engine=engine, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, **options)
    server = uvicorn.Server(config)
    _install_sighup(app.state.service)
    _exit_cleanly_on_sigterm()
    model = app.state.service.model
    log.warning("serving %s (%s on %s, %s) at %s", model.path, model.detector.kind,
                model.format, model.detector.engine, url)
    server.run(sockets=[sock])


def _check_bundle(bundle: str | Path) -> None:
    """Refuse a bundle the workers could not load before starting them: the same loading they
    do (checksums, format, an inference session), then let it go."""
    ScoringService(bundle)
