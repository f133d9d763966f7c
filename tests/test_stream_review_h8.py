"""``deepwatch stream``: defects found in review h8 (each test fails on the code before its fix)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import termios
import threading
import time
from pathlib import Path

import pytest

from deepwatch.models.detector import Detector
from deepwatch.serve import _stream_io
from deepwatch.serve._stream_io import DeliveryError
from deepwatch.serve.stream import StreamOptions, run_stream


@pytest.fixture(scope="module")
def detector(kdd_bundle: Path) -> Detector:
    return Detector(kdd_bundle)


def _queued(fd: int) -> int:
    """Bytes waiting in the pipe whose read end is ``fd``."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


def test_a_stop_while_an_output_takes_nothing_more_ends_the_write(
        detector: Detector, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An output whose reader stopped reading (a named pipe, or stdout piped to a stalled log
    shipper): the worker logged "stopping after the batch in hand" at SIGTERM and then waited in
    the write for ever, every later SIGTERM and Ctrl-C logged and ignored (only SIGKILL ended
    it). After a stop, writes may go on for STOP_WRITE_S: one still blocked then ends the run
    with a DeliveryError that says so."""
    monkeypatch.setattr(_stream_io, "STOP_WRITE_S", 0.5)
    fifo = tmp_path / "verdicts.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read (until the end)
    done = threading.Event()
    sent: list[float] = []

    def stop_when_full() -> None:
        deadline = time.monotonic() + 60
        while _queued(reader) < 65536 and time.monotonic() < deadline:  # the pipe is full
            time.sleep(0.02)
        time.sleep(0.2)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)
        if not done.wait(5):  # the old code waits for ever: read the pipe so that it ends
            while not done.is_set():
                try:
                    os.read(reader, 1 << 20)
                except BlockingIOError:
                    time.sleep(0.01)

    helper = threading.Thread(target=stop_when_full, daemon=True)
    opts = StreamOptions(bundle=str(kdd_bundle), format="kdd", inputs=[str(small_kdd_test)],
                         out=str(tmp_path / "alerts.jsonl"), verdicts=str(fifo))
    before = signal.getsignal(signal.SIGALRM)
    helper.start()
    try:
        with pytest.raises(DeliveryError) as caught:
            run_stream(opts, detector=detector)
        ended = time.monotonic()
    finally:
        done.set()
        helper.join(30)
        os.close(reader)
    assert (f"cannot write --verdicts {fifo}: it had not taken the batch in hand 0.5s after "
            "the stop") in str(caught.value)
    assert sent and ended - sent[0] < 3.0, ended - sent[0]
    # the alarm it set is gone with it
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("blocked", ["write", "flush"])
def test_after_a_stop_a_write_or_flush_to_a_full_output_is_given_up(
        blocked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop came before the write (the batch in hand is written after it): a write, or the
    flush of what the file object holds, that the output does not take within STOP_WRITE_S is
    a DeliveryError; the file is then closed without waiting again."""
    from deepwatch.serve._stream_core import ALERT, Messages, Output
    from deepwatch.serve._stream_io import JsonlSink

    monkeypatch.setattr(_stream_io, "STOP_WRITE_S", 0.3)
    fifo = tmp_path / "alerts.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    stop = threading.Event()
    sink = JsonlSink(str(fifo), stop=stop)
    try:
        if blocked == "flush":  # the pipe full already: a small write is held in the buffer
            filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                while True:
                    os.write(filler, b"\n" * 4096)
            except BlockingIOError:
                pass
            finally:
                os.close(filler)
        lines = [b"{}"] * (10 if blocked == "flush" else 200_000)
        out = Output({ALERT: Messages(lines)}, len(lines), len(lines), 0, len(lines))
        stop.set()
        t0 = time.monotonic()
        with pytest.raises(DeliveryError,
                           match="it had not taken the batch in hand 0.3s after the stop"):
            sink.write(out)
            sink.flush()
        assert time.monotonic() - t0 < 2.0
    finally:
        sink.close()  # returns at once: what the file object held goes to /dev/null
        os.close(reader)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _when_handlers_are_in(then: float = 0.3) -> None:
    """Waits until run_stream has put its SIGTERM handler in (so that a SIGTERM cannot end the
    test process), then ``then`` more seconds."""
    first = signal.getsignal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while signal.getsignal(signal.SIGTERM) is first and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(then)


def test_a_stop_while_an_output_pipe_has_no_reader_ends_the_run(
        detector: Detector, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """``--out FIFO`` that no one has opened yet: opening it waited in the kernel for a reader,
    for ever, every SIGTERM and Ctrl-C logged and ignored. A stop now ends the wait; nothing
    is read, and the stop line says why."""
    fifo = tmp_path / "alerts.fifo"
    os.mkfifo(fifo)
    done = threading.Event()
    sent: list[float] = []

    def stop_it() -> None:
        _when_handlers_are_in()
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)
        if not done.wait(3):  # the old code waits in open() for ever: be its reader
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                while not done.is_set():
                    try:
                        os.read(reader, 1 << 20)
                    except BlockingIOError:
                        time.sleep(0.01)
            finally:
                os.close(reader)

    helper = threading.Thread(target=stop_it, daemon=True)
    opts = StreamOptions(bundle=str(kdd_bundle), format="kdd", inputs=[str(small_kdd_test)],
                         out=str(fifo))
    helper.start()
    try:
        report = run_stream(opts, detector=detector)
        ended = time.monotonic()
    finally:
        done.set()
        helper.join(30)
    assert (report.records, report.batches) == (0, 0)
    assert report.unread == [f"--out {fifo} had no reader yet: no input was read"]
    assert sent and ended - sent[0] < 1.0, ended - sent[0]


def test_an_output_pipe_opened_by_its_reader_later_gets_every_alert(
        detector: Detector, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """The reader of ``--out FIFO`` comes after the worker started: it gets every alert, as
    when it was there first."""
    fifo = tmp_path / "alerts.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def read_later() -> None:
        _when_handlers_are_in(0.3)
        with open(fifo, "rb") as fh:
            got.append(fh.read())

    reader = threading.Thread(target=read_later, daemon=True)
    opts = StreamOptions(bundle=str(kdd_bundle), format="kdd", inputs=[str(small_kdd_test)],
                         out=str(fifo))
    reader.start()
    report = run_stream(opts, detector=detector)
    reader.join(30)
    lines = got[0].splitlines()
    assert report.alerts > 100 and len(lines) == report.alerts
    assert all(json.loads(x)["event"]["kind"] == "alert" for x in lines)


@pytest.mark.parametrize("flag", ["output_topic", "verdict_topic", "dead_letter_topic"])
def test_an_output_topic_that_is_the_input_topic_is_refused(kdd_bundle: Path,
                                                            flag: str) -> None:
    """``--dead-letter-topic`` (or another output) naming the input topic: the worker read what
    it wrote as records, and a dead letter read again was rejected again, for ever (on Tansu,
    one bad record became 217 dead letters in a minute, and counting). Refused before anything
    is read, as an output file that is an input file is. (The stop is set: the old code returned
    at once instead of waiting for the unreachable brokers.)"""
    from deepwatch.errors import UsageError

    topics = {"output_topic": "conn.alerts", "verdict_topic": "conn.verdicts",
              "dead_letter_topic": "conn.dead", flag: "conn"}
    opts = StreamOptions(bundle=str(kdd_bundle), format="kdd", brokers="127.0.0.1:9",
                         input_topic="conn", **topics)
    stopped = threading.Event()
    stopped.set()
    flag_name = "--" + flag.replace("_", "-")
    with pytest.raises(UsageError, match=f"^{flag_name} 'conn' is the input topic: the worker "
                                         "would read what it writes as records"):
        run_stream(opts, stop=stopped)
