"""The REST service against web pages and stalling clients, on a real uvicorn server with the
settings ``deepwatch serve`` uses (its HTTP protocol included), spoken to over real sockets.

- cross-site requests and DNS rebinding: JSON bodies only (415), loopback ``Host`` names only
  (421), a foreign ``Origin`` refused on POST (403);
- idle or slow clients: connections that never finish a request head take no request slot and
  are closed; a body that takes longer than ``--body-timeout`` to arrive gets a 408, however
  steadily its bytes trickle in (slowloris); an oversized head a 431;
- slow senders against the request slots (``_intake``): bodies arriving hold no slot, so more
  slowloris clients than slots leave a well-behaved client served; one client address may send
  only so many bodies at once (429), the uploads and the bytes held are bounded (503), a body
  under the minimum rate is cut off (408), and ``X-Forwarded-For`` counts only from a proxy
  that ``--forwarded-allow-ips`` names.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ThreadServer, free_port, stop_server, wait_healthy

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.errors import UsageError  # noqa: E402
from deepwatch.serve import app as app_module  # noqa: E402
from deepwatch.serve._service import Limits  # noqa: E402
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

KEY = "security-key-0123456789"
JSON_TYPE = {"content-type": "application/json"}
LINE = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00")


class Server(ThreadServer):
    """uvicorn in a thread, with ``deepwatch serve``'s options (``overrides`` on top)."""

    def __init__(self, app: Any, **overrides: Any) -> None:
        super().__init__(app, **{**uvicorn_options(), "timeout_graceful_shutdown": 2,
                                 **overrides})

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[Server]:
    with Server(create_app(kdd_bundle, allowed_hosts=["deepwatch.internal"])) as srv:
        yield srv


def _generation(srv: Server) -> int:
    return int(httpx.get(srv.url + "/healthz").json()["generation"])


# -- cross-site requests and DNS rebinding -------------------------------------------------------

def test_the_audited_cross_site_reload_is_refused(server: Server) -> None:
    """The audit's request: a page of evil.example, resolved to 127.0.0.1, posting text/plain."""
    before = _generation(server)
    r = httpx.post(server.url + "/v1/reload", content=b'{"bundle": "/tmp/other"}',
                   headers={"Origin": "http://evil.example", "Host": "evil.example",
                            "Content-Type": "text/plain"})
    assert r.status_code == 421 and "evil.example" in r.json()["detail"]
    # the same page with the server's own name (a plain cross-site request, no rebinding)
    r = httpx.post(server.url + "/v1/reload", content=b"{}",
                   headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "Origin" in r.json()["detail"]
    assert _generation(server) == before


@pytest.mark.parametrize("path", ["/v1/score", "/v1/reload"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=utf-8",
                                          "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_post_bodies_must_be_declared_json(server: Server, path: str,
                                           content_type: str | None) -> None:
    before = _generation(server)
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(server.url + path, content=b'{"records": []}', headers=headers)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["detail"]
    assert _generation(server) == before


def test_json_bodies_and_bodiless_reloads_still_pass(server: Server) -> None:
    for content_type in ["application/json", "Application/JSON; charset=utf-8"]:
        r = httpx.post(server.url + "/v1/score", content=f'{{"records": ["{LINE}"]}}'.encode(),
                       headers={"Content-Type": content_type})
        assert r.status_code == 200 and len(r.json()["results"]) == 1
    before = _generation(server)
    assert httpx.post(server.url + "/v1/reload").status_code == 200  # no body: re-read
    assert _generation(server) == before + 1
    # an empty form still declares its type: refused
    r = httpx.post(server.url + "/v1/reload", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "10.0.0.1", "[::2]:80", ""])
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/stats"), ("GET", "/"),
                                              ("GET", "/metrics"), ("POST", "/v1/score")])
def test_a_foreign_host_name_is_refused_on_loopback(server: Server, host: str, method: str,
                                                    path: str) -> None:
    r = httpx.request(method, server.url + path, json={"records": []}, headers={"Host": host})
    assert r.status_code == 421, r.text
    assert "localhost" in r.json()["detail"]


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:{port}", "127.0.0.1:{port}",
                                  "127.0.0.2", "[::1]:{port}", "app.localhost:{port}",
                                  "localhost.", "deepwatch.internal:{port}"])
def test_loopback_and_allowed_host_names_are_served(server: Server, host: str) -> None:
    headers = {"Host": host.format(port=server.port)}
    assert httpx.get(server.url + "/v1/stats", headers=headers).status_code == 200
    r = httpx.post(server.url + "/v1/score", json={"records": [LINE]}, headers=headers)
    assert r.status_code == 200, r.text


def test_healthz_answers_any_host(server: Server) -> None:
    r = httpx.get(server.url + "/healthz", headers={"Host": "probe.example"})
    assert r.status_code == 200 and r.json()["status"] == "ok"


# -- the dashboard's page runs its own code only -----------------------------------------------

#: Markup that, were it ever to reach the dashboard's page (the page draws user agents, URLs
#: and labels as text), would run: an ``onerror``, an inline script, an ``onload``.
INJECTED = ("<img src=x onerror=\"document.title='pwned by onerror'\">"
            "<script>document.title='pwned by script'</script>"
            "<svg onload=\"document.title='pwned by onload'\"></svg>")


def test_the_dashboard_and_its_data_carry_a_content_security_policy(server: Server) -> None:
    """No policy was sent: any markup that got into the page would have run. Now only the
    page's own inline script and style (by hash) run, it fetches only from this server and no
    site may frame it; /v1/stats, which quotes the senders' text, is never run as a page."""
    import base64
    import hashlib
    import re

    page = httpx.get(server.url + "/")
    policy = {d.split()[0]: d.split()[1:]
              for d in page.headers["content-security-policy"].split("; ")}
    for tag in ("script", "style"):
        [inline] = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert policy[f"{tag}-src"] == [f"'sha256-{digest}'"]
    assert policy["default-src"] == policy["frame-ancestors"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"] and policy["base-uri"] == ["'none'"]
    assert page.headers["x-content-type-options"] == "nosniff"
    stats = httpx.get(server.url + "/v1/stats")
    assert stats.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert stats.headers["x-content-type-options"] == "nosniff"


@pytest.mark.integration
def test_markup_in_the_dashboard_does_not_run_under_its_policy(server: Server) -> None:
    """Real Chromium on the served page with :data:`INJECTED` added, sent with the served
    policy (and its data polled from the real server): the dashboard's own script runs and
    goes live, none of the injected handlers does (without the policy each sets the title)."""
    from conftest import ThreadServer, chromium_dom
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    real = httpx.get(server.url + "/")
    page = real.text.replace("<h1>deepwatch</h1>", f"<h1>deepwatch{INJECTED}</h1>")
    policy = {k: v for k, v in real.headers.items() if k == "content-security-policy"}

    async def index(request: Any) -> Response:
        return Response(page, media_type="text/html", headers=policy)

    async def stats(request: Any) -> Response:
        return Response(httpx.get(server.url + "/v1/stats").content,
                        media_type="application/json")

    app = Starlette(routes=[Route("/", index), Route("/v1/stats", stats)])
    with ThreadServer(app) as mirror:
        run = chromium_dom(mirror.url + "/")
    dom = run.stdout
    assert 'data-state="live"' in dom, (dom[:2000], run.stderr[-2000:])
    assert "<title>deepwatch: live scoring</title>" in dom  # no handler set it


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:1",
                                    "http://127.0.0.1", "https://127.0.0.1.evil.example",
                                    "file://", "not a url"])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/reload"])
def test_foreign_origins_cannot_post(server: Server, origin: str, path: str) -> None:
    before = _generation(server)
    r = httpx.post(server.url + path, json={"records": []}, headers={"Origin": origin})
    assert r.status_code == 403, r.text
    assert "cross-origin" in r.json()["detail"]
    assert _generation(server) == before


def test_same_origin_posts_and_foreign_origin_reads_pass(server: Server) -> None:
    for origin, host in [(server.url, None), (f"http://localhost:{server.port}",
                                              f"localhost:{server.port}"),
                         ("http://localhost", "localhost"), ("http://localhost", "localhost:80")]:
        headers = {"Origin": origin, **({"Host": host} if host else {})}
        r = httpx.post(server.url + "/v1/score", json={"records": [LINE]}, headers=headers)
        assert r.status_code == 200, (origin, host, r.text)
    # a read: the browser keeps the answer from the foreign page (no CORS headers are sent)
    r = httpx.get(server.url + "/v1/stats", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(server.url + "/v1/score", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in r.headers, "no preflight is granted"


def test_the_key_is_still_asked_first(kdd_bundle: Path) -> None:
    with Server(create_app(kdd_bundle, api_key=KEY, allowed_hosts=[])) as srv:
        evil = {"Host": "evil.example", "Origin": "http://evil.example"}
        r = httpx.post(srv.url + "/v1/reload", headers=evil)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        r = httpx.post(srv.url + "/v1/reload", headers={**evil, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 421
        r = httpx.post(srv.url + "/v1/score", json={"records": [LINE]},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert httpx.get(srv.url + "/healthz").status_code == 200


# -- idle and slow clients -----------------------------------------------------------------------

def _closed_by_server(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``timeout`` s (None: still open)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def test_idle_connections_cannot_starve_the_server(kdd_bundle: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """More idle sockets than the concurrency limit (nothing sent, half a request line, half
    the headers) and one that went quiet after an answer: others are still served at once,
    and the stalled sockets are closed once their head deadline passes."""
    monkeypatch.setattr(app_module, "HEAD_TIMEOUT_SECONDS", 1.5)
    limit = app_module.MAX_CONCURRENT_REQUESTS
    with Server(create_app(kdd_bundle)) as srv, contextlib.ExitStack() as stack:
        silent = [stack.enter_context(srv.connect()) for _ in range(limit + 16)]
        partial = [stack.enter_context(srv.connect()) for _ in range(8)]
        for i, sock in enumerate(partial):
            sock.sendall(b"GET /healthz HT" if i % 2 else
                         b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        reused = stack.enter_context(srv.connect())
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b" 200 " in reused.recv(65536).split(b"\r\n")[0]
        reused.sendall(b"GET /heal")  # the next request never finishes

        t0 = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            assert c.get("/healthz").status_code == 200
            r = c.post("/v1/score", json={"records": [LINE]})
            assert r.status_code == 200 and len(r.json()["results"]) == 1
        assert time.monotonic() - t0 < 5, "served at once, idle sockets or not"

        deadline = 1.5 + 5
        for sock in silent:
            assert _closed_by_server(sock, deadline) == b""
        for sock in [*partial, reused]:
            answer = _closed_by_server(sock, deadline)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - t0 < 15
        # and the server serves on
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


def _trickle(port: int, path: str, gap: float = 0.1, give_up: float = 20.0
             ) -> tuple[bytes | None, float]:
    """A slowloris POST: the head, then the body a byte every ``gap`` s (the connection never
    goes quiet, so no idle timeout ends it) until the server answers or ``give_up`` s pass.
    What the server sent before closing (None: it never did) and when it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        t0 = time.monotonic()  # before the head leaves: the server's clock cannot start earlier
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     "application/json\r\nContent-Length: 10000\r\n\r\n{".encode())
        with contextlib.suppress(OSError):  # the server may close while this still sends
            while time.monotonic() - t0 < give_up:
                if select.select([sock], [], [], gap)[0]:
                    break  # the answer is arriving
                sock.sendall(b" ")
        took = time.monotonic() - t0
        return _closed_by_server(sock, 5), took


def _rejected(url: str, status: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f'deepwatch_rejected_requests_total{{status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_body_trickled_in_is_cut_off_at_the_configured_limit(kdd_bundle: Path) -> None:
    """Slowloris: bytes of the body keep coming, too slowly to ever finish. At the configured
    limit (30 s by default) the answer is a 408 with the reason, the connection is closed, the
    refusal is counted in /metrics, and the server serves on."""
    assert Limits().body_timeout_seconds == 30.0
    limits = Limits(body_timeout_seconds=1.0)
    with Server(create_app(kdd_bundle, limits=limits)) as srv:
        for path in ("/v1/score", "/v1/reload"):
            answer, took = _trickle(srv.port, path)
            assert answer is not None, f"{path}: the trickle was never cut off"
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"the body did not arrive within 1 s" in answer
            assert 1.0 <= took < 4.0, took
        assert _rejected(srv.url, "408") == 2
        stats = httpx.get(srv.url + "/v1/stats", timeout=5).json()
        assert stats["limits"]["body_timeout_seconds"] == 1.0
        r = httpx.post(srv.url + "/v1/score", json={"records": [LINE]}, timeout=5)
        assert r.status_code == 200


def test_serve_body_timeout_option(kdd_bundle: Path) -> None:
    """``deepwatch serve --body-timeout`` sets the limit (a bad value is one error line), and
    the other intake options reach the server."""
    bad = subprocess.run([sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle),
                          "--port", "0", "--body-timeout", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --body-timeout must be a number of seconds above 0, not 0"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port", str(port),
         "--body-timeout", "1.5", "--body-min-rate", "0", "--max-client-uploads", "3",
         "--forwarded-allow-ips", "10.0.0.0/8,::1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        limits = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=5).json()["limits"]
        assert (limits["body_min_rate"], limits["max_client_uploads"]) == (0, 3)
        answer, took = _trickle(port, "/v1/score")
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"the body did not arrive within 1.5 s" in answer
        assert 1.5 <= took < 5.0, took
        assert _rejected(f"http://127.0.0.1:{port}", "408") == 1
    finally:
        stop_server(proc)


def test_serve_upload_options(kdd_bundle: Path) -> None:
    """``deepwatch serve --max-uploads``, ``--upload-wait`` and ``--body-rate-grace`` reach the
    server (by default 256, 5 s and 5 s, settable only in code before): past the uploads a
    body is refused with 503 at once, past its client's cap with 429 after the wait, and a
    trickle with 408 once the grace is over."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port", str(port),
         "--max-uploads", "2", "--max-client-uploads", "1", "--upload-wait", "0.5",
         "--body-min-rate", "100", "--body-rate-grace", "2", "--body-timeout", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, proc)
        limits = httpx.get(url + "/v1/stats", timeout=5).json()["limits"]
        assert (limits["max_uploads"], limits["upload_wait_seconds"],
                limits["body_rate_grace_seconds"]) == (2, 0.5, 2.0)
        with Trickle(port, 0, []) as slow:
            started = [time.monotonic()]
            slow.add("127.0.0.2")
            started.append(time.monotonic())
            slow.add("127.0.0.3")
            deadline = time.monotonic() + 5
            while httpx.get(url + "/v1/stats", timeout=5).json()["intake"]["uploading"] < 2:
                assert time.monotonic() < deadline, "the two bodies never counted as arriving"
                time.sleep(0.02)
            for source in ("127.0.0.4", "127.0.0.2"):  # past the uploads; past its client's cap
                started.append(time.monotonic())
                slow.add(source)
            answered: dict[int, float] = {}
            deadline = time.monotonic() + 10
            while len(answered) < 4 and time.monotonic() < deadline:
                for i in list(slow.answers):
                    answered.setdefault(i, time.monotonic() - started[i])
                time.sleep(0.02)
            answers = [slow.answers.get(i) for i in range(4)]
        assert [_status(a) for a in answers] == [408, 408, 503, 429], answers
        assert _detail(answers[2] or b"") == ("the service is receiving its most request bodies "
                                              "at once (2); retry shortly")
        assert answered[2] < 1.5, answered
        assert "none came in whole within 0.5 s" in _detail(answers[3] or b"")
        assert 0.5 <= answered[3] < 2.0, answered
        for i in (0, 1):
            assert _detail(answers[i] or b"").startswith("the body arrived too slowly: ")
            assert 2.0 <= answered[i] < 4.5, answered  # the grace, not the default 5 s
        assert _rejected(url, "408") == 2
    finally:
        stop_server(proc)


@pytest.mark.parametrize(("args", "message"), [
    (["--max-uploads", "0"], "--max-uploads must be 1 or more, not 0"),
    (["--max-uploads", "-3"], "--max-uploads must be 1 or more, not -3"),
    (["--body-rate-grace", "0"], "--body-rate-grace must be a number of seconds above 0, not 0"),
    (["--body-rate-grace", "-1.5"], "--body-rate-grace must be a number of seconds above 0, "
                                    "not -1.5"),
    (["--body-rate-grace", "inf"], "--body-rate-grace must be a number of seconds above 0, "
                                   "not inf"),
    (["--upload-wait", "-0.5"], "--upload-wait must be a number of seconds, 0 (429 at once) or "
                                "more, not -0.5"),
    (["--upload-wait", "nan"], "--upload-wait must be a number of seconds, 0 (429 at once) or "
                               "more, not nan"),
])
def test_serve_refuses_bad_upload_options(kdd_bundle: Path, args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is one error line and exit 2, before anything listens."""
    from deepwatch.cli import main

    assert main(["serve", str(kdd_bundle), "--port", "0", *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_the_intake_limits_reach_every_worker(kdd_bundle: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``--workers`` the limits travel to the worker processes in ``settings.json``: what
    a worker builds its ``Limits`` from there is what ``serve`` was given (the supervisor
    stopped before it starts any worker)."""
    from uvicorn.supervisors import multiprocess

    from deepwatch.serve import _workers

    limits = Limits(body_timeout_seconds=12.0, body_min_rate=50.0, body_rate_grace_seconds=1.5,
                    max_uploads=7, max_client_uploads=3, upload_wait_seconds=0.25)
    seen: list[Limits] = []

    def init_processes(self: Any) -> None:
        settings = _workers.read_settings(Path(os.environ[_workers.STATE_ENV]))
        seen.append(Limits(**settings["limits"]))  # as _workers._worker_app reads them
        self.should_exit.set()
        for sock in self.sockets:  # no worker will accept on it
            sock.close()

    monkeypatch.setattr(multiprocess.Multiprocess, "init_processes", init_processes)
    for name in (_workers.STATE_ENV, "PROMETHEUS_MULTIPROC_DIR", "DEEPWATCH_THREADS"):
        monkeypatch.setenv(name, "")  # run_workers sets them in this process: unset after
        monkeypatch.delenv(name)
    handlers = {sig: signal.getsignal(sig) for sig in multiprocess.SIGNALS}
    try:
        app_module.run_server(kdd_bundle, port=0, workers=2, limits=limits)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert seen == [limits]


# -- slow senders against the request slots -----------------------------------------------------

def _status(answer: bytes | None) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer else None


def _detail(answer: bytes) -> str:
    return str(json.loads(answer.partition(b"\r\n\r\n")[2])["detail"])


def _counts(srv: Server) -> tuple[int, int, int]:
    """Slots held, bodies arriving and bytes of bodies held in the server's intake."""
    intake = srv.server.config.app.state.intake
    return intake.serving, intake.uploading, intake.buffered


def _settled(srv: Server, timeout: float = 5.0) -> bool:
    """Whether the intake comes back to nothing held (a request lets go of its place just after
    its answer is sent)."""
    deadline = time.monotonic() + timeout
    while _counts(srv) != (0, 0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Trickle:
    """Slowloris clients: each connects from one of ``sources`` in turn, sends a score request's
    head (``extra`` headers, ``Content-Length: length``) and ``first`` bytes of its body, then a
    byte every ``gap`` s, so its connection never goes quiet, until the server answers it."""

    def __init__(self, port: int, count: int, sources: list[str], *, gap: float = 0.1,
                 first: bytes = b"{", extra: str = "", length: int = 10000) -> None:
        self.port, self.count, self.sources = port, count, sources
        self.gap, self.first, self.extra, self.length = gap, first, extra, length
        self.socks: list[socket.socket] = []
        self.answers: dict[int, bytes | None] = {}  # by client, once the server answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickle:
        for i in range(self.count):
            self.add(self.sources[i % len(self.sources)])
        self._thread.start()
        return self

    def add(self, source: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                        source_address=(source, 0))
        sock.sendall(f"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     f"application/json\r\n{self.extra}Content-Length: {self.length}\r\n\r\n"
                     .encode()
                     + self.first)
        self.socks.append(sock)
        return sock

    def _run(self) -> None:
        while not self._stop.wait(self.gap):
            for i, sock in enumerate(list(self.socks)):
                if i in self.answers:
                    continue
                if select.select([sock], [], [], 0)[0]:  # the answer is arriving
                    self.answers[i] = _closed_by_server(sock, 5)
                    continue
                try:
                    sock.sendall(b" ")
                except OSError:  # closed by the server before its answer was read
                    self.answers[i] = _closed_by_server(sock, 5)

    def waiting(self) -> int:
        """Clients the server has not answered (still sending their bodies)."""
        return len(self.socks) - len(self.answers)

    def wait_answered(self, n: int, timeout: float) -> list[bytes | None]:
        deadline = time.monotonic() + timeout
        while len(self.answers) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return [self.answers[i] for i in sorted(self.answers)]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for sock in self.socks:
            sock.close()


def test_slow_senders_cannot_starve_the_scoring_slots(kdd_bundle: Path) -> None:
    """More slowloris clients than request slots, each from an address under the per-client
    cap, keep trickling their bodies: a well-behaved client is still served while every one of
    them is connected (a body arriving holds no slot), and each slow sender gets the documented
    408 once the body timeout passes, counted in /metrics."""
    timeout = 3.0
    limits = Limits(body_timeout_seconds=timeout)
    n = app_module.MAX_CONCURRENT_REQUESTS + 16
    sources = [f"127.0.0.{i}" for i in range(2, 2 + -(-n // 8))]  # 8 from each address
    with Server(create_app(kdd_bundle, limits=limits)) as srv, \
            Trickle(srv.port, n, sources) as slow:
        time.sleep(0.3)  # every head is in and every body trickling
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            r = client.post("/v1/score", json={"records": [LINE, LINE]})
            health = client.get("/healthz")
        still_connected = slow.waiting()
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == [0, 1]
        assert health.status_code == 200
        assert still_connected == n, "served while every slow sender was still sending"

        answers = slow.wait_answered(n, timeout + 10)
        assert len(answers) == n
        for answer in answers:
            assert _status(answer) == 408, answer
            assert _detail(answer).startswith(f"the body did not arrive within {timeout:g} s")
        assert _rejected(srv.url, "408") == n
        assert _settled(srv), "every slot, upload and byte given back"


def test_one_client_cannot_take_every_upload(kdd_bundle: Path) -> None:
    """A client address may send ``max_client_uploads`` bodies at once: the next waits its turn
    and, when none of them comes in whole within the wait, gets a 429; the uploads of all
    clients together are bounded too (503); requests without a body are still served meanwhile,
    and every refusal is counted."""
    limits = Limits(body_timeout_seconds=20.0, max_client_uploads=4, max_uploads=6,
                    upload_wait_seconds=0.5)
    with Server(create_app(kdd_bundle, limits=limits)) as srv, \
            Trickle(srv.port, 6, ["127.0.0.2"]) as greedy:
        refused = greedy.wait_answered(2, timeout=5)
        assert len(refused) == 2 and greedy.waiting() == 4
        for answer in refused:
            assert answer is not None and _status(answer) == 429, answer
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
            assert _detail(answer) == ("4 request bodies from 127.0.0.2 are arriving already, "
                                       "the most one client may send at once, and none came in "
                                       "whole within 0.5 s; wait for their answers")
        with Trickle(srv.port, 3, ["127.0.0.3"]) as other:
            refused = other.wait_answered(1, timeout=5)
            assert other.waiting() == 2  # 6 uploads now: the service's most
            assert refused and _status(refused[0]) == 503, refused
            assert "receiving its most request bodies at once (6)" in _detail(refused[0] or b"")
            assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
            r = httpx.post(srv.url + "/v1/score", json={"records": [LINE]}, timeout=5)
            assert r.status_code == 503 and "Retry-After" in r.headers
        assert _rejected(srv.url, "429") == 2
        assert _rejected(srv.url, "503") == 2


def test_the_bytes_of_bodies_held_are_bounded(kdd_bundle: Path) -> None:
    """Bodies arriving hold no slot, so the bytes they hold are bounded by themselves: as many
    full bodies as there are slots (here 2 x 1,000 bytes); the body that would go past it is
    refused with 503, and its bytes are given back."""
    limits = Limits(max_requests=2, max_body_bytes=1000, body_timeout_seconds=20.0)
    with Server(create_app(kdd_bundle, limits=limits)) as srv, \
            Trickle(srv.port, 0, [], first=b"{" + b" " * 799, length=1000) as slow:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            slow.add(source)
            time.sleep(0.3)
        answers = slow.wait_answered(1, timeout=5)
        assert [_status(a) for a in answers] == [503], answers
        assert "holds its most bytes of request bodies (2,000)" in _detail(answers[0] or b"")
        assert slow.waiting() == 2
        assert 1600 <= _counts(srv)[2] < 2000


def test_a_body_under_the_minimum_rate_is_cut_off(kdd_bundle: Path) -> None:
    """Once a body has been arriving the grace period, it must average the minimum rate: a
    trickle is cut off then (408, long before the body timeout); a body sent in pieces at a
    decent pace over more than the grace period is scored."""
    limits = Limits(body_timeout_seconds=30.0, body_min_rate=100.0, body_rate_grace_seconds=0.5)
    with Server(create_app(kdd_bundle, limits=limits)) as srv:
        answer, took = _trickle(srv.port, "/v1/score")
        assert answer is not None and _status(answer) == 408, answer
        assert "the body arrived too slowly" in _detail(answer)
        assert "under the minimum of 100 bytes a second" in _detail(answer)
        assert 0.5 <= took < 5.0, took

        body = orjson.dumps({"records": [LINE] * 10})  # ~1.6 kB in 8 pieces over ~1.2 s
        with srv.connect() as sock:
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n")
            step = -(-len(body) // 8)
            for i in range(0, len(body), step):
                time.sleep(0.15)
                sock.sendall(body[i:i + step])
            answer = _closed_by_server(sock, 10)
        assert answer is not None and _status(answer) == 200, answer
        assert _rejected(srv.url, "408") == 1


def test_complete_requests_still_take_the_slots(kdd_bundle: Path) -> None:
    """The slots still bound the work in flight: with both taken by requests being scored, a
    third complete request, and a request without a body, get 503 (JSON, Retry-After), and
    are served again once the slots are free."""
    limits = Limits(max_requests=2)
    app = create_app(kdd_bundle, limits=limits)
    service = app.state.service
    scoring = service.score
    go = threading.Event()

    def held_score(body: bytes) -> bytes:  # in the thread pool: the body is over 32 KiB
        go.wait(20)
        return scoring(body)

    service.score = held_score
    big = {"records": [LINE] * 250}
    assert len(orjson.dumps(big)) > app_module.INLINE_BODY_BYTES
    with Server(app) as srv, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(httpx.post, srv.url + "/v1/score", json=big, timeout=30)
                for _ in range(2)]
        deadline = time.monotonic() + 10
        while _counts(srv)[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/score", json={"records": [LINE]}, timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"] == ("the service is answering its most requests at once (2); "
                                      "retry shortly")
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 503
        go.set()
        assert [f.result().status_code for f in held] == [200, 200]
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        assert _rejected(srv.url, "503") == 2
        assert _settled(srv)


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(kdd_bundle: Path) -> None:
    """The per-client cap counts by the connection's peer; the address in X-Forwarded-For only
    when the peer is a proxy named in ``forwarded_allow_ips`` (by default none: uvicorn alone
    would trust the header from loopback, letting any local client pick its address)."""
    limits = Limits(body_timeout_seconds=20.0, max_client_uploads=1, upload_wait_seconds=0.3)
    for trusted in ([], ["127.0.0.1"]):
        with Server(create_app(kdd_bundle, limits=limits), **uvicorn_options(trusted)) as srv, \
                Trickle(srv.port, 1, ["127.0.0.1"], extra="X-Forwarded-For: 10.0.0.1\r\n") \
                as first:
            time.sleep(0.2)
            second = Trickle(srv.port, 1, ["127.0.0.1"], extra="X-Forwarded-For: 10.0.0.2\r\n")
            with second:
                answers = second.wait_answered(1, timeout=1.0)
            assert first.waiting() == 1
            if trusted:
                assert answers == [], "another client behind the proxy"
            else:
                assert [_status(a) for a in answers] == [429], answers
                assert "from 127.0.0.1 are arriving" in _detail(answers[0] or b"")


@pytest.mark.parametrize(("limits", "proxies", "message"), [
    (Limits(body_min_rate=-1.0), [], "--body-min-rate must be a number of bytes a second, 0 or "
                                     "more, not -1"),
    (Limits(body_min_rate=math.inf), [], "--body-min-rate must be a number of bytes a second, "
                                         "0 or more, not inf"),
    (Limits(max_client_uploads=-2), [], "--max-client-uploads must be 0 (no cap) or more, not -2"),
    (Limits(), ["10.0.0.1,proxy.example"], "--forwarded-allow-ips: 'proxy.example' is not an IP "
                                           "address or network (nor *)"),
    (Limits(), ["10.0.0.1/8"], "--forwarded-allow-ips: '10.0.0.1/8' is not an IP address or "
                               "network (nor *)"),
])
def test_serve_refuses_bad_intake_options(kdd_bundle: Path, limits: Limits, proxies: list[str],
                                          message: str) -> None:
    with pytest.raises(UsageError) as err:
        app_module.run_server(kdd_bundle, port=0, limits=limits, forwarded_allow_ips=proxies)
    assert str(err.value) == message


def test_proxy_options_reach_uvicorn() -> None:
    assert app_module.uvicorn_options()["proxy_headers"] is False
    options = app_module.uvicorn_options(["10.0.0.0/8", " ::1 "])
    assert options["proxy_headers"] is True
    assert options["forwarded_allow_ips"] == ["10.0.0.0/8", "::1"]
    assert app_module._check_proxies(["10.0.0.1, *"]) == ["*"]


def test_an_oversized_request_head_is_refused(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        with contextlib.suppress(OSError):  # the server may close while this still sends
            for _ in range(20):
                sock.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
        answer = _closed_by_server(sock, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer
    assert httpx.get(server.url + "/healthz").status_code == 200


def _head(size: int, request: bytes = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n") -> bytes:
    """A request head of exactly ``size`` bytes (it asks for the connection to be closed)."""
    start = request + b"Connection: close\r\nX-Pad: "
    head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


def _statuses(answer: bytes) -> list[int]:
    return [int(part.split(b" ", 1)[0]) for part in answer.split(b"HTTP/1.1 ")[1:]]


@pytest.mark.parametrize("pieces", [1, 7, 70])
@pytest.mark.parametrize("size, status", [(64 * 1024, 200), (64 * 1024 + 1, 431),
                                          (66_000, 431), (100_000, 431), (300_000, 431)])
def test_a_head_is_held_to_the_limit_however_it_arrives(server: Server, pieces: int, size: int,
                                                        status: int) -> None:
    """The audit's heads, sent with one ``sendall`` (the chunk that ends the head used to go
    uncounted, so up to ~128 KiB passed) or in pieces: the limit is exact either way."""
    assert app_module.MAX_HEAD_BYTES == 64 * 1024
    head = _head(size)
    step = -(-size // pieces)
    with server.connect() as sock:
        with contextlib.suppress(OSError):  # the server may close while this still sends
            for i in range(0, size, step):
                sock.sendall(head[i:i + step])
        answer = _closed_by_server(sock, 5)
    assert answer is not None and _statuses(answer) == [status], answer[:200]
    if status == 431:
        assert b"over the limit of 65,536 bytes" in answer
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize("size, status", [(65_000, 200), (64 * 1024 + 1, 431), (100_000, 431)])
@pytest.mark.parametrize("first", [
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: 15\r\n\r\n{\"records\": []}"], ids=["get", "post"])
def test_a_head_after_another_request_in_the_same_packet_is_held_to_the_limit(
        server: Server, first: bytes, size: int, status: int) -> None:
    """A head that begins after another request in the same read is counted from where it
    begins, and a 431 comes after the answer to the request before it, in order."""
    with server.connect() as sock:
        with contextlib.suppress(OSError):
            sock.sendall(first + _head(size))
        answer = _closed_by_server(sock, 5)
    assert answer is not None and _statuses(answer) == [200, status], answer[:200]


def test_a_body_sent_after_an_early_answer_is_no_oversized_head(server: Server) -> None:
    """A body the server refused unread (415) still arrives whole: it is the old request's,
    not a new head, and the connection serves the next request."""
    with server.connect() as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 300000\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 415 "), first
        sock.sendall(b"x" * 300000)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(5)
        second = sock.recv(65536)
    assert second.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in second, second


def test_cli_server_answers_past_idle_connections(kdd_bundle: Path) -> None:
    """``deepwatch serve`` itself (not only this file's server) has the protection."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        with contextlib.ExitStack() as stack:
            for _ in range(app_module.MAX_CONCURRENT_REQUESTS + 16):
                stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.3)  # all accepted
            t0 = time.monotonic()
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
            r = httpx.post(url + "/v1/reload", content=b"{}",
                           headers={"Host": "evil.example", **JSON_TYPE}, timeout=5)
            assert r.status_code == 421
            assert time.monotonic() - t0 < 5
    finally:
        stop_server(proc)
