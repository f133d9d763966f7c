"""``deepwatch score --engine spark``: the same scoring, spread over a Spark cluster.

Spark reads the raw text (lines end at ``\\n`` only, as for the local engine) and numbers every
line of every file, on the executors and with the local engine's own line reader (``LineBuffer``),
never with Hadoop's: a line over ``MAX_LINE_BYTES`` is skipped as it is read (its first bytes
kept) and becomes one reject, at a bounded cost in memory whatever its length. A file is
gzip, bzip2 or xz by its name (.gz, .bz2, .xz) or its first bytes, and one compressed otherwise
(.zst, .lz4, .zip ...) is refused before the job starts, as by the local engine. A plain file is
cut into byte ranges of ``SPLIT_BYTES`` read by as many tasks; a range holds the lines that start
in it (the last one read on past its end), as Hadoop's LineRecordReader aligns its splits, and a
first pass counts the line breaks of each range so that every task knows its first line number.
A compressed file is one task (it is read from its start, with the local engine's reader,
which verifies each gzip member or bzip2/xz stream): a damaged one (truncated, corrupt) is read
up to the damage and the rest becomes one reject. ``mapInArrow`` then hands runs of
consecutive lines to the executors, which parse them with the format's own ``Format.parse`` and
score them with ``Detector.score_batch`` (the bundle loaded and verified once per partition, from
its path). So a record gets the same verdict as with the local engine. Scored records and
rejects travel together, keyed by (file, line); Spark writes them to a staging directory beside
``--out`` and the driver streams them, in input order, into the one output file the contract
asks for. The executors log nothing: the warning about a damaged input travels on its reject,
and whatever else the reader logs about an input (zero padding after its last gzip member, an
empty .bz2) on rows of their own, so that the driver logs each, once, as the local engine does.

With a cluster (``--master`` other than ``local[...]``), the bundle, the inputs and the directory of
``--out`` must be at the same paths on every executor (a shared filesystem), and the executors
need deepwatch installed. Derived features with per-client windows (an access log's) see, in
every partition, the requests before it: a first job finds each partition's last requests of
each client, the driver hands them on from partition to partition in input order, and each
partition is scored from the windows it is handed (see TAILS); the lines the first job read are
kept for the second (memory, then disk), so the files are read once. A featurizer with any
other state across records has its lines scored by one task, in input order.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._arrow import to_numpy
from .errors import DeepwatchError, InputError, Interrupted, StopSignals, UsageError
from .formats import Format, get_format
from .formats._base import cut_lost, decode_text
from .io import Stats, with_label
from .scoring import ScoreReport, _close, _kept_before
from .sinks import RecordSink, RejectSink
from .sources.files import (
    BOM,
    CHUNK_BYTES,
    MAX_LINE_BYTES,
    Chunk,
    InputSpec,
    LineBuffer,
    iter_chunks,
    parse_input_spec,
)
from .sources.files import log as reader_log

#: Columns that travel with every row between the executors and the driver. ``_warning``: on
#: the reject standing for the unreadable rest of a damaged input, the warning to log about it;
#: ``_damaged``: true on a reject that stands for text not read as a line (no --format hint);
#: ``_level``: set on a row that is no line and no reject but a message of the reader about
#: its file (in ``_warning``), to be logged at that level (see LINES' ``note``).
HELPERS = pa.schema([pa.field("_file", pa.int32()), pa.field("_line", pa.int64()),
                     pa.field("_raw", pa.string()), pa.field("_reason", pa.string()),
                     pa.field("_warning", pa.string()), pa.field("_damaged", pa.bool_()),
                     pa.field("_level", pa.int32())])
#: Every line of every input, numbered from 1 per file. ``damage``: set on a row that stands
#: for text that could not be read as a line (see ``Chunk.damage``; ``text`` then holds the
#: beginning of what could not be trusted, cut as the local engine cuts it, and ``reason`` its
#: reject's reason), and ``rest_lost`` on the one for the rest of a damaged input. ``note`` and
#: ``level``: set on a row that is no line but a message the reader logged about the file while
#: it read it, which is no reject (zero padding after the last gzip member, an empty .bz2): the
#: text after the file's name, and its logging level. Its ``line`` is the one after the last
#: line of what the task read, so that it reaches the driver in input order.
LINES = pa.schema([pa.field("file", pa.int32()), pa.field("line", pa.int64()),
                   pa.field("text", pa.string()), pa.field("damage", pa.string()),
                   pa.field("rest_lost", pa.bool_()), pa.field("reason", pa.string()),
                   pa.field("note", pa.string()), pa.field("level", pa.int32())])
#: What one reading task reads: a whole compressed file (``compression``: "gzip", "bzip2" or
#: "xz", as the driver found it), or the lines of a plain file (``compression`` null) that start
#: in bytes [start, end) of its ``size`` bytes, numbered from ``first_line``.
PIECES = pa.schema([pa.field("file", pa.int32()), pa.field("path", pa.string()),
                    pa.field("compression", pa.string()), pa.field("start", pa.int64()),
                    pa.field("end", pa.int64()), pa.field("size", pa.int64()),
                    pa.field("first_line", pa.int64())])
#: The bytes of a plain file one task reads (Hadoop's split size for local files).
SPLIT_BYTES = 32 << 20
DEFAULT_MASTER = "local[2]"
_HEAD_BYTES = 256 << 10


class SparkError(DeepwatchError):
    """Spark could not be started or a job failed."""

    exit_code = 1


# ---- the session ----------------------------------------------------------------------------

#: How long a stop that came while Spark starts waits for the start to end (so that the session
#: is stopped cleanly) before the run gives the start up: a start that hangs (a JVM that never
#: answers) held the stop until SIGKILL.
START_STOP_WAIT_S = 10.0


def spark_session(master: str | None = None, abandon: Callable[[], bool] | None = None
                  ) -> tuple[Any, bool]:
    """The active SparkSession, or a new one for ``master``; and whether it was created here.
    ``abandon``: asked while a new session starts; once it says True the start is given up
    (``(None, False)``: its thread is left to end with the process, and with it the JVM)."""
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
    # started on a thread of its own: on the main thread, pyspark puts its own Ctrl-C handler
    # in, which calls into the JVM from the main thread while that waits on the JVM (a Ctrl-C
    # while Spark started printed pages of py4j tracebacks); the main thread waits, and the
    # run's stop handlers (see _Stops) take a Ctrl-C or SIGTERM meanwhile
    started: list[Any] = []

    def start() -> None:
        try:
            session = builder.getOrCreate()
            # a failed job is reported as one line (SparkError); executors' traces are noise
            session.sparkContext.setLogLevel("FATAL")
            started.append(session)
        except BaseException as exc:  # py4j / JVM start-up failures have many types
            started.append(exc)

    starter = threading.Thread(target=start, name="deepwatch-spark-start", daemon=True)
    starter.start()
    while starter.is_alive():
        starter.join(0.05)
        if starter.is_alive() and abandon is not None and abandon():
            return None, False
    if isinstance(started[0], BaseException):
        exc = started[0]
        raise SparkError(f"cannot start Spark with master {master} (is Java 17 installed and "
                         f"JAVA_HOME set?): {str(exc).splitlines()[0] if str(exc) else exc}"
                         ) from None
    # the active session of this thread too (Spark keeps one per thread): the next call in
    # this thread finds it, and does not take it for its own (which it would stop)
    session = started[0]
    SparkSession._get_j_spark_session_class(session.sparkContext._jvm).setActiveSession(
        session._jsparkSession)
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


def _parse_run(fmt: Format, text: pa.Array, first_line: int, label: str | None,
               parsed: pa.Schema, context: str | None) -> tuple[Any, pa.RecordBatch | None]:
    """The parse of one run of consecutive lines of one file, and its records (labelled, with
    ``parsed``'s columns) to score, None where there is none."""
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(text)], pa.int32()), text),
                            "\n")[0].as_py()
    result = fmt.parse_in_context(joined + "\n", first_line, context)
    if not result.batch.num_rows:
        return result, None
    return result, _conform(with_label(result.batch, label, fmt), parsed)


def _score_run(det: Any, fmt: Format, text: pa.Array, file_no: int, first_line: int,
               label: str | None, parsed: pa.Schema, union: pa.Schema,
               context: str | None = None, state: dict[str, Any] | None = None
               ) -> pa.RecordBatch:
    """Parse and score one run of consecutive lines of one file; records and rejects in order.
    ``context``: the format's context line in force before the run (a Zeek #fields header, or
    a ``LogAscii::tsv=T`` log's field-name line). ``state``: the detector's state carried from
    the runs before it in the partition (per-client windows of derived features)."""
    result, records = _parse_run(fmt, text, first_line, label, parsed, context)
    parts = []
    if records is not None:
        scored = det.score_batch(records, state)
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


def _runs(batch: pa.RecordBatch) -> Iterator[tuple[int, int, str]]:
    """The runs of ``batch`` (LINES rows): (start, end, kind), kind "noted" (see _noted),
    "refused" (see _refused) or "lines" (consecutive lines of one file, to parse)."""
    n = batch.num_rows
    files = to_numpy(batch.column("file")).astype(np.int64)
    lines = to_numpy(batch.column("line")).astype(np.int64, copy=False)
    refused = _refused(batch)
    noted = _noted(batch)
    cut = np.flatnonzero((np.diff(files) != 0) | (np.diff(lines) != 1)
                         | (refused[1:] != refused[:-1]) | (noted[1:] != noted[:-1])) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, n], strict=True):
        yield int(a), int(b), "noted" if noted[a] else "refused" if refused[a] else "lines"


def _batch_key(batch: pa.RecordBatch) -> tuple[int, int]:
    """The (file, line) of a LINES batch's first row: what names its partition (see TAILS)."""
    return int(batch.column("file")[0].as_py()), int(batch.column("line")[0].as_py())


def score_partition(batches: Iterator[pa.RecordBatch], bundle: str, format_name: str,
                    labels: Sequence[str | None], parsed: pa.Schema, union: pa.Schema,
                    contexts: dict[int, list[tuple[int, str]]] | None = None,
                    backend: str = "auto", explain: bool | None = None,
                    windows: dict[tuple[int, int], str | None] | None = None,
                    ) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function: (file, line, text) rows in, scored rows and rejects out.
    ``contexts``: per file, its context lines (line number, text) in order (see _contexts).
    ``backend`` and ``explain`` are the driver's, so that every partition scores as it does.
    ``windows``: for a detector whose features keep per-client windows, the windows each
    partition starts with, by its first (file, line) (see _hand_over): the path of a Parquet
    file, None for no earlier request of any of its clients."""
    from .models.detector import Detector

    # once per partition; verify=True checks every file's sha256
    det = Detector(bundle, engine=backend, explain=explain)
    fmt = get_format(format_name)
    # one state for the partition, as the local engine has one for the run: the per-client
    # windows of derived features go on across its runs (cut at an over-long line, a damage, a
    # file's end) and Arrow batches, not from nothing at each; they start with what the
    # requests before the partition left in them
    state = det.new_state()
    first = True
    for batch in batches:
        if batch.num_rows == 0:
            continue
        if first and windows is not None:
            state = _windows_at(windows, _batch_key(batch))
        first = False
        files = to_numpy(batch.column("file")).astype(np.int64)
        lines = to_numpy(batch.column("line")).astype(np.int64, copy=False)
        text = batch.column("text")
        for a, b, kind in _runs(batch):
            f = int(files[a])
            if kind == "noted":
                yield _noted_run(batch.slice(a, b - a), union)
            elif kind == "refused":
                yield _refused_run(batch.slice(a, b - a), union)
            else:
                yield _score_run(det, fmt, text.slice(a, b - a), f, int(lines[a]), labels[f],
                                 parsed, union, _context_at((contexts or {}).get(f, []),
                                                            int(lines[a])), state)


# ---- per-client windows across partitions ---------------------------------------------------
#
# An access log's window features (features/_window.py) see, for each request, its client's
# last requests, in input order, however far back they came. The local engine carries one
# state through the run; here each partition would start with empty windows. So a first job
# (``tail_partition``) reads and parses every partition as the scoring job will and keeps, as
# the local engine's state keeps, each client's last ``window - 1`` requests in it; the driver
# then goes through the partitions in input order (``_hand_over``), carrying every client's last
# requests from one to the next, and writes for each partition the windows of its clients as
# they stand at its start; the scoring job starts each partition with those.

#: The derivers whose only state is the per-client window of features/_window.py.
WINDOWED = frozenset({"access_v1"})
#: A partition's tail (its clients' last requests, the window state's columns), each row with
#: the (file, line) of its partition's first row and its place in the tail. A partition whose
#: tail is empty still has one row, with a null client, so that every partition is known.
TAILS = pa.schema([pa.field("client", pa.string()), pa.field("ts", pa.float64()),
                   pa.field("path", pa.string()), pa.field("status", pa.int64()),
                   pa.field("post", pa.bool_()), pa.field("_from_file", pa.int32()),
                   pa.field("_from_line", pa.int64()), pa.field("_seq", pa.int64())])
_WINDOW_COLUMNS = TAILS.names[:5]


def tail_partition(batches: Iterator[pa.RecordBatch], bundle: str, format_name: str,
                   labels: Sequence[str | None], parsed: pa.Schema,
                   contexts: dict[int, list[tuple[int, str]]] | None = None,
                   backend: str = "auto", explain: bool | None = None,
                   ) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function of the first job for windowed features: LINES rows in, the
    partition's TAILS out. Its records are parsed and derived as ``score_partition`` does
    (the same runs, the same parse), from empty windows, and not scored."""
    from .features._window import STATE_KEY
    from .models.detector import Detector

    det = Detector(bundle, engine=backend, explain=explain)
    fmt = get_format(format_name)
    state = det.new_state()
    key: tuple[int, int] | None = None
    for batch in batches:
        if batch.num_rows == 0:
            continue
        key = key or _batch_key(batch)
        files = to_numpy(batch.column("file")).astype(np.int64)
        lines = to_numpy(batch.column("line")).astype(np.int64, copy=False)
        text = batch.column("text")
        for a, b, kind in _runs(batch):
            if kind != "lines":
                continue
            f = int(files[a])
            _, records = _parse_run(fmt, text.slice(a, b - a), int(lines[a]), labels[f], parsed,
                                    _context_at((contexts or {}).get(f, []), int(lines[a])))
            if records is not None:
                det.featurizer._derive(pa.Table.from_batches([det.as_batch(records)]), state)
    if key is None:
        return
    tail = state.get(STATE_KEY)
    if tail is None or tail.num_rows == 0:
        tail = pa.table({"client": pa.nulls(1, pa.string())})
    n = tail.num_rows
    table = pa.Table.from_arrays([tail.column(c) if c in tail.schema.names else
                                  pa.nulls(n, TAILS.field(c).type) for c in _WINDOW_COLUMNS],
                                 names=_WINDOW_COLUMNS)
    table = (table.append_column("_from_file", pa.array(np.full(n, key[0], np.int32)))
             .append_column("_from_line", pa.array(np.full(n, key[1], np.int64)))
             .append_column("_seq", pa.array(np.arange(n, dtype=np.int64))))
    yield _conform(table, TAILS)


def _windows_at(windows: dict[tuple[int, int], str | None], key: tuple[int, int]
                ) -> dict[str, Any]:
    """The state a partition whose first row is ``key`` starts with (see _hand_over)."""
    import pyarrow.parquet as pq

    from .features._window import STATE_KEY

    if key not in windows:  # the scoring job cut the lines otherwise than the first job
        raise SparkError(f"no client windows for the partition from line {key[1]} of input "
                         f"{key[0] + 1}: Spark cut the input otherwise for the two jobs; "
                         "please report")
    path = windows[key]
    return {} if path is None else {STATE_KEY: pq.read_table(path).combine_chunks()}


def _window_bounds(derive: dict[str, Any]) -> tuple[int, int]:
    """The requests of each client a window state keeps (the window's size less one), and the
    most it keeps in all (as features/_window.py's ``window_features`` does)."""
    import inspect

    from .features._window import window_features
    from .features.web import DEFAULT_PARAMS

    keep = int({**DEFAULT_PARAMS, **derive.get("params", {})}["window"]) - 1
    clients = inspect.signature(window_features).parameters["max_clients"].default
    return keep, int(clients) * keep if clients else sys.maxsize


def _last_per_client(table: pa.Table, keep: int) -> pa.Table:
    """Each client's last ``keep`` rows of ``table`` (in input order), in ``table``'s order."""
    if table.num_rows == 0:
        return table
    codes = np.asarray(pc.dictionary_encode(table.column("client").combine_chunks()).indices
                       .to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    n = len(sc)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sc[1:] != sc[:-1]
    pos = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    size = np.bincount(codes)[sc]
    return table.take(pa.array(np.sort(order[pos >= size - keep])))


def _hand_over(tails: Path, out: Path, keep: int, bound: int) -> dict[tuple[int, int], str | None]:
    """From the partitions' tails (TAILS, staged in ``tails``), in input order, the windows each
    partition starts with: every client's last ``keep`` requests before it, of the clients it
    has (a Parquet file in ``out``, None where there is none), by its first (file, line). As
    the local engine's state, what is carried keeps at most ``bound`` requests, the latest."""
    import pyarrow.parquet as pq

    table = pq.read_table(tails, schema=TAILS) if any(tails.glob("*.parquet")) else \
        TAILS.empty_table()
    table = table.sort_by([("_from_file", "ascending"), ("_from_line", "ascending"),
                           ("_seq", "ascending")])
    froms = np.stack([to_numpy(table.column("_from_file")).astype(np.int64),
                      to_numpy(table.column("_from_line")).astype(np.int64)], axis=1)
    cuts = np.flatnonzero(np.any(np.diff(froms, axis=0) != 0, axis=1)) + 1 if len(froms) else \
        np.array([], np.int64)
    carried = table.select(_WINDOW_COLUMNS).slice(0, 0).append_column(
        "_order", pa.array([], pa.int64()))
    windows: dict[tuple[int, int], str | None] = {}
    done = 0
    out.mkdir(parents=True, exist_ok=True)
    for k, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, len(froms)], strict=True)):
        if a == b:
            continue
        part = table.slice(int(a), int(b - a))
        tail = part.filter(pc.is_valid(part.column("client")))
        key = (int(froms[a, 0]), int(froms[a, 1]))
        mine = pc.is_in(carried.column("client"), tail.column("client").unique())
        before = carried.filter(mine)
        windows[key] = None
        if before.num_rows:
            path = out / f"{k}.parquet"
            ordered = before.take(pc.sort_indices(before.column("_order")))
            pq.write_table(ordered.select(_WINDOW_COLUMNS), path)
            windows[key] = str(path)
        if tail.num_rows:
            done += 1
            new = tail.select(_WINDOW_COLUMNS).append_column(
                "_order", pc.add(tail.column("_seq"), pa.scalar(done << 40, pa.int64())))
            carried = pa.concat_tables([carried.filter(pc.invert(mine)),
                                        _last_per_client(pa.concat_tables([before, new]), keep)])
            if carried.num_rows > bound:
                carried = carried.take(pc.sort_indices(carried.column("_order"))).slice(
                    carried.num_rows - bound)
    return windows


def _refused(batch: pa.RecordBatch) -> np.ndarray:
    """Which rows are no line to parse: damage, or an over-long line (see LINES)."""
    return to_numpy(batch.column("damage").is_valid()).astype(bool, copy=False)


def _noted(batch: pa.RecordBatch) -> np.ndarray:
    """Which rows are no line but a message of the reader about their file (see LINES)."""
    return to_numpy(batch.column("level").is_valid()).astype(bool, copy=False)


def _noted_run(rows: pa.RecordBatch, union: pa.Schema) -> pa.RecordBatch:
    """The reader's messages of a run of rows that are messages (see _noted), for the driver to
    log (see _warn): no record, no reject."""
    table = pa.table({"_file": rows.column("file"), "_line": rows.column("line"),
                      "_warning": rows.column("note"), "_level": rows.column("level")})
    return _conform(table, union)


def _refused_run(rows: pa.RecordBatch, union: pa.Schema) -> pa.RecordBatch:
    """The rejects of a run of refused rows (see _refused), as the local engine makes them (the
    text and reason were cut by ``cut_lost`` where the line was read)."""
    warnings_ = [damage if rest_lost else None
                 for damage, rest_lost in zip(rows.column("damage").to_pylist(),
                                              rows.column("rest_lost").to_pylist(), strict=True)]
    table = pa.table({"_file": rows.column("file"), "_line": rows.column("line"),
                      "_raw": rows.column("text"), "_reason": rows.column("reason"),
                      "_warning": pa.array(warnings_, pa.string()),
                      "_damaged": pa.array(np.ones(rows.num_rows, bool))})
    return _conform(table, union)


def read_partition(batches: Iterator[pa.RecordBatch], block_bytes: int = CHUNK_BYTES,
                   ) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function reading the inputs: PIECES rows in, LINES out, read by the
    local engine's reader (a compressed file's checksums verified; damage and over-long lines as
    rows with ``damage`` set), ``block_bytes`` at a time. It logs nothing: what the reader logs
    about a piece's file is kept and, once the piece is read, handed on as rows with ``note``
    set (see LINES), for the driver to log (see _warn), except the warning about a damage, which
    its reject's row carries already. So each message reaches the driver once, from the rows
    that are written, however often Spark reads an input (sampling, retries)."""
    with _kept() as logged:
        for batch in batches:
            for piece in batch.to_pylist():
                spec = InputSpec(piece["path"], magic=piece["compression"])
                chunks = (iter_chunks(spec, block_bytes) if piece["compression"] else
                          range_chunks(spec, piece["start"], piece["end"], piece["size"],
                                       piece["first_line"], block_bytes))
                logged.clear()
                damages: set[str] = set()  # the warnings their rejects carry
                after = int(piece["first_line"])  # the line after the last one handed out
                for chunk in chunks:
                    if chunk.data or chunk.damage is not None:
                        rows = _chunk_lines(chunk, piece["file"])
                        after = int(rows.column("line")[-1].as_py()) + 1
                        if chunk.damage is not None:
                            damages.add(f"{spec.display}: {chunk.damage}")
                        yield rows
                notes = [r for r in logged if r.getMessage() not in damages]
                if notes:
                    yield _note_lines(notes, spec, piece["file"], after)


def range_chunks(spec: InputSpec, start: int, end: int, size: int, first_line: int,
                 block_bytes: int = CHUNK_BYTES, max_line: int = MAX_LINE_BYTES,
                 ) -> Iterator[Chunk]:
    """The lines of the plain file ``spec`` (``size`` bytes) that start in bytes [start, end),
    numbered from ``first_line``, cut as the local engine's reader cuts the whole file.

    As Hadoop's LineRecordReader does, a range after the first begins at its first line start
    (past the end of a line that began before it), and its last line is read on past ``end`` to
    its line break. A line over ``max_line`` bytes is skipped as it is read (``LineBuffer``), so
    memory stays bounded by ``max_line`` and ``block_bytes`` whatever the lines' length; so does
    the search for the first line start, which stops at ``end``.
    """
    try:
        with open(spec.path, "rb") as fh:
            now = os.fstat(fh.fileno()).st_size
            if now != size:  # the line numbers counted before would be wrong
                raise InputError(f"{spec.path} changed while it was read ({size:,} bytes, now "
                                 f"{now:,}); score it again")
            at = _first_line_start(fh, start, end, block_bytes)
            if at >= end:
                return
            lines = LineBuffer(spec, max_line)
            lines.line, lines.at_start = first_line, at == 0
            fh.seek(at)
            block = b""
            while at < end and (block := fh.read(min(block_bytes, end - at))):
                at += len(block)
                yield from lines.feed(block)
            if block and not block.endswith(b"\n"):  # the last line goes on past the range
                while block := fh.read(block_bytes):
                    cut = block.find(b"\n")
                    yield from lines.feed(block if cut < 0 else block[: cut + 1])
                    if cut >= 0:
                        break
            last = lines.finish()  # a last line without a line break, or an over-long one
            if last is not None:
                yield last
    except OSError as exc:
        raise InputError(f"cannot read {spec.path}: {exc.strerror or exc}") from None


def _first_line_start(fh: Any, start: int, end: int, block_bytes: int) -> int:
    """The first line start at or after ``start`` (a line starts at 0 and after each line
    break), or ``end`` when none is before ``end``."""
    if start == 0:
        return 0
    fh.seek(start - 1)
    at = start - 1  # a line break here or later, before end - 1, ends the line before ours
    while at < end - 1 and (block := fh.read(min(block_bytes, end - 1 - at))):
        cut = block.find(b"\n")
        if cut >= 0:
            return at + cut + 1
        at += len(block)
    return end


def lines_starting_in(path: str, start: int, end: int, block_bytes: int = CHUNK_BYTES) -> int:
    """How many lines of a plain file start in bytes [start, end): as many as :func:`range_chunks`
    hands out for that range. A line starts at 0 (unless the file holds nothing, or only the
    byte order mark that the reader drops) and after every line break but a last one."""
    with open(path, "rb") as fh:
        n = 0
        if start == 0:
            head = fh.read(len(BOM) + 1)
            n = int(bool(head) and head != BOM)
        fh.seek(max(start - 1, 0))
        left = end - 1 - max(start - 1, 0)
        while left > 0 and (block := fh.read(min(block_bytes, left))):
            n += block.count(b"\n")
            left -= len(block)
        return n


def _chunk_lines(chunk: Chunk, file_no: int) -> pa.RecordBatch:
    """The LINES rows of one chunk: one per line, or the one row standing for its damage."""
    if chunk.damage is not None:
        text, reason = cut_lost(chunk.lost, chunk.damage)
        return pa.RecordBatch.from_pydict(
            {"file": [file_no], "line": [chunk.first_line], "text": [text],
             "damage": [chunk.damage], "rest_lost": [chunk.rest_lost], "reason": [reason],
             "note": [None], "level": [None]}, schema=LINES)
    text = decode_text(chunk.data)  # a byte that is not UTF-8 is written \xHH
    if text.endswith("\n"):
        text = text[:-1]
    split = pc.split_pattern(pa.array([text], pa.string()), "\n").flatten()
    n = len(split)
    return pa.RecordBatch.from_arrays(
        [pa.array(np.full(n, file_no, np.int32)),
         pa.array(np.arange(chunk.first_line, chunk.first_line + n, dtype=np.int64)),
         split, pa.nulls(n, pa.string()), pa.nulls(n, pa.bool_()), pa.nulls(n, pa.string()),
         pa.nulls(n, pa.string()), pa.nulls(n, pa.int32())],
        schema=LINES)


def _note_lines(records: Sequence[logging.LogRecord], spec: InputSpec, file_no: int,
                line: int) -> pa.RecordBatch:
    """The LINES rows carrying what the reader logged about ``spec`` (see LINES' ``note``),
    numbered from ``line``. The reader names the file first ("<path>: ..."): the executor's
    path is left out, for the driver to put the name the user gave in front. (A message that
    does not start so is carried whole, and gets the name in front as well.)"""
    head = f"{spec.display}: "
    notes = [m[len(head):] if m.startswith(head) else m for m in (r.getMessage() for r in records)]
    n = len(notes)
    return pa.RecordBatch.from_pydict(
        {"file": [file_no] * n, "line": list(range(line, line + n)), "text": [None] * n,
         "damage": [None] * n, "rest_lost": [None] * n, "reason": [None] * n, "note": notes,
         "level": [r.levelno for r in records]}, schema=LINES)


@contextlib.contextmanager
def _kept() -> Iterator[list[logging.LogRecord]]:
    """What the reader logs, kept in a list rather than logged (the executors log nothing)."""
    kept: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        kept.append(record)
        return False

    reader_log.addFilter(keep)
    try:
        yield kept
    finally:
        reader_log.removeFilter(keep)


@contextlib.contextmanager
def _unlogged() -> Iterator[None]:
    """The reader's warnings about damaged inputs left out: Spark reads an input more than once
    (sampling, then scoring) and the driver's look at each input's head reads part of it."""
    def drop(record: logging.LogRecord) -> bool:
        return False

    reader_log.addFilter(drop)
    try:
        yield
    finally:
        reader_log.removeFilter(drop)


def _context_at(headers: list[tuple[int, str]], line: int) -> str | None:
    """The last context line before ``line`` (headers sorted by line number)."""
    at = bisect.bisect_left(headers, (line, "")) - 1
    return headers[at][1] if at >= 0 else None


def _contexts(frame: Any, fmt: Format) -> dict[int, list[tuple[int, str]]]:
    """Per file, the lines that set the format's context (Zeek's #fields headers, or the
    field-name line of a ``LogAscii::tsv=T`` log), in order: a run of lines scored on an
    executor may start after its file's header."""
    if not fmt.context_prefixes:
        return {}
    from functools import reduce

    from pyspark.sql import functions as F

    from .formats._base import CR_INSIDE

    starts = reduce(lambda a, b: a | b, [F.col("text").startswith(p)
                                         for p in fmt.context_prefixes])
    # a line with text after a CR in it is a reject, not a context line (as Format.context_after)
    rows = frame.filter(F.col("damage").isNull() & starts
                        & ~F.col("text").rlike(CR_INSIDE)).select("file", "line", "text").collect()
    out: dict[int, list[tuple[int, str]]] = {}
    for row in sorted(rows, key=lambda r: (r["file"], r["line"])):
        out.setdefault(int(row["file"]), []).append((int(row["line"]), str(row["text"])))
    return out


# ---- on the driver --------------------------------------------------------------------------

def _specs(inputs: Sequence[str]) -> list[InputSpec]:
    specs: list[InputSpec] = []
    for text in inputs:
        for spec in parse_input_spec(text):
            if spec.path == "-":
                raise UsageError("the spark engine reads files, not stdin; use --engine local")
            try:
                regular = stat.S_ISREG(os.stat(spec.path).st_mode)
            except OSError as exc:
                raise InputError(f"cannot read {spec.path}: {exc.strerror or exc}") from None
            if not regular:
                # (its executors read a file by byte ranges of its size, from any machine: a
                # named pipe, <(...) or a device gave no line, or waited for ever for a writer)
                raise UsageError(f"the spark engine reads regular files, and {spec.display} is "
                                 "not one (a named pipe, a device, or <(...)); use --engine "
                                 "local")
            specs.append(spec)
    if not specs:
        raise UsageError("no input files")
    return specs


def _parsed_schema(fmt: Format, specs: Sequence[InputSpec]) -> tuple[pa.Schema, pa.RecordBatch]:
    """The schema of parsed batches, and a few real parsed rows, from the head of each input."""
    sample = None
    labelled = False
    for spec in specs:
        with _unlogged():
            chunks = iter_chunks(spec, chunk_bytes=_HEAD_BYTES)
            chunk = next(chunks, None)
            if isinstance(chunks, Generator):
                chunks.close()  # the file is closed now, not whenever the generator is collected
        if chunk is None:
            continue
        batch = with_label(fmt.parse_bulk(chunk.data, first_line=1).batch, spec.label, fmt)
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


def _compression(spec: InputSpec) -> str | None:
    """The compression ``spec`` is read as (the local engine's test: its first bytes, else its
    name), None for a plain file read in byte ranges."""
    return spec.compression


def _pieces(sc: Any, specs: Sequence[InputSpec], split_bytes: int) -> list[dict[str, Any]]:
    """The PIECES rows the inputs are read in: a compressed file whole; a plain file in ranges of
    ``split_bytes``, each with its first line number. The lines of every range but the last of
    its file are counted on the executors first (a pass over the bytes, not the lines)."""
    pieces: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        path = str(Path(spec.path).resolve())
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise InputError(f"cannot read {spec.path}: {exc.strerror or exc}") from None
        packed = _compression(spec)
        cuts = [0] if packed is not None or size == 0 else list(range(0, size, split_bytes))
        pieces.extend({"file": i, "path": path, "compression": packed, "start": a,
                       "end": b, "size": size, "first_line": 1}
                      for a, b in zip(cuts, [*cuts[1:], size], strict=True))
    counted = [k for k, p in enumerate(pieces)
               if k + 1 < len(pieces) and pieces[k + 1]["file"] == p["file"]]
    if counted:
        counts = sc.parallelize([(pieces[k]["path"], pieces[k]["start"], pieces[k]["end"])
                                 for k in counted], len(counted)).map(_count_range).collect()
        for k, n in zip(counted, counts, strict=True):
            pieces[k + 1]["first_line"] = pieces[k]["first_line"] + n
    return pieces


def _count_range(piece: tuple[str, int, int]) -> int:
    return lines_starting_in(*piece)


def _lines_frame(session: Any, specs: Sequence[InputSpec], same_cuts: bool = False) -> Any:
    """A DataFrame of LINES: every line of every input, numbered from 1 per file. ``same_cuts``:
    more than one job runs over it (windowed features: the tails, then the scoring), and every
    one must see the same partitions with the same lines in each. The frame is then persisted
    (memory, then disk; to be unpersisted by the caller), so the first job reads the files and
    the others read what it kept: where the lines are spread over the cores, Spark draws the
    cuts from a sample anew for each job; where each piece is a partition of its own, the
    scoring job read every file again, twice the reading, and a file changed in between (a
    live log) failed the run ("changed while it was read") or, changed at the same size, was
    scored from other bytes than the windows came from."""
    from pyspark.sql.pandas.types import from_arrow_schema

    sc = session.sparkContext
    pieces = _pieces(sc, specs, SPLIT_BYTES)
    # one task a piece, in input order
    rows = sc.parallelize([tuple(p[f.name] for f in PIECES) for p in pieces], len(pieces))
    frame = session.createDataFrame(rows, from_arrow_schema(PIECES)).mapInArrow(
        read_partition, from_arrow_schema(LINES))
    spread = sc.defaultParallelism
    if len(pieces) < spread:
        # a compressed file is one task: spread its lines in (file, line) ranges over the cores,
        # each range still in input order, so that every executor scores a share
        frame = frame.repartitionByRange(spread, "file", "line").sortWithinPartitions(
            "file", "line")
    if same_cuts:
        from pyspark import StorageLevel

        frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    return frame


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
            every = to_numpy(batch.column("_file")).astype(np.int64)
            # the reader's messages (see LINES' note) are no line: they are logged, not counted,
            # and one may share its key with the first line of the next piece of a plain file
            line = ~to_numpy(batch.column("_level").is_valid()).astype(bool)
            files = every[line]
            lines = to_numpy(batch.column("_line")).astype(np.int64)[line]
            if len(files):
                order_ok = ((int(files[0]), int(lines[0])) > last and
                            bool(np.all((np.diff(files) > 0) | ((np.diff(files) == 0)
                                                                & (np.diff(lines) > 0)))))
                if not order_ok:
                    raise SparkError("Spark returned records out of input order; please report")
                last = (int(files[-1]), int(lines[-1]))
            bad = to_numpy(pc.is_valid(batch.column("_reason")))
            damaged = to_numpy(batch.column("_damaged").fill_null(False)).astype(bool)
            _warn(batch, names)
            for f in np.unique(files).tolist():
                mine = (every == f) & line
                stats.add(names[f], int(mine.sum()), int((mine & bad).sum()),
                          int((mine & damaged).sum()))
            if bad.any():
                rej = batch.filter(pa.array(bad))
                reject_sink.write(pa.table({
                    "line": rej.column("_line"), "raw": rej.column("_raw"),
                    "reason": rej.column("_reason"),
                    "source": pa.array(names, pa.string()).take(rej.column("_file")),
                }))
            records = _conform(batch.filter(pa.array(line & ~bad)), scored)
            malicious = pc.equal(records.column("verdict"), "malicious")
            alerts += int(pc.sum(malicious).as_py() or 0)
            if alerts_only:
                records = records.filter(malicious)
            if records.num_rows:
                sink.write(records)
    return stats, alerts


def _warn(batch: pa.RecordBatch, names: Sequence[str]) -> None:
    """Log the warning each damaged input's reject carries, and what else the reader said about
    an input on an executor (zero padding after the last gzip member, an empty .bz2: see LINES'
    ``note``), as the local engine's reader does: the same logger, level and text."""
    warned = batch.filter(pc.is_valid(batch.column("_warning")))
    for f, why, level in zip(warned.column("_file").to_pylist(),
                             warned.column("_warning").to_pylist(),
                             warned.column("_level").to_pylist(), strict=True):
        reader_log.log(logging.WARNING if level is None else level, "%s: %s", names[f], why)


def score_spark(bundle: str, format_name: str, inputs: Sequence[str], out: str,
                alerts_only: bool = False, rejects: str | None = None,
                master: str | None = None, backend: str = "auto",
                explain: bool | None = None) -> ScoreReport:
    """Score ``inputs`` on Spark into ``out`` (.parquet or .jsonl), rejects to ``rejects``.
    ``backend`` and ``explain`` mean what they mean to the local engine (``score_files``)."""
    with warnings.catch_warnings():  # pyspark's notice about pandas 3, which deepwatch never uses
        warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas",
                                FutureWarning)
        return _score_spark(bundle, format_name, inputs, out, alerts_only, rejects, master,
                            backend, explain)


def _score_spark(bundle: str, format_name: str, inputs: Sequence[str], out: str,
                 alerts_only: bool, rejects: str | None, master: str | None,
                 backend: str, explain: bool | None) -> ScoreReport:
    from pyspark.sql.pandas.types import from_arrow_schema

    from .models.detector import Detector

    t0 = time.perf_counter()
    # fail here, not on an executor, for a bad bundle; its output schema is the executors'
    det = Detector(bundle, engine=backend, explain=explain)
    if format_name != det.format:
        raise UsageError(f"the bundle was trained on format {det.format!r}, not {format_name!r}")
    if out == "-":
        raise UsageError("the spark engine writes a file; give --out a .parquet or .jsonl path")
    fmt = get_format(format_name)
    specs = _specs(inputs)
    sink = RecordSink(out)
    # the run's stop handlers, taken from before Spark starts (seconds): a SIGTERM then killed
    # the run, its output's lock file left behind and no line said; a stop while Spark starts
    # is raised once it has started, and the session stopped
    stops = _Stops(None)
    session: Any = None
    owned = False
    try:
        parsed, sample = _parsed_schema(fmt, specs)
        scored = det.score_batch(sample).schema
        union = pa.schema([_for_spark(f).with_nullable(True) for f in scored] + list(HELPERS))
        interrupt = signal.getsignal(signal.SIGINT)  # (put back after the run)
        stops._take()
        session, owned = spark_session(master, stops.give_up_start)
        if session is None:  # a stop held past START_STOP_WAIT_S while Spark started
            raise Interrupted(f"Spark had not started {START_STOP_WAIT_S:.0f} s after the "
                              "stop; its start was given up, nothing was scored",
                              terminated=stops.signum == signal.SIGTERM)
        stops.sc = session.sparkContext
        stops.raise_held()
        staging: Path | None = None
        lines: Any = None
        reject_sink = RejectSink(rejects)
    except BaseException:
        sink.abort()  # (its output's lock let go: see scoring.score_files)
        stops._restore()
        if owned:
            with contextlib.suppress(Exception):
                session.stop()
        raise
    try:
        with contextlib.ExitStack() as held:
            held.callback(stops._restore)  # (the stops after the first are held to the end)
            try:
                # absolute: Spark takes a relative path whose first part holds a ':'
                # (runs/10:30/out.jsonl) for a URI of that scheme, and the job failed
                staging = Path(tempfile.mkdtemp(prefix=".deepwatch-spark-",
                                                dir=Path(os.path.abspath(out)).parent))
                try:  # the jobs: counting the lines of big plain files, Zeek's headers, scoring
                    derive = det.featurizer.spec.get("derive") or {}
                    lines = _lines_frame(session, specs, same_cuts=derive.get("name") in WINDOWED)
                    common = {"bundle": str(Path(bundle).resolve()), "format_name": format_name,
                              "labels": [s.label for s in specs], "parsed": parsed,
                              "contexts": _contexts(lines, fmt), "backend": backend,
                              "explain": explain}
                    windows = None
                    if derive.get("name") in WINDOWED:
                        # the windows each partition starts with, from a first job (see TAILS)
                        lines.mapInArrow(functools.partial(tail_partition, **common),
                                         from_arrow_schema(TAILS)).write.mode(
                                             "overwrite").parquet(str(staging / "tails"))
                        windows = _hand_over(staging / "tails", staging / "windows",
                                             *_window_bounds(derive))
                        stops.raise_held()  # (a stop while no job ran: no scoring job starts)
                    elif derive:
                        # state this engine cannot hand from one partition to the next: the
                        # lines are scored by one task, in input order, as the local engine does
                        lines = lines.repartition(1).sortWithinPartitions("file", "line")
                    work = functools.partial(score_partition, union=union, windows=windows,
                                             **common)
                    frame = lines.mapInArrow(work, from_arrow_schema(union))
                    frame.write.mode("overwrite").parquet(str(staging / "parts"))
                except DeepwatchError:
                    raise
                except Exception as exc:
                    stops.raise_held()  # the jobs failed because a stop cancelled them
                    raise SparkError(f"the Spark job failed: {_first_line(exc)}") from None
                stops.jobs_done()
                stats, alerts = _merge(staging / "parts", specs, scored, sink, reject_sink,
                                       alerts_only)
            except BaseException as exc:
                # what was written before a failure or a stop (while the output was merged) is kept,
                # and a stop says so, as the local engine does
                _close(sink, reject_sink, scored, complete=False)
                if isinstance(exc, KeyboardInterrupt):
                    raise Interrupted(_kept_before(sink, reject_sink, out),
                                      terminated=getattr(exc, "terminated", False)) from None
                raise
            else:
                _close(sink, reject_sink, scored, complete=True)
            finally:
                if lines is not None and lines.is_cached:
                    with contextlib.suppress(Exception):  # (Spark may be gone after a stop)
                        lines.unpersist()
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                engine = f"spark {session.sparkContext.master}, {det.engine}"
    finally:
        if stops.signum is not None and _jvm_gone(session):
            _quiet_py4j()
        if owned:
            # after a stop, the JVM may be gone already (SIGTERM to the whole process group, as
            # `timeout`, systemd or a batch scheduler send it): nothing is left to stop
            with contextlib.suppress(Exception) if stops.signum is not None else \
                    contextlib.nullcontext():
                session.stop()
            if interrupt is not None and _main_thread():
                signal.signal(signal.SIGINT, interrupt)
    return ScoreReport(stats, sink.rows, alerts, time.perf_counter() - t0, engine)


def _jvm_gone(session: Any) -> bool:
    """Whether the JVM this process started for ``session`` has ended (killed with the
    process group by a SIGTERM meant for the run)."""
    gateway = getattr(getattr(session, "sparkContext", None), "_gateway", None)
    proc = getattr(gateway, "proc", None)
    return proc is not None and proc.poll() is not None


def _quiet_py4j() -> None:
    """After a stop, with the JVM gone (SIGTERM to the whole process group): the calls into it
    that then fail outside the run's control (py4j's log of a closed connection, a Java
    object's finaliser at exit, a py4j thread) printed a traceback after the run's one line
    (once in a CI run: "py4j.protocol.Py4JNetworkError: Error while sending or receiving").
    They are dropped; any other error is reported as before."""
    logging.getLogger("py4j").setLevel(logging.CRITICAL + 1)

    def from_py4j(exc: BaseException | None) -> bool:
        return exc is not None and type(exc).__module__.startswith("py4j")

    unraisable, thread_hook = sys.unraisablehook, threading.excepthook

    def on_unraisable(info: Any) -> None:
        if not from_py4j(info.exc_value):
            unraisable(info)

    def on_thread_error(args: Any) -> None:
        if not from_py4j(args.exc_value):
            thread_hook(args)

    sys.unraisablehook = on_unraisable
    threading.excepthook = on_thread_error


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Stops(StopSignals):
    """Ctrl-C and SIGTERM during a run, taken as the local engine's ``score`` takes them: the
    run stops, its staging directory is removed, and one line says so (``interrupted``,
    ``terminated``); a stop once the output is being written keeps what was written, said
    partial. While the Spark jobs run, the stop cancels them (from a thread of its own: the
    driver's main thread is waiting on the JVM, and a call into it from a signal handler there,
    as pyspark's own Ctrl-C handler makes, fails with tracebacks) and the run stops when they
    end; SIGTERM, which killed the driver and left the staging directory behind, does the same.
    The stops after the first are held, one line saying so. Main thread only."""

    def __init__(self, sc: Any):
        super().__init__()
        self.sc = sc
        self.signum: int | None = None
        self.running = True  # the Spark jobs: a stop cancels them, and is raised once they end
        self._held_at: float | None = None  # when a stop came while Spark started

    def _on_stop(self, signum: int, _frame: object) -> None:
        if self.signum is not None:
            self._say_held("already stopping: the clean-up under way is finished first\n")
            return
        self.signum = signum
        if self.running:
            threading.Thread(target=self._cancel, daemon=True).start()
            return
        raise Interrupted(terminated=signum == signal.SIGTERM)

    def give_up_start(self) -> bool:
        """Whether a stop has been held for :data:`START_STOP_WAIT_S` while Spark starts."""
        if self.signum is None:
            return False
        if self._held_at is None:
            self._held_at = time.monotonic()
        return time.monotonic() - self._held_at > START_STOP_WAIT_S

    def _cancel(self) -> None:
        if self.sc is None:  # (Spark is starting: no job runs yet)
            return
        with contextlib.suppress(Exception):  # (the jobs may have ended, Spark stopped)
            self.sc.cancelAllJobs()

    def jobs_done(self) -> None:
        """The jobs have ended: a stop that came while they did is raised now, and one that
        comes later at once."""
        self.raise_held()
        self.running = False

    def raise_held(self) -> None:
        if self.signum is not None:
            raise Interrupted(terminated=self.signum == signal.SIGTERM)


def _first_line(exc: BaseException) -> str:
    """The useful line of a Spark/py4j error: the Python exception raised on the executor."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("deepwatch.errors.") or "Error:" in line:
            return line
    return text.splitlines()[0] if text else type(exc).__name__
