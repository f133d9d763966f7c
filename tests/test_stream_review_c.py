"""``deepwatch stream``: defects found by a review of the stream worker's stops (review c).

Reproduced with the real command on Tansu; the tests run the worker in this process
(``run_stream``, SIGTERM sent to the process itself) against a real Tansu broker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _need_kafka

from deepwatch.models.detector import Detector


@pytest.fixture(scope="module")
def detector(kdd_bundle: Path) -> Detector:
    return Detector(kdd_bundle)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu, in-memory storage) for this module."""
    _need_kafka()
    from deepwatch.serve.tansu import TansuBroker

    with TansuBroker(log=tmp_path_factory.mktemp("broker_c") / "tansu.log") as running:
        yield running.address


def _create(brokers: str, *topics: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        exc = future.exception(30)
        assert exc is None, exc
    del admin


def _committed(brokers: str, group: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group,
                         "enable.auto.commit": False})
    try:
        return int(consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset)
    finally:
        consumer.close()


class _Seen(logging.Handler):
    """Sets ``assigned`` at the worker's 'partitions assigned' log line."""

    def __init__(self) -> None:
        super().__init__()
        self.assigned = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "assign":
            self.assigned.set()


@pytest.mark.integration
def test_a_stop_ends_a_long_batch_wait_at_once_and_commits_what_came(
        broker: str, detector: Detector, small_kdd_test: Path) -> None:
    """With a long ``--batch-wait-ms`` (60000) SIGTERM waited out the whole micro-batch window:
    the worker stopped about a minute later (reproduced: 52.6 s from SIGTERM to exit, records
    in hand). The wait is now cut at the stop: what came is scored, written and committed, and
    the worker ends at once."""
    from deepwatch.serve.stream import StreamOptions, run_stream

    topic, group = "long-wait", "long-wait-group"
    _create(broker, topic, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead")
    values = small_kdd_test.read_bytes().split(b"\n")[:7]
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker})
    for i, value in enumerate(values):
        producer.produce(topic, value, str(i).encode())
    assert producer.flush(10) == 0
    del producer

    seen = _Seen()
    logger = logging.getLogger("deepwatch.stream")
    logger.addHandler(seen)
    level = logger.level
    logger.setLevel(logging.INFO)
    sent: list[float] = []

    def terminate() -> None:
        if seen.assigned.wait(30):
            time.sleep(1.0)  # the records are fetched: the worker waits to fill its batch
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate, daemon=True)
    opts = StreamOptions(bundle="", format="kdd", brokers=broker, input_topic=topic,
                         output_topic=f"{topic}.alerts", verdict_topic=f"{topic}.verdicts",
                         dead_letter_topic=f"{topic}.dead", group=group, batch_wait_ms=60000,
                         kafka_options={"session.timeout.ms": "6000"})
    try:
        killer.start()
        report = run_stream(opts, detector=detector)
        ended = time.monotonic()
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
        killer.join(5)
    assert sent, "the worker was never assigned its partition"
    assert ended - sent[0] < 3.0, f"the stop took {ended - sent[0]:.1f}s"
    assert (report.records, report.scored) == (len(values), len(values))
    assert report.produced["verdict"] == len(values)  # written and acknowledged
    assert _committed(broker, group, topic) == len(values)
