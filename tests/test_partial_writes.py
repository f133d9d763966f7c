"""Writes the OS takes only part of: never a silent loss.

With ``PYTHONUNBUFFERED=1`` (set by many container images) stdout is a raw file, whose ``write``
may take part of the bytes and return the count: ``score --out - | head`` lost every row after
the first 64 KiB, exited 0 and said all were written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepwatch import lake


def test_score_to_stdout_whose_reader_leaves_is_an_error_with_unbuffered_python(
        kdd_bundle: Path, small_kdd_test: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEEPWATCH_PROGRESS": "0"}
    with subprocess.Popen([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                           "--format", "kdd", "--out", "-", str(small_kdd_test)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.read(100)  # a reader that takes a little and goes (head -c 100)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        rc = proc.wait(timeout=120)
    assert first.startswith(b"{")
    assert rc != 0, err
    assert "cannot write -" in err and "Broken pipe" in err, err
    assert "rows written" not in err, err


def test_score_to_stdout_unbuffered_writes_every_row(kdd_bundle: Path,
                                                      small_kdd_test: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEEPWATCH_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                           "--format", "kdd", "--out", "-", str(small_kdd_test)],
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    rows = done.stdout.splitlines()
    assert len(rows) == len(small_kdd_test.read_bytes().splitlines()) > 1000
    assert all(r.startswith(b"{") and r.endswith(b"}") for r in rows)


def test_a_short_write_of_the_ingested_list_is_said(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def half(fd: int, data: bytes) -> int:  # a disk that fills up part way through
        return real_write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(lake.os, "write", half)
    said = lake._append_ingested(tmp_path, ['{"input": "a.log"}\n', '{"input": "b.log"}\n'])
    assert said is not None and "could not note the inputs as ingested" in said
    assert "part" in said
