"""``serve --workers 2`` applies every serve option in each worker as one process does: the API
key, the engine, the body and upload limits, and the proxies trusted to name the client (TLS
with workers: ``test_serve_tls``)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import serving

pytest.importorskip("uvicorn")

KEY = "workers-options-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"body_timeout_seconds": 29.0, "body_min_rate": 3.0, "body_rate_grace_seconds": 27.0,
          "max_uploads": 7, "max_client_uploads": 5, "upload_wait_seconds": 1.5}


def _stats(url: str) -> dict[str, Any]:
    """``/v1/stats`` on a new connection: any worker may answer (its pid is in ``intake``)."""
    r = httpx.get(url + "/v1/stats", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _upload_from(port: int, client: str) -> socket.socket:
    """A score request whose body has begun to arrive, sent through a proxy on 127.0.0.1 for
    ``client``: it stays in its worker's count of bodies arriving, by client, until closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST /v1/score HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}"
                 f"\r\nX-Forwarded-For: {client}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 1000\r\n\r\n{{".encode())
    return sock


def test_every_worker_applies_the_serve_options(kdd_bundle: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    options = ["--workers", "2", "--api-key-file", str(key_file), "--backend", "torch",
               "--forwarded-allow-ips", "127.0.0.1", "--body-timeout", "29",
               "--body-min-rate", "3", "--body-rate-grace", "27", "--max-uploads", "7",
               "--max-client-uploads", "5", "--upload-wait", "1.5"]
    with serving(kdd_bundle, *options) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        seen: dict[int, dict[str, Any]] = {}  # each worker's stats, by pid
        deadline = time.monotonic() + 30
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"one worker answers: {sorted(seen)}"
            snap = _stats(url)
            seen[snap["intake"]["pid"]] = snap
        assert proc.pid not in seen
        for snap in seen.values():
            assert {k: snap["limits"][k] for k in LIMITS} == LIMITS, snap["limits"]
            assert snap["model"]["engine"].startswith("torch"), snap["model"]  # not onnx
        # no key, no answer, whichever worker takes the connection (both take some of 20)
        assert {httpx.get(url + "/v1/stats", timeout=30).status_code
                for _ in range(20)} == {401}
        # each worker counts a body by the client its trusted proxy names, not by the proxy
        # (which worker accepts a connection is the kernel's choice: an upload whose worker
        # already showed one is closed again, so that no worker nears --max-uploads however
        # many land on it before the other takes one; six in a row on one worker was seen)
        open_uploads: dict[str, socket.socket] = {}
        clients: dict[int, set[str]] = {}  # the clients seen uploading, by worker
        sent = 0
        try:
            while len(clients) < 2:
                assert sent < 40 and time.monotonic() < deadline + 60, clients
                sent += 1
                client = f"203.0.113.{sent}"
                open_uploads[client] = _upload_from(port, client)
                for _ in range(20):  # see both workers' counts
                    intake = _stats(url)["intake"]
                    if client in intake["clients"]:
                        if intake["pid"] in clients:
                            open_uploads.pop(client).close()
                        clients.setdefault(intake["pid"], set()).update(intake["clients"])
                        break
        finally:
            for sock in open_uploads.values():
                sock.close()
        named = {f"203.0.113.{i + 1}" for i in range(sent)}
        assert all(found <= named for found in clients.values()), clients
