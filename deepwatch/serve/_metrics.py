"""Prometheus metrics of the REST service, in a registry of its own (one per app).

With ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start) every
worker writes its values to files there, and ``/metrics``, whichever worker answers it, adds
up all of them: the counts are the service's, not one worker's.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

#: Request latencies of a fast scoring service: 0.5 ms to 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000)
#: The paths requests are counted under; anything else is ``other`` (bounded label values).
KNOWN_PATHS = frozenset({"/", "/v1/score", "/v1/reload", "/v1/stats", "/healthz", "/metrics",
                         "/docs", "/openapi.json"})

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        # ``*_created`` series double the page and no dashboard reads them
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("deepwatch_http_requests", "HTTP requests answered",
                                ["path", "status"], registry=r)
        self.request_seconds = Histogram("deepwatch_http_request_duration_seconds",
                                         "Time to answer an HTTP request", ["path"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.score_seconds = Histogram("deepwatch_score_duration_seconds",
                                       "Time to parse and score the records of one request",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_records = Histogram("deepwatch_score_batch_records",
                                       "Records in one score request", buckets=BATCH_BUCKETS,
                                       registry=r)
        self.records = Counter("deepwatch_records", "Records received, by outcome",
                               ["outcome"], registry=r)
        self.alerts = Counter("deepwatch_alerts", "Records given a malicious verdict",
                              registry=r)
        self.rejected_requests = Counter("deepwatch_rejected_requests",
                                         "Requests refused as a whole, by HTTP status",
                                         ["status"], registry=r)
        self.reloads = Counter("deepwatch_model_reloads", "Model reloads, by result",
                               ["result"], registry=r)
        # across workers: the live workers' values (max), a stopped worker's are dropped
        self.model_info = Gauge("deepwatch_model_info", "The model being served (value 1)",
                                ["kind", "format", "engine"], registry=r,
                                multiprocess_mode="livemax")
        self.model_loaded = Gauge("deepwatch_model_loaded_timestamp_seconds",
                                  "When the model being served was loaded", registry=r,
                                  multiprocess_mode="livemax")
        self._certificate_expiry: Gauge | None = None  # made by set_certificate_expiry
        self._model_labels: tuple[str, str, str] | None = None
        for outcome in ("scored", "rejected"):
            self.records.labels(outcome)

    def set_model(self, kind: str, fmt: str, engine: str, loaded_at: float) -> None:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.model_info.clear()
        elif self._model_labels is not None:  # clear() is not there in multi-process mode
            self.model_info.labels(*self._model_labels).set(0)
        self._model_labels = (kind, fmt, engine)
        self.model_info.labels(kind, fmt, engine).set(1)
        self.model_loaded.set(loaded_at)

    def set_certificate_expiry(self, timestamp: float) -> None:
        """With ``--tls-cert``: when the certificate served expires, as a Unix time (an alert
        rule compares it with ``time()``). Across workers the soonest of the live ones. Without
        TLS there is no such series at all (a 0 would read as long expired)."""
        if self._certificate_expiry is None:
            self._certificate_expiry = Gauge(
                "deepwatch_tls_certificate_expiry_timestamp_seconds",
                "When the TLS certificate served expires (its notAfter)",
                registry=self.registry, multiprocess_mode="livemin")
        self._certificate_expiry.set(timestamp)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        label = path if path in KNOWN_PATHS else "other"
        self.requests.labels(label, str(status)).inc()
        self.request_seconds.labels(label).observe(seconds)

    def render(self) -> bytes:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, path=shared)
        return generate_latest(every_worker)
