"""A closed stdin (``deepwatch ingest ... - <&-``) crashed a run with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_closed_stdin_is_an_input_error(tmp_path: Path) -> None:
    """``deepwatch ingest ... - <&-`` (standard input closed: Python's ``sys.stdin`` is None)
    ended in ``AttributeError: 'NoneType' object has no attribute 'buffer'`` and a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch", "ingest", "-f", "kdd", "--lake",
         str(tmp_path / "lake"), "-"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.close(0))  # noqa: PLW1509 - the child's stdin, closed
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: cannot read <stdin>: standard input is closed;")
