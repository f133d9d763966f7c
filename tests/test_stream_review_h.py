"""``deepwatch stream``: stops during a broker outage, and rebalances during a micro-batch wait
(review h).

Against a real Kafka-protocol broker (Tansu) of this module's own: one test stops it (SIGSTOP,
an outage: connections stay open, nothing is answered), which no other module's broker may see.
"""

from __future__ import annotations

import os
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
from deepwatch.serve._stream_io import DeliveryError, MemorySource


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Kafka-protocol broker (Tansu, in-memory storage) for this module."""
    _need_kafka()
    from deepwatch.serve.tansu import TansuBroker

    with TansuBroker(log=tmp_path_factory.mktemp("broker_h") / "tansu.log") as running:
        yield running


def _create(brokers: str, partitions: int, *topics: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.create_topics([NewTopic(t, partitions, 1) for t in topics]).values():
        exc = future.exception(30)
        assert exc is None, exc
    del admin


class _StopBrokerOnSecondBatch:
    """The detector; when it scores its second batch, the broker stops answering (SIGSTOP) and,
    ``after`` seconds later, the process gets SIGTERM: the loop is then waiting for the second
    batch's acknowledgements."""

    def __init__(self, detector: Detector, broker: Any, after: float):
        self._detector, self._broker, self._after = detector, broker, after
        self.calls = 0
        self.signalled: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._detector, name)

    def _terminate(self) -> None:
        time.sleep(self._after)
        self.signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    def score_batch(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if self.calls == 2:
            self._broker.proc.send_signal(signal.SIGSTOP)
            threading.Thread(target=self._terminate, daemon=True).start()
        return self._detector.score_batch(*args, **kwargs)


@pytest.mark.integration
@pytest.mark.parametrize("queue", ["room", "full"])
def test_a_stop_while_the_brokers_do_not_acknowledge_is_bounded_and_commits_nothing_unacked(
        tansu: Any, kdd_bundle: Path, small_kdd: Path, monkeypatch: pytest.MonkeyPatch,
        queue: str) -> None:
    """SIGTERM while the loop waited for its alerts' acknowledgements from brokers that did not
    answer (an outage; reproduced with the real command on Tansu, the broker SIGSTOPped) was held
    by the producer's flush for its whole 60 s, then 60 s more at close (117.7 s from SIGTERM to
    exit 1, 'error: 809 messages not acknowledged within 60s'). The wait now ends
    ``STOP_FLUSH_S`` after the stop; the error says what was not acknowledged, and the batch
    whose messages were not acknowledged is not committed (read again at the next start).
    So it is when the producer's queue is full (``full``: it takes 5 messages here) and the
    loop waits for room in it to write the batch."""
    from deepwatch.serve import _kafka_io
    from deepwatch.serve._kafka_io import KafkaSink
    from deepwatch.serve.stream import run_loop, stop_on_signals

    # 5 s in use: the test stays short (raising=False: the code before the bound had none)
    monkeypatch.setattr(_kafka_io, "STOP_FLUSH_S", 1.0, raising=False)
    out = {"alert": f"h-{queue}.alerts", "verdict": f"h-{queue}.verdicts",
           "dead_letter": f"h-{queue}.dead"}
    _create(tansu.address, 1, *out.values())
    options = {"queue.buffering.max.messages": "5"} if queue == "full" else {}
    values: list[bytes | None] = list(small_kdd.read_bytes().split(b"\n")[:30])
    stop = threading.Event()
    sink = KafkaSink(tansu.address, dict(out), options, stop=stop, check_timeout=10.0,
                     max_pending=1)
    source = MemorySource(values, batch_size=10, topic="h-stop")
    detector = _StopBrokerOnSecondBatch(Detector(kdd_bundle), tansu, after=0.5)
    try:
        with stop_on_signals(stop), pytest.raises(DeliveryError) as caught:
            run_loop(source, sink, StreamProcessor(detector, get_format("kdd")), stop)
        ended = time.monotonic()
        sink.close()  # what a stop left unacknowledged is not waited for again
        closed = time.monotonic()
    finally:
        if tansu.proc is not None:
            tansu.proc.send_signal(signal.SIGCONT)
        sink.close()
    assert detector.signalled, "the broker was never stopped"
    took = ended - detector.signalled[0]
    assert took < 1.0 + 2.0, f"the stop took {took:.1f}s"
    assert closed - ended < 1.0, f"closing waited {closed - ended:.1f}s"
    message = str(caught.value)
    assert message.startswith("stopped while the brokers had not acknowledged "), message
    assert "verdicts and 0 dead letters written since the last commit): none of their 10 " \
           "records was committed, so they are read again at the next start" in message
    if queue == "full":  # what the queue holds (the rest of the batch never went in)
        assert message.startswith("stopped while the brokers had not acknowledged 5 messages")
    assert source.committed == 10  # the first batch, acknowledged before the outage, only


class _Watched:
    """A consumer, as it is, that keeps the messages each consume took before its member's
    partitions were revoked (``revoked`` set), and calls ``on_both`` once it has taken messages
    of partitions 0 and 1."""

    def __init__(self, consumer: Any, revoked: Any, on_both: Any):
        self._consumer, self._revoked, self._on_both = consumer, revoked, on_both
        self.before: list[Any] = []  # taken by a consume that ended before the revoke

    def __getattr__(self, name: str) -> object:
        return getattr(self._consumer, name)

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        got = list(self._consumer.consume(num_messages, timeout))
        if not self._revoked():
            had = {m.partition() for m in self.before}
            self.before += [m for m in got if m.error() is None]
            if len(had) < 2 <= len({m.partition() for m in self.before}):
                self._on_both()
        return got


@pytest.mark.integration
def test_messages_of_a_partition_revoked_during_the_batch_wait_are_not_in_the_batch(
        tansu: Any) -> None:
    """A worker that took messages of its partitions early in a micro-batch wait, then lost
    them to a rebalance (a second member joining its group) before the wait ended, must not
    hand them over as its batch: it no longer owns them, their next owner reads them. Two
    consumers in one group on Tansu; what the first took before the rebalance revoked its
    partitions is not in the batch it yields."""
    from confluent_kafka import Consumer, Producer

    from deepwatch.serve._kafka_io import KafkaSource

    topic, group = "h-rebalance", "h-rebalance-group"
    _create(tansu.address, 2, topic)
    producer = Producer({"bootstrap.servers": tansu.address})
    for p in (0, 1):
        for i in range(5):
            producer.produce(topic, f"{p}-{i}".encode(), partition=p)
    assert producer.flush(10) == 0
    del producer

    events: list[tuple[str, int]] = []
    source = KafkaSource(tansu.address, topic, group, batch_size=1000, max_wait=30.0,
                         on_event=lambda e, n: events.append((e, n)), check_timeout=10.0)
    other = Consumer({"bootstrap.servers": tansu.address, "group.id": group,
                      "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    done = threading.Event()

    def join() -> None:  # the second member: its joining takes the partitions away
        other.subscribe([topic])
        while not done.is_set():
            other.poll(0.1)

    joiner = threading.Thread(target=join, daemon=True)
    watched = _Watched(source.consumer, lambda: any(e == "revoke" for e, _ in events),
                       joiner.start)
    source.consumer = watched
    handed: list[Any] = []
    to_batch = source._to_batch

    def keep(msgs: list[Any]) -> Any:
        handed.extend(msgs)
        return to_batch(msgs)

    source._to_batch = keep  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        batches = source.batches(threading.Event())
        next(batches)
        took = time.monotonic() - started
        assert {m.partition() for m in watched.before} == {0, 1}, "never took both partitions"
        assert ("revoke", 2) in events, f"no rebalance during the wait: {events}"
        assert took < 25, "the wait was not ended by the rebalance"
        kept = [m for m in handed if any(m is b for b in watched.before)]
        assert not kept, (f"the batch holds {len(kept)} messages taken before their partitions "
                          "were revoked")
        batches.close()
    finally:
        done.set()
        if joiner.is_alive():
            joiner.join(30)
        # both leave the group at once: each waits for the join in progress (5 s on Tansu)
        closer = threading.Thread(target=other.close)
        closer.start()
        source.close()
        closer.join(60)
