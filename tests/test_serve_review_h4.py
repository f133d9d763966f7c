"""Defects found by a fresh review of the REST service, each against a real uvicorn server run
with ``deepwatch serve``'s own settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

JSON_TYPE = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle), **uvicorn_options()) as srv:
        yield srv


def test_reload_of_a_path_holding_a_nul_is_a_422(server: ThreadServer) -> None:
    """``{"bundle": "a\\u0000b"}`` (valid JSON) was a 500 and a traceback in the log
    (ValueError: embedded null byte, from the stat of the path); no path holds a NUL, so it is
    a bundle that cannot load: 422 with the reason, the model served kept, the reload counted
    as failed."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = c.get("/healthz").json()["generation"]
        failed = _failed_reloads(c)
        r = c.post("/v1/reload", content=b'{"bundle": "models\\u0000/x"}', headers=JSON_TYPE)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "still serving the previous one" in detail and "NUL" in detail
        assert c.get("/healthz").json()["generation"] == before
        assert _failed_reloads(c) == failed + 1


def _failed_reloads(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith('deepwatch_model_reloads_total{result="failed"}'):
            return float(line.split()[-1])
    raise AssertionError("no failed-reloads counter")
