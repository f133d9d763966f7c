"""Defects found by a review of the REST service, each against a real uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app  # noqa: E402

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
