"""What ``/metrics`` and ``/v1/stats`` say across a reload to a bundle of another kind (mlp to
autoencoder), in one process and with ``--workers 2``: one ``deepwatch_model_info`` series at 1,
the new model's, and the dashboard's totals counting every request answered, those a replaced
worker answered in its last second included."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer, trained_bundle, wait_healthy
from test_serve_workers import _get, _kill, _start

pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def autoencoder_bundle(small_kdd: Path, bundle_root: Path) -> Path:
    return trained_bundle("autoencoder", small_kdd, bundle_root)  # shared with other tests


def _model_info(text: str) -> dict[str, float]:
    """Every ``deepwatch_model_info`` series of a ``/metrics`` page: its labels, its value."""
    found = {}
    for line in text.splitlines():
        if line.startswith("deepwatch_model_info{"):
            labels, value = line.rsplit(" ", 1)
            found[labels] = float(value)
    return found


def _served_kind(text: str) -> str:
    info = _model_info(text)
    assert list(info.values()) == [1.0], info  # one model served: one series, at 1
    return next(iter(info)).split('kind="', 1)[1].split('"', 1)[0]


def test_one_process_gives_only_the_reloaded_model(kdd_bundle: Path, autoencoder_bundle: Path,
                                                   small_kdd: Path) -> None:
    records = small_kdd.read_text().splitlines()[:20]
    with ThreadServer(create_app(kdd_bundle)) as srv, httpx.Client(base_url=srv.url) as c:
        assert _served_kind(c.get("/metrics").text) == "mlp"
        for bundle, kind in ((autoencoder_bundle, "autoencoder"), (kdd_bundle, "mlp")):
            r = c.post("/v1/reload", json={"bundle": str(bundle)})
            assert r.status_code == 200, r.text
            assert _served_kind(c.get("/metrics").text) == kind
            assert c.post("/v1/score", json={"records": records}).status_code == 200
        assert c.get("/v1/stats").json()["totals"]["requests"] == 2


@pytest.mark.slow
def test_workers_give_only_the_reloaded_model_and_keep_every_request_in_the_totals(
        kdd_bundle: Path, autoencoder_bundle: Path, small_kdd: Path, tmp_path: Path) -> None:
    """The requests are answered just before the reload is asked for: the replaced workers have
    not published them yet (they do every second), only as they stop."""
    records = small_kdd.read_text().splitlines()[:20]
    log = tmp_path / "serve.log"
    proc, url = _start(kdd_bundle, log)
    try:
        wait_healthy(url, proc)
        assert _served_kind(_get(url, "/metrics").text) == "mlp"
        old = {_get(url, "/healthz").json()["pid"] for _ in range(20)}
        sent = 0
        for n, (bundle, kind) in enumerate(((autoencoder_bundle, "autoencoder"),
                                            (kdd_bundle, "mlp")), 1):
            for _ in range(25):
                assert _get(url, "/v1/score", "POST", json={"records": records}).status_code == 200
                sent += 1
            r = _get(url, "/v1/reload", "POST", json={"bundle": str(bundle)})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 60
            while True:  # every answer from a new worker
                answers = [_get(url, "/healthz").json()["pid"] for _ in range(10)]
                if not set(answers) & old:
                    break
                assert time.monotonic() < deadline, f"workers not replaced: {answers}"
                time.sleep(0.2)
            deadline = time.monotonic() + 10
            while log.read_text().count("SIGHUP: every worker replaced") < n:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            old = set(answers)
            for _ in range(6):  # whichever worker answers
                assert _served_kind(_get(url, "/metrics").text) == kind
                assert _get(url, "/v1/stats").json()["totals"]["requests"] == sent
    except BaseException:
        _kill(proc)
        raise AssertionError(f"server log:\n{log.read_text()[-4000:]}") from None
    finally:
        _kill(proc)
