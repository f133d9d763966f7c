"""``score --engine spark`` of an access log reads its files once, not once per job.

An access bundle's window features need two jobs (the partitions' tails, then the scoring, see
``deepwatch.spark``). The lines frame both run on was kept between them only where Spark spread
the lines over the cores; where each input piece was a partition of its own (two files or more,
a plain file of two ranges or more), the scoring job read every file again: twice the reading,
and a file that changed in between failed the run (``changed while it was read``), or with a
change of the same size, scored other bytes than the tails came from. Here two small real files
are read through the same frame by two jobs, one of them appended to in between.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import data_file, head_lines, need

# (pyspark's notice about pandas 3, which deepwatch never uses: score_spark ignores it too)
pytestmark = pytest.mark.filterwarnings(
    "ignore:PySpark does not yet fully support pandas:FutureWarning")


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        need(False, "pyspark (pip install 'deepwatch[spark]')")
    need(shutil.which("java") is not None, "java (Spark needs Java 17)")
    from deepwatch.spark import spark_session

    session, owned = spark_session("local[2]")
    yield session
    if owned:
        session.stop()


@pytest.mark.slow
def test_the_two_jobs_of_windowed_features_read_the_files_once(spark: object,
                                                               tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    from deepwatch.spark import _lines_frame, _specs

    site = head_lines(data_file("weblogs/apache_access.log.gz"), 300)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    first.write_text("".join(site[:200]))
    second.write_text("".join(site[200:]))
    # two files: two pieces, as many as local[2]'s cores, so the lines are not spread (nor,
    # before, kept): each job read the files itself
    lines = _lines_frame(spark, _specs([str(first), str(second)]), same_cuts=True)
    try:
        assert lines.count() == 300  # the first job (the tails job's place)
        with first.open("a") as f:  # a live log, written to between the two jobs
            f.write("".join(site[:5]))
        # the second job (the scoring job's place) sees the lines the first one read
        # (it failed: "... a.log changed while it was read (... bytes, now ...)")
        got = lines.groupBy("file").agg(F.count("*").alias("n"), F.max("line").alias("last"))
        assert sorted((r["file"], r["n"], r["last"]) for r in got.collect()) == [
            (0, 200, 200), (1, 100, 100)]
    finally:
        lines.unpersist()
