"""A stop while Spark starts waits for the start to end (so that the session is stopped
cleanly), but not for ever: a start that hangs (a JVM that never answers) held the stop until
SIGKILL. After ``START_STOP_WAIT_S`` the start is given up and the run ends in one line."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import need


def test_a_start_that_hangs_is_given_up_after_a_stop(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        need(False, "pyspark")
        return
    import deepwatch.spark
    from deepwatch.errors import Interrupted

    release = threading.Event()

    def hangs(self: object) -> object:  # getOrCreate of a JVM that never answers
        release.wait(30)
        raise RuntimeError("released by the test")

    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))
    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", hangs)
    monkeypatch.setattr(deepwatch.spark, "START_STOP_WAIT_S", 0.3)
    part = tmp_path / "part.csv"
    part.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:20]))
    out = tmp_path / "o"
    out.mkdir()

    def died(*_: object) -> None:  # SIGTERM's default action, without ending the test run
        raise RuntimeError("SIGTERM was not taken: the process would have died here")

    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    before = signal.signal(signal.SIGTERM, died)
    t0 = time.monotonic()
    try:
        timer.start()
        with pytest.raises(Interrupted) as stop:
            deepwatch.spark.score_spark(str(kdd_bundle), "kdd", [str(part)],
                                        str(out / "out.jsonl"), rejects=str(out / "r.jsonl"))
        assert signal.getsignal(signal.SIGTERM) is died  # the handler found is put back
    finally:
        timer.cancel()
        release.set()
        signal.signal(signal.SIGTERM, before)
    assert time.monotonic() - t0 < 10
    assert stop.value.terminated
    assert "its start was given up" in str(stop.value.detail)
    assert sorted(p.name for p in out.iterdir()) == []  # no output, no lock file
