"""``GET /docs``: the API page needs nothing but the server. It was FastAPI's Swagger UI page,
whose script and style came from cdn.jsdelivr.net: offline it stayed blank, and a third
party's script ran on the service's origin, in the page where the key is typed. Checked on a
real uvicorn server, in real headless Chromium with every name but 127.0.0.1 unresolvable and
its network log read back."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ThreadServer, need

pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

KEY = "docs-page-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def open_server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle), **uvicorn_options()) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle, api_key=KEY), **uvicorn_options()) as srv:
        yield srv


def _offline_chromium(url: str) -> tuple[str, list[dict[str, Any]]]:
    """The DOM of the page at ``url`` as headless Chromium draws it with no name but
    127.0.0.1 resolving (as offline), and the requests it started (from its network log:
    each one's ``url`` and ``initiator``, the origin of the page that asked for it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    need(browser is not None, "chromium (apt-get install -y chromium)")
    assert browser is not None
    with tempfile.TemporaryDirectory() as profile:
        netlog = Path(profile) / "net.json"
        run = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-dev-shm-usage",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             f"--log-net-log={netlog}", f"--user-data-dir={profile}/p",
             "--virtual-time-budget=3000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=False)
        events = json.loads(netlog.read_text())["events"]
    starts = [e["params"] for e in events
              if "initiator" in e.get("params", {}) and "url" in e["params"]]
    assert starts, run.stderr[-2000:]
    return run.stdout, starts


@pytest.mark.integration
def test_the_api_page_lists_every_operation_with_nothing_from_elsewhere(
        open_server: ThreadServer) -> None:
    schema = httpx.get(open_server.url + "/openapi.json").json()
    dom, requests = _offline_chromium(open_server.url + "/docs")
    assert 'data-state="ready"' in dom, dom[:3000]
    operations = set(re.findall(r'data-operation="([A-Z]+ [^"]+)"', dom))
    assert operations == {f"{method.upper()} {path}" for path, ops in schema["paths"].items()
                          for method in ops}
    assert "POST /v1/score" in operations
    # the score operation's summary, request body fields and response schemas are drawn
    assert schema["paths"]["/v1/score"]["post"]["summary"] in dom
    for field in ("records", "explain", "ScoreResponse", "results", "rejects", "verdict"):
        assert f">{field}<" in dom, field
    # every request the page made went to this server (the page itself, /openapi.json)
    origin = open_server.url
    from_page = [r["url"] for r in requests if r["initiator"] == origin]
    assert f"{origin}/openapi.json" in from_page
    assert all(u.startswith(origin + "/") for u in from_page), from_page
    assert not [r for r in requests if "jsdelivr" in r["url"] or "tiangolo" in r["url"]]


def test_the_page_and_its_policy_name_no_other_origin(keyed: ThreadServer) -> None:
    """Behind the key, as every endpoint but /healthz; its own inline script and style only,
    fetching only from this server."""
    assert httpx.get(keyed.url + "/docs").status_code == 401
    page = httpx.get(keyed.url + "/docs", headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http" not in policy and "*" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", page.text)
    assert "/docs" not in httpx.get(keyed.url + "/openapi.json", headers=AUTH).json()["paths"]


@pytest.mark.integration
def test_with_a_key_the_page_sends_it_for_the_schema(keyed: ThreadServer) -> None:
    """A proxy sends the key for the page (docs/rest.md), and the page sends the one in its URL
    fragment with its request for /openapi.json: it lists the operations; without a key in the
    fragment it says the schema needs one."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def docs(request: Request) -> Response:
        real = httpx.get(keyed.url + "/docs", headers=AUTH)
        return Response(real.content, media_type="text/html", headers={
            k: v for k, v in real.headers.items() if k == "content-security-policy"})

    async def schema(request: Request) -> Response:  # passed on as the page sent it
        sent = {k: v for k, v in request.headers.items() if k == "authorization"}
        real = httpx.get(keyed.url + "/openapi.json", headers=sent)
        return Response(real.content, status_code=real.status_code,
                        media_type="application/json")

    proxy = Starlette(routes=[Route("/docs", docs), Route("/openapi.json", schema)])
    with ThreadServer(proxy) as front:
        with_key, _ = _offline_chromium(front.url + f"/docs#key={KEY}")
        without, _ = _offline_chromium(front.url + "/docs")
    assert 'data-state="ready"' in with_key, with_key[:3000]
    assert 'data-operation="POST /v1/score"' in with_key
    assert 'data-state="error"' in without, without[:3000]
    assert "401: type the API key above" in without
