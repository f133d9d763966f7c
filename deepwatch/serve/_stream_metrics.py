"""Prometheus metrics of one stream worker, in a registry of its own, served on
``--metrics-port`` (loopback unless told otherwise).

Every label takes a small, known set of values: no topic, broker address or error text is ever
a label (the Kafka client errors are labelled by librdkafka's error name, an enum)."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BATCH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_RECORDS = (1, 10, 100, 1000, 5000, 10000, 20000, 50000, 100000)
#: What a librdkafka error name looks like (``_TRANSPORT``, ``UNKNOWN_TOPIC_OR_PART``); a code
#: librdkafka has no name for is counted as ``other``, so the label stays bounded
_ERROR_NAME = re.compile(r"_?[A-Z][A-Z0-9_]{0,63}")


class StreamMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.records = Counter("deepwatch_stream_records", "Records read, by outcome",
                               ["outcome"], registry=r)
        self.alerts = Counter("deepwatch_stream_alerts", "Records given a malicious verdict",
                              registry=r)
        self.produced = Counter("deepwatch_stream_messages_produced",
                                "Messages written and acknowledged, by kind", ["kind"],
                                registry=r)
        self.batches = Counter("deepwatch_stream_batches", "Micro-batches processed", registry=r)
        self.batch_seconds = Histogram("deepwatch_stream_batch_duration_seconds",
                                       "Time to parse, score and write a batch (hand its "
                                       "messages to the sink), not counting the wait for their "
                                       "acknowledgement",
                                       buckets=BATCH_SECONDS, registry=r)
        self.batch_records = Histogram("deepwatch_stream_batch_records", "Records in a batch",
                                       buckets=BATCH_RECORDS, registry=r)
        self.commits = Counter("deepwatch_stream_offset_commits",
                               "Partition offsets committed", registry=r)
        self.rebalances = Counter("deepwatch_stream_rebalances",
                                  "Partition assignments and revocations", ["event"], registry=r)
        self.delivery_errors = Counter("deepwatch_stream_delivery_errors",
                                       "Batches whose messages were not acknowledged",
                                       registry=r)
        self.client_errors = Counter(
            "deepwatch_stream_client_errors",
            "Kafka client errors, by client (consumer or producer) and librdkafka error name "
            "(_TRANSPORT, _ALL_BROKERS_DOWN, ...), every one counted, logged or not",
            ["client", "code"], registry=r)
        self.client_failing = Gauge(
            "deepwatch_stream_client_failing",
            "1 from a Kafka client error until the client works again (the brokers answer, a "
            "message is read, a delivery is acknowledged), else 0", ["client"], registry=r)
        self.last_batch = Gauge("deepwatch_stream_last_batch_timestamp_seconds",
                                "When the last batch was parsed, scored and written (its "
                                "messages handed to the sink; their acknowledgement may come "
                                "later)", registry=r)
        for outcome in ("scored", "rejected"):
            self.records.labels(outcome)
        for kind in ("alert", "verdict", "dead_letter"):
            self.produced.labels(kind)
        self._server: Any = None

    def on_source_event(self, name: str, n: int) -> None:
        if name == "commit":
            self.commits.inc(n)
        else:
            self.rebalances.labels(name).inc()

    def on_client_error(self, client: str, code: str) -> None:
        """A Kafka client error (``code``: librdkafka's name for it)."""
        self.client_errors.labels(client, code if _ERROR_NAME.fullmatch(code) else "other").inc()

    def on_client_state(self, client: str, failing: bool) -> None:
        """A Kafka client is failing (since an error) or works (again, or from its start)."""
        self.client_failing.labels(client).set(1 if failing else 0)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
