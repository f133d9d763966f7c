"""deepwatch.api as a notebook uses it: each command's function is named there, and scores
what the command scores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from conftest import ROOT, head_lines


def test_every_commands_function_is_named_by_deepwatch_api(kdd_bundle: Path, tmp_path: Path,
                                                          kdd_test_file: Path) -> None:
    """The README says ``deepwatch.api`` names every function a notebook needs and that each
    command calls one function a notebook calls the same way; ``score``'s (``score_files``),
    ``report``'s (``write_report``) and ``ingest``'s were not there (``ImportError: cannot
    import name 'score_files' from 'deepwatch.api'``). Called from there, ``score_files``
    writes the very rows ``deepwatch score`` writes for the same records, ``write_report``
    the page of what ``evaluate`` returns, and ``ingest`` fills a lake ``read_lake`` reads."""
    import deepwatch.api as api
    from deepwatch.api import evaluate, ingest, read_lake, score_files, write_report
    from deepwatch.scoring import score_files as from_module
    from deepwatch.web_cli import ingest as ingest_from_module

    assert score_files is from_module and ingest is ingest_from_module
    assert {"score_files", "ingest", "write_report"} <= set(api.__all__)

    records = tmp_path / "records.csv"
    records.write_text("".join(head_lines(kdd_test_file, 300, every=97)))
    report = score_files(kdd_bundle, "kdd", records, tmp_path / "api.parquet")
    assert report.written == 300
    cli = subprocess.run([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                          "--format", "kdd", "--out", str(tmp_path / "cli.parquet"),
                          str(records)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert pq.read_table(tmp_path / "api.parquet").equals(pq.read_table(tmp_path / "cli.parquet"))

    result, columns = evaluate(kdd_bundle, "kdd", records)
    page = write_report(tmp_path / "report.html", result, columns)
    assert page.read_text().lstrip().lower().startswith("<!doctype html")

    stats, _summary = ingest("kdd", str(tmp_path / "lake"), [str(records)])
    assert read_lake(tmp_path / "lake").num_rows == 300
