"""Recent activity for the dashboard: per-second counts, latency percentiles, latest alerts.

Bounded in memory whatever the traffic: a fixed window of seconds, a ring of latencies and a
ring of alerts. Safe to update from the threads that score requests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np

WINDOW_SECONDS = 300
LATENCY_SAMPLES = 4096
RECENT_ALERTS = 50


class RecentStats:
    def __init__(self, window: int = WINDOW_SECONDS) -> None:
        self.window = window
        self.started = time.time()
        self._lock = threading.Lock()
        # second -> [requests, records, alerts, rejects]
        self._seconds: dict[int, list[int]] = {}
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._alerts: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)
        self.totals = {"requests": 0, "records": 0, "alerts": 0, "rejects": 0}

    def record(self, records: int, alerts: int, rejects: int, seconds: float,
               alert_rows: list[dict[str, Any]] | None = None) -> None:
        now = time.time()
        sec = int(now)
        with self._lock:
            bucket = self._seconds.get(sec)
            if bucket is None:
                bucket = self._seconds[sec] = [0, 0, 0, 0]
                self._trim(sec)
            bucket[0] += 1
            bucket[1] += records
            bucket[2] += alerts
            bucket[3] += rejects
            self.totals["requests"] += 1
            self.totals["records"] += records
            self.totals["alerts"] += alerts
            self.totals["rejects"] += rejects
            self._latency_ms.append(seconds * 1000.0)
            if alert_rows:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
                for row in alert_rows:
                    self._alerts.appendleft({"time": stamp, **row})

    def _trim(self, now: int) -> None:
        old = [s for s in self._seconds if s <= now - self.window]
        for s in old:
            del self._seconds[s]

    def raw(self) -> dict[str, Any]:
        """What a snapshot is made of, as plain JSON (workers share these through files)."""
        now = int(time.time())
        with self._lock:
            self._trim(now)
            return {"started": self.started, "window": self.window,
                    "seconds": {str(k): list(v) for k, v in self._seconds.items()},
                    "latency_ms": list(self._latency_ms), "alerts": list(self._alerts),
                    "totals": dict(self.totals)}

    def snapshot(self) -> dict[str, Any]:
        return merged_snapshot([self.raw()])


def _combined(raws: list[dict[str, Any]], after: int | None = None
              ) -> tuple[dict[int, list[int]], dict[str, int], list[float], list[dict[str, Any]]]:
    """Several :meth:`RecentStats.raw` as one: per-second counts (the seconds after ``after``,
    when given) and totals summed, the latencies in the order of ``raws``, the alerts newest
    first (ISO stamps sort as text)."""
    seconds: dict[int, list[int]] = {}
    totals = {"requests": 0, "records": 0, "alerts": 0, "rejects": 0}
    latencies: list[float] = []
    alerts: list[dict[str, Any]] = []
    for r in raws:
        for sec, counts in r["seconds"].items():
            if after is not None and int(sec) <= after:
                continue
            bucket = seconds.setdefault(int(sec), [0, 0, 0, 0])
            for i, c in enumerate(counts):
                bucket[i] += c
        for k in totals:
            totals[k] += r["totals"][k]
        latencies += r["latency_ms"]
        alerts += r["alerts"]
    if len(raws) > 1:  # (one worker's are newest first already)
        alerts.sort(key=lambda a: a.get("time", ""), reverse=True)
    return seconds, totals, latencies, alerts


def merged_snapshot(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """The dashboard's numbers over one or several workers' :meth:`RecentStats.raw`."""
    now = int(time.time())
    window = max(r["window"] for r in raws)
    seconds, totals, latencies, alerts = _combined(raws)
    series = [[s, *seconds.get(s, (0, 0, 0, 0))] for s in range(now - window + 1, now + 1)]
    lat = np.asarray(latencies, dtype=np.float64)
    pct = ({f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99)}
           if lat.size else {"p50": None, "p95": None, "p99": None})
    last_minute = series[-60:]
    return {
        "uptime_seconds": round(time.time() - min(r["started"] for r in raws), 1),
        "totals": totals,
        "last_minute": {"requests": sum(r[1] for r in last_minute),
                        "records": sum(r[2] for r in last_minute),
                        "alerts": sum(r[3] for r in last_minute),
                        "rejects": sum(r[4] for r in last_minute)},
        "latency_ms": {**pct, "samples": int(lat.size)},
        "series": {"columns": ["second", "requests", "records", "alerts", "rejects"],
                   "rows": series},
        "recent_alerts": alerts[:RECENT_ALERTS],
    }


#: How long ``fold_retired``'s ``folded`` names a folded worker: far longer than a reader takes
#: between reading the workers' files and reading the folded ones (milliseconds).
FOLDED_KEEP_SECONDS = 60.0


def fold_retired(retired: dict[str, Any] | None, gone: dict[int, dict[str, Any]],
                 now: float | None = None) -> dict[str, Any]:
    """``retired`` (the :meth:`RecentStats.raw` of the workers that are gone, or None) with the
    raws of the workers ``gone`` (by pid) folded in, as one raw: totals summed, seconds merged
    within the window, the newest latencies and alerts kept (as bounded as one worker's), the
    earliest start (the dashboard's uptime stays the server's).

    ``folded`` maps each pid folded in the last ``FOLDED_KEEP_SECONDS`` to ``[its started,
    when folded]``: a reader that read that worker's own file just before it was removed skips
    it (:meth:`WorkerGroup.all_stats`), and a file folded already is not counted twice."""
    now = time.time() if now is None else now
    before: dict[str, list[float]] = (retired or {}).get("folded", {})
    new = sorted(((pid, raw) for pid, raw in gone.items()
                  if not is_folded(before, pid, raw)),
                 key=lambda pr: pr[1]["started"])
    raws = ([retired] if retired else []) + [raw for _, raw in new]
    if not raws:
        raise ValueError("nothing to fold")
    window = max(r["window"] for r in raws)
    # oldest first: the newest latencies are the last; seconds past the window are dropped
    seconds, totals, latencies, alerts = _combined(raws, after=int(now) - window)
    folded = {pid: stamp for pid, stamp in before.items() if now - stamp[1] <= FOLDED_KEEP_SECONDS}
    folded.update({str(pid): [raw["started"], now] for pid, raw in new})
    return {"started": min(r["started"] for r in raws), "window": window,
            "seconds": {str(k): v for k, v in sorted(seconds.items())},
            "latency_ms": latencies[-LATENCY_SAMPLES:], "alerts": alerts[:RECENT_ALERTS],
            "totals": totals, "folded": folded}


def is_folded(folded: dict[str, list[float]], pid: int, raw: dict[str, Any]) -> bool:
    """Whether ``raw``, the file of worker ``pid``, is in ``folded`` (the same pid may be a
    later worker's: the start stamp tells them apart)."""
    stamp = folded.get(str(pid))
    return stamp is not None and stamp[0] == raw["started"]
