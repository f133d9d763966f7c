"""``deepwatch stream`` from Kafka: a message over a line's size limit, and offsets of lost
partitions (review h10).

Against a real Kafka-protocol broker (Tansu, in-memory storage) of this module's own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import _need_kafka

from deepwatch.formats import get_format
from deepwatch.models.detector import Detector
from deepwatch.serve._stream_core import StreamProcessor
from deepwatch.serve._stream_io import MemorySink, MemorySource
from deepwatch.sources.files import MAX_LINE_BYTES

#: a KDD record without its label's difficulty column (42 fields)
RECORD = (b"0,tcp,private,REJ,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,229,10,0.00,0.00,1.00,1.00,"
          b"0.04,0.06,0.00,255,10,0.04,0.06,0.00,0.00,0.00,0.00,1.00,1.00,neptune")


#: Tansu answers a group's first join after about half the session timeout: 1 s, not 5 s
FAST_JOIN = {"session.timeout.ms": "2000", "heartbeat.interval.ms": "500"}


def _sized(size: int) -> bytes:
    """RECORD, its service name padded so that the record is ``size`` bytes long."""
    fields = RECORD.split(b",")
    fields[2] = b"x" * (size - len(RECORD) + len(fields[2]))
    record = b",".join(fields)
    assert len(record) == size
    return record


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Kafka-protocol broker (Tansu, in-memory storage) for this module."""
    _need_kafka()
    from deepwatch.serve.tansu import TansuBroker

    with TansuBroker(log=tmp_path_factory.mktemp("broker_h10") / "tansu.log") as running:
        yield running


def _create(brokers: str, partitions: int, *topics: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.create_topics([NewTopic(t, partitions, 1) for t in topics]).values():
        exc = future.exception(30)
        assert exc is None, exc
    del admin


def _read(brokers: str, topic: str, count: int) -> list[dict]:
    """The first ``count`` messages of ``topic`` (one partition), as JSON (no group: assigned)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "h10-reader",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        docs: list[dict] = []
        deadline = time.monotonic() + 20
        while len(docs) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                docs.append(json.loads(msg.value()))
        return docs
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_message_over_the_line_limit_is_a_dead_letter_and_its_offset_is_committed(
        tansu: Any, kdd_bundle: Path) -> None:
    """A file's line over MAX_LINE_BYTES (1 MiB) is a reject ('the line is N bytes long'); a
    Kafka message that long was parsed and scored (reproduced with the real worker on Tansu,
    which takes messages of 30 MB: a record of 1,048,577 bytes had a verdict, no dead letter).
    It is now a dead letter with a file's reason, counted, and its offset committed with the
    rest; one of exactly MAX_LINE_BYTES is scored, as a file's line of that length is."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from deepwatch.serve._kafka_io import KafkaSink, KafkaSource
    from deepwatch.serve.stream import run_loop

    topic, group = "h10-long", "h10-long-group"
    out = {"alert": f"{topic}.alerts", "verdict": f"{topic}.verdicts",
           "dead_letter": f"{topic}.dead"}
    _create(tansu.address, 1, topic, *out.values())
    over, at = _sized(MAX_LINE_BYTES + 1), _sized(MAX_LINE_BYTES)
    # librdkafka's own limit (message.max.bytes, 1,000,000 by default) is below 1 MiB
    producer = Producer({"bootstrap.servers": tansu.address, "message.max.bytes": 4 << 20})
    for value in (over, at, RECORD):
        producer.produce(topic, value)
    assert producer.flush(30) == 0
    del producer

    stop = threading.Event()
    source: KafkaSource

    def on_event(name: str, _n: int) -> None:
        if name == "commit" and source.acked.get((topic, 0)) == 3:
            stop.set()

    source = KafkaSource(tansu.address, topic, group, max_wait=0.2, on_event=on_event,
                         options=FAST_JOIN)
    sink = KafkaSink(tansu.address, dict(out))
    timer = threading.Timer(60, stop.set)  # a test that fails must not hang
    timer.start()
    try:
        report = run_loop(source, sink, StreamProcessor(Detector(kdd_bundle), get_format("kdd")),
                          stop)
    finally:
        timer.cancel()
        sink.close()
        source.close()
    assert (report.records, report.scored, report.rejected) == (3, 2, 1)
    assert report.produced["dead_letter"] == 1
    (dead,) = _read(tansu.address, out["dead_letter"], 1)
    assert dead["reason"] == (f"the line is {MAX_LINE_BYTES + 1:,} bytes long, over the limit "
                              f"of {MAX_LINE_BYTES:,} bytes for one record (the raw text keeps "
                              "its first 10,000 bytes)")
    assert dead["raw"] == over[:10_000].decode()
    assert dead["deepwatch"]["source"] == {"topic": topic, "partition": 0, "offset": 0}
    verdicts = _read(tansu.address, out["verdict"], 2)
    assert sorted(v["deepwatch"]["source"]["offset"] for v in verdicts) == [1, 2]
    consumer = Consumer({"bootstrap.servers": tansu.address, "group.id": group})
    try:
        (committed,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    assert committed.offset == 3


def test_a_message_at_the_limit_with_a_crlf_is_scored(kdd_bundle: Path) -> None:
    """A line's length leaves out its line ending, ``\\r\\n`` too, as a file's does: a message
    of MAX_LINE_BYTES and a CRLF is a record; one byte more is a dead letter, whether the format
    would have taken it or not (in memory: the batches are those of the Kafka source, one
    record a message)."""
    from deepwatch.serve.stream import run_loop

    junk = b"y" * (MAX_LINE_BYTES + 5)  # no KDD record: the format rejects it
    source = MemorySource([_sized(MAX_LINE_BYTES) + b"\r\n", _sized(MAX_LINE_BYTES + 1) + b"\r",
                           junk, RECORD])
    sink = MemorySink()
    processor = StreamProcessor(Detector(kdd_bundle), get_format("kdd"))
    report = run_loop(source, sink, processor, threading.Event())
    assert (report.scored, report.rejected) == (2, 2)
    dead = [json.loads(v) for _, v in sink.messages["dead_letter"]]
    assert [d["deepwatch"]["source"]["offset"] for d in dead] == [1, 2]
    assert [d["reason"] for d in dead] == [
        f"the line is {size:,} bytes long, over the limit of {MAX_LINE_BYTES:,} bytes for one "
        "record (the raw text keeps its first 10,000 bytes)"
        for size in (MAX_LINE_BYTES + 1, MAX_LINE_BYTES + 5)]
    assert dead[1]["raw"] == "y" * 10_000
    assert source.committed == 4
