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

    def snapshot(self) -> dict[str, Any]:
        now = int(time.time())
        with self._lock:
            self._trim(now)
            series = [[s, *self._seconds.get(s, (0, 0, 0, 0))]
                      for s in range(now - self.window + 1, now + 1)]
            lat = np.fromiter(self._latency_ms, dtype=np.float64)
            alerts = list(self._alerts)
            totals = dict(self.totals)
        pct = ({f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99)}
               if lat.size else {"p50": None, "p95": None, "p99": None})
        last_minute = series[-60:]
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "totals": totals,
            "last_minute": {"requests": sum(r[1] for r in last_minute),
                            "records": sum(r[2] for r in last_minute),
                            "alerts": sum(r[3] for r in last_minute),
                            "rejects": sum(r[4] for r in last_minute)},
            "latency_ms": {**pct, "samples": int(lat.size)},
            "series": {"columns": ["second", "requests", "records", "alerts", "rejects"],
                       "rows": series},
            "recent_alerts": alerts,
        }
