"""The REST service against a real uvicorn server on a free loopback port, with an httpx client.

One server (with an API key and small limits) serves most tests; the reload, SIGHUP and browser
tests start their own so that swapping bundles cannot disturb the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import ThreadServer, chromium_dom, free_port, wait_healthy

from deepwatch.formats import get_format
from deepwatch.models.detector import Detector

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve._service import Limits  # noqa: E402
from deepwatch.serve.app import create_app  # noqa: E402

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_TYPE = {"content-type": "application/json"}
LIMITS = Limits(max_body_bytes=256 * 1024, max_records=500)


@pytest.fixture(scope="module")
def lines(small_kdd: Path) -> list[str]:
    return small_kdd.read_text().splitlines()[:400]


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle, api_key=KEY, limits=LIMITS)) as srv:
        yield srv


@pytest.fixture()
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def score(client: httpx.Client, records: list[Any], **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/score", json={"format": "kdd", "records": records, **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# -- scoring -------------------------------------------------------------------------------------

def test_raw_lines_get_the_verdicts_of_score_batch(client: httpx.Client, lines: list[str],
                                                  kdd_bundle: Path) -> None:
    body = score(client, lines[:200])
    assert body["rejects"] == []
    results = body["results"]
    assert [r["index"] for r in results] == list(range(200))
    det = Detector(kdd_bundle)
    expected = det.score_batch(get_format("kdd").parse("\n".join(lines[:200]) + "\n").batch)
    np.testing.assert_allclose([r["score"] for r in results],
                               expected.column("score").to_numpy(), rtol=0, atol=1e-9)
    assert [r["verdict"] for r in results] == expected.column("verdict").to_pylist()
    assert [r["attack_type"] for r in results] == expected.column("attack_type").to_pylist()
    assert {r["verdict"] for r in results} <= {"normal", "malicious"}
    assert {"malicious", "normal"} <= {r["verdict"] for r in results}, "sample has both kinds"
    assert all(0.0 <= r["score"] <= 1.0 for r in results)
    assert {"category", "attack_type", "score", "verdict"} <= set(results[0])
    assert "explanation" not in results[0], "explanations only when asked for"


def test_explanations_on_request(client: httpx.Client, lines: list[str]) -> None:
    results = score(client, lines[:100], explain=True)["results"]
    malicious = [r for r in results if r["verdict"] == "malicious"]
    assert malicious, "the sample has attacks"
    for r in results:
        if r["verdict"] == "normal":
            assert r["explanation"] is None
    top = json.loads(malicious[0]["explanation"])
    assert 1 <= len(top) <= 3
    assert all(set(t) == {"feature", "share"} and 0.0 <= t["share"] <= 1.0 for t in top)
    plain = score(client, lines[:100])["results"]
    assert [r["score"] for r in plain] == [r["score"] for r in results]


def test_objects_of_fields_score_like_their_raw_lines(client: httpx.Client,
                                                      lines: list[str]) -> None:
    objects = get_format("kdd").parse("\n".join(lines[:50]) + "\n").batch.to_pylist()
    by_lines = score(client, lines[:50])["results"]
    by_objects = score(client, objects)["results"]
    assert by_objects == by_lines


@pytest.mark.parametrize("extra", [{}, {"format": None}], ids=["left-out", "null"])
def test_format_may_be_left_out(client: httpx.Client, lines: list[str],
                                extra: dict[str, Any]) -> None:
    r = client.post("/v1/score", json={"records": lines[:3], **extra})
    assert r.status_code == 200, r.text
    assert r.json() == score(client, lines[:3])


def test_the_openapi_schema_of_a_score_request_is_what_the_server_accepts(
        client: httpx.Client, lines: list[str]) -> None:
    """Each property's schema types (string, null, boolean) are accepted by the server, and
    other JSON types refused with 422."""
    operation = client.get("/openapi.json").json()["paths"]["/v1/score"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    samples = {"string": "kdd", "null": None, "boolean": True, "integer": 7}
    for name in ("format", "explain"):
        prop = schema["properties"][name]
        allowed = {t["type"] for t in prop.get("anyOf", [prop])}
        for kind, value in samples.items():
            r = client.post("/v1/score", json={"records": lines[:2], name: value})
            assert (r.status_code == 200) == (kind in allowed), (name, kind, r.text)
            if kind not in allowed:
                assert r.status_code == 422 and repr(name) in r.json()["detail"]


def test_good_and_bad_records_in_one_request(client: httpx.Client, lines: list[str]) -> None:
    good_object = get_format("kdd").parse(lines[3] + "\n").batch.to_pylist()[0]
    negative = dict(good_object, src_bytes=-5)
    missing = {k: v for k, v in good_object.items() if k != "service"}
    records: list[Any] = [
        lines[0],                       # 0 good line
        "this is not a KDD record",     # 1 bad line: wrong field count
        good_object,                    # 2 good object
        missing,                        # 3 bad object: a required field missing
        lines[1],                       # 4 good line
        42,                             # 5 neither a line nor an object
        lines[2] + "\n" + lines[2],     # 6 two lines in one record
        negative,                       # 7 bad object: negative byte count
        "",                             # 8 empty line
        lines[2].replace(",tcp,", ",tcp,,", 1),  # 9 bad line: one field too many
    ]
    body = score(client, records)
    assert [r["index"] for r in body["results"]] == [0, 2, 4]
    rejects = {r["index"]: r["reason"] for r in body["rejects"]}
    assert sorted(rejects) == [1, 3, 5, 6, 7, 8, 9]
    assert "expected 42 fields" in rejects[1]
    assert "service" in rejects[3]
    assert "raw line" in rejects[5]
    assert "line break" in rejects[6]
    assert "src_bytes" in rejects[7] and "negative" in rejects[7]
    assert rejects[8] == "empty line"
    assert "fields" in rejects[9]
    assert [r["index"] for r in body["rejects"]] == sorted(rejects)
    alone = score(client, [lines[0], good_object, lines[1]])["results"]
    assert [r["score"] for r in body["results"]] == [r["score"] for r in alone]


def test_an_empty_batch_is_answered(client: httpx.Client) -> None:
    assert score(client, []) == {"results": [], "rejects": []}


def test_only_bad_records(client: httpx.Client) -> None:
    body = score(client, ["junk", {"duration": "x"}])
    assert body["results"] == []
    assert [r["index"] for r in body["rejects"]] == [0, 1]


# -- refusing requests ---------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (b'"records"', 422, "JSON object"),
    (b'{"format": "kdd"}', 422, "'records'"),
    (b'{"format": "kdd", "records": "a line"}', 422, "'records'"),
    (b'{"format": "kdd", "records": {"a": 1}}', 422, "'records'"),
    (b'{"format": 7, "records": []}', 422, "'format'"),
    (b'{"format": "nope", "records": []}', 422, "unknown format"),
    (b'{"format": "nslkdd", "records": []}', 422, "format 'kdd'"),
    (b'{"format": "kdd", "records": [], "extra": 1}', 422, "unknown key"),
    (b'{"format": "kdd", "records": [], "explain": "yes"}', 422, "'explain'"),
])
def test_malformed_bodies_get_4xx_with_a_reason(client: httpx.Client, body: bytes, status: int,
                                                words: str) -> None:
    r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_wrong_methods_and_paths_are_4xx(client: httpx.Client) -> None:
    assert client.get("/v1/score").status_code == 405
    assert client.post("/nowhere", json={}).status_code == 404


def test_body_size_is_bounded(client: httpx.Client) -> None:
    big = b'{"records": ["' + b"x" * (LIMITS.max_body_bytes + 10) + b'"]}'
    r = client.post("/v1/score", content=big, headers=JSON_TYPE)
    assert r.status_code == 413
    assert "limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        yield b'{"records": ["'
        for _ in range(LIMITS.max_body_bytes // 65536 + 2):
            yield b"y" * 65536
        yield b'"]}'

    r = client.post("/v1/score", content=chunks(), headers=JSON_TYPE)
    assert r.status_code == 413


def test_batch_length_is_bounded(client: httpx.Client, lines: list[str]) -> None:
    records = ["1"] * (LIMITS.max_records + 1)
    r = client.post("/v1/score", json={"records": records})
    assert r.status_code == 413
    assert f"{LIMITS.max_records:,}" in r.json()["detail"]
    assert client.post("/v1/score", json={"records": ["1"] * LIMITS.max_records}).status_code == 200


# -- the API key ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/score"), ("POST", "/v1/reload"), ("GET", "/metrics"), ("GET", "/"),
    ("GET", "/v1/stats"), ("GET", "/docs"), ("GET", "/openapi.json"),
])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer",
                                    f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"])
def test_every_endpoint_but_healthz_needs_the_key(server: ThreadServer, method: str, path: str,
                                                  header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, server.url + path, headers=headers, json={"records": []})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "API key" in r.json()["detail"]


def test_healthz_needs_no_key_and_the_key_opens_the_rest(server: ThreadServer,
                                                         client: httpx.Client) -> None:
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    head = httpx.head(server.url + "/healthz")  # how many load balancers probe
    assert head.status_code == 200 and head.content == b""
    assert client.get("/docs").status_code == 200
    assert "/v1/score" in client.get("/openapi.json").json()["paths"]
    r = client.post("/v1/score", json={"records": []},
                    headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200, "the scheme is case-insensitive"


# -- metrics and dashboard data ------------------------------------------------------------------

def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def test_metrics_count_records_requests_and_latency(client: httpx.Client,
                                                    lines: list[str]) -> None:
    before = client.get("/metrics").text
    body = score(client, lines[:30] + ["garbage", "more garbage"])
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    scored = _metric(text, "deepwatch_records_total", 'outcome="scored"')
    assert scored - _metric(before, "deepwatch_records_total", 'outcome="scored"') == 30
    rejected = _metric(text, "deepwatch_records_total", 'outcome="rejected"')
    assert rejected - _metric(before, "deepwatch_records_total", 'outcome="rejected"') == 2
    alerts = sum(r["verdict"] == "malicious" for r in body["results"])
    assert (_metric(text, "deepwatch_alerts_total")
            - _metric(before, "deepwatch_alerts_total")) == alerts
    assert _metric(text, "deepwatch_http_requests_total", 'path="/v1/score",status="200"') >= 1
    assert 'deepwatch_http_request_duration_seconds_bucket{le="0.01",path="/v1/score"}' in text
    assert "deepwatch_score_duration_seconds_count" in text
    assert "deepwatch_score_batch_records_bucket" in text
    assert 'deepwatch_model_info{engine="onnxruntime:CPU",format="kdd",kind="mlp"} 1.0' in text
    names = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if not ln.startswith("#")}
    assert all(n.startswith("deepwatch_") for n in names), names
    assert "tls_certificate" not in text  # no TLS: no expiry series (a 0 would read as expired)


def test_stats_feed_the_dashboard(client: httpx.Client, lines: list[str]) -> None:
    score(client, lines[:100])
    s = client.get("/v1/stats").json()
    assert s["model"]["kind"] == "mlp" and s["model"]["format"] == "kdd"
    assert s["totals"]["records"] >= 100
    assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
    assert len(s["series"]["rows"]) == 300
    assert sum(row[2] for row in s["series"]["rows"]) >= 100
    if s["totals"]["alerts"]:
        alert = s["recent_alerts"][0]
        assert {"score", "attack_type", "category", "index", "time", "service"} <= set(alert)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/stats" in page.text


# -- reload --------------------------------------------------------------------------------------

def variant_bundle(src: Path, dst: Path, threshold: float) -> Path:
    """A copy of ``src`` whose decision flags every record scoring at least ``threshold``.

    Only the manifest changes (it records the checksums of the other files, not its own)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["decision"]["policy"] = "threshold"
    manifest["decision"]["threshold"] = threshold
    manifest["trained_at"] = "variant"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_reload_swaps_the_bundle_without_dropping_requests(kdd_bundle: Path, tmp_path: Path,
                                                           lines: list[str]) -> None:
    everything = variant_bundle(kdd_bundle, tmp_path / "all-malicious", threshold=0.0)
    with ThreadServer(create_app(kdd_bundle)) as srv, httpx.Client(base_url=srv.url) as c:
        payload = {"records": lines[:50]}
        before = c.post("/v1/score", json=payload).json()["results"]
        assert {r["verdict"] for r in before} == {"normal", "malicious"}
        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as h:
                while not stop.is_set():
                    r = h.post("/v1/score", json=payload)
                    statuses.append(r.status_code)
                    assert len(r.json()["results"]) == 50

        workers = [threading.Thread(target=hammer) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        r = c.post("/v1/reload", json={"bundle": str(everything)})
        time.sleep(0.3)
        stop.set()
        for w in workers:
            w.join(timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["generation"] == 2
        assert len(statuses) > 2 and set(statuses) == {200}, "no request failed during the swap"
        after = c.post("/v1/score", json=payload).json()["results"]
        assert {r["verdict"] for r in after} == {"malicious"}
        assert [r["score"] for r in after] == [r["score"] for r in before]
        stats = c.get("/v1/stats").json()["model"]
        assert stats["bundle"] == str(everything) and stats["generation"] == 2

        # a bundle that cannot load is refused, and the one being served stays
        r = c.post("/v1/reload", json={"bundle": str(tmp_path / "missing")})
        assert r.status_code == 422 and "still serving" in r.json()["detail"]
        assert c.get("/healthz").json()["generation"] == 2
        assert c.post("/v1/reload", content=b"{bad", headers=JSON_TYPE).status_code == 400
        assert c.post("/v1/reload", json={"bundle": 3}).status_code == 422
        # no body: the bundle being served is read again from disk
        assert c.post("/v1/reload").json()["model"]["generation"] == 3
        metrics = c.get("/metrics").text
        assert 'deepwatch_model_reloads_total{result="ok"} 2.0' in metrics
        assert 'deepwatch_model_reloads_total{result="failed"} 1.0' in metrics


# -- the command line: a served process, SIGHUP, SIGTERM -----------------------------------------

def _reap(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Kill a server subprocess the test left running, and close its pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


@pytest.mark.slow
def test_cli_serve_with_key_file_reloads_on_sighup(kdd_bundle: Path, tmp_path: Path,
                                                   lines: list[str]) -> None:
    bundle = tmp_path / "served"
    shutil.copytree(kdd_bundle, bundle)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(bundle), "--port", str(port),
         "--api-key-file", str(key_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": ""})
    try:
        wait_healthy(url, proc)
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            assert httpx.post(url + "/v1/score", json={"records": lines[:2]}).status_code == 401
            first = c.post("/v1/score", json={"records": lines[:40]}).json()["results"]
            assert {r["verdict"] for r in first} == {"normal", "malicious"}
            # retrain in place (here: the same weights, a decision that flags everything)
            variant = variant_bundle(kdd_bundle, tmp_path / "next", threshold=0.0)
            shutil.rmtree(bundle)
            variant.rename(bundle)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while c.get("/healthz").json()["generation"] != 2:
                assert time.monotonic() < deadline, "SIGHUP did not reload the bundle"
                time.sleep(0.1)
            after = c.post("/v1/score", json={"records": lines[:40]}).json()["results"]
            assert {r["verdict"] for r in after} == {"malicious"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "SIGHUP: reloaded" in err
        assert "Traceback" not in err
    except Exception:
        proc.kill()
        proc.wait()
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(f"server stderr:\n{err[-4000:]}") from None
    finally:
        _reap(proc)


@pytest.mark.slow
def test_cli_serve_sighup_with_a_broken_bundle_keeps_serving_the_previous_one(
        kdd_bundle: Path, tmp_path: Path, lines: list[str]) -> None:
    """A retrain that left the bundle damaged, then SIGHUP: one error line in the log, and the
    model loaded before goes on answering, with the same verdicts."""
    bundle = tmp_path / "served"
    shutil.copytree(kdd_bundle, bundle)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(bundle), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, proc)
        before = httpx.post(url + "/v1/score", json={"records": lines[:40]}, timeout=30).json()
        weights = next(bundle.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # checksum mismatch
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while 'reloads_total{result="failed"} 1.0' not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "the failed reload was never counted"
            time.sleep(0.1)
        assert httpx.get(url + "/healthz").json()["generation"] == 1
        after = httpx.post(url + "/v1/score", json={"records": lines[:40]}, timeout=30).json()
        assert after == before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        failed = [ln for ln in err.splitlines() if "SIGHUP" in ln]
        assert len(failed) == 1 and "bundle not reloaded, still serving the previous one" in \
            failed[0], err
        assert "Traceback" not in err
    finally:
        _reap(proc)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_lets_the_requests_in_flight_finish_then_exits_0(
        kdd_bundle: Path, kdd_test_file: Path, workers: int) -> None:
    """Ctrl-C at the terminal (SIGINT to the whole process group) while requests are being
    scored. polars chains its own Ctrl-C hook to the handler it finds at import, and it was
    imported by the first request (the robust parse of bad lines), after uvicorn's handlers:
    the requests in flight, which a stop lets finish, answered 500 instead. And the one
    process ended with ``interrupted`` and 130, where the docs say a stop exits 0."""
    from conftest import head_lines

    good = [ln.rstrip("\n") for ln in head_lines(kdd_test_file, 9_000)]
    records = [ln if i % 3 else ln.replace(",", ";", 5) for i, ln in enumerate(good)]
    body = json.dumps({"records": records})  # a third bad lines: polars work in every request
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch", "serve", str(kdd_bundle), "--port", str(port),
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done: list[tuple[float, float, object]] = []  # (sent, answered, status or error type)
    outstanding = [0]  # requests sent and not yet answered
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                with lock:
                    outstanding[0] += 1
                sent = time.monotonic()
                try:
                    r = c.post(url + "/v1/score", content=body,
                               headers={"content-type": "application/json"})
                    done.append((sent, time.monotonic(), r.status_code))
                except httpx.TransportError as exc:  # the server has closed: the end
                    done.append((sent, time.monotonic(), type(exc).__name__))
                    return
                finally:
                    with lock:
                        outstanding[0] -= 1

    try:
        wait_healthy(url, proc)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(done) < 6:  # every client under way (and polars imported in each worker)
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        while outstanding[0] < 3:  # every client's request being sent, read or scored
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        err = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        stop.set()
        _reap(proc)
    assert code == 0, err
    assert "Traceback" not in err and "interrupted" not in err, err
    statuses = [status for _, _, status in done]
    assert all(s == 200 or isinstance(s, str) for s in statuses), (statuses, err)
    assert sum(isinstance(s, str) for s in statuses) <= 3, statuses  # one last try per client
    across = [s for sent, answered, s in done if sent < signalled < answered and s == 200]
    assert across, (statuses, err)  # answered though in flight when the stop came


def test_cli_serve_refuses_a_host_name_that_does_not_resolve(kdd_bundle: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--host",
         "no-such-host.invalid", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot listen on no-such-host.invalid: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _fresh(url: str, path: str, method: str = "GET", auth: bool = True,
           **kw: Any) -> httpx.Response:
    """One request on a new connection: any of the workers may take it."""
    return httpx.request(method, url + path, headers=AUTH if auth else {}, timeout=30, **kw)


def _metric_value(text: str, line_start: str) -> float:
    found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    assert len(found) == 1, (line_start, found)
    return float(found[0].rsplit(" ", 1)[1])


@pytest.mark.slow
def test_cli_serve_workers_share_metrics_stats_and_reloads(kdd_bundle: Path, tmp_path: Path,
                                                           lines: list[str]) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    log_file = tmp_path / "serve.log"
    log_fh = log_file.open("wb")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port", str(port),
         "--api-key-file", str(key_file), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=log_fh, start_new_session=True)
    try:
        wait_healthy(url, proc)
        pids: set[int] = set()
        for _ in range(200):  # both workers take connections
            pids.add(_fresh(url, "/healthz").json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2 and proc.pid not in pids
        assert _fresh(url, "/v1/score", "POST", json={"records": lines[:3]},
                      auth=False).status_code == 401  # the key holds in every worker

        for _ in range(30):
            r = _fresh(url, "/v1/score", "POST", json={"records": lines[:3]})
            assert r.status_code == 200 and len(r.json()["results"]) == 3
        # whichever worker answers, the counts are the whole service's
        for _ in range(6):
            text = _fresh(url, "/metrics").text
            assert _metric_value(text, 'deepwatch_records_total{outcome="scored"}') == 90
            assert _metric_value(text, "deepwatch_score_batch_records_count") == 30
        deadline = time.monotonic() + 10
        while _fresh(url, "/v1/stats").json()["totals"]["requests"] != 30:
            assert time.monotonic() < deadline, "the dashboard never saw every worker's requests"
            time.sleep(0.2)
        for _ in range(4):
            assert _fresh(url, "/v1/stats").json()["totals"]["requests"] == 30

        # a reload on one worker replaces both, one by one
        everything = variant_bundle(kdd_bundle, tmp_path / "all-malicious", threshold=0.0)
        r = _fresh(url, "/v1/reload", "POST", json={"bundle": str(everything)})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloading" and r.json()["workers"] == "replacing"
        assert r.json()["model"]["generation"] == 2
        deadline = time.monotonic() + 60
        while True:
            answers = [_fresh(url, "/healthz").json() for _ in range(10)]
            if {a["generation"] for a in answers} == {2} and not {a["pid"] for a in answers} & pids:
                break
            assert time.monotonic() < deadline, f"workers not replaced: {answers}"
            time.sleep(0.2)
        pids = set()
        while len(pids) < 2:
            pids.add(_fresh(url, "/healthz").json()["pid"])
        for _ in range(6):
            out = _fresh(url, "/v1/score", "POST", json={"records": lines[:20]}).json()
            assert {x["verdict"] for x in out["results"]} == {"malicious"}
        # a bundle that cannot load changes nothing
        r = _fresh(url, "/v1/reload", "POST", json={"bundle": str(tmp_path / "missing")})
        assert r.status_code == 422 and "still serving" in r.json()["detail"]
        time.sleep(1.0)
        assert {_fresh(url, "/healthz").json()["generation"] for _ in range(10)} == {2}

        # replacement workers that cannot start (their key file is gone): the old ones stay
        key_file.unlink()
        assert _fresh(url, "/v1/reload", "POST").status_code == 200
        deadline = time.monotonic() + 60
        while "not every worker could be replaced" not in log_file.read_text():
            assert time.monotonic() < deadline, "the failed replacement was never reported"
            time.sleep(0.2)
        answers = [_fresh(url, "/healthz").json() for _ in range(10)]
        assert {a["generation"] for a in answers} == {2} and {a["pid"] for a in answers} <= pids
        assert _fresh(url, "/v1/score", "POST", json={"records": lines[:3]}).status_code == 200

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = log_file.read_text()
        assert "with 2 workers" in err and "Traceback" not in err
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    except Exception as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{exc!r}\nserver log:\n{log_file.read_text()[-4000:]}"
                             ) from exc
    finally:
        _reap(proc)
        log_fh.close()


def test_cli_serve_workers_refuse_a_bad_bundle_once(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "serve", str(tmp_path / "none"),
                        "--port", "0", "--workers", "2"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "serve", str(tmp_path),
                        "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers must be at least 1" in r.stderr


BREAK_WORKERS = '''
import deepwatch.serve._workers as workers


def _cannot_start():
    raise RuntimeError("injected: this worker cannot build its app")


workers._worker_app = _cannot_start
'''


def test_cli_serve_workers_that_cannot_start_stop_the_server(kdd_bundle: Path,
                                                             tmp_path: Path) -> None:
    """A worker that fails while building its app (after the parent's checks passed) stops
    the server with exit 1 and one error line, instead of uvicorn restarting it forever."""
    # every Python process started with this PYTHONPATH runs the patch; only workers call it
    (tmp_path / "sitecustomize.py").write_text(BREAK_WORKERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle),
                        "--port", "0", "--workers", "2"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 1, r.stderr
    assert "injected: this worker cannot build its app" in r.stderr  # the worker's log line
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: a worker could not start (its error is logged above); the "
                      "server stopped"], r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60  # no restart loop


@pytest.mark.parametrize(("key_text", "words"), [(None, "does not exist"), ("", "is empty"),
                                                 ("two words", "whitespace")])
def test_cli_serve_refuses_a_bad_key_file(kdd_bundle: Path, tmp_path: Path,
                                          key_text: str | None, words: str) -> None:
    key_file = tmp_path / "key"
    if key_text is not None:
        key_file.write_text(key_text)
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port",
         str(free_port()), "--api-key-file", str(key_file)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_serve_refuses_a_missing_bundle(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(tmp_path / "none"), "--port",
         str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "no bundle" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_serve_refuses_an_address_it_cannot_listen_on(kdd_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port",
             str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "serving" not in proc.stderr and "Traceback" not in proc.stderr


def test_cli_serve_on_port_0_names_the_port_it_got(kdd_bundle: Path, lines: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        url = line.rsplit(" at ", 1)[1].strip().rstrip("/")
        assert not url.endswith(":0")
        r = httpx.post(url + "/v1/score", json={"records": lines[:3]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _reap(proc)


# -- the dashboard in a real browser -------------------------------------------------------------

def _dashboard_dom(url: str) -> subprocess.CompletedProcess[str]:
    """The dashboard at ``url`` as Chromium draws it given 5 s of page time to poll
    ``/v1/stats``."""
    return chromium_dom(url + "/", budget_ms=5000)


@pytest.mark.integration
def test_dashboard_renders_live_numbers_in_headless_chromium(kdd_bundle: Path,
                                                             lines: list[str]) -> None:
    with ThreadServer(create_app(kdd_bundle)) as srv, httpx.Client(base_url=srv.url) as c:
        body = c.post("/v1/score", json={"records": lines[:300]}).json()
        alerts = sum(r["verdict"] == "malicious" for r in body["results"])
        proc = _dashboard_dom(srv.url)
    dom = proc.stdout
    assert 'data-state="live"' in dom, (dom[:2000], proc.stderr[-2000:])
    assert '<div class="v" id="total-records">300</div>' in dom
    assert f'<div class="v" id="total-alerts">{alerts}</div>' in dom
    assert "model: mlp on kdd" in dom
    assert "<polyline" in dom
    if alerts:
        assert 'class="alert-row"' in dom


@pytest.mark.integration
def test_dashboard_counts_rejected_records_apart_from_scored_ones(kdd_bundle: Path,
                                                                  lines: list[str]) -> None:
    # "records scored" said 22 for 20 records scored and 2 rejected (/metrics said 20), and
    # "records / s" said 0 for a trickle of 22 records in the last minute
    with ThreadServer(create_app(kdd_bundle)) as srv, httpx.Client(base_url=srv.url) as c:
        body = c.post("/v1/score", json={"records": [*lines[:20], "junk", "1,2"]}).json()
        assert (len(body["results"]), len(body["rejects"])) == (20, 2)
        metrics = c.get("/metrics").text
        proc = _dashboard_dom(srv.url)
    assert re.search(r'deepwatch_records_total\{outcome="scored"\} 20\.0', metrics)
    dom = proc.stdout
    assert 'data-state="live"' in dom, (dom[:2000], proc.stderr[-2000:])
    assert '<div class="v" id="total-records">20</div>' in dom
    assert '<div class="v" id="total-rejects">2</div>' in dom
    assert '<div class="v" id="rate">0.37</div>' in dom  # 22 records in the last minute


# -- any body: an answer or a 4xx, and every record accounted for --------------------------------

def test_any_json_body_gets_results_and_rejects_or_a_4xx(kdd_bundle: Path,
                                                         lines: list[str]) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from deepwatch.serve._request import RequestError
    from deepwatch.serve._service import ScoringService

    service = ScoringService(kdd_bundle, limits=LIMITS)
    good = get_format("kdd").parse(lines[0] + "\n").batch.to_pylist()[0]
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False), st.text(max_size=30))
    field = st.sampled_from(sorted(good))
    mutated = st.builds(lambda k, v: {**good, k: v}, field, scalars)
    record = st.one_of(st.sampled_from(lines[:20]), st.text(max_size=60), mutated,
                       st.dictionaries(st.text(max_size=8), scalars, max_size=4), scalars,
                       st.lists(scalars, max_size=3))
    body = st.one_of(
        st.fixed_dictionaries({"records": st.lists(record, max_size=12)}),
        st.dictionaries(st.sampled_from(["format", "records", "explain", "x"]),
                        st.one_of(scalars, st.lists(record, max_size=3)), max_size=3))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body)
    def check(payload: dict[str, Any]) -> None:
        raw = json.dumps(payload).encode()
        try:
            answer = json.loads(service.score(raw))
        except RequestError as exc:
            assert 400 <= exc.status < 500 and exc.reason
            return
        records = payload["records"]
        indices = [r["index"] for r in answer["results"]] + [r["index"] for r in
                                                              answer["rejects"]]
        assert sorted(indices) == list(range(len(records)))
        assert all(r["reason"] for r in answer["rejects"])

    check()


@pytest.mark.slow
def test_a_hybrid_bundle_answers_with_anomaly_scores(small_kdd: Path, bundle_root: Path,
                                                     lines: list[str]) -> None:
    from conftest import trained_bundle

    bundle = trained_bundle("hybrid", small_kdd, bundle_root)  # shared with test_anomaly
    with ThreadServer(create_app(bundle)) as srv, httpx.Client(base_url=srv.url) as c:
        results = c.post("/v1/score", json={"records": lines[:200], "explain": True}).json()[
            "results"]
        unasked = c.post("/v1/score", json={"records": lines[:200]}).json()["results"]
    expected = Detector(bundle).score_batch(
        get_format("kdd").parse("\n".join(lines[:200]) + "\n").batch)
    assert len(results) == 200
    np.testing.assert_allclose([r["anomaly_score"] for r in results],
                               expected.column("anomaly_score").to_numpy(), rtol=1e-9)
    assert [r["verdict"] for r in results] == expected.column("verdict").to_pylist()
    assert [r["explanation"] for r in results] == expected.column("explanation").to_pylist()
    # as docs/rest.md and docs/anomaly.md say: the JSON array as a string, null for normal
    # records, and none at all unless asked for, though the Detector explains this bundle unasked
    verdicts = {r["verdict"] for r in results}
    assert verdicts == {"normal", "malicious"}, verdicts
    for r in results:
        if r["verdict"] == "normal":
            assert r["explanation"] is None
        else:
            top = json.loads(r["explanation"])
            assert isinstance(top, list) and top and set(top[0]) == {"feature", "share"}
    assert all("explanation" not in r for r in unasked)
    assert [r["score"] for r in unasked] == [r["score"] for r in results]


def test_dashboard_stats_stay_bounded() -> None:
    from deepwatch.serve._stats import LATENCY_SAMPLES, RECENT_ALERTS, RecentStats

    stats = RecentStats(window=60)
    for i in range(LATENCY_SAMPLES + 500):
        stats.record(records=3, alerts=1, rejects=1, seconds=0.001 * (i % 10),
                     alert_rows=[{"score": 0.9, "n": i}])
    snap = stats.snapshot()
    assert snap["totals"] == {"requests": LATENCY_SAMPLES + 500,
                              "records": 3 * (LATENCY_SAMPLES + 500),
                              "alerts": LATENCY_SAMPLES + 500, "rejects": LATENCY_SAMPLES + 500}
    assert snap["latency_ms"]["samples"] == LATENCY_SAMPLES
    assert len(snap["recent_alerts"]) == RECENT_ALERTS
    assert snap["recent_alerts"][0]["n"] == LATENCY_SAMPLES + 499, "newest first"
    assert len(snap["series"]["rows"]) == 60
    assert sum(r[2] for r in snap["series"]["rows"]) == 3 * (LATENCY_SAMPLES + 500)


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.2", False), ("localhost", False),
                                              ("0.0.0.0", True)])
def test_serving_beyond_loopback_without_a_key_is_warned_about(kdd_bundle: Path, host: str,
                                                               warned: bool) -> None:
    """The warning goes by the address the socket is bound to: all of 127/8 is loopback."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle),
                             "--host", host, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(f"http://{'127.0.0.2' if host == '127.0.0.2' else '127.0.0.1'}:{port}",
                     proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert ("without an API key" in err) == warned, err
    finally:
        _reap(proc)
