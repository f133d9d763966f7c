"""``deepwatch serve --tls-cert/--tls-key``: HTTPS on a real server (one process and
``--workers 2``) with a throwaway CA made by the ``openssl`` command, the files refused in one
line when they cannot work, and the warning for plain HTTP beyond loopback.

Under CI=true a missing ``openssl`` command is a failure, not a skip (see ``conftest.need``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer, free_port, need

pytest.importorskip("uvicorn")
from deepwatch.serve import app as app_module  # noqa: E402
from deepwatch.serve._x509 import validity, validity_warning  # noqa: E402
from deepwatch.serve.app import (  # noqa: E402
    cleartext_warning,
    create_app,
    tls_options,
    uvicorn_options,
)

KEY = "tls-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PASSWORD = "correct horse battery staple"
RENEWED_PASSWORD = "Tr0ub4dor&3 for the renewal"
SERVER_EXT = """\
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
"""


def _openssl(*args: str | Path, cwd: Path) -> None:
    r = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(map(str, args))}: {r.stderr}"


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate it signed for 127.0.0.1 and localhost, the server's
    key (plain, and encrypted with a password file), another key, a file that is not PEM, the
    API key file, and a renewal: a second certificate for the same names (another serial and
    subject) with its own key (plain, and encrypted with another password). The CA and those
    two certificates are valid for 90 days; two more of server.key's expire in 3 days and
    expired a day before they were made."""
    need(shutil.which("openssl") is not None, "the openssl command (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "90",
             "-subj", "/CN=deepwatch test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=d)
    (d / "server.ext").write_text(SERVER_EXT)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "90", "-extfile", "server.ext",
             cwd=d)
    for name, days in (("expiring.pem", "3"), ("expired.pem", "-1")):  # server.key's too
        _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAserial", "ca.srl", "-out", name, "-days", days, "-extfile", "server.ext",
                 cwd=d)
    _openssl("req", *ec, "-keyout", "renewed.key", "-out", "renewed.csr", "-subj",
             "/CN=127.0.0.1 renewed", cwd=d)
    _openssl("x509", "-req", "-in", "renewed.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAserial", "ca.srl", "-out", "renewed.pem", "-days", "90", "-extfile",
             "server.ext", cwd=d)
    (d / "password.txt").write_text(PASSWORD + "\n")
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "file:password.txt", "-out",
             "server-encrypted.key", cwd=d)
    (d / "renewed-password.txt").write_text(RENEWED_PASSWORD + "\n")
    _openssl("pkey", "-in", "renewed.key", "-aes256", "-passout", "file:renewed-password.txt",
             "-out", "renewed-encrypted.key", cwd=d)
    (d / "wrong-password.txt").write_text("not-the-password-4711\n")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
             "other.key", cwd=d)
    (d / "not-pem.txt").write_text("this is no certificate\n")
    (d / "empty.txt").write_text("\n")
    (d / "api.key").write_text(KEY + "\n")
    names = ["ca.pem", "server.pem", "server.key", "server-encrypted.key", "password.txt",
             "wrong-password.txt", "other.key", "not-pem.txt", "empty.txt", "api.key",
             "renewed.pem", "renewed.key", "renewed-encrypted.key", "renewed-password.txt",
             "expiring.pem", "expired.pem"]
    return {name: d / name for name in names}


def _trusting(tls: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls["ca.pem"]))


@pytest.fixture(scope="module")
def lines(small_kdd: Path) -> list[str]:
    return small_kdd.read_text().splitlines()[:50]


#: ``deepwatch serve`` as ``python -m deepwatch.cli`` runs it, its request-head deadline (the
#: TLS handshake's too) set to the first argument's seconds: the tests wait out short ones.
WITH_HEAD_TIMEOUT = ("import sys; from deepwatch.serve import app; "
                     "app.HEAD_TIMEOUT_SECONDS = float(sys.argv.pop(1)); "
                     "from deepwatch.cli import main; sys.exit(main())")
#: The request-head deadline of the servers whose stalled handshakes are timed.
SHORT_HEAD_TIMEOUT = 2.0


def _serve(bundle: Path, log: Path, *args: str | Path, head_timeout: float | None = None
           ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = ["-m", "deepwatch.cli"] if head_timeout is None else [
        "-c", WITH_HEAD_TIMEOUT, str(head_timeout)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, *command, "serve", str(bundle), "--port", str(port),
             *map(str, args)], stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
    return proc, port


def _half_a_client_hello() -> bytes:
    """The first half of the ClientHello Python's TLS client sends to begin a handshake."""
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                  server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    sent = out.read()
    assert sent[:1] == b"\x16", sent[:16]  # a TLS handshake record
    return sent[:len(sent) // 2]


def _stall_handshakes(port: int, deadline: float) -> Callable[[], list[float | None]]:
    """Open two TCP connections to the TLS port that never finish their handshake: one sends
    nothing, one half a ClientHello. The function returned gives, for each, the seconds from
    its opening until the server closed it; None where it was still open ``deadline`` + 5 s
    on (asyncio's own handshake timeout is 60 s)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    opened = time.monotonic()
    socks[1].sendall(_half_a_client_hello())
    closed: list[float | None] = [None, None]

    def watch() -> None:
        with selectors.DefaultSelector() as sel:
            for i, sock in enumerate(socks):
                sel.register(sock, selectors.EVENT_READ, i)
            while sel.get_map() and (left := opened + deadline + 5 - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    try:
                        if key.fileobj.recv(65536):  # type: ignore[union-attr]
                            continue  # (the server sends nothing before it closes)
                    except ConnectionResetError:
                        pass
                    closed[key.data] = time.monotonic() - opened
                    sel.unregister(key.fileobj)
        for sock in socks:
            sock.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def result() -> list[float | None]:
        watcher.join(deadline + 10)
        return closed

    return result


def _assert_closed_at_the_deadline(closed: list[float | None], deadline: float) -> None:
    """Both stalled handshakes were cut off at the deadline (give or take scheduling)."""
    late = [f"{what}: " + (f"still open {deadline + 5:g} s on" if after is None
                           else f"closed after {after:.2f} s")
            for what, after in zip(("a silent connection", "half a ClientHello"), closed,
                                   strict=True)
            if after is None or not deadline - 0.2 <= after <= deadline + 2.5]
    assert not late, f"the handshake deadline is {deadline:g} s; " + "; ".join(late)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path,
                  verify: ssl.SSLContext | bool, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", verify=verify, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server did not become healthy: {log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture()
def started(request: pytest.FixtureRequest) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Server processes a test started: killed (with their workers) if still running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        _kill(proc)


def _plain_http_answer(port: int) -> bytes:
    """What a plain-HTTP request to the port gets back before the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return got


def _check_https(url: str, port: int, tls: dict[str, Path], lines: list[str]) -> None:
    """Over TLS with the CA trusted: health, scoring (with the key), and what plain HTTP and a
    client that does not trust the CA get."""
    with httpx.Client(base_url=url, verify=_trusting(tls), timeout=30) as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert c.post("/v1/score", json={"records": lines[:3]}).status_code == 401
        r = c.post("/v1/score", json={"records": lines}, headers=AUTH)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(lines)
        assert {res["verdict"] for res in results} == {"normal", "malicious"}
    answer = _plain_http_answer(port)
    assert not answer.startswith(b"HTTP/"), answer[:200]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url + "/healthz", verify=ssl.create_default_context(), timeout=10)


@pytest.mark.slow
def test_https_serves_the_api_metrics_and_dashboard(kdd_bundle: Path, tls: dict[str, Path],
                                                    lines: list[str], tmp_path: Path,
                                                    started: list[subprocess.Popen[bytes]]
                                                    ) -> None:
    """Beyond loopback (0.0.0.0) with TLS and a key: every endpoint over HTTPS, no cleartext
    warning, the https URL in the log; a TLS handshake left unfinished (nothing sent, or half a
    ClientHello) is cut off at the request-head deadline (short here) while HTTPS goes on."""
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--host", "0.0.0.0", "--tls-cert", tls["server.pem"],
                        "--tls-key", tls["server.key"], "--api-key-file", tls["api.key"],
                        head_timeout=SHORT_HEAD_TIMEOUT)
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))
    stalled = _stall_handshakes(port, SHORT_HEAD_TIMEOUT)
    _check_https(url, port, tls, lines)
    with httpx.Client(base_url=url, verify=_trusting(tls), headers=AUTH, timeout=30) as c:
        metrics = c.get("/metrics").text
        assert 'deepwatch_records_total{outcome="scored"} 50.0' in metrics
        assert _expiry_gauge(metrics) == _not_after(tls["server.pem"])
        page = c.get("/")
        assert page.status_code == 200 and 'fetch("/v1/stats"' in page.text
        assert "http://" not in page.text and "ws://" not in page.text  # relative: https too
        stats = c.get("/v1/stats")
        assert stats.status_code == 200 and stats.json()["totals"]["records"] == 50
    _assert_closed_at_the_deadline(stalled(), SHORT_HEAD_TIMEOUT)
    assert httpx.get(url + "/healthz", verify=_trusting(tls), timeout=10).status_code == 200
    assert _stop(proc) == 0
    err = log.read_text()
    assert f"at https://0.0.0.0:{port}/" in err, err
    assert "clear text" not in err and "Traceback" not in err, err
    assert "expires on" not in err and "expired on" not in err, err  # 90 days left


def _not_after(pem: Path) -> float:
    """The certificate's notAfter as the ``openssl`` command reads it, a Unix time."""
    r = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-enddate"],
                       capture_output=True, text=True, timeout=60, check=True)
    text = r.stdout.strip().removeprefix("notAfter=")
    return ssl.cert_time_to_seconds(text)


def _expiry_gauge(metrics: str) -> float | None:
    name = "deepwatch_tls_certificate_expiry_timestamp_seconds "
    found = [ln for ln in metrics.splitlines() if ln.startswith(name)]
    assert len(found) <= 1, found
    return float(found[0][len(name):]) if found else None


@pytest.mark.slow
def test_https_with_two_workers_and_an_encrypted_key(kdd_bundle: Path, tls: dict[str, Path],
                                                     lines: list[str], tmp_path: Path,
                                                     started: list[subprocess.Popen[bytes]]
                                                     ) -> None:
    """Each worker serves HTTPS with the key the password decrypts, and cuts off a TLS
    handshake left unfinished at the request-head deadline (the parent's, short here)."""
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--workers", "2", "--tls-cert", tls["server.pem"],
                        "--tls-key", tls["server-encrypted.key"], "--tls-key-password-file",
                        tls["password.txt"], "--api-key-file", tls["api.key"],
                        head_timeout=SHORT_HEAD_TIMEOUT)
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))
    stalled = _stall_handshakes(port, SHORT_HEAD_TIMEOUT)
    _check_https(url, port, tls, lines)
    pids = {httpx.get(url + "/healthz", verify=_trusting(tls), timeout=10).json()["pid"]
            for _ in range(12)}
    assert proc.pid not in pids  # the workers answer, each over TLS
    metrics = httpx.get(url + "/metrics", verify=_trusting(tls), headers=AUTH, timeout=10).text
    assert _expiry_gauge(metrics) == _not_after(tls["server.pem"])  # the workers' together
    _assert_closed_at_the_deadline(stalled(), SHORT_HEAD_TIMEOUT)
    assert httpx.get(url + "/healthz", verify=_trusting(tls), timeout=10).status_code == 200
    assert _stop(proc) == 0
    err = log.read_text()
    assert "with 2 workers" in err and f"at https://127.0.0.1:{port}/" in err, err
    assert PASSWORD not in err and "Traceback" not in err, err


def _der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def _presented(client: httpx.Client) -> bytes:
    """The certificate (DER) the server presented on the connection that answers a request made
    now with ``client`` (its keep-alive connection, where it has one open)."""
    r = client.get("/healthz")
    assert r.status_code == 200, r.text
    ssl_object = r.extensions["network_stream"].get_extra_info("ssl_object")
    der: bytes = ssl_object.getpeercert(True)
    return der


def _put_in_place(live: Path, **files: Path) -> None:
    """Copy each file to ``live/NAME.pem`` as renewals do: written beside, then renamed over."""
    for name, src in files.items():
        tmp = live / f".{name}.pem.new"
        shutil.copyfile(src, tmp)
        os.replace(tmp, live / f"{name}.pem")


def _wait_for_line(log: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [ln for ln in log.read_text().splitlines() if text in ln]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in the log: {log.read_text()}")


@pytest.mark.slow
def test_a_reload_loads_a_renewed_certificate_and_refuses_a_broken_one(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path,
        started: list[subprocess.Popen[bytes]]) -> None:
    """One process: POST /v1/reload (and SIGHUP) read the certificate files again. A renewed
    pair serves new connections while a keep-alive connection opened before goes on with the
    old one; a pair that cannot work is refused with the start-up check's reason, and new
    connections still get the last good certificate."""
    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["expiring.pem"], key=tls["server.key"])
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--tls-cert", live / "cert.pem", "--tls-key",
                        live / "key.pem", "--api-key-file", tls["api.key"])
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))
    # the certificate at start expires in 3 days: said in the log and given by /metrics
    assert f"--tls-cert {live / 'cert.pem'} expires on " in log.read_text()

    def fresh() -> httpx.Client:
        return httpx.Client(base_url=url, verify=_trusting(tls), headers=AUTH, timeout=30)

    def expiry() -> float | None:
        with fresh() as c:
            return _expiry_gauge(c.get("/metrics").text)

    assert expiry() == _not_after(tls["expiring.pem"])
    first, renewed = _der(tls["expiring.pem"]), _der(tls["renewed.pem"])
    assert first != renewed
    with fresh() as old:
        assert _presented(old) == first
        _put_in_place(live, cert=tls["renewed.pem"], key=tls["renewed.key"])
        with fresh() as admin:
            r = admin.post("/v1/reload")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloaded" and r.json()["model"]["generation"] == 2
        assert r.json()["certificate"] == {"status": "reloaded"}
        with fresh() as new:
            assert _presented(new) == renewed
        assert _presented(old) == first  # the same connection: its handshake is done
    assert "POST /v1/reload: certificate reloaded from" in log.read_text()
    assert expiry() == _not_after(tls["renewed.pem"])  # the renewal's, 90 days on

    _put_in_place(live, key=tls["other.key"])  # not the certificate's key
    reason = (f"--tls-key {live / 'key.pem'} is not the private key of the certificate in "
              f"--tls-cert {live / 'cert.pem'}")
    proc.send_signal(signal.SIGHUP)
    line = _wait_for_line(log, "SIGHUP: certificate not reloaded")
    assert line.endswith("new connections still get the previous one: " + reason), line
    _wait_for_line(log, "(generation 3)")  # the bundle reloads regardless
    with fresh() as new:
        assert _presented(new) == renewed
        r = new.post("/v1/reload")
        assert r.status_code == 200, r.text
        assert r.json()["certificate"] == {"status": "kept", "reason": reason}
        assert r.json()["model"]["generation"] == 4
    with fresh() as new:
        assert _presented(new) == renewed
        assert new.post("/v1/score", json={"records": []}).status_code == 200
    assert expiry() == _not_after(tls["renewed.pem"])  # the certificate still served
    assert _stop(proc) == 0
    assert "Traceback" not in log.read_text()


def _worker_pids(url: str, tls: dict[str, Path], workers: int) -> set[int]:
    """The pids of the workers answering (each asked on a connection of its own)."""
    pids: set[int] = set()
    for _ in range(200):
        r = httpx.get(url + "/healthz", verify=_trusting(tls), timeout=10)
        pids.add(r.json()["pid"])
        if len(pids) == workers:
            return pids
    raise AssertionError(f"only {pids} answered")


@pytest.mark.slow
def test_workers_are_not_replaced_for_a_certificate_that_cannot_work(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path,
        started: list[subprocess.Popen[bytes]]) -> None:
    """--workers 2: SIGHUP with a broken certificate in place is refused in the parent with the
    start-up check's reason (rather than each new worker failing to load it), and so is
    POST /v1/reload in the worker that gets it; the workers serve on."""
    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["server.pem"], key=tls["server-encrypted.key"])
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--workers", "2", "--tls-cert", live / "cert.pem",
                        "--tls-key", live / "key.pem", "--tls-key-password-file",
                        tls["password.txt"], "--api-key-file", tls["api.key"])
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))
    pids = _worker_pids(url, tls, 2)
    _put_in_place(live, cert=tls["not-pem.txt"])
    reason = f"--tls-cert {live / 'cert.pem'} holds no PEM certificate"
    proc.send_signal(signal.SIGHUP)
    line = _wait_for_line(log, "reload refused because of the certificate")
    assert line.endswith("(generation 1, the certificate they have): " + reason + " (-----BEGIN "
                         "CERTIFICATE-----)"), line
    r = httpx.post(url + "/v1/reload", headers=AUTH, verify=_trusting(tls), timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].endswith(reason + " (-----BEGIN CERTIFICATE-----)"), r.text
    assert _worker_pids(url, tls, 2) == pids
    assert {r.json()["generation"] for r in (
        httpx.get(url + "/healthz", verify=_trusting(tls), timeout=10) for _ in range(4))} == {1}
    assert _stop(proc) == 0
    err = log.read_text()
    assert "replacing the" not in err and "could not be replaced" not in err, err
    assert PASSWORD not in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_worker_killed_outright_leaves_no_certificate_expiry_behind(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path,
        started: list[subprocess.Popen[bytes]]) -> None:
    """--workers 2: each worker killed with SIGKILL (it cannot drop its own gauges) is started
    again by the parent, and reads the certificate files as they are then (here renewed, with
    no reload asked for). Once both are new, /metrics gives the renewed certificate's expiry
    alone: the parent dropped the killed workers' values, which would otherwise hold the
    soonest expiry (the old certificate's) in it for as long as the server runs."""
    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["expiring.pem"], key=tls["server.key"])
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--workers", "2", "--tls-cert", live / "cert.pem",
                        "--tls-key", live / "key.pem", "--api-key-file", tls["api.key"])
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))

    def expiry() -> float | None:
        return _expiry_gauge(httpx.get(url + "/metrics", verify=_trusting(tls), headers=AUTH,
                                       timeout=10).text)

    assert expiry() == _not_after(tls["expiring.pem"])
    _put_in_place(live, cert=tls["renewed.pem"], key=tls["renewed.key"])
    first = _worker_pids(url, tls, 2)
    for pid in first:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # until two workers answer, the killed one not among them
            answering = {httpx.get(url + "/healthz", verify=_trusting(tls),
                                   timeout=10).json()["pid"] for _ in range(30)}
            if len(answering) == 2 and pid not in answering:
                break
            assert time.monotonic() < deadline, f"worker {pid} was not started again"
            time.sleep(0.2)
    assert not _worker_pids(url, tls, 2) & first
    assert expiry() == _not_after(tls["renewed.pem"])
    assert _stop(proc) == 0


def _repoint(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` as certbot does: a new link made beside it, then
    renamed over it (a reader finds the old target or the new one, never no file)."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.symlink_to(target)
    os.replace(tmp, link)


@pytest.mark.slow
def test_workers_serve_a_certificate_renewed_behind_symlinks(
        kdd_bundle: Path, tls: dict[str, Path], lines: list[str], tmp_path: Path,
        started: list[subprocess.Popen[bytes]]) -> None:
    """--workers 2, renewed as certbot does it: --tls-cert and --tls-key are live/ links to
    archive/ files; the renewal writes archive/cert2.pem and key2.pem (here also a key
    encrypted with a new password, written to the password file) and repoints the links. After
    SIGHUP every worker is replaced and each new one serves the renewed certificate (the links
    are followed when a worker starts, not resolved once at start-up); no password is logged."""
    live, archive = tmp_path / "live", tmp_path / "archive"
    live.mkdir()
    archive.mkdir()

    def archived(name: str, src: Path) -> None:
        shutil.copyfile(src, archive / name)
        (archive / name).chmod(0o600)

    archived("cert1.pem", tls["expiring.pem"])  # renewed in time: 3 days left
    archived("key1.pem", tls["server-encrypted.key"])
    (live / "cert.pem").symlink_to("../archive/cert1.pem")
    (live / "key.pem").symlink_to("../archive/key1.pem")
    password = tmp_path / "key-password.txt"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--workers", "2", "--tls-cert", live / "cert.pem",
                        "--tls-key", live / "key.pem", "--tls-key-password-file", password,
                        "--api-key-file", tls["api.key"])
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))

    first, renewed = _der(tls["expiring.pem"]), _der(tls["renewed.pem"])
    assert first != renewed
    names = {first: "first", renewed: "renewed"}

    def expiry() -> float | None:
        return _expiry_gauge(httpx.get(url + "/metrics", verify=_trusting(tls), headers=AUTH,
                                       timeout=10).text)

    assert expiry() == _not_after(tls["expiring.pem"])

    def presented_by_every_worker() -> dict[int, set[str]]:
        """The certificates (first, renewed) fresh connections were given, by the pid of the
        worker that answered, over at least 6 connections and until both workers answered."""
        seen: dict[int, set[str]] = {}
        for n in range(200):
            with httpx.Client(base_url=url, verify=_trusting(tls), timeout=30) as c:
                r = c.get("/healthz")
                der = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
            assert r.status_code == 200, r.text
            seen.setdefault(r.json()["pid"], set()).add(names.get(der, "another"))
            if n >= 5 and len(seen) == 2:
                return seen
        raise AssertionError(f"only the workers {set(seen)} answered")

    before = presented_by_every_worker()
    assert all(got == {"first"} for got in before.values()), before

    archived("cert2.pem", tls["renewed.pem"])
    archived("key2.pem", tls["renewed-encrypted.key"])
    _repoint(live / "cert.pem", "../archive/cert2.pem")
    _repoint(live / "key.pem", "../archive/key2.pem")
    new_password = tmp_path / ".key-password.txt.new"
    new_password.write_text(RENEWED_PASSWORD + "\n")
    new_password.chmod(0o600)
    os.replace(new_password, password)
    assert (archive / "cert1.pem").exists()  # the old files stay, as certbot keeps them

    proc.send_signal(signal.SIGHUP)
    _wait_for_line(log, "SIGHUP: every worker replaced")
    after = presented_by_every_worker()
    assert not set(after) & set(before), (before, after)  # fresh workers answer, only they
    assert all(got == {"renewed"} for got in after.values()), after  # each worker
    assert expiry() == _not_after(tls["renewed.pem"])  # the replaced workers' value is gone
    with httpx.Client(base_url=url, verify=_trusting(tls), headers=AUTH, timeout=30) as c:
        assert _presented(c) == renewed
        r = c.post("/v1/score", json={"records": lines})
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == len(lines)
    assert _stop(proc) == 0
    err = log.read_text()
    assert "(generation 2)" in err and "reload refused" not in err, err
    assert PASSWORD not in err and RENEWED_PASSWORD not in err, err
    assert "Traceback" not in err, err


def _answer(sock: ssl.SSLSocket, within: float) -> bytes:
    """What the server sends before it closes the TLS connection (it must, within the time)."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ssl.SSLError, ConnectionResetError):
        pass
    return got


def test_the_slow_client_guard_holds_over_tls(kdd_bundle: Path, tls: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The head deadline and the head size limit work on TLS connections (uvicorn's protocol
    then sits behind asyncio's TLS transport): a head left unfinished gets 408, one over the
    limit 431, and the server answers on."""
    monkeypatch.setattr(app_module, "HEAD_TIMEOUT_SECONDS", 1.0)
    options = {**uvicorn_options((), tls_options(str(tls["server.pem"]), str(tls["server.key"]))),
               "timeout_graceful_shutdown": 2}
    context = _trusting(tls)
    with ThreadServer(create_app(kdd_bundle), **options) as srv:
        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            return context.wrap_socket(raw, server_hostname="127.0.0.1")

        with connect() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            answer = _answer(sock, 10)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        with connect() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
            with contextlib.suppress(OSError):  # the server may close meanwhile
                for _ in range(20):
                    sock.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
            answer = _answer(sock, 10)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        r = httpx.get(f"https://127.0.0.1:{srv.port}/healthz", verify=context, timeout=10)
        assert r.status_code == 200


@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert", "server.pem"], "--tls-cert needs --tls-key"),
    (["--tls-key", "server.key"], "--tls-key needs --tls-cert"),
    (["--tls-key-password-file", "password.txt"],
     "--tls-key-password-file goes with --tls-cert and --tls-key"),
    (["--tls-cert", "server.pem", "--tls-key", "other.key"],
     "--tls-key {other.key} is not the private key of the certificate in --tls-cert "
     "{server.pem}"),
    (["--tls-cert", "not-pem.txt", "--tls-key", "server.key"],
     "--tls-cert {not-pem.txt} holds no PEM certificate"),
    (["--tls-cert", "server.pem", "--tls-key", "not-pem.txt"],
     "--tls-key {not-pem.txt} holds no PEM private key"),
    (["--tls-cert", "server.key", "--tls-key", "server.key"],
     "--tls-cert {server.key} holds no PEM certificate"),
    (["--tls-cert", "missing.pem", "--tls-key", "server.key"],
     "--tls-cert file {missing.pem} does not exist"),
    (["--tls-cert", "server.pem", "--tls-key", "server-encrypted.key"],
     "--tls-key {server-encrypted.key} is encrypted: give its password"),
    (["--tls-cert", "server.pem", "--tls-key", "server-encrypted.key",
      "--tls-key-password-file", "wrong-password.txt"],
     "--tls-key {server-encrypted.key} cannot be decrypted with the password in "
     "--tls-key-password-file {wrong-password.txt}"),
    (["--tls-cert", "server.pem", "--tls-key", "server-encrypted.key",
      "--tls-key-password-file", "empty.txt"], "--tls-key-password-file {empty.txt} is empty"),
])
def test_tls_files_that_cannot_work_are_one_error_line(
        kdd_bundle: Path, tls: dict[str, Path], args: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before anything listens: one line, exit 2, no password, nothing asked on the
    terminal (an encrypted key without its password)."""
    from deepwatch.cli import main

    d = tls["ca.pem"].parent
    paths = {name: str(d / name) for name in [*tls, "missing.pem"]}
    argv = [paths.get(a, a) for a in args]
    assert main(["serve", str(kdd_bundle), "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for name, path in paths.items():
        message = message.replace("{" + name + "}", path)
    assert err.startswith("error: " + message), err
    assert "not-the-password-4711" not in err and PASSWORD not in err


def test_the_tls_settings_reach_uvicorn(tls: dict[str, Path]) -> None:
    assert tls_options(None, None) == {}
    options = tls_options(str(tls["server.pem"]), str(tls["server-encrypted.key"]),
                          str(tls["password.txt"]))
    assert options == {"ssl_certfile": str(tls["server.pem"].resolve()),
                       "ssl_keyfile": str(tls["server-encrypted.key"].resolve()),
                       "ssl_keyfile_password": PASSWORD}  # the first line, without its newline
    assert uvicorn_options((), options)["ssl_keyfile"] == options["ssl_keyfile"]
    assert "ssl_certfile" not in uvicorn_options()


def test_a_certificate_validity_is_read_as_openssl_reads_it(tls: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Of the file's first certificate (the server's; a chain follows it); damaged DER is a
    ValueError (the caller then leaves the judging to OpenSSL), never another exception."""
    for name in ("server.pem", "expiring.pem", "expired.pem", "ca.pem"):
        pem = tls[name].read_bytes()
        r = subprocess.run(["openssl", "x509", "-noout", "-startdate", "-enddate"], input=pem,
                           capture_output=True, timeout=60, check=True)
        dates = dict(ln.split("=", 1) for ln in r.stdout.decode().splitlines())
        got = validity(pem)
        assert [t.timestamp() for t in got] == [ssl.cert_time_to_seconds(dates["notBefore"]),
                                                ssl.cert_time_to_seconds(dates["notAfter"])]
    chain = tls["expiring.pem"].read_bytes() + tls["ca.pem"].read_bytes()
    assert validity(chain) == validity(tls["expiring.pem"].read_bytes())
    der = ssl.PEM_cert_to_DER_cert(tls["server.pem"].read_text())
    for cut in (0, 1, 2, 5, 40, 150, 200):
        damaged = ssl.DER_cert_to_PEM_cert(der[:cut]).encode()
        with pytest.raises(ValueError):
            validity(damaged)
    with pytest.raises(ValueError):
        validity(b"no certificate here")


def test_a_certificate_expired_soon_to_expire_or_not_yet_valid_is_warned_of(
        tls: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """At start and on each reload (both go through tls_options): a warning with the date and
    what to do. The server still starts: a warning, not an error, as nginx does (a restart does
    not take the service down over a certificate that clients may still be given)."""
    warned = {}
    for name in ("server.pem", "expiring.pem", "expired.pem"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepwatch.serve"):
            options = tls_options(str(tls[name]), str(tls["server.key"]))
        assert options["ssl_certfile"] == str(tls[name].resolve())
        warned[name] = [r.getMessage() for r in caplog.records]
    assert warned["server.pem"] == []
    (soon,) = warned["expiring.pem"]
    assert soon.startswith(f"--tls-cert {tls['expiring.pem']} expires on "), soon
    assert re.search(r"UTC, in (2\.9|3\.0) days: ", soon), soon  # made 3 days before
    assert soon.endswith("days: renew it, then reload (SIGHUP or POST /v1/reload)"), soon
    (expired,) = warned["expired.pem"]
    assert expired.startswith(f"--tls-cert {tls['expired.pem']} expired on ")
    assert "clients will refuse the connection" in expired, expired
    not_before, not_after = validity(tls["server.pem"].read_bytes())
    early = validity_warning("--tls-cert", "c.pem", not_before, not_after,
                             now=not_before - timedelta(hours=1))
    assert early is not None and early.startswith(
        f"--tls-cert c.pem is not valid until {not_before:%Y-%m-%d %H:%M} UTC")
    assert "clock" in early
    at = {days: validity_warning("--tls-cert", "c.pem", not_before, not_after,
                                 now=not_after - timedelta(days=days)) for days in (15, 13.9)}
    assert at[15] is None and at[13.9] is not None and "in 13.9 days" in at[13.9]


def test_the_tls_paths_keep_their_symlinks(tls: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Absolute, not resolved: a reload reads what the link points to then (Let's Encrypt's
    live/ files are links it moves to each renewal)."""
    (tmp_path / "cert.pem").symlink_to(tls["server.pem"])
    (tmp_path / "key.pem").symlink_to(tls["server.key"])
    monkeypatch.chdir(tmp_path)
    options = tls_options("cert.pem", "key.pem")
    assert options == {"ssl_certfile": str(tmp_path / "cert.pem"),
                       "ssl_keyfile": str(tmp_path / "key.pem")}


def test_a_key_others_may_read_is_warned_of(tls: dict[str, Path], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """As ssh does for a private key: the key (and the file with its password) readable by
    other users is a warning naming the file and the fix; chmod 600 is quiet."""
    import shutil

    key = tmp_path / "server.key"
    shutil.copy(tls["server.key"], key)
    for mode, warned in ((0o600, False), (0o640, True), (0o604, True)):
        key.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepwatch.serve"):
            tls_options(str(tls["server.pem"]), str(key))
        said = [r.getMessage() for r in caplog.records if "may be read" in r.getMessage()]
        assert said == ([f"--tls-key {key} may be read by other users (mode {mode:04o}): "
                         f"chmod 600 {key}"] if warned else []), said


@pytest.mark.parametrize(("address", "warned"), [
    ("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("192.168.0.7", True),
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("[::1]", False),
    ("::ffff:127.0.0.1", False), ("localhost", False)])
def test_plain_http_beyond_loopback_is_warned_about(address: str, warned: bool) -> None:
    warning = cleartext_warning(address, tls=False)
    assert (warning is not None) == warned
    if warning is not None:
        assert warning.startswith(f"listening on {address} without TLS")
        assert "clear text" in warning and "--tls-cert" in warning
        assert "reverse proxy" in warning
    assert cleartext_warning(address, tls=True) is None
    proxied = cleartext_warning(address, tls=False, proxied=True)
    assert (proxied is not None) == warned
    assert proxied is None or "hop from a proxy" in proxied


@pytest.mark.slow
def test_serving_plain_http_on_every_interface_logs_the_warning(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path,
        started: list[subprocess.Popen[bytes]]) -> None:
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--host", "0.0.0.0", "--api-key-file", tls["api.key"])
    started.append(proc)
    _wait_healthy(f"http://127.0.0.1:{port}", proc, log, verify=False)
    assert _stop(proc) == 0
    warned = [ln for ln in log.read_text().splitlines() if "clear text" in ln]
    assert len(warned) == 1, log.read_text()
    assert "deepwatch.serve listening on 0.0.0.0 without TLS" in warned[0]
    assert "--tls-cert" in warned[0] and "reverse proxy" in warned[0]
