"""``deepwatch stream``: defects found by a review of the stream worker (review d)."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import _need_kafka

from deepwatch.formats import get_format
from deepwatch.models.detector import Detector
from deepwatch.serve._stream_core import DEAD_LETTER, VERDICT, StreamProcessor
from deepwatch.serve._stream_io import JsonlSink, MemorySink, MemorySource
from deepwatch.serve._stream_metrics import StreamMetrics
from deepwatch.serve.stream import run_loop


@pytest.fixture(scope="module")
def detector(kdd_bundle: Path) -> Detector:
    return Detector(kdd_bundle)


def _produced(metrics: StreamMetrics) -> dict[str, float]:
    return {s.labels["kind"]: s.value for fam in metrics.registry.collect()
            for s in fam.samples if s.name == "deepwatch_stream_messages_produced_total"}


@pytest.mark.parametrize("rejects", [False, True])
def test_dead_letters_without_rejects_file_are_not_counted_as_produced(
        detector: Detector, small_kdd_test: Path, tmp_path: Path, rejects: bool) -> None:
    """Without --rejects the embedded worker writes its dead letters nowhere, yet
    ``deepwatch_stream_messages_produced_total{kind="dead_letter"}`` (and the report) counted
    them as written; a message is counted as produced only where the sink writes its kind."""
    values = small_kdd_test.read_bytes().split(b"\n")[:50] + [b"not a record", b""]
    dead = tmp_path / "dead.jsonl" if rejects else None
    sink = JsonlSink(str(tmp_path / "alerts.jsonl"), None, str(dead) if dead else None)
    metrics = StreamMetrics()
    try:
        report = run_loop(MemorySource(values, batch_size=20), sink,
                          StreamProcessor(detector, get_format("kdd"), verdicts=False),
                          threading.Event(), metrics)
    finally:
        sink.close()
    alerts = (tmp_path / "alerts.jsonl").read_bytes().count(b"\n")
    written = dead.read_bytes().count(b"\n") if dead else 0
    assert report.rejected == 2 and alerts == report.alerts > 0
    assert written == (2 if rejects else 0)
    assert report.produced == {"alert": alerts, "verdict": 0, "dead_letter": written}
    assert _produced(metrics) == {"alert": alerts, "verdict": 0, "dead_letter": written}


@pytest.mark.parametrize("shape", ["alone", "last", "two last"])
def test_a_batch_ending_with_a_tombstone_is_dead_letters_not_a_crash(
        detector: Detector, small_kdd_test: Path, shape: str) -> None:
    """A Kafka tombstone (null value) or empty message last in a consumed batch (a tombstone
    alone, the usual case, or the newest message of a partition) stopped the worker with a
    traceback, 'N records became N-1 lines', nothing committed, and again at every restart: the
    joined text ended with the line break of the record before it. Each empty message is a
    dead letter of its own, and the batch is committed."""
    good = small_kdd_test.read_bytes().split(b"\n")[:2]
    values: list[bytes | None] = {"alone": [None], "last": [*good, None],
                                  "two last": [good[0], b"", None]}[shape]
    keys = [str(i).encode() for i in range(len(values))]
    source, sink = MemorySource(values, keys, batch_size=10, topic="t"), MemorySink()
    report = run_loop(source, sink, StreamProcessor(detector, get_format("kdd")),
                      threading.Event())
    assert source.committed == len(values) == report.records
    dead = {int(k): json.loads(v) for k, v in sink.messages[DEAD_LETTER]}
    verdicts = {int(k) for k, _ in sink.messages[VERDICT]}
    empty = {i for i, v in enumerate(values) if not v}
    assert set(dead) == empty and verdicts == set(range(len(values))) - empty
    for i in empty:
        assert dead[i]["raw"] == "" and dead[i]["reason"] == "empty line"
        assert dead[i]["deepwatch"]["source"] == {"topic": "t", "partition": 0, "offset": i}


@pytest.mark.integration
def test_a_stop_while_the_brokers_do_not_answer_does_not_hang_on_a_done_commit(
        tmp_path: Path) -> None:
    """A worker stopped (SIGTERM) while its brokers did not answer (a network partition; here
    the broker is SIGSTOPped) hung for minutes at close: it committed again, synchronously and
    without a time limit, offsets the brokers had already stored. An offset they confirmed is
    not committed again (and not counted again in deepwatch_stream_offset_commits_total)."""
    _need_kafka()
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from deepwatch.serve._kafka_io import KafkaSource
    from deepwatch.serve._stream_core import RawBatch
    from deepwatch.serve.tansu import TansuBroker

    topic, group = "stuck", "stuck-group"
    with TansuBroker(log=tmp_path / "tansu.log") as broker:
        admin = AdminClient({"bootstrap.servers": broker.address})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)
        del admin
        events: list[tuple[str, int]] = []
        source = KafkaSource(broker.address, topic, group, on_event=lambda e, n: events.append(
            (e, n)), check_timeout=5.0)
        closer = None
        try:
            done = MemorySource([b"x"] * 5, topic=topic, batch_size=5)
            batch: RawBatch = next(iter(done.batches(threading.Event())))
            source.commit(batch)  # asynchronous, as the run loop commits

            reader = Consumer({"bootstrap.servers": broker.address, "group.id": group})
            try:
                deadline = time.monotonic() + 20
                while reader.committed([TopicPartition(topic, 0)], timeout=5)[0].offset != 5:
                    assert time.monotonic() < deadline, "the commit was not stored"
                    time.sleep(0.1)
            finally:
                reader.close()
            source.consumer.poll(0.5)  # the commit's answer, as consume serves it
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)
            closer = threading.Thread(target=source.close, daemon=True)
            started = time.monotonic()
            closer.start()
            closer.join(10)
            took = time.monotonic() - started
            assert not closer.is_alive(), "close hung on a commit the broker had stored"
            assert took < 10 and events == [("commit", 1)]
        finally:
            if broker.proc is not None:
                broker.proc.send_signal(signal.SIGCONT)
            if closer is not None:
                closer.join(120)
            source.close()


@pytest.mark.integration
def test_a_refused_commit_is_said_and_sent_again_with_the_next(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    """An asynchronous commit the brokers refused was taken as done, without a word: the
    partition's offset stayed uncommitted until the worker stopped (a crash meanwhile read it
    all again). It is logged (``commit_error``) and sent again with the next commit; one not
    confirmed yet when the worker stops is committed then."""
    _need_kafka()
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from deepwatch.serve._kafka_io import KafkaSource
    from deepwatch.serve.tansu import TansuBroker

    def batch(topic: str, n: int) -> object:
        return next(iter(MemorySource([b"x"] * n, topic=topic, batch_size=n).batches(
            threading.Event())))

    group = "retry-group"
    with TansuBroker(log=tmp_path / "tansu.log") as broker:
        admin = AdminClient({"bootstrap.servers": broker.address})
        admin.create_topics([NewTopic("a", 1, 1)])["a"].result(10)
        source = KafkaSource(broker.address, "a", group, check_timeout=5.0)
        reader = Consumer({"bootstrap.servers": broker.address, "group.id": group})
        try:
            def stored(topic: str) -> int:
                return int(reader.committed([TopicPartition(topic, 0)], timeout=5)[0].offset)

            with caplog.at_level(logging.WARNING, logger="deepwatch.stream"):
                source.commit(batch("b", 3))  # "b" does not exist yet: refused
                deadline = time.monotonic() + 10
                while not [r for r in caplog.records if getattr(r, "event", "") ==
                           "commit_error"] and time.monotonic() < deadline:
                    source.consumer.poll(0.1)
            assert [r for r in caplog.records if getattr(r, "event", "") == "commit_error"]
            admin.create_topics([NewTopic("b", 1, 1)])["b"].result(10)
            source.commit(batch("a", 2))  # the next commit takes the refused one with it
            deadline = time.monotonic() + 10
            while stored("b") != 3 and time.monotonic() < deadline:
                source.consumer.poll(0.1)
            assert (stored("a"), stored("b")) == (2, 3)
            source.commit(batch("a", 4))
            source.close()  # not confirmed yet: committed (and waited for) here
            assert stored("a") == 4
        finally:
            source.close()
            reader.close()
            del admin


class _StopOnFirstBatch:
    """The detector, setting ``stop`` (as SIGTERM does) when it scores its first batch."""

    def __init__(self, detector: Detector, stop: threading.Event):
        self._detector, self._stop = detector, stop

    def __getattr__(self, name: str) -> object:
        return getattr(self._detector, name)

    def score_batch(self, *args: object, **kwargs: object) -> object:
        self._stop.set()
        return self._detector.score_batch(*args, **kwargs)


def test_a_stop_while_files_are_read_says_what_was_left_unread(
        detector: Detector, small_kdd_test: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop (SIGTERM) while ``stream`` read a file left the rest of it, and the files after
    it, unscored, and the stop line said only how many records were scored (exit 0, nothing
    else): it now says where each input was left, as a warning."""
    from deepwatch.serve._stream_io import CHUNK_BYTES
    from deepwatch.serve.stream import StreamOptions, run_stream

    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    text = small_kdd_test.read_bytes()
    big.write_bytes(text * (CHUNK_BYTES // len(text) + 2))  # more than one chunk
    small.write_bytes(text[:5000])
    stop = threading.Event()
    opts = StreamOptions(bundle="unused", format="kdd", inputs=[str(big), str(small)],
                         out=str(tmp_path / "alerts.jsonl"))
    with caplog.at_level(logging.INFO, logger="deepwatch.stream"):
        report = run_stream(opts, stop, _StopOnFirstBatch(detector, stop))
    lines = report.records
    assert 0 < lines < big.read_bytes().count(b"\n")
    read = len(b"".join(big.read_bytes().splitlines(True)[:lines]))
    assert report.unread == [
        f"{big} was read up to line {lines:,} ({read:,} of {big.stat().st_size:,} bytes): the "
        "lines after it were not scored",
        f"1 more input ({small}) was not read"]
    (stopped,) = [r for r in caplog.records if getattr(r, "event", "") == "stop"]
    assert stopped.levelno == logging.WARNING
    assert stopped.getMessage().endswith("; stopped: " + "; stopped: ".join(report.unread))

    # read to its end, a file leaves nothing unread: the stop line says nothing more
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepwatch.stream"):
        report = run_stream(StreamOptions(bundle="unused", format="kdd", inputs=[str(small)],
                                          out=str(tmp_path / "alerts.jsonl")),
                            threading.Event(), detector)
    assert report.unread == [] and report.records > 0
    (stopped,) = [r for r in caplog.records if getattr(r, "event", "") == "stop"]
    assert stopped.levelno == logging.INFO


def test_a_stop_while_a_file_is_read_in_small_batches_ends_after_the_batch_in_hand(
        detector: Detector, small_kdd_test: Path, tmp_path: Path) -> None:
    """With --batch-size, a stop while a file (not followed) was read scored every batch of
    the 4 MiB chunk in hand first (with --batch-size 1, one record a batch for minutes, or a
    write given up 5 s after the stop, exit 1): it ends after the batch in hand, and the rest
    is said unread."""
    from deepwatch.serve.stream import StreamOptions, run_stream

    big = tmp_path / "big.csv"
    big.write_bytes(small_kdd_test.read_bytes())
    stop = threading.Event()
    opts = StreamOptions(bundle="unused", format="kdd", inputs=[str(big)], batch_size=7,
                         out=str(tmp_path / "alerts.jsonl"))
    report = run_stream(opts, stop, _StopOnFirstBatch(detector, stop))
    assert report.records == 7
    read = len(b"".join(big.read_bytes().splitlines(True)[:7]))
    assert report.unread == [f"{big} was read up to line 7 ({read:,} of {big.stat().st_size:,} "
                             "bytes): the lines after it were not scored"]


def test_a_message_holding_a_line_break_is_a_dead_letter_even_where_the_format_parses_it(
        detector: Detector, small_kdd_test: Path) -> None:
    """'A message holding a line break is one record, rejected whole' (docs/stream.md): it was
    scored where the format parsed its text, the break written as the two characters \\n (a
    KDD label 'normal.\\nxyz'; on Tansu a 3 MB one made a 3 MB verdict). It is a dead letter
    saying why; one the format rejects keeps the format's reason; the others are scored."""
    from deepwatch.serve._stream_core import BROKEN

    good = small_kdd_test.read_bytes().split(b"\n")[:3]
    values = [good[0] + b"\nxyz", good[1], good[2] + b"\r\n", b"a\nb", good[0][:-1] + b"\n."]
    keys = [str(i).encode() for i in range(len(values))]
    source, sink = MemorySource(values, keys, batch_size=10, topic="t"), MemorySink()
    report = run_loop(source, sink, StreamProcessor(detector, get_format("kdd")),
                      threading.Event())
    assert (report.records, report.scored, report.rejected) == (5, 2, 3)
    assert {int(k) for k, _ in sink.messages[VERDICT]} == {1, 2}  # a last line break is no break
    dead = {int(k): json.loads(v) for k, v in sink.messages[DEAD_LETTER]}
    assert set(dead) == {0, 3, 4}
    assert dead[0]["raw"] == good[0].decode() + "\\nxyz" and dead[0]["reason"] == BROKEN
    assert dead[4]["reason"] == BROKEN and dead[3]["reason"] != BROKEN
    assert dead[0]["deepwatch"]["source"] == {"topic": "t", "partition": 0, "offset": 0}
