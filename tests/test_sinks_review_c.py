"""Two runs writing one output at once: the second is refused, before it scores anything.

Before, two ``deepwatch score`` runs given the same ``--out X.jsonl`` each truncated and wrote
the file: it came out with lines of both, holes of NUL bytes and cut lines, and each run said it
had written all its rows. Two given the same Parquet path each moved a whole file into place at
its end: the last one's was kept, the other's rows were lost without a word. The same went for
``--rejects``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import head_lines, run_cli

from deepwatch.errors import OutputError
from deepwatch.sinks import RecordSink, RejectSink

_HOLD = """
import sys
import pyarrow as pa
from deepwatch.sinks import RecordSink
sink = RecordSink(sys.argv[1])
sink.write(pa.record_batch({"x": [1, 2]}))
print("holding", flush=True)
sys.stdin.readline()
"""


def _lock_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def test_a_second_score_into_the_same_jsonl_is_refused_at_once(
        kdd_bundle: Path, kdd_test_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "scored.jsonl"
    lines = head_lines(kdd_test_file, 200)
    first = subprocess.Popen(
        [sys.executable, "-m", "deepwatch", "score", str(kdd_bundle), "--format", "kdd",
         "--out", str(out), "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdin is not None
        first.stdin.write("".join(lines[:100]))  # the first run is under way, reading more
        first.stdin.flush()
        deadline = time.monotonic() + 30  # (before the fix no lock came: on after a while)
        while not _lock_of(out).exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        second_input = tmp_path / "other.csv"
        second_input.write_text("".join(lines[100:]))
        second = run_cli("score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                         str(second_input))
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1, second.stderr
        assert f"--out {out} is being written by another run (pid {first.pid})" in err[0]
        assert "lines read" not in second.stderr  # refused before reading anything
        first.stdin.write("".join(lines[100:]))
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    rows = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == 200  # the first run's output, whole and alone
    assert not _lock_of(out).exists()


def test_a_second_sink_on_a_parquet_or_rejects_path_is_refused(tmp_path: Path) -> None:
    for path, make in ((tmp_path / "a.parquet", RecordSink), (tmp_path / "r.jsonl", RejectSink)):
        first = make(str(path))
        what = "--out" if make is RecordSink else "--rejects"
        with pytest.raises(OutputError, match=f"{what} {path} is being written by another run"):
            make(str(path))
        first.close()
        assert not _lock_of(path).exists()
        make(str(path)).close()  # free again once the first is closed
        assert not _lock_of(path).exists()


def test_an_aborted_or_dropped_sink_lets_go_of_its_output(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    RecordSink(str(out)).abort()
    RejectSink(str(tmp_path / "r.jsonl")).abort()
    RecordSink(str(out))  # never closed (an error before the run began): let go when dropped
    sink = RecordSink(str(out))
    sink.write(pa.record_batch({"x": [1]}))
    sink.close()
    assert out.read_bytes() == b'{"x":1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl"]


def test_the_lock_of_a_run_killed_outright_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "k.jsonl"
    with subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
            with pytest.raises(OutputError, match=f"pid {holder.pid}"):
                RecordSink(str(out))
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
    assert _lock_of(out).exists()  # left by the killed run, no longer held
    sink = RecordSink(str(out))
    sink.write(pa.record_batch({"y": [2]}))
    sink.close()
    assert out.read_bytes() == b'{"y":2}\n'
    assert not _lock_of(out).exists()


def test_devices_are_not_locked(tmp_path: Path) -> None:
    first = RejectSink(os.devnull)
    second = RejectSink(os.devnull)  # /dev/null is shared by any number of runs
    first.close()
    second.close()


def test_an_output_already_there_is_locked_itself_and_one_made_meanwhile_still_is(
        tmp_path: Path) -> None:
    older = tmp_path / "older.jsonl"
    older.write_bytes(b'{"x":0}\n')
    first = RecordSink(str(older))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["older.jsonl"]  # nothing beside it
    with pytest.raises(OutputError, match="is being written by another run"):
        RejectSink(str(older))
    first.abort()
    assert older.read_bytes() == b'{"x":0}\n'
    new = tmp_path / "new.jsonl"
    first = RecordSink(str(new))
    new.write_bytes(b"")  # (as the first run's first rows make it)
    with pytest.raises(OutputError, match="is being written by another run"):
        RecordSink(str(new))
    first.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "older.jsonl"]


def test_a_run_refused_for_its_rejects_path_lets_go_of_its_output(
        kdd_bundle: Path, kdd_test_file: Path, tmp_path: Path) -> None:
    """The output's lock was taken before the rejects path was checked: a run refused for
    that kept it, held by the sink its error's traceback keeps (a notebook keeps the last one),
    and the next run given the same --out in the same Python was refused as another's."""
    from deepwatch.errors import DeepwatchError
    from deepwatch.scoring import score_files

    src = tmp_path / "in.csv"
    src.write_text("".join(head_lines(kdd_test_file, 200)))
    out = tmp_path / "out.jsonl"
    with pytest.raises(DeepwatchError, match="is a directory") as refused:
        score_files(str(kdd_bundle), "kdd", [str(src)], str(out), rejects=str(tmp_path))
    report = score_files(str(kdd_bundle), "kdd", [str(src)], str(out),
                         rejects=str(tmp_path / "rejects.jsonl"))
    assert refused.value is not None  # (its traceback still held while the second run ran)
    assert report.written == 200
    assert len(out.read_text().splitlines()) == 200
