"""Defects found by a review of the REST service, each against a real uvicorn server."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer, need

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import TlsReload, create_app  # noqa: E402

KEY = "review-b-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle, api_key=KEY)) as srv:
        yield srv


@pytest.fixture()
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def test_reload_of_a_path_the_system_cannot_look_up_is_a_422(client: httpx.Client) -> None:
    """A bundle path too long for the system (ENAMETOOLONG from a stat) was a 500 and a
    traceback; it is a bundle that cannot load: 422 with the reason, the old model kept."""
    before = client.get("/healthz").json()["generation"]
    r = client.post("/v1/reload", json={"bundle": "a" * 5000})
    assert r.status_code == 422, r.text
    assert "still serving the previous one" in r.json()["detail"]
    assert "File name too long" in r.json()["detail"]
    assert client.get("/healthz").json()["generation"] == before
    assert 'deepwatch_model_reloads_total{result="failed"} 1.0' in client.get("/metrics").text


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two self-signed certificates for 127.0.0.1, each with its key: a.pem/a.key, b.pem/b.key."""
    need(shutil.which("openssl") is not None, "the openssl command (apt-get install openssl)")
    d = tmp_path_factory.mktemp("pairs")
    for name in ("a", "b"):
        r = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.pem", "-days", "30", "-subj", f"/CN=pair {name}", "-addext",
             "subjectAltName=IP:127.0.0.1"], cwd=d, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    return d


def _put(src: Path, dst: Path) -> None:
    """A file renamed into place, as the docs ask a renewal to do."""
    shutil.copyfile(src, dst.with_name(dst.name + ".new"))
    os.replace(dst.with_name(dst.name + ".new"), dst)


def test_a_certificate_renewed_during_a_reload_never_breaks_new_handshakes(
        kdd_bundle: Path, two_pairs: Path, tmp_path: Path) -> None:
    """A renewal renames the certificate, then the key, into place. A reload that read and
    checked a matching pair, and then loaded the files again while the renewal had renamed
    only the certificate, got the new certificate without its key into the running server's
    context ('failed'): every new TLS connection was refused until the next good reload.
    What is checked is now what is loaded: every reload is 'reloaded' or 'kept', and new
    handshakes always succeed."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    _put(two_pairs / "a.pem", cert)
    _put(two_pairs / "a.key", key)
    reloader = TlsReload(str(cert), str(key))
    app = create_app(kdd_bundle, tls=reloader)
    client_side = ssl.create_default_context()
    client_side.check_hostname, client_side.verify_mode = False, ssl.CERT_NONE
    stop = threading.Event()

    def renewals() -> None:
        i = 0
        while not stop.is_set():
            name = "ab"[i % 2]
            i += 1
            _put(two_pairs / f"{name}.pem", cert)
            _put(two_pairs / f"{name}.key", key)

    with ThreadServer(app, ssl_certfile=str(cert), ssl_keyfile=str(key),
                      ssl_context_factory=reloader.context_factory) as srv:
        url = srv.url.replace("http://", "https://")
        renewing = threading.Thread(target=renewals, daemon=True)
        renewing.start()
        outcomes: dict[str, int] = {}
        try:
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                status = reloader.renew("test")["status"]
                outcomes[status] = outcomes.get(status, 0) + 1
                if status != "kept":  # what was loaded serves new connections
                    r = httpx.get(url + "/healthz", verify=client_side, timeout=10)
                    assert r.status_code == 200
                assert status in ("reloaded", "kept"), outcomes
        finally:
            stop.set()
            renewing.join()
        assert outcomes.get("reloaded", 0) >= 5, outcomes


@pytest.fixture(scope="module")
def access_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_root: Path) -> Path:
    """A tiny access autoencoder (400 lines of the site log, one epoch), as test_access's."""
    from conftest import data_file, head_lines, trained_bundle

    site = tmp_path_factory.mktemp("site") / "site.log"
    site.write_text("".join(head_lines(data_file("weblogs/apache_access.log.gz"), 400)))
    return trained_bundle("autoencoder", site, bundle_root, epochs=1, fmt="access")


def test_a_value_the_reader_fails_on_refuses_that_record_alone(
        access_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An access record whose timestamp was 1e308 seconds made the reader raise OverflowError
    (not a reject): the whole request was a 500 and its other records were lost. That value
    is now the reader's own reject; a reader failing on a value it does not expect (here one
    made to, as it did on 1e308) refuses that record alone, with the error as its reason, and
    the others score."""
    from deepwatch.formats import _records

    real = _records._timestamp

    def failing(value: object, typ: object) -> object:
        if value == 1e308:
            raise OverflowError("cannot convert float infinity to integer")
        return real(value, typ)  # type: ignore[arg-type]

    monkeypatch.setattr(_records, "_timestamp", failing)
    good = {"client_ip": "192.0.2.7", "timestamp": "2015-05-18T08:51:57Z",
            "request": "GET / HTTP/1.1", "status": 200, "bytes": 3279}
    with ThreadServer(create_app(access_bundle)) as srv:
        r = httpx.post(srv.url + "/v1/score", timeout=30, json={
            "records": [good, {**good, "timestamp": 1e308}, good]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [res["index"] for res in body["results"]] == [0, 2]
        assert [rej["index"] for rej in body["rejects"]] == [1]
        assert body["rejects"][0]["reason"].startswith("the record cannot be read: ")
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    assert 'deepwatch_records_total{outcome="rejected"} 1.0' in metrics
    assert 'deepwatch_records_total{outcome="scored"} 2.0' in metrics


def test_large_bodies_are_scored_within_two_bodies_worth_at_once(
        kdd_bundle: Path, small_kdd: Path) -> None:
    """A body's JSON, parsed, can take fifty times its bytes (16 MiB of nested arrays: 800 MB
    held while its records are read): three such requests at once took a server from 164 MB
    to 2.2 GB, and nothing bounded how many ran. Bodies scored in worker threads now take at
    most two bodies' worth of bytes at once; the others wait their turn and are answered."""
    from deepwatch.serve._service import Limits

    limits = Limits(max_body_bytes=64 * 1024)
    app = create_app(kdd_bundle, limits=limits)
    service = app.state.service
    real_score = service.score
    now = 0
    most = 0
    lock = threading.Lock()

    def score(body: bytes) -> bytes:  # the real scoring, watched: how many run at once
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
        try:
            time.sleep(0.3)
            return real_score(body)
        finally:
            with lock:
                now -= 1

    service.score = score
    lines = small_kdd.read_text().splitlines()
    body = b'{"records": ['
    for line in lines:
        piece = b'"' + line.encode() + b'", '
        if len(body) + len(piece) > 60 * 1024:
            break
        body += piece
    body = body.rstrip(b", ") + b"]}"
    assert 32 * 1024 < len(body) <= 64 * 1024  # scored in a thread, two fit in the budget
    answers: list[int] = []
    with ThreadServer(app) as srv:
        def post() -> None:
            r = httpx.post(srv.url + "/v1/score", content=body, timeout=30,
                           headers={"content-type": "application/json"})
            answers.append(r.status_code)

        posts = [threading.Thread(target=post) for _ in range(4)]
        for t in posts:
            t.start()
        for t in posts:
            t.join()
    assert answers == [200] * 4
    assert most == 2


def test_a_request_leaving_the_scoring_line_gives_its_turn_on() -> None:
    """A request cancelled while it waits for its turn (or just as it got it) leaves the
    budget as it found it, and the ones behind it go on."""
    import asyncio

    from deepwatch.serve._intake import ScoringBudget

    async def run() -> None:
        budget = ScoringBudget(10)
        await budget.acquire(8)
        waiting = asyncio.create_task(budget.acquire(8))  # waits: 16 > 10
        behind = asyncio.create_task(budget.acquire(2))  # behind it, first come first served
        await asyncio.sleep(0.01)
        assert not waiting.done() and not behind.done()
        waiting.cancel()  # gone from the line: the one behind fits now
        await asyncio.wait_for(behind, 1)
        assert budget.used == 10
        budget.release(2)
        woken = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0.01)
        budget.release(8)  # its turn is handed over...
        woken.cancel()  # ...and it is cancelled before it runs: the place is given back
        with contextlib.suppress(asyncio.CancelledError):
            await woken
        assert budget.used == 0

    asyncio.run(run())


def test_a_compressed_body_is_refused_for_its_compression(client: httpx.Client) -> None:
    """A log shipper sending gzip (Content-Encoding: gzip) got 400 'the body is not valid JSON:
    str is not valid UTF-8', which sends its operator looking for a JSON fault; it is a 415
    naming the compression."""
    import gzip

    r = client.post("/v1/score", content=gzip.compress(b'{"records": []}'),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415, r.text
    assert "Content-Encoding 'gzip' is not read" in r.json()["detail"]
    plain = client.post("/v1/score", content=b'{"records": []}',
                        headers={"content-type": "application/json",
                                 "content-encoding": "identity"})
    assert plain.status_code == 200, plain.text


def test_a_worker_starting_during_a_renewal_loads_the_renewed_pair(
        two_pairs: Path, tmp_path: Path) -> None:
    """serve --workers: a reload checks the files, then starts workers, which load them. A
    renewal renaming the certificate, then the key, into place meanwhile gave a starting
    worker a certificate without its key: it died with a traceback (KEY_VALUES_MISMATCH) and
    the reload was undone. uvicorn's own loading (Config.load, as in a worker) now tries
    again for a moment, and gets the renewed pair once its key is in place."""
    from deepwatch.serve._workers import worker_ssl_context

    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    _put(two_pairs / "b.pem", cert)  # the renewal half-way: the new certificate, the old key
    _put(two_pairs / "a.key", key)
    finish = threading.Timer(0.3, _put, (two_pairs / "b.key", key))
    finish.start()

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    config = uvicorn.Config(app, ssl_certfile=str(cert), ssl_keyfile=str(key),
                            ssl_context_factory=worker_ssl_context)
    try:
        config.load()
    finally:
        finish.join()
    assert isinstance(config.ssl, ssl.SSLContext)
    bare = uvicorn.Config(app, ssl_certfile=str(cert), ssl_keyfile=str(key))
    _put(two_pairs / "a.key", key)  # without the factory: the error at once
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        bare.load()


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "private-directory"])
def test_the_checked_pair_is_handed_to_openssl_as_read(two_pairs: Path, memfd: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes read once reach OpenSSL unchanged: as anonymous memory files, or (a system
    without them) as files only their owner may read, removed after."""
    from deepwatch.serve.app import _TlsPair

    if not memfd:
        monkeypatch.delattr(os, "memfd_create", raising=False)
    pair = _TlsPair((two_pairs / "a.pem").read_bytes(), (two_pairs / "a.key").read_bytes(), None)
    with pair.files() as (cert_file, key_file):
        assert Path(cert_file).read_bytes() == pair.cert_pem
        assert Path(key_file).read_bytes() == pair.key_pem
        if not memfd:
            assert os.stat(key_file).st_mode & 0o077 == 0
            assert os.stat(Path(key_file).parent).st_mode & 0o077 == 0
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    if not memfd:  # (a memory file's number may be taken by another file at once)
        assert not Path(cert_file).exists() and not Path(key_file).exists()


def _reloads(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("deepwatch_model_reloads_total{")}


@pytest.mark.slow
def test_workers_count_each_replacement_once_in_the_reload_metric(
        kdd_bundle: Path, tmp_path: Path) -> None:
    """serve --workers: a replacement asked by `kill -HUP` was not counted in
    deepwatch_model_reloads_total at all (one process counts it), and one asked by POST was
    counted by the worker that checked the bundle, before the replacement had even begun. The
    parent now counts each replacement once, as it ends."""
    import signal

    from conftest import wait_healthy
    from test_serve_workers import _all_workers, _kill, _start

    log = tmp_path / "serve.log"
    proc, url = _start(kdd_bundle, log)
    try:
        wait_healthy(url, proc)
        assert _reloads(url) == {"ok": 0.0, "failed": 0.0}
        for generation, ask in ((2, "SIGHUP"), (3, "POST")):
            if ask == "SIGHUP":
                proc.send_signal(signal.SIGHUP)
            else:
                assert httpx.post(url + "/v1/reload", timeout=30).status_code == 200
            deadline = time.monotonic() + 60
            while {h["generation"] for h in _all_workers(url)} != {generation}:
                assert time.monotonic() < deadline, f"{ask} did not replace the workers"
                time.sleep(0.2)
            # counted once the replaced workers have stopped (a second's drain)
            while (count := _reloads(url)) != {"ok": generation - 1.0, "failed": 0.0}:
                assert time.monotonic() < deadline, (ask, count)
                time.sleep(0.2)
            time.sleep(0.5)
            assert _reloads(url) == count  # and only once
        assert httpx.post(url + "/v1/reload", json={"bundle": str(tmp_path / "none")},
                          timeout=30).status_code == 422
        assert _reloads(url) == {"ok": 2.0, "failed": 1.0}
    finally:
        _kill(proc)
