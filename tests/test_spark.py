"""``score --engine spark`` on a real pyspark local[2]: the same rows, verdicts and rejects as the
local engine, in input order."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import need

from deepwatch.errors import BundleError, UsageError
from deepwatch.scoring import score_files

BAD_LINES = ["garbage,line", "", "0,tcp,http,SF,not-a-number" + ",0" * 37 + ",normal."]


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    """One SparkSession for the module (starting Spark takes many seconds)."""
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


@pytest.fixture(scope="module")
def inputs(small_kdd_test: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A plain file with bad lines in the middle, CRLF endings and no final newline, and a .gz;
    their names hold a space, non-ASCII and Hadoop's glob characters (read as they are)."""
    root = tmp_path_factory.mktemp("spark_inputs")
    lines = small_kdd_test.read_text().splitlines()
    plain = root / "mixed [1] é{a}*?.csv"
    body = lines[:2000] + BAD_LINES + lines[2000:4000]
    plain.write_bytes("\r\n".join(body).encode())
    packed = root / "more.csv.gz"
    packed.write_bytes(gzip.compress(("\n".join(lines[4000:7000]) + "\n").encode()))
    return [str(plain), str(packed)]


def _rejects(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_spark_gives_the_local_engines_rows_verdicts_and_rejects(
        spark: object, kdd_bundle: Path, inputs: list[str], tmp_path: Path) -> None:
    from deepwatch.spark import score_spark

    local = score_files(str(kdd_bundle), "kdd", inputs, str(tmp_path / "local.parquet"),
                        rejects=str(tmp_path / "local.jsonl"))
    dist = score_spark(str(kdd_bundle), "kdd", inputs, str(tmp_path / "spark.parquet"),
                       rejects=str(tmp_path / "spark.jsonl"))
    assert dist.engine.startswith("spark local[2]")
    a = pq.read_table(tmp_path / "spark.parquet")
    b = pq.read_table(tmp_path / "local.parquet")
    assert a.num_rows == b.num_rows == 7000
    assert a.schema.equals(b.schema)
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()
    assert a.column("attack_type").to_pylist() == b.column("attack_type").to_pylist()
    assert a.column("label").to_pylist() == b.column("label").to_pylist()  # input order
    sa, sb = a.column("score").to_numpy(), b.column("score").to_numpy()
    assert abs(sa - sb).max() < 1e-6
    assert 0 < dist.alerts == local.alerts < 7000
    # every rejected line is kept, with the same line number, text, reason and source
    rejects = _rejects(tmp_path / "spark.jsonl")
    assert rejects == _rejects(tmp_path / "local.jsonl")
    assert [r["line"] for r in rejects] == [2001, 2002, 2003]
    assert [r["raw"] for r in rejects] == BAD_LINES
    assert {r["source"] for r in rejects} == {inputs[0]}
    assert (dist.stats.lines, dist.stats.parsed, dist.stats.rejected) == (7003, 7000, 3)
    assert dist.stats.by_source == local.stats.by_source


@pytest.mark.slow
def test_cli_spark_alerts_only_jsonl_with_path_labels(
        spark: object, kdd_bundle: Path, inputs: list[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from deepwatch.cli import main

    labelled = [f"{inputs[1]}=campaign"]
    args = ["score", str(kdd_bundle), "--format", "kdd", "--alerts-only", *labelled]
    assert main([*args, "--out", str(tmp_path / "local.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "spark.jsonl"), "--engine", "spark"]) == 0
    err = capsys.readouterr().err
    assert "(spark local[2]" in err and "3,000 lines read: 3,000 parsed, 0 rejected" in err
    spark_rows = _rejects(tmp_path / "spark.jsonl")
    local_rows = _rejects(tmp_path / "local.jsonl")
    assert spark_rows and len(spark_rows) < 3000
    assert {r["verdict"] for r in spark_rows} == {"malicious"}
    assert {r["label"] for r in spark_rows} == {"campaign"}
    assert [r["score"] for r in spark_rows] == pytest.approx([r["score"] for r in local_rows],
                                                             abs=1e-6)
    assert [r["attack_type"] for r in spark_rows] == [r["attack_type"] for r in local_rows]
    assert [r["src_bytes"] for r in spark_rows] == [r["src_bytes"] for r in local_rows]


def test_a_path_hadoop_would_split_is_refused_with_one_line(tmp_path: Path) -> None:
    from deepwatch.spark import _hadoop_path

    assert _hadoop_path(str(tmp_path / "a b[1]*.csv")) == \
        "file://" + str(tmp_path.resolve()) + "/a b\\[1\\]\\*.csv"
    with pytest.raises(UsageError, match=r"Hadoop splits input paths at commas; rename the file "
                                         r"or use the local engine"):
        _hadoop_path(str(tmp_path / "a,b.csv"))


def test_bad_bundle_and_stdin_are_refused_before_spark_starts(
        kdd_bundle: Path, inputs: list[str], tmp_path: Path) -> None:
    from deepwatch.spark import score_spark

    with pytest.raises(UsageError, match="not stdin"):
        score_spark(str(kdd_bundle), "kdd", ["-"], str(tmp_path / "o.parquet"))
    with pytest.raises(UsageError, match="trained on format 'kdd'"):
        score_spark(str(kdd_bundle), "nslkdd", inputs, str(tmp_path / "o.parquet"))
    broken = tmp_path / "broken"
    shutil.copytree(kdd_bundle, broken)
    with open(broken / "featurizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="does not match its checksum"):
        score_spark(str(broken), "kdd", inputs, str(tmp_path / "o.parquet"))


@pytest.mark.slow
def test_a_damaged_gz_fails_the_spark_job_with_one_clear_line(
        spark: object, kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Hadoop cannot read past the damage and Spark would drop or fail the file silently or
    with pages of Java; the error names the cause and the engine that reads such files, and
    leaves no output and no (empty) rejects file."""
    from deepwatch.spark import SparkError, score_spark

    whole = gzip.compress(small_kdd_test.read_bytes())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    out, rejects = tmp_path / "o.parquet", tmp_path / "r.jsonl"
    capfd.readouterr()
    with pytest.raises(SparkError, match=r"input file is damaged \(java\.io\.EOFException.*"
                                         r"--engine local"):
        score_spark(str(kdd_bundle), "kdd", [str(cut)], str(out), rejects=str(rejects))
    assert not out.exists() and not rejects.exists()
    assert "Exception" not in capfd.readouterr().err  # no executor stack traces
    out.write_bytes(b"an earlier run's output")  # a failed run leaves it as it was
    with pytest.raises(SparkError, match="input file is damaged"):
        score_spark(str(kdd_bundle), "kdd", [str(cut)], str(out))
    assert out.read_bytes() == b"an earlier run's output"


@pytest.mark.slow
def test_zeek_headers_reach_every_partition(spark: object, tmp_path: Path) -> None:
    """A .gz conn.log is one Hadoop split, spread over the cores in line ranges: the ranges
    after the first must still read the fields in the order of the file's #fields header."""
    from test_zeek import FIELDS, HEADER, SWAPPED, _conn, _tsv

    from deepwatch.spark import score_spark
    from deepwatch.train.api import train

    header = HEADER.replace("\t".join(FIELDS), "\t".join(SWAPPED))
    rows = [_conn(i) for i in range(3000)]
    for i, r in enumerate(rows):
        r["duration"] = str(0.1 * (i % 7))
    text = "\n".join([header, *(_tsv(SWAPPED, r) for r in rows[:2000]),
                      "#fields\t" + "\t".join(FIELDS),  # a second log, the standard order
                      *(_tsv(list(FIELDS), r) for r in rows[2000:])]) + "\n"
    log = tmp_path / "conn.log.gz"
    log.write_bytes(gzip.compress(text.encode()))
    bundle = tmp_path / "ae"
    train("zeek", "autoencoder", [f"{log}=normal"], bundle, epochs=1, seed=0)
    local = score_files(str(bundle), "zeek", [str(log)], str(tmp_path / "local.parquet"))
    dist = score_spark(str(bundle), "zeek", [str(log)], str(tmp_path / "spark.parquet"))
    a = pq.read_table(tmp_path / "spark.parquet")
    b = pq.read_table(tmp_path / "local.parquet")
    assert (dist.stats.parsed, dist.stats.rejected) == (local.stats.parsed, 0) == (3000, 0)
    assert set(a.column("resp_bytes").to_pylist()) == {999999}
    assert set(a.column("orig_h").to_pylist()) == {"10.0.0.1"}
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    assert a.schema.equals(b.schema)  # the times too, in milliseconds as the local engine
    assert a.column("ts").to_pylist() == b.column("ts").to_pylist()
    assert a.column("verdict").to_pylist() == b.column("verdict").to_pylist()
