"""``score --engine spark``: a stop while Spark starts (seconds of JVM start-up) ends the run as
one at any other time does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need
from test_spark import spark  # noqa: F401 - test_spark's Spark session fixture, for this module

from deepwatch.scoring import score_files


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.slow
def test_sigterm_while_spark_starts_ends_the_run_in_one_line_and_leaves_nothing(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """SIGTERM while the driver started Spark (its JVM launched, the session not yet made)
    killed the run outright: exit by the signal, no ``terminated`` line, and the output's lock
    file (``.out.jsonl.lock``) left beside --out. The run's stop handlers are now in before
    Spark starts: the stop is taken, Spark is stopped once started, and the run ends as a stop
    during the jobs does (exit 143, one line, nothing left)."""
    need(shutil.which("java") is not None, "java (Spark needs Java 17)")
    need(sys.platform.startswith("linux"), "/proc (Linux)")
    part = tmp_path / "part.csv"
    part.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:200]))
    out = tmp_path / "o"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch", "score", str(kdd_bundle), "--format", "kdd",
         "--engine", "spark", "--out", str(out / "out.jsonl"), "--rejects",
         str(out / "rejects.jsonl"), str(part)],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _children(proc.pid):  # the JVM (spark-submit) is being launched
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == "terminated", err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_stop_while_spark_starts_is_raised_once_started_and_spark_stopped(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, the same path: a SIGTERM that comes while the session starts (here, a
    stand-in for it, which sends the signal) is taken by the run's handler, raised once the
    start returns, the session made for the run stopped, no lock file left, and the handler
    found before put back."""
    import deepwatch.spark
    from deepwatch.errors import Interrupted

    stopped = []

    class Session:
        sparkContext = None  # noqa: N815 - pyspark's name

        def stop(self) -> None:
            stopped.append(True)

    def starting(master: str | None = None, abandon: object = None) -> tuple[Session, bool]:
        os.kill(os.getpid(), signal.SIGTERM)  # (taken at once, on this thread)
        return Session(), True

    def died(*_: object) -> None:  # SIGTERM's default action, without ending the test run
        raise RuntimeError("SIGTERM was not taken: the process would have died here")

    monkeypatch.setattr(deepwatch.spark, "spark_session", starting)
    part = tmp_path / "part.csv"
    part.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:20]))
    out = tmp_path / "o"
    out.mkdir()
    before = signal.signal(signal.SIGTERM, died)
    try:
        with pytest.raises(Interrupted) as stop:
            deepwatch.spark.score_spark(str(kdd_bundle), "kdd", [str(part)],
                                        str(out / "out.jsonl"), rejects=str(out / "r.jsonl"))
        assert signal.getsignal(signal.SIGTERM) is died
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.terminated and stopped == [True]
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.usefixtures("spark")
def test_a_relative_out_whose_first_directory_holds_a_colon_is_written(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--out runs/10:30/out.jsonl`` (a relative path whose first part holds a ':', as a time
    of day does): the Spark job failed ('Relative path in absolute URI'), Spark taking the
    staging directory beside it for a URI of scheme ``10``; the local engine wrote it. Both
    write the same rows now."""
    from deepwatch.spark import score_spark

    part = tmp_path / "part.csv"
    part.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:50]))
    (tmp_path / "10:30" / "x:y").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    report = score_spark(str(kdd_bundle), "kdd", [str(part)], "10:30/x:y/out.jsonl")
    local = score_files(str(kdd_bundle), "kdd", [str(part)], "10:30/local.jsonl")
    assert report.written == local.written == 50
    rows = (tmp_path / "10:30" / "x:y" / "out.jsonl").read_text().splitlines()
    local_rows = (tmp_path / "10:30" / "local.jsonl").read_text().splitlines()
    assert [json.loads(r)["verdict"] for r in rows] == [
        json.loads(r)["verdict"] for r in local_rows]
    assert sorted(p.name for p in (tmp_path / "10:30" / "x:y").iterdir()) == ["out.jsonl"]
