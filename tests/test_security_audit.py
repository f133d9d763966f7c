"""Regressions from a security audit: hostile input must end as counted rejects with a reason,
never as a failed request or a run that runs out of memory.

- a record field nested about 1,000 levels deep (the JSON parser accepts 1,024) made ``repr`` and
  ``json.dumps`` raise RecursionError while the reject's reason was written: a 500;
- a line without an end (a file or a gzip bomb with no line break) was held in memory whole and
  parsed as one record: a 1.3 MB .gz took 4 GB, a larger one ended the run. A line over
  ``MAX_LINE_BYTES`` is now one reject, its beginning kept.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer

uvicorn = pytest.importorskip("uvicorn")
from deepwatch.formats._base import MAX_RAW  # noqa: E402
from deepwatch.serve.app import create_app, uvicorn_options  # noqa: E402
from deepwatch.sources.files import (  # noqa: E402
    BOM,
    MAX_LINE_BYTES,
    Chunk,
    InputSpec,
    LineBuffer,
)

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


# -- over-long lines ----------------------------------------------------------------------------

def _read(data: bytes, block: int, max_line: int) -> list[Chunk]:
    lines = LineBuffer(InputSpec("x"), max_line=max_line)
    out: list[Chunk] = []
    for i in range(0, len(data), block):
        out.extend(lines.feed(data[i : i + block]))
    last = lines.finish()
    return out + ([last] if last is not None else [])


@pytest.mark.parametrize("block", [3, 7, 64, 1 << 16])
def test_an_over_long_line_is_one_reject_wherever_the_blocks_cut(block: int) -> None:
    long = b"x" * 100
    data = BOM + long + b"\na\nbb\n" + long + b"\r\nccc\n" + long  # the last has no line break
    chunks = _read(data, block, max_line=20)
    kept = b"".join(c.data for c in chunks if c.damage is None)
    assert kept == b"a\nbb\nccc\n"
    longs = [c for c in chunks if c.damage is not None]
    assert [c.first_line for c in longs] == [1, 4, 6]
    assert [c.lost for c in longs] == [long, long + b"\r", long]
    assert all("over the limit of 20 bytes" in c.damage for c in longs if c.damage)
    # every line keeps its number in the input
    numbered = {c.first_line + i: text for c in chunks if c.damage is None
                for i, text in enumerate(c.data.split(b"\n")[:-1])}
    assert numbered == {2: b"a", 3: b"bb", 5: b"ccc"}


def test_lines_up_to_the_limit_are_kept(tmp_path: Path) -> None:
    data = b"y" * 20 + b"\n" + b"z" * 21 + b"\n"
    for block in (1, 5, 64):
        chunks = _read(data, block, max_line=20)
        assert b"".join(c.data for c in chunks) == b"y" * 20 + b"\n"
        assert [c.first_line for c in chunks if c.damage] == [2]


def _score(args: list[str], tmp_path: Path) -> tuple[str, int]:
    """Run ``deepwatch score`` in a process of its own: its stderr and peak memory (KiB)."""
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True)\n"
             "sys.stderr.write(p.stderr)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.exit(p.returncode)\n")
    got = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "deepwatch",
                          "score", *args], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    return got.stderr, int(got.stdout.split()[-1])


def test_a_decompression_bomb_without_line_breaks_is_one_reject_in_bounded_memory(
        kdd_bundle: Path, tmp_path: Path) -> None:
    # 200 MB of text in under 1 MB of gzip, without a line break: it was held whole, and the
    # parse of it took about 13 times its size (2.6 GB); a larger bomb ended the run
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        block = b"A" * (1 << 20)
        for _ in range(200):
            f.write(block)
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    err, peak_kib = _score([str(kdd_bundle), "--format", "kdd", "--out", str(out),
                            "--rejects", str(rejects), str(bomb)], tmp_path)
    assert "1 lines read: 0 parsed, 1 rejected" in err
    [reject] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert reject["line"] == 1 and reject["raw"] == "A" * MAX_RAW
    assert f"the line is {200 << 20:,} bytes long, over the limit of" in reject["reason"]
    assert peak_kib < 1_200_000, f"peak memory {peak_kib:,} KiB"


def test_an_over_long_line_among_records_is_counted_and_kept(kdd_bundle: Path,
                                                             tmp_path: Path) -> None:
    src = tmp_path / "mixed.csv"
    src.write_bytes((LINE + "\n").encode() * 2 + b"B" * (3 << 20) + b"\n"
                    + (LINE + "\n").encode() * 2)
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    err, _ = _score([str(kdd_bundle), "--format", "kdd", "--out", str(out),
                     "--rejects", str(rejects), str(src)], tmp_path)
    assert "5 lines read: 4 parsed, 1 rejected" in err
    assert len(out.read_text().splitlines()) == 4
    [reject] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert reject["line"] == 3 and reject["raw"].startswith("BBBB")
    assert f"{MAX_LINE_BYTES:,} bytes for one record" in reject["reason"]


# -- a lake whose manifest is not an object -----------------------------------------------------

@pytest.mark.parametrize("text", ["[1]", '"kdd"', '{"version": 1}',
                                  "[" * 100_000 + "]" * 100_000])
def test_a_malformed_lake_manifest_is_one_clear_error(tmp_path: Path, text: str) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "_lake.json").write_text(text)
    got = subprocess.run([sys.executable, "-m", "deepwatch", "train", "--format", "kdd",
                          "--model", "mlp", "--out", str(tmp_path / "b"), "--lake", str(lake)],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode != 0
    assert "Traceback" not in got.stderr
    assert got.stderr.strip().count("\n") == 0, got.stderr
    assert "_lake.json" in got.stderr
