"""The stats of ``serve --workers`` workers that are gone, folded by the parent into
``stats/retired.json``, and the rule by which ``/v1/stats`` reads them once and only once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepwatch.serve._stats import LATENCY_SAMPLES, RECENT_ALERTS, merged_snapshot
from deepwatch.serve._workers import RETIRED, WorkerGroup, retire_gone_stats

NOW = 1_800_000_000.0
WINDOW = 300


def _raw(started: float, requests: int, *, seconds: dict[int, list[int]] | None = None,
         latencies: int = 1, alerts: int = 0, tag: str = "") -> dict[str, Any]:
    return {"started": started, "window": WINDOW,
            "seconds": {str(k): v for k, v in (seconds or {}).items()},
            "latency_ms": [float(requests)] * latencies,
            "alerts": [{"time": f"2027-01-15T08:{59 - i // 60:02d}:{59 - i % 60:02d}Z",
                        "row": f"{tag}{i}"} for i in range(alerts)],
            "totals": {"requests": requests, "records": 10 * requests, "alerts": alerts,
                       "rejects": 0}}


def _write(stats: Path, pid: int, raw: dict[str, Any]) -> None:
    (stats / f"{pid}.json").write_text(json.dumps(raw))


def _totals(group: WorkerGroup) -> dict[str, int]:
    return merged_snapshot(group.all_stats())["totals"]


def test_gone_workers_are_folded_and_read_once(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    stats.mkdir()
    now = int(NOW)
    gone_a = _raw(NOW - 900, 3, seconds={now - 10: [1, 10, 0, 0], now - 400: [1, 10, 0, 0]},
                  latencies=LATENCY_SAMPLES, alerts=40, tag="a")
    gone_b = _raw(NOW - 500, 5, seconds={now - 10: [2, 20, 0, 0]}, latencies=10, alerts=30,
                  tag="b")
    live = _raw(NOW - 100, 7)
    _write(stats, 101, gone_a)
    _write(stats, 103, gone_b)
    _write(stats, 102, live)
    group = WorkerGroup(tmp_path)
    assert _totals(group)["requests"] == 15

    assert retire_gone_stats(stats, {102}, now=NOW) == [101, 103]
    assert sorted(f.name for f in stats.iterdir()) == ["102.json", RETIRED]
    retired = json.loads((stats / RETIRED).read_text())
    assert retired["totals"] == {"requests": 8, "records": 80, "alerts": 70, "rejects": 0}
    assert retired["started"] == NOW - 900  # the uptime stays the server's
    assert retired["window"] == WINDOW
    assert retired["seconds"] == {str(now - 10): [3, 30, 0, 0]}  # the window's only
    assert len(retired["latency_ms"]) == LATENCY_SAMPLES  # the newest: b's after a's
    assert retired["latency_ms"][-10:] == [5.0] * 10
    assert len(retired["alerts"]) == RECENT_ALERTS
    assert [a["time"] for a in retired["alerts"]] == sorted(
        (a["time"] for a in gone_a["alerts"] + gone_b["alerts"]), reverse=True)[:RECENT_ALERTS]
    assert retired["folded"] == {"101": [NOW - 900, NOW], "103": [NOW - 500, NOW]}
    assert _totals(group)["requests"] == 15
    assert min(r["started"] for r in group.all_stats()) == NOW - 900  # the uptime's start

    # a reader that listed 103.json before the parent removed it reads it after: skipped
    _write(stats, 103, gone_b)
    assert _totals(group)["requests"] == 15
    # the parent finding it again (its removal failed) does not count it twice
    assert retire_gone_stats(stats, {102}, now=NOW + 1) == [103]
    assert json.loads((stats / RETIRED).read_text())["totals"]["requests"] == 8
    assert not (stats / "103.json").exists()

    # pid 101 reused by a new worker (another start stamp): counted, not taken for the old one
    _write(stats, 101, _raw(NOW + 5, 11))
    assert _totals(group)["requests"] == 26
    assert retire_gone_stats(stats, {101, 102}, now=NOW + 6) == []

    # folded long ago: forgotten when the parent next writes retired.json
    _write(stats, 104, _raw(NOW + 10, 2))
    assert retire_gone_stats(stats, {101, 102}, now=NOW + 70) == [104]
    retired = json.loads((stats / RETIRED).read_text())
    assert retired["folded"] == {"104": [NOW + 10, NOW + 70]}
    assert retired["totals"]["requests"] == 10
    assert retired["started"] == NOW - 900
    assert _totals(group)["requests"] == 28
    assert sorted(f.name for f in stats.iterdir()) == ["101.json", "102.json", RETIRED]


def test_no_retired_file_until_a_worker_is_gone(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    stats.mkdir()
    _write(stats, 102, _raw(NOW, 1))
    assert retire_gone_stats(stats, {102}, now=NOW) == []
    assert [f.name for f in stats.iterdir()] == ["102.json"]
    assert [r["totals"]["requests"] for r in WorkerGroup(tmp_path).all_stats()] == [1]
