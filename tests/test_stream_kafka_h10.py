"""``deepwatch stream`` from Kafka: a message over a line's size limit, and offsets of lost
partitions (review h10).

Against a real Kafka-protocol broker (Tansu, in-memory storage) of this module's own.
"""

from __future__ import annotations

import json
import signal
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
#: a member whose broker does not answer for 0.6 s loses its partitions
QUICK_LOSS = {"session.timeout.ms": "600", "heartbeat.interval.ms": "200"}


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


class _LoseThenHandOver:
    """The detector; while it scores the first batch, the broker stops answering (SIGSTOP) for
    longer than the worker's session timeout, so that the worker's member loses its partitions,
    and ``hand_over`` (another member taking them, reading and committing) runs after."""

    def __init__(self, detector: Detector, broker: Any, hand_over: Any, stopped: float):
        self._detector, self._broker, self._hand_over = detector, broker, hand_over
        self._stopped = stopped
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._detector, name)

    def score_batch(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.calls == 1:
            self._broker.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(self._stopped)
            finally:
                self._broker.proc.send_signal(signal.SIGCONT)
            self._hand_over()
        return self._detector.score_batch(*args, **kwargs)


@pytest.mark.integration
def test_a_batch_written_before_its_partition_was_lost_does_not_commit_it(
        tansu: Any, kdd_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose member lost its partition (its session timed out: the broker did not
    answer) while a written batch waited for its commit committed that batch's offset after
    the loss, over the new owner's: on Tansu the new owner read all 20 records and committed
    20, then the old worker committed 10 (the group's offset went back: 10 records read again).
    Offsets of a lost partition are now taken out of the batches not committed yet."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from deepwatch.serve import stream
    from deepwatch.serve._kafka_io import KafkaSource

    # the written batch waits for its commit (as it may for up to 1 s or 4 batches)
    monkeypatch.setattr(stream, "SETTLE_EVERY_S", 60.0)
    topic, group = "h10-lost", "h10-lost-group"
    _create(tansu.address, 1, topic)
    producer = Producer({"bootstrap.servers": tansu.address})
    for i in range(20):
        producer.produce(topic, RECORD, str(i).encode())
    assert producer.flush(30) == 0
    del producer

    other = Consumer({"bootstrap.servers": tansu.address, "group.id": group,
                      "enable.auto.commit": False, "auto.offset.reset": "earliest",
                      **QUICK_LOSS})
    taken = threading.Event()
    done = threading.Event()

    def run_other() -> None:  # joins once the worker's member is gone: reads all, commits 20
        other.subscribe([topic])
        seen = 0
        while not done.is_set():
            msg = other.poll(0.1)
            if msg is not None and msg.error() is None:
                seen += 1
                if seen == 20:
                    other.commit(offsets=[TopicPartition(topic, 0, 20)], asynchronous=False)
                    taken.set()

    joiner = threading.Thread(target=run_other, daemon=True)

    def hand_over() -> None:
        joiner.start()
        assert taken.wait(30), "the other member never read the partition"

    stop = threading.Event()
    source = KafkaSource(tansu.address, topic, group, batch_size=10, max_wait=0.2,
                         options=QUICK_LOSS)
    lost: list[int] = []
    on_lost = source._on_lost

    def losing(consumer: Any, partitions: list[Any]) -> None:
        lost.extend(p.partition for p in partitions)
        on_lost(consumer, partitions)
        stop.set()

    source._on_lost = losing  # type: ignore[method-assign]
    sink = MemorySink()
    sink.max_pending = 4  # type: ignore[attr-defined]
    detector = _LoseThenHandOver(Detector(kdd_bundle), tansu, hand_over, stopped=1.0)
    timer = threading.Timer(60, stop.set)
    timer.start()
    try:
        report = stream.run_loop(source, sink, StreamProcessor(detector, get_format("kdd")), stop)
        source.close()
        assert lost == [0], "the worker's member never lost its partition"
        assert report.records == 10
        checker = Consumer({"bootstrap.servers": tansu.address, "group.id": group})
        try:
            (committed,) = checker.committed([TopicPartition(topic, 0)], timeout=10)
        finally:
            checker.close()
        assert committed.offset == 20, (f"the group's offset went back to {committed.offset} "
                                        "after the partition was lost")
    finally:
        timer.cancel()
        done.set()
        if joiner.is_alive():
            joiner.join(30)
        other.close()
        source.close()
