"""Web request features: values on known requests, and stream-vs-whole-file equality."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwatch.features import Featurizer
from deepwatch.features._text import char_classes, entropy, hashed_ngrams
from deepwatch.features._window import WINDOW_COLUMNS
from deepwatch.features.web import DERIVED_MARK, access_feature_spec, derive_access
from deepwatch.formats import get_format

FMT = get_format("access")


def _line(ip: str, second: int, path: str, status: int = 200, method: str = "GET",
          agent: str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/124.0 Safari/537.36",
          referer: str = "-") -> str:
    minute, sec = divmod(second, 60)
    hour, minute = divmod(minute, 60)
    return (f'{ip} - - [14/May/2024:{hour:02d}:{minute:02d}:{sec:02d} +0000] '
            f'"{method} {path} HTTP/1.1" {status} 512 "{referer}" "{agent}"')


def _table(lines: list[str]) -> pa.Table:
    res = FMT.parse("\n".join(lines) + "\n")
    assert res.rejects.num_rows == 0
    return pa.Table.from_batches([res.batch])


def test_text_statistics() -> None:
    arr = pa.array(["aaaa", "ab", "", None, "A1/%"])
    cc = char_classes(arr)
    assert cc["length"].tolist() == [4, 2, 0, 0, 4]
    assert cc["digits"].tolist() == [0, 0, 0, 0, 1]
    assert cc["upper"].tolist() == [0, 0, 0, 0, 1]
    assert cc["special"].tolist() == [0, 0, 0, 0, 2]
    assert np.allclose(entropy(arr), [0.0, 1.0, 0.0, 0.0, 2.0])
    grams = hashed_ngrams(arr, 3, 8)
    # framed strings: "aaaa" -> 4 trigrams of 6 framed bytes, "" -> 0 (2 framed bytes)
    assert grams.sum(axis=1).tolist() == [4, 2, 0, 0, 4]
    # the hash is fixed: the same string always lands in the same buckets
    assert np.array_equal(hashed_ngrams(pa.array(["ab"]), 3, 8)[0], grams[1])


def test_request_features() -> None:
    t = _table([
        _line("8.8.8.8", 0, "/shop/item.php?id=1%27%20OR%201=1&x=2", referer="https://a.example/"),
        _line("10.1.2.3", 5, "/static/../../etc/passwd", status=404,
              agent="Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
                    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"),
    ])
    d = derive_access(t, {}, {}).to_pylist()
    a, b = d[0], d[1]
    assert a["query_params"] == 2 and a["percent_encodings"] == 3
    assert a["extension"] == "php" and a["status_class"] == "2"
    assert a["referer_host"] == "a.example" and a["has_referer"] == 1.0
    assert a["country"] == "US" and a["ip_private"] == 0.0
    assert a["browser"] == "Chrome" and a["device"] == "desktop"
    assert b["path_dots"] == 2 and b["status_code"] == "404"
    assert b["country"] == "private" and b["ip_private"] == 1.0
    assert b["device"] == "mobile" and b["browser"] == "Mobile Safari"
    assert b["has_referer"] == 0.0


def test_a_size_no_float_holds_exactly_is_a_feature_not_a_crash() -> None:
    # a client may make a server log any size: 9223372036854775807 (2**63 - 1) passed the
    # parse, then the features' cast to float refused it (not exact), and one such line made
    # the whole `score` run, or the REST request, fail with a traceback / a 500
    line = _line("1.2.3.4", 0, "/").replace(" 200 512 ", " 200 9223372036854775807 ")
    t = _table([line, _line("1.2.3.4", 1, "/")])
    d = derive_access(t, {}, {}).to_pylist()
    assert d[0]["bytes"] == float(2**63 - 1) and d[1]["bytes"] == 512.0
    fz = Featurizer(access_feature_spec()).fit(t)
    assert np.isfinite(fz.transform(t)).all()


def test_window_features_per_client() -> None:
    lines = [_line("1.1.1.1", i, f"/p{i % 2}", status=404 if i % 4 == 0 else 200)
             for i in range(8)]
    lines.insert(3, _line("2.2.2.2", 3, "/x", method="POST"))
    d = derive_access(_table(lines), {"window": 4}, {})
    req = d.column("win_requests").to_pylist()
    assert req == [1, 2, 3, 1, 4, 4, 4, 4, 4]
    assert d.column("win_gap").to_pylist()[:3] == [3600.0, 1.0, 1.0]
    assert d.column("win_post_share").to_pylist()[3] == 1.0
    assert d.column("win_distinct_paths").to_pylist()[-1] == 0.5
    # window of the last client-1 row: seconds 4..7, one 404 (second 4)
    assert d.column("win_404_share").to_pylist()[-1] == 0.25
    assert d.column("win_rate").to_pylist()[-1] == pytest.approx(4 / 3 * 60)


def _traffic(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    clients = [f"9.9.{i}.{i}" for i in range(7)]
    lines = [_line(clients[int(rng.integers(7))], int(rng.integers(0, 3000)),
                   f"/p{int(rng.integers(5))}", status=int(rng.choice([200, 404, 500])),
                   method=str(rng.choice(["GET", "POST"])))
             for _ in range(n)]
    return _table(lines)


@pytest.mark.parametrize("batch", [1, 7, 64, 333])
def test_stream_equals_whole_file(batch: int) -> None:
    table = _traffic(120 if batch == 1 else 400, seed=batch)
    whole = derive_access(table, {}, {})
    state: dict[str, object] = {}
    parts = [derive_access(table.slice(i, batch), {}, state)
             for i in range(0, table.num_rows, batch)]
    streamed = pa.concat_tables(parts)
    for col in WINDOW_COLUMNS:
        assert np.array_equal(streamed.column(col).to_numpy(), whole.column(col).to_numpy()), col
    assert streamed.column("url_entropy").to_pylist() == whole.column("url_entropy").to_pylist()


def test_featurizer_stream_equals_whole_and_round_trips() -> None:
    table = _traffic(300, seed=1)
    fz = Featurizer(access_feature_spec()).fit(table)
    whole = fz.transform(table, {})
    state: dict[str, object] = {}
    streamed = np.concatenate([fz.transform(table.slice(i, 50), state)
                               for i in range(0, table.num_rows, 50)])
    assert np.array_equal(whole, streamed)
    again = Featurizer.from_json(fz.to_json())
    assert np.array_equal(again.transform(table, {}), whole)
    assert np.isfinite(whole).all()
    assert any(n.startswith("browser=") for n in fz.feature_names_)


def test_derivation_is_idempotent() -> None:
    table = _traffic(50, seed=3)
    once = derive_access(table, {}, {})
    assert DERIVED_MARK in once.schema.names
    assert derive_access(once, {}, {"access_window": None}) is once


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8), st.integers(0, 10**6))
def test_property_any_batching_gives_the_same_windows(cuts: list[int], seed: int) -> None:
    table = _traffic(90, seed=seed)
    whole = derive_access(table, {"window": 5}, {})
    state: dict[str, object] = {}
    parts, start = [], 0
    for size in [*cuts, table.num_rows]:
        if start >= table.num_rows:
            break
        parts.append(derive_access(table.slice(start, size), {"window": 5}, state))
        start += size
    streamed = pa.concat_tables(parts)
    for col in WINDOW_COLUMNS:
        assert np.array_equal(streamed.column(col).to_numpy(), whole.column(col).to_numpy()), col


def _hours(fz: Featurizer, table: pa.Table) -> list[float]:
    """The hour of day each record's ``hour_sin`` and ``hour_cos`` features stand for."""
    x = fz.transform(table, {}).astype(np.float64)
    sin, cos = ((x[:, fz.feature_names_.index(c)] * fz.std_[c] + fz.mean_[c])
                for c in ("hour_sin", "hour_cos"))
    return [round(float(h), 3) for h in (np.degrees(np.arctan2(sin, cos)) / 15.0) % 24.0]


def test_a_new_featurizer_reads_the_local_hour_and_an_old_one_the_utc_hour() -> None:
    """The hour-of-day features were the UTC hour: the offset of ``[... -0700]`` was dropped
    at parse, so a server's 10:00 local was hour 17. A featurizer fitted now reads the local
    hour (its saved params say so: ``local_hour``); one saved before (its params lack the key)
    computes exactly what it did, so an old bundle scores as it always did."""
    day = _table([_line(f"9.9.{i % 7}.1", i * 288, f"/p{i % 5}") for i in range(300)])
    fz = Featurizer(access_feature_spec()).fit(day)  # every hour: no feature at its clip
    assert fz.to_dict()["spec"]["derive"]["params"]["local_hour"] is True
    lines = [_line("10.0.0.1", 36000, "/a").replace("+0000", "-0700"),  # 17:00 UTC
             _line("10.0.0.2", 81000, "/b").replace("+0000", "+0530"),  # 17:00 UTC
             _line("10.0.0.3", 3600, "/c")]  # 01:00 UTC
    table = _table(lines)
    assert _hours(fz, table) == [10.0, 22.5, 1.0]

    old = fz.to_dict()  # as the featurizer was saved before the key existed
    del old["spec"]["derive"]["params"]["local_hour"]
    before = Featurizer.from_json(json.dumps(old))
    assert _hours(before, table) == [17.0, 17.0, 1.0]
    # everything else it computes is the new featurizer's
    rest = [j for j, n in enumerate(fz.feature_names_) if not n.startswith("hour_")]
    assert np.array_equal(before.transform(table, {})[:, rest], fz.transform(table, {})[:, rest])
    # records with no offset (JSON objects that give none, an older lake) read as UTC
    assert _hours(fz, table.drop_columns(["utc_offset_minutes"])) == [17.0, 17.0, 1.0]
    assert _hours(fz, table.set_column(
        table.schema.get_field_index("utc_offset_minutes"), "utc_offset_minutes",
        pa.nulls(3, pa.int32()))) == [17.0, 17.0, 1.0]
