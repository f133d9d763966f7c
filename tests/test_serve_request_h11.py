"""``POST /v1/score`` records naming a field twice, and what ``POST /v1/reload``'s refusal
quotes, each against a real uvicorn server run with ``deepwatch serve``'s own settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.formats import get_format  # noqa: E402
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

JSON_TYPE = {"content-type": "application/json"}
LINE = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.")


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle), **uvicorn_options()) as srv:
        yield srv


def _fields() -> str:
    """LINE as the members of a JSON object of fields (without the braces)."""
    record = get_format("kdd").parse(LINE + "\n").batch.to_pylist()[0]
    return orjson.dumps(record).decode()[1:-1]


@pytest.mark.parametrize("repeat", [
    '"src_bytes": 999999999, {fields}',  # the first is the one dropped
    '{fields}, "src_bytes": 999999999',  # the last
    '{fields}, "src_bytes" : 999999999',  # spaced
    '{fields}, "src\\u005fbytes": 999999999',  # the name written with an escape
])
def test_a_record_naming_a_field_twice_is_a_reject(server: ThreadServer, repeat: str) -> None:
    """A record object with a field twice was scored with the last value (orjson keeps it),
    without a word: which of the two the sender meant, and which a proxy or filter reading the
    first saw, is not known. Such a record is a reject naming the field; the others in the
    request are scored as ever."""
    fields = _fields()
    body = ('{"records": [{' + repeat.format(fields=fields) + '}, {' + fields + '}, "'
            + LINE + '"]}')
    r = httpx.post(server.url + "/v1/score", content=body, headers=JSON_TYPE, timeout=30)
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [1, 2]
    assert r.json()["rejects"] == [{"index": 0, "reason": "the record names 'src_bytes' more "
                                    "than once (a JSON reader keeps only one of them); send "
                                    "each field once"}]


def test_a_body_with_colons_and_nested_objects_and_no_repeat_is_scored(
        server: ThreadServer) -> None:
    """Text holding ``":`` and a field whose value is an object make the body read again to
    tell; none of its keys is repeated, so nothing is refused for that."""
    fields = _fields()
    body = ('{"records": ["' + LINE + '", "x\\": {\\"a\\": 1, \\"a\\": 2}", {' + fields
            + '}, {"src_bytes": {"a": 1, "a": 2}}]}')
    r = httpx.post(server.url + "/v1/score", content=body, headers=JSON_TYPE, timeout=30)
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [0, 2]
    assert [x["index"] for x in r.json()["rejects"]] == [1, 3]
    assert all("more than once" not in x["reason"] for x in r.json()["rejects"])


def test_the_reload_refusal_writes_invisible_characters_of_the_path_visibly(
        server: ThreadServer, tmp_path: Path) -> None:
    """``POST /v1/reload`` quoted the path sent as it was: a right-to-left override (U+202E),
    a zero-width space or a line separator reached the client's terminal or log raw, where
    ``/x<U+202E>gpj.exe`` reads as ``/xexe.jpg``. They are written visibly, as a report writes
    such characters of a label."""
    path = f"{tmp_path}/x\u202egpj.exe\u200b\u2028\x1by"
    r = httpx.post(server.url + "/v1/reload", json={"bundle": path}, timeout=30)
    assert r.status_code == 422, r.text
    for ch in "\u202e\u200b\u2028\x1b":
        assert ch.encode() not in r.content
        assert ch not in r.json()["detail"]
    assert f"{tmp_path}/x<U+202E>gpj.exe<U+200B><U+2028><U+001B>y" in r.json()["detail"]


def test_a_bundle_named_in_latin1_is_described_and_its_refusal_told(
        kdd_bundle: Path, tmp_path: Path) -> None:
    """A bundle served from a directory named in Latin-1 (a byte that is not UTF-8, kept by
    Python as a lone surrogate) made ``/v1/stats`` and ``POST /v1/reload`` a 500 (orjson
    cannot write the surrogate), and the reload's refusal once the directory was gone too.
    The byte is written ``\\xHH``, as the formats write such bytes."""
    served = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    shutil.copytree(kdd_bundle, served)
    with ThreadServer(create_app(served), **uvicorn_options()) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        stats = c.get("/v1/stats")
        assert stats.status_code == 200, stats.text
        assert stats.json()["model"]["bundle"] == f"{tmp_path}/caf\\xE9"
        reloaded = c.post("/v1/reload")
        assert reloaded.status_code == 200, reloaded.text
        shutil.rmtree(served)
        refused = c.post("/v1/reload")
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].endswith(f"no bundle at {tmp_path}/caf\\xE9")
