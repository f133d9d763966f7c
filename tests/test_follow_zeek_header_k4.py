"""A Zeek log followed with ``--position-file`` keeps its ``#fields`` header across a restart.

The header sets how the lines after it read (their field order, and IoT-23's ``label``). A
restarted worker read on from the kept position with no header in force: every later line of a
log with its own field order was a reject (``expected 20 tab-separated fields, found 17``), and
an IoT-23 log's labels were lost without a word. The header in force at the position is now
read from the file's start and handed with the first batch (``RawBatch.context``), for the
file the path names and for the rest of a file rotated while the worker was stopped."""

from __future__ import annotations

from pathlib import Path

from test_stream_position_j2 import read_batches

from deepwatch.formats import get_format
from deepwatch.serve._stream_core import RawBatch
from deepwatch.serve._stream_io import FileSource

FMT = get_format("zeek")
#: a conn.log with its own field order (no uid), and a label
NAMES = ["ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "conn_state",
         "orig_bytes", "label"]
HEADER = "#fields\t" + "\t".join(NAMES) + "\n"


def _lines(start: int, n: int) -> bytes:
    return "".join(f"{1545404603 + i}.5\t10.0.0.{i % 200}\t{40000 + i}\t10.0.1.1\t80\ttcp\tS0"
                   f"\t{i}\t{'Benign' if i % 2 else 'Malicious'}\n"
                   for i in range(start, start + n)).encode()


def _source(log: Path, pos: Path) -> FileSource:
    return FileSource([str(log)], follow=True, chunk_bytes=256, batch_size=4,
                      position_file=str(pos), context_after=FMT.context_after)


def _parsed(batches: list[RawBatch]) -> tuple[list[object], list[str]]:
    """The labels and the reject reasons, each batch read as the stream processor reads it:
    in the context its source gave, else in the one the batches before it left."""
    context: str | None = None
    labels: list[object] = []
    reasons: list[str] = []
    for b in batches:
        if b.context is not None:
            context = b.context[0]
        result = FMT.parse_bulk(b.data, first_line=0, context=context)
        context = FMT.context_after(b.data, context)
        labels += result.batch.column("label").to_pylist()
        reasons += result.rejects.column("reason").to_pylist()
    return labels, reasons


def test_a_restarted_worker_reads_on_under_the_header_in_force(tmp_path: Path) -> None:
    log, pos = tmp_path / "conn.log", tmp_path / "pos.json"
    log.write_bytes(HEADER.encode() + _lines(0, 10))
    first = read_batches(_source(log, pos), 11)
    assert _parsed(first) == (["malicious" if i % 2 == 0 else "normal" for i in range(10)], [])
    with log.open("ab") as fh:
        fh.write(_lines(10, 12))
    again = read_batches(_source(log, pos), 12)
    assert again[0].origin["line"][0] == 12 and again[0].context == (HEADER.rstrip("\n"),)
    assert all(b.context is None for b in again[1:])  # the batches after it follow it
    labels, reasons = _parsed(again)
    assert reasons == []
    assert labels == ["malicious" if i % 2 == 0 else "normal" for i in range(10, 22)]


def test_the_rest_of_a_file_rotated_while_stopped_reads_under_its_own_header(
        tmp_path: Path) -> None:
    log, pos = tmp_path / "conn.log", tmp_path / "pos.json"
    log.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + _lines(0, 6))  # a BOM opening it
    assert len(read_batches(_source(log, pos), 7)) >= 2
    with log.open("ab") as fh:
        fh.write(_lines(6, 5))
    log.rename(tmp_path / "conn.log.1")
    log.write_bytes(HEADER.encode() + _lines(100, 3))  # the new file, with its header
    again = read_batches(_source(log, pos), 9)
    assert again[0].context == (HEADER.rstrip("\n"),)
    labels, reasons = _parsed(again)
    assert reasons == [] and len(labels) == 8


def test_the_stream_processor_scores_the_resumed_lines_under_the_header(tmp_path: Path) -> None:
    """The worker's own path: a small Zeek model, the batches of a restarted run through the
    stream processor. Without the header each resumed line was a reject (9 fields, not the
    standard conn.log's)."""
    from deepwatch.models.detector import Detector
    from deepwatch.serve._stream_core import StreamProcessor
    from deepwatch.train.api import train

    training = tmp_path / "train.log"
    training.write_bytes(HEADER.encode() + _lines(0, 300))
    train("zeek", "autoencoder", [str(training)], tmp_path / "ae", epochs=1, seed=0)
    log, pos = tmp_path / "conn.log", tmp_path / "pos.json"
    log.write_bytes(HEADER.encode() + _lines(0, 10))
    read_batches(_source(log, pos), 11)
    with log.open("ab") as fh:
        fh.write(_lines(10, 12))
    processor = StreamProcessor(Detector(tmp_path / "ae"), FMT)
    outs = [processor.process(b) for b in read_batches(_source(log, pos), 12)]
    assert sum(o.rejected for o in outs) == 0
    assert sum(o.scored for o in outs) == 12
