"""``deepwatch stream``: defects found by a review of the stream worker (review g).

The messages are handed to the worker's own loop (``run_loop``) by the in-memory source, which
makes its batches as the Kafka source does (one record a message, ``join_messages``, no input
order carried from batch to batch); the defects were reproduced with the real command on Tansu.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import trained_bundle

from deepwatch.formats import get_format
from deepwatch.models.detector import Detector
from deepwatch.serve._stream_core import (
    BROKEN,
    DEAD_LETTER,
    HEADER_MESSAGE,
    VERDICT,
    StreamProcessor,
)
from deepwatch.serve._stream_io import MemorySink, MemorySource
from deepwatch.serve._stream_metrics import StreamMetrics
from deepwatch.serve.stream import run_loop

FIELDS = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service",
          "duration", "orig_bytes", "resp_bytes", "conn_state", "local_orig", "local_resp",
          "missed_bytes", "history", "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes"]


def _row(i: int) -> list[str]:
    """A conn.log record's TSV fields, in conn.log's standard order."""
    return [f"{1700000000 + i}.5", f"C{i}", "10.0.0.1", str(40000 + i), "10.0.0.2",
            str((80, 443, 53)[i % 3]), ("tcp", "udp")[i % 2], "http", str(0.1 * (i % 7)),
            str(100 + i), str(2000 + 3 * i), "SF", "-", "-", "0", "ShADfF", str(1 + i % 5),
            "200", "5", "2200"]


@pytest.fixture(scope="module")
def zeek_detector(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    """A tiny Zeek autoencoder (one epoch on 100 records), as the Zeek tests train."""
    root = tmp_path_factory.mktemp("zeek_review_g")
    log = root / "conn.log"
    log.write_text("".join("\t".join(_row(i)) + "\n" for i in range(100)))
    return Detector(trained_bundle("autoencoder", log, root, epochs=1, fmt="zeek"))


def _records(metrics: StreamMetrics) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for fam in metrics.registry.collect()
            for s in fam.samples if s.name == "deepwatch_stream_records_total"}


def test_a_zeek_header_message_is_a_dead_letter_and_sets_no_field_order(
        zeek_detector: Detector) -> None:
    """A message that is a Zeek header line (``#fields``, ``#types``, ``#path``...) got no
    verdict, no dead letter and no count: it vanished (reproduced on Tansu: 7 messages, 4 of
    them headers, 'stream stopped: 3 records'). And a ``#fields`` message set the field order of
    the messages after it in its batch only: a record in the header's order was scored, one in
    the standard order rejected. Each header message is a dead letter saying why, counted as
    rejected; every other message is read on its own, in the standard order."""
    swap = [1, 0, *range(2, len(FIELDS))]  # uid first: another order than conn.log's
    values: list[bytes | None] = [
        "\t".join(_row(1)).encode(),
        b"#separator \\x09",
        ("#fields\t" + "\t".join(FIELDS[i] for i in swap)).encode(),
        b"#types\ttime\tstring\taddr",
        "\t".join(_row(2)[i] for i in swap).encode(),  # in the header's order: no record
        "\t".join(_row(3)).encode(),  # in the standard order: a record, whatever came before
        ("ts\t" + "\t".join(FIELDS[1:])).encode(),  # a LogAscii::tsv=T log's field-name line
        b"#fields\tts\tuid\n",  # a trailing line break is no line break inside
        b"#path\tconn\nmore",  # a header holding a line break: that is said instead
        b"#close\t2024-01-01-00-00-00",
    ]
    keys = [str(i).encode() for i in range(len(values))]
    source, sink, metrics = MemorySource(values, keys, batch_size=100, topic="conn"), \
        MemorySink(), StreamMetrics()
    report = run_loop(source, sink, StreamProcessor(zeek_detector, get_format("zeek")),
                      threading.Event(), metrics)
    dead = {int(k): json.loads(v) for k, v in sink.messages[DEAD_LETTER]}
    verdicts = {int(k) for k, _ in sink.messages[VERDICT]}
    assert verdicts == {0, 5}
    headers = {1, 2, 3, 6, 7, 9}
    assert set(dead) == headers | {4, 8}
    for i in headers:
        assert dead[i]["reason"] == HEADER_MESSAGE, i
        assert dead[i]["raw"] == values[i].decode().rstrip("\n")  # type: ignore[union-attr]
        assert dead[i]["deepwatch"]["source"] == {"topic": "conn", "partition": 0, "offset": i}
    assert dead[8]["reason"] == BROKEN and dead[8]["raw"] == "#path\tconn\\nmore"
    assert "field ts" in dead[4]["reason"]
    # nothing unsaid: every message is scored or rejected, in the report and the metrics alike
    assert (report.records, report.scored, report.rejected) == (len(values), 2, 8)
    assert _records(metrics) == {"scored": 2, "rejected": 8}
    assert source.committed == len(values)


def test_a_header_alone_in_its_batch_is_a_dead_letter(zeek_detector: Detector) -> None:
    """A batch of header messages only (a producer that sends a log's header lines as it
    rotates) is counted whole too: nothing is scored, every message is a dead letter."""
    values: list[bytes | None] = [b"#open\t2024-01-01-00-00-00", b"#path\tconn"]
    sink, metrics = MemorySink(), StreamMetrics()
    report = run_loop(MemorySource(values, batch_size=1), sink,
                      StreamProcessor(zeek_detector, get_format("zeek")), threading.Event(),
                      metrics)
    assert [json.loads(v)["reason"] for _, v in sink.messages[DEAD_LETTER]] == \
        [HEADER_MESSAGE] * 2
    assert (report.records, report.rejected, report.batches) == (2, 2, 2)
    assert _records(metrics) == {"scored": 0, "rejected": 2}


class _SlowFlush(MemorySink):
    """A sink whose acknowledgements take ``WAIT`` seconds (a broker round trip)."""

    WAIT = 0.3

    def flush(self) -> None:
        time.sleep(self.WAIT)
        super().flush()


def test_batch_duration_and_last_batch_say_what_they_measure(kdd_bundle: Path,
                                                             small_kdd_test: Path) -> None:
    """``deepwatch_stream_batch_duration_seconds`` said 'Time to parse, score, write and
    acknowledge a batch' and ``last_batch_timestamp_seconds`` 'When the last batch was
    acknowledged', though both were taken before the acknowledgement was waited for (with
    Kafka, most batches'), and the duration of a batch that happened to wait for it counted
    that wait: one figure measured two things. Both are now taken when the batch is written,
    never counting the wait, and their help texts say so."""
    values: list[bytes | None] = list(small_kdd_test.read_bytes().split(b"\n")[:30])
    metrics = StreamMetrics()
    sink = _SlowFlush()
    began = time.time()
    report = run_loop(MemorySource(values, batch_size=10), sink,
                      StreamProcessor(Detector(kdd_bundle), get_format("kdd")),
                      threading.Event(), metrics)
    assert report.batches == 3 and len(sink.messages[VERDICT]) == 30
    samples = {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples}
    assert samples["deepwatch_stream_batch_duration_seconds_count"] == 3
    # every batch here waits WAIT for its acknowledgement (the sink settles each): not counted
    assert samples["deepwatch_stream_batch_duration_seconds_sum"] < _SlowFlush.WAIT
    assert began < samples["deepwatch_stream_last_batch_timestamp_seconds"] < time.time()
    helps = {fam.name: fam.documentation for fam in metrics.registry.collect()}
    for name in ("deepwatch_stream_batch_duration_seconds",
                 "deepwatch_stream_last_batch_timestamp_seconds"):
        assert "acknowledgement" in helps[name]
        assert "acknowledge a batch" not in helps[name]
        assert "was acknowledged" not in helps[name]
