"""A glob's files are read sorted, a log's rotated files before it, oldest first: ``access.log*``
was read newest first (``access.log``, then ``.1``, then ``.2.gz``), so that an access log's
per-client windows saw later requests before earlier ones."""

from __future__ import annotations

import gzip
from pathlib import Path

from deepwatch.sources.files import log_order, parse_input_spec


def _paths(pattern: str) -> list[str]:
    return [Path(s.path).name for s in parse_input_spec(pattern)]


def test_rotated_logs_are_read_oldest_first(tmp_path: Path) -> None:
    for name in ("access.log", "access.log.1", "error.log", "error.log.1"):
        (tmp_path / name).write_text("x\n")
    for n in (2, 9, 10):
        (tmp_path / f"access.log.{n}.gz").write_bytes(gzip.compress(b"x\n"))
    assert _paths(str(tmp_path / "access.log*")) == [
        "access.log.10.gz", "access.log.9.gz", "access.log.2.gz", "access.log.1", "access.log"]
    assert _paths(str(tmp_path / "*.log*")) == [
        "access.log.10.gz", "access.log.9.gz", "access.log.2.gz", "access.log.1", "access.log",
        "error.log.1", "error.log"]


def test_dateext_names_are_read_by_date_and_other_names_as_sorted(tmp_path: Path) -> None:
    for name in ("access.log", "access.log-20240514.gz", "access.log-20240512",
                 "access.log-2024051309", "access.log.bak"):
        (tmp_path / name).write_text("x\n")
    assert _paths(str(tmp_path / "access.log*")) == [
        "access.log-20240512", "access.log-2024051309", "access.log-20240514.gz", "access.log",
        "access.log.bak"]
    # numbered files whose log is not among them (split parts) stay as sorted
    assert log_order(["part.2", "part.1", "part.10"]) == ["part.1", "part.10", "part.2"]
