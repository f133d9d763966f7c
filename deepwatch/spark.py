"""``deepwatch score --engine spark``: the same scoring, spread over a Spark cluster.

Spark reads the raw text (plain or ``.gz``; lines end at ``\\n`` only, as for the local engine)
and numbers every line of every file; ``mapInArrow`` then hands runs of consecutive lines to the
executors, which parse them with the format's own ``Format.parse`` and score them with
``Detector.score_batch`` (the bundle loaded and verified once per partition, from its path). So a
record gets the same verdict as with the local engine. Scored records and rejects travel together,
keyed by (file, line); Spark writes them to a staging directory beside ``--out`` and the driver
streams them, in input order, into the one output file the contract asks for.

With a cluster (``--master`` other than ``local[...]``), the bundle, the inputs and the directory of
``--out`` must be at the same paths on every executor (a shared filesystem), and the executors
need deepwatch installed. Formats whose parsing depends on earlier lines, and derived features
with state across records, see each partition on its own.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._arrow import to_numpy
from .errors import DeepwatchError, UsageError
from .formats import Format, get_format
from .io import Stats, with_label
from .scoring import ScoreReport
from .sinks import RecordSink, RejectSink
from .sources.files import InputSpec, iter_chunks, parse_input_spec

#: Columns that travel with every row between the executors and the driver.
HELPERS = pa.schema([pa.field("_file", pa.int32()), pa.field("_line", pa.int64()),
                     pa.field("_raw", pa.string()), pa.field("_reason", pa.string())])
DEFAULT_MASTER = "local[2]"
_HEAD_BYTES = 256 << 10


class SparkError(DeepwatchError):
    """Spark could not be started or a job failed."""

    exit_code = 1


# ---- the session ----------------------------------------------------------------------------

def spark_session(master: str | None = None) -> tuple[Any, bool]:
    """The active SparkSession, or a new one for ``master``; and whether it was created here."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise UsageError("the spark engine needs pyspark: pip install 'deepwatch[spark]'") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        running = active.sparkContext.master
        if master and master != running:
            raise UsageError(f"a Spark session for {running} already runs in this process; "
                             f"cannot also use --master {master}")
        return active, False
    master = master or DEFAULT_MASTER
    builder = (SparkSession.builder.master(master).appName("deepwatch score")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               # pyspark's notice about pandas 3 on every worker: deepwatch's workers use Arrow
               .config("spark.executorEnv.PYTHONWARNINGS",
                       "ignore:PySpark does not yet fully support pandas:FutureWarning")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "50000"))
    if master.startswith("local"):
        # nothing listens beyond loopback, and the workers run this very interpreter
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.pyspark.python", sys.executable))
        # PySpark starts its Python workers with $PYSPARK_PYTHON, else whatever `python3` is
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # py4j / JVM start-up failures have many types
        raise SparkError(f"cannot start Spark with master {master} (is Java 17 installed and "
                         f"JAVA_HOME set?): {str(exc).splitlines()[0] if str(exc) else exc}"
                         ) from None
    # a failed job is reported as one line (SparkError); the executors' stack traces are noise
    session.sparkContext.setLogLevel("FATAL")
    return session, True


# ---- on the executors -----------------------------------------------------------------------

def _conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with exactly ``schema``'s columns: missing ones null, types cast."""
    n = batch.num_rows
    cols = []
    for f in schema:
        if f.name in batch.schema.names:
            col = batch.column(f.name)
            cols.append(col if col.type == f.type else pc.cast(col, f.type))
        else:
            cols.append(pa.nulls(n, f.type))
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _record_lines(result: Any, first_line: int) -> np.ndarray:
    """Line numbers of the parsed records (from the parser, or what the rejects leave)."""
    if len(result.line_numbers) == result.batch.num_rows:
        return to_numpy(result.line_numbers).astype(np.int64, copy=False)
    every = np.arange(first_line, first_line + result.lines, dtype=np.int64)
    rejected = to_numpy(result.rejects.column("line")).astype(np.int64, copy=False)
    return every[~np.isin(every, rejected)]


def _score_run(det: Any, fmt: Format, text: pa.Array, file_no: int, first_line: int,
               label: str | None, parsed: pa.Schema, union: pa.Schema,
               context: str | None = None) -> pa.RecordBatch:
    """Parse and score one run of consecutive lines of one file; records and rejects in order.
    ``context``: the format's context line in force before the run (a Zeek #fields header)."""
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(text)], pa.int32()), text),
                            "\n")[0].as_py()
    result = fmt.parse_in_context(joined + "\n", first_line, context)
    parts = []
    if result.batch.num_rows:
        records = _conform(with_label(result.batch, label), parsed)
        scored = det.score_batch(records)
        lines = _record_lines(result, first_line)
        extra = {"_file": pa.array(np.full(len(lines), file_no, np.int32)),
                 "_line": pa.array(lines)}
        table = pa.Table.from_batches([scored])
        for name, arr in extra.items():
            table = table.append_column(name, arr)
        parts.append(_conform(table, union))
    rej = result.rejects
    if rej.num_rows:
        n = rej.num_rows
        table = pa.table({"_file": pa.array(np.full(n, file_no, np.int32)),
                          "_line": rej.column("line"), "_raw": rej.column("raw"),
                          "_reason": rej.column("reason")})
        parts.append(_conform(table, union))
    both = pa.Table.from_batches(parts, schema=union)
    return _conform(both.take(pc.sort_indices(both.column("_line"))), union)


def score_partition(batches: Iterator[pa.RecordBatch], bundle: str, format_name: str,
                    labels: Sequence[str | None], parsed: pa.Schema, union: pa.Schema,
                    contexts: dict[int, list[tuple[int, str]]] | None = None,
                    ) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function: (file, line, text) rows in, scored rows and rejects out.
    ``contexts``: per file, its context lines (line number, text) in order (see _contexts)."""
    from .models.detector import Detector

    det = Detector(bundle)  # once per partition; verify=True checks every file's sha256
    fmt = get_format(format_name)
    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        files = to_numpy(batch.column("file")).astype(np.int64)
        lines = to_numpy(batch.column("line")).astype(np.int64, copy=False)
        text = batch.column("text")
        cut = np.flatnonzero((np.diff(files) != 0) | (np.diff(lines) != 1)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, n], strict=True):
            f = int(files[a])
            yield _score_run(det, fmt, text.slice(a, b - a), f, int(lines[a]), labels[f],
                             parsed, union, _context_at((contexts or {}).get(f, []),
                                                        int(lines[a])))


def _context_at(headers: list[tuple[int, str]], line: int) -> str | None:
    """The last context line before ``line`` (headers sorted by line number)."""
    at = bisect.bisect_left(headers, (line, "")) - 1
    return headers[at][1] if at >= 0 else None


def _contexts(frame: Any, fmt: Format) -> dict[int, list[tuple[int, str]]]:
    """Per file, the lines that set the format's context (Zeek's #fields headers), in order:
    a run of lines scored on an executor may start after its file's header."""
    if fmt.context_prefix is None:
        return {}
    from pyspark.sql import functions as F

    rows = frame.filter(F.col("text").startswith(fmt.context_prefix)).select(
        "file", "line", "text").collect()
    out: dict[int, list[tuple[int, str]]] = {}
    for row in sorted(rows, key=lambda r: (r["file"], r["line"])):
        out.setdefault(int(row["file"]), []).append((int(row["line"]), str(row["text"])))
    return out


# ---- on the driver --------------------------------------------------------------------------

def _specs(inputs: Sequence[str]) -> list[InputSpec]:
    specs: list[InputSpec] = []
    for text in inputs:
        if text == "-":
            raise UsageError("the spark engine reads files, not stdin; use --engine local")
        specs.extend(parse_input_spec(text))
    if not specs:
        raise UsageError("no input files")
    return specs


def _parsed_schema(fmt: Format, specs: Sequence[InputSpec]) -> tuple[pa.Schema, pa.RecordBatch]:
    """The schema of parsed batches, and a few real parsed rows, from the head of each input."""
    sample = None
    labelled = False
    for spec in specs:
        chunks = iter_chunks(spec, chunk_bytes=_HEAD_BYTES)
        chunk = next(chunks, None)
        if isinstance(chunks, Generator):
            chunks.close()  # the file is closed now, not whenever the generator is collected
        if chunk is None:
            continue
        batch = with_label(fmt.parse_bulk(chunk.data, first_line=1).batch, spec.label)
        labelled = labelled or "label" in batch.schema.names
        if sample is None and batch.num_rows:
            sample = batch.slice(0, 64)
    if sample is None:
        empty = fmt.schema.empty_table()
        return fmt.schema, _conform(empty, fmt.schema)
    schema = sample.schema
    if labelled and "label" not in schema.names:
        schema = schema.append(pa.field("label", pa.string()))
    return schema, _conform(sample, schema)


def _hadoop_path(path: str) -> str:
    """``path`` as Hadoop's input formats read it: the file itself, not a pattern.

    Hadoop does not decode percent-escapes (``Path.as_uri()`` turns a space into ``%20``, a
    file that does not exist), expands glob characters, and splits a list of paths at commas.
    """
    full = str(Path(path).resolve())
    if "," in full:
        raise UsageError(f"the Spark engine cannot read {path!r}: Hadoop splits input paths "
                         "at commas; rename the file or use the local engine")
    return "file://" + "".join("\\" + c if c in "\\{}[]*?^" else c for c in full)


def _lines_frame(session: Any, specs: Sequence[InputSpec]) -> Any:
    """A DataFrame (file, line, text): every line of every input, numbered from 1 per file."""
    sc = session.sparkContext
    conf = {"textinputformat.record.delimiter": "\n"}  # \n only, like the local engine
    rdds = []
    for i, spec in enumerate(specs):
        raw = sc.newAPIHadoopFile(_hadoop_path(spec.path),
                                  "org.apache.hadoop.mapreduce.lib.input.TextInputFormat",
                                  "org.apache.hadoop.io.LongWritable",
                                  "org.apache.hadoop.io.Text", conf=conf)
        rdds.append(raw.values().zipWithIndex().map(functools.partial(_numbered, i)))
    lines = sc.union(rdds)
    frame = session.createDataFrame(lines, "file int, line long, text string")
    spread = sc.defaultParallelism
    if lines.getNumPartitions() < spread:
        # a .gz file is one partition: spread its lines in (file, line) ranges over the cores,
        # each range still in input order, so that every executor scores a share
        frame = frame.repartitionByRange(spread, "file", "line").sortWithinPartitions(
            "file", "line")
    return frame


def _numbered(file_no: int, pair: tuple[str, int]) -> tuple[int, int, str]:
    return file_no, pair[1] + 1, pair[0]


def _for_spark(f: pa.Field) -> pa.Field:
    """A field Spark's Arrow exchange takes: its timestamps are microseconds (Zeek's and web
    logs' times are milliseconds; the output gets them back as they were)."""
    if pa.types.is_timestamp(f.type) and f.type.unit != "us":
        return f.with_type(pa.timestamp("us", tz=f.type.tz))
    return f


def _first_key(path: Path) -> tuple[int, int] | None:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1, columns=["_file", "_line"]):
        if batch.num_rows:
            return int(batch.column(0)[0].as_py()), int(batch.column(1)[0].as_py())
    return None


def _merge(staging: Path, specs: Sequence[InputSpec], scored: pa.Schema, sink: RecordSink,
           reject_sink: RejectSink, alerts_only: bool) -> tuple[Stats, int]:
    """Stream the staged parts, in (file, line) order, into the output and rejects sinks."""
    import pyarrow.parquet as pq

    keyed = [(k, p) for p in staging.glob("*.parquet") if (k := _first_key(p)) is not None]
    stats = Stats()
    alerts = 0
    last = (-1, 0)
    names = [s.display for s in specs]
    for _key, part in sorted(keyed):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=65_536):
            files = to_numpy(batch.column("_file")).astype(np.int64)
            lines = to_numpy(batch.column("_line")).astype(np.int64, copy=False)
            order_ok = ((int(files[0]), int(lines[0])) > last and
                        bool(np.all((np.diff(files) > 0) | ((np.diff(files) == 0)
                                                            & (np.diff(lines) > 0)))))
            if not order_ok:
                raise SparkError("Spark returned records out of input order; please report")
            last = (int(files[-1]), int(lines[-1]))
            bad = to_numpy(pc.is_valid(batch.column("_reason")))
            for f in np.unique(files).tolist():
                mine = files == f
                stats.add(names[f], int(mine.sum()), int((mine & bad).sum()))
            if bad.any():
                rej = batch.filter(pa.array(bad))
                reject_sink.write(pa.table({
                    "line": rej.column("_line"), "raw": rej.column("_raw"),
                    "reason": rej.column("_reason"),
                    "source": pa.array(names, pa.string()).take(rej.column("_file")),
                }))
            records = _conform(batch.filter(pa.array(~bad)), scored)
            malicious = pc.equal(records.column("verdict"), "malicious")
            alerts += int(pc.sum(malicious).as_py() or 0)
            if alerts_only:
                records = records.filter(malicious)
            if records.num_rows:
                sink.write(records)
    return stats, alerts


def score_spark(bundle: str, format_name: str, inputs: Sequence[str], out: str,
                alerts_only: bool = False, rejects: str | None = None,
                master: str | None = None) -> ScoreReport:
    """Score ``inputs`` on Spark into ``out`` (.parquet or .jsonl), rejects to ``rejects``."""
    with warnings.catch_warnings():  # pyspark's notice about pandas 3, which deepwatch never uses
        warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas",
                                FutureWarning)
        return _score_spark(bundle, format_name, inputs, out, alerts_only, rejects, master)


def _score_spark(bundle: str, format_name: str, inputs: Sequence[str], out: str,
                 alerts_only: bool, rejects: str | None, master: str | None) -> ScoreReport:
    from pyspark.sql.pandas.types import from_arrow_schema

    from .models.detector import Detector

    t0 = time.perf_counter()
    det = Detector(bundle)  # fail here, not on an executor, for a bad bundle
    if format_name != det.format:
        raise UsageError(f"the bundle was trained on format {det.format!r}, not {format_name!r}")
    if out == "-":
        raise UsageError("the spark engine writes a file; give --out a .parquet or .jsonl path")
    fmt = get_format(format_name)
    specs = _specs(inputs)
    sink = RecordSink(out)
    parsed, sample = _parsed_schema(fmt, specs)
    scored = det.score_batch(sample).schema
    union = pa.schema([_for_spark(f).with_nullable(True) for f in scored] + list(HELPERS))
    session, owned = spark_session(master)
    staging = Path(tempfile.mkdtemp(prefix=".deepwatch-spark-", dir=Path(out).parent))
    reject_sink = RejectSink(rejects)
    done = False
    try:
        lines = _lines_frame(session, specs)
        work = functools.partial(score_partition, bundle=str(Path(bundle).resolve()),
                                 format_name=format_name, labels=[s.label for s in specs],
                                 parsed=parsed, union=union, contexts=_contexts(lines, fmt))
        frame = lines.mapInArrow(work, from_arrow_schema(union))
        try:
            frame.write.mode("overwrite").parquet(str(staging / "parts"))
        except Exception as exc:
            raise SparkError(f"the Spark job failed: {_first_line(exc)}") from None
        stats, alerts = _merge(staging / "parts", specs, scored, sink, reject_sink, alerts_only)
        done = True
    finally:
        if done or sink.rows:
            sink.close(scored)
            reject_sink.close()
        else:
            sink.abort()
            reject_sink.abort()
        shutil.rmtree(staging, ignore_errors=True)
        engine = f"spark {session.sparkContext.master}, {det.engine}"
        if owned:
            session.stop()
    return ScoreReport(stats, sink.rows, alerts, time.perf_counter() - t0, engine)


#: What Hadoop's decompressors raise on a truncated or corrupt compressed input.
_DAMAGED = re.compile(r"(?:java\.io\.EOFException|java\.util\.zip\.ZipException)[^\n]*")


def _first_line(exc: BaseException) -> str:
    """The useful line of a Spark/py4j error: the Python exception raised on the executor."""
    text = str(exc)
    damaged = _DAMAGED.search(text)
    if damaged:
        return (f"an input file is damaged ({damaged.group(0).strip()}); `--engine local` "
                "reads a damaged .gz file up to the damage and reports the rest as a reject")
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("deepwatch.errors.") or "Error:" in line:
            return line
    return text.splitlines()[0] if text else type(exc).__name__
