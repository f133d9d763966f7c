"""Defects found by a third review of the REST service, each against a real uvicorn server run
with ``deepwatch serve``'s own settings (its h11 protocol)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

KEY = "review-c-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle, api_key=KEY), **uvicorn_options()) as srv:
        yield srv


@pytest.fixture(scope="module")
def open_server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    """No key: on loopback the ``Host`` check is all that stands between a web page and it."""
    with ThreadServer(create_app(kdd_bundle), **uvicorn_options()) as srv:
        yield srv


# -- the OpenAPI schema and the docs page with a key ---------------------------------------------

def test_the_schema_declares_the_bearer_key_the_gate_asks_for(keyed: ThreadServer) -> None:
    """With a key, the schema said nothing of it: the docs page had no "Authorize" button, so
    its "Try it out" calls went without the key (401), and clients made from the schema knew
    of no key. It declares an HTTP bearer scheme for every operation but /healthz."""
    schema = httpx.get(keyed.url + "/openapi.json", headers=AUTH).json()
    schemes = schema["components"]["securitySchemes"]
    assert list(schemes.values()) == [
        {"type": "http", "scheme": "bearer", "description": "The key of serve's --api-key-file"}]
    (name,) = schemes
    assert schema["security"] == [{name: []}]
    paths = schema["paths"]
    assert paths["/healthz"]["get"]["security"] == [], "/healthz needs no key"
    keyed_operations = [(path, method) for path, ops in paths.items() for method in ops
                        if path != "/healthz"]
    assert ("/v1/score", "post") in keyed_operations
    for path, method in keyed_operations:
        operation = paths[path][method]
        assert "security" not in operation, "the schema's own: the key"
        assert "401" in operation["responses"], (path, method)
        # and the gate agrees with the schema, over HTTP
        r = httpx.request(method.upper(), keyed.url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(keyed.url + "/healthz").status_code == 200


def test_the_docs_page_and_schema_stay_behind_the_key(keyed: ThreadServer) -> None:
    """The decision taken (docs/rest.md): the page and the schema still need the key, as every
    endpoint but /healthz does; with it the page loads and points at the schema."""
    for path in ("/docs", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(keyed.url + path).status_code == 401, path
    page = httpx.get(keyed.url + "/docs", headers=AUTH)
    assert page.status_code == 200 and "'/openapi.json'" in page.text


def test_without_a_key_the_schema_declares_none(open_server: ThreadServer) -> None:
    schema = httpx.get(open_server.url + "/openapi.json").json()
    assert "security" not in schema
    assert "securitySchemes" not in schema.get("components", {})


# -- two Host headers ----------------------------------------------------------------------------

def _raw(server: ThreadServer, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` (a request without a body) on a connection of its own: the status and
    the whole answer, read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def _get(path: str, *hosts: str, extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\n".encode()
            + b"".join(f"Host: {h}\r\n".encode() for h in hosts)
            + extra + b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("hosts", [("evil.example", "localhost"), ("localhost", "evil.example"),
                                   ("localhost", "localhost")])
@pytest.mark.parametrize("path", ["/v1/stats", "/v1/stats/", "/healthz"])
def test_two_host_headers_are_a_400(open_server: ThreadServer, hosts: tuple[str, str],
                                    path: str) -> None:
    """RFC 9112 (3.2): a request with more than one Host header is answered 400. It was
    served: the DNS-rebinding check read the last Host and Starlette the first, so
    ``Host: evil.example`` then ``Host: localhost`` passed the check (200 with the
    statistics) and a redirect was built on the other name (``Location:
    http://evil.example/v1/stats``)."""
    status, answer = _raw(open_server, _get(path, *hosts))
    assert status == 400, answer
    assert b"more than one Host header" in answer
    assert b"evil.example" not in answer


def test_one_host_header_is_served_as_before(open_server: ThreadServer) -> None:
    assert _raw(open_server, _get("/v1/stats", "localhost"))[0] == 200
    assert _raw(open_server, _get("/v1/stats", "evil.example"))[0] == 421
    assert _raw(open_server, _get("/healthz", "evil.example"))[0] == 200


def test_with_a_key_two_host_headers_are_refused_too(keyed: ThreadServer) -> None:
    assert _raw(keyed, _get("/v1/stats", "localhost", "localhost"))[0] == 401, "the key first"
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    status, answer = _raw(keyed, _get("/v1/stats", "evil.example", "localhost", extra=auth))
    assert status == 400, answer
    assert _raw(keyed, _get("/v1/stats", "localhost", extra=auth))[0] == 200
