"""Defects found by a fresh review of the REST service, each against a real uvicorn server run
with ``deepwatch serve``'s own settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app, read_api_key, uvicorn_options  # noqa: E402

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


def test_a_key_file_saved_with_a_byte_order_mark_takes_its_key(kdd_bundle: Path,
                                                              tmp_path: Path) -> None:
    """A key file written by an editor that starts UTF-8 with a byte order mark (Notepad,
    PowerShell 5's ``Set-Content -Encoding UTF8``) made U+FEFF part of the key: every client
    sending the key in the file got 401, and only one sending the mark's bytes got in. The
    mark is not part of the key."""
    key_file = tmp_path / "key.txt"
    key_file.write_bytes(b"\xef\xbb\xbfbom-key-0123\r\n")
    key = read_api_key(key_file)
    with ThreadServer(create_app(kdd_bundle, api_key=key), **uvicorn_options()) as srv:
        assert httpx.get(srv.url + "/v1/stats").status_code == 401
        r = httpx.get(srv.url + "/v1/stats", headers={"Authorization": "Bearer bom-key-0123"})
        assert r.status_code == 200, r.text
        marked = httpx.get(srv.url + "/v1/stats",
                           headers={"Authorization": b"Bearer \xef\xbb\xbfbom-key-0123"})
        assert marked.status_code == 401


LINE = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.")


@pytest.mark.parametrize("body", [
    '{"records": [LINE, LINE], "records": ["not a record"]}',
    '{"records": [LINE, LINE], "rec\\u006frds": ["not a record"]}',  # the same key, escaped
    '{"format": "nslkdd", "records": [LINE], "format": "kdd"}',
])
def test_a_key_given_twice_in_the_body_is_refused(server: ThreadServer, body: str) -> None:
    """JSON with a key twice was read as its last: ``{"records": [A, B], "records": [C]}``
    scored C alone as index 0 and dropped A and B without a word (neither a result nor a
    reject), and a proxy or filter that reads the first (some do) saw other records or another
    format than the model scored. It is refused as a whole: 422 naming the key."""
    body = body.replace("LINE", f'"{LINE}"')
    r = httpx.post(server.url + "/v1/score", content=body, headers=JSON_TYPE, timeout=30)
    assert r.status_code == 422, r.text
    assert "more than once" in r.json()["detail"]
    key = "'format'" if '"format"' in body else "'records'"
    assert key in r.json()["detail"]


def test_the_key_names_within_records_are_no_repeats(server: ThreadServer) -> None:
    """Record text (or an object's field) that reads like a key is not a key of the body."""
    body = {"records": ["records", '"records"', LINE, {"records": 1, "format": "kdd"}],
            "format": "kdd"}
    r = httpx.post(server.url + "/v1/score", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [2]
    assert [x["index"] for x in r.json()["rejects"]] == [0, 1, 3]
