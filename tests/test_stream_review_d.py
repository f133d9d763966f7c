"""``deepwatch stream``: defects found by a review of the stream worker (review d)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

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
