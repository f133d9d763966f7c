"""Regressions from a security audit: hostile input must end as counted rejects with a reason,
never as a failed request or a run that runs out of memory.

- a record field nested about 1,000 levels deep (the JSON parser accepts 1,024) made ``repr`` and
  ``json.dumps`` raise RecursionError while the reject's reason was written: a 500;
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402

JSON_TYPE = {"content-type": "application/json"}
LINE = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00")


@pytest.fixture(scope="module")
def server(kdd_bundle: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(kdd_bundle), **uvicorn_options()) as srv:
        yield srv


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("field", ["duration", "protocol_type", "not_a_field"])
def test_a_deeply_nested_field_is_a_reject_not_a_500(server: ThreadServer, field: str) -> None:
    # 1,000 levels: within orjson's limit, past what repr() and json.dumps() recurse through
    body = b'{"records": [{"' + field.encode() + b'": ' + _nested(1000).encode() + b'}, "' \
        + LINE.encode() + b'"]}'
    r = httpx.post(server.url + "/v1/score", content=body, headers=JSON_TYPE, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [res["index"] for res in out["results"]] == [1]
    assert [rej["index"] for rej in out["rejects"]] == [0]
    reason = out["rejects"][0]["reason"]
    assert reason.startswith("field 'duration'") or reason == "missing field 'duration'"
    assert len(reason) <= 500


def test_past_the_parser_limit_is_a_400(server: ThreadServer) -> None:
    body = b'{"records": [{"duration": ' + _nested(2000).encode() + b"}]}"
    r = httpx.post(server.url + "/v1/score", content=body, headers=JSON_TYPE, timeout=30)
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["detail"]


def test_the_reject_keeps_the_beginning_of_a_deep_record() -> None:
    from deepwatch.formats import get_format

    record = {"duration": "x", "deep": [[[[["end"]]]]]}
    deep: list[object] = []
    for _ in range(1000):
        deep = [deep]
    result = get_format("kdd").parse_records([record, {"duration": deep}])
    raws = result.rejects.column("raw").to_pylist()
    assert raws[0] == '{"duration": "x", "deep": [[[[["end"]]]]]}'  # as json.dumps writes it
    assert raws[1].startswith('{"duration": [[[[') and "..." in raws[1]
    assert len(raws[1]) <= 10_000
