"""``deepwatch score``: stream inputs through a Detector into a sink, rejects kept apart."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ._line_cache import ScoredLineCache
from .errors import DeepwatchError, Interrupted, OutputError, UsageError
from .formats import Format, get_format
from .io import InputReader, Stats
from .sinks import RecordSink, RejectSink, rejects_read
from .sources.files import Inputs, input_list

if TYPE_CHECKING:
    from .models.campaigns import Campaigns


def _campaigns(det: Any, alerts_only: bool) -> Campaigns:
    from .models.campaigns import Campaigns

    return Campaigns(det, alerts_only)


@dataclass
class ScoreReport:
    stats: Stats
    written: int
    alerts: int
    seconds: float
    engine: str


def score_files(bundle: str | Path, format_name: str, inputs: Inputs, out: str | Path,
                alerts_only: bool = False, rejects: str | Path | None = None,
                engine: str = "auto", progress: bool = False, detector: Any = None,
                lakes: Inputs = (), cluster: bool = False,
                explain: bool | None = None,
                days: str | Sequence[str] | None = None) -> ScoreReport:
    """Score ``inputs`` (one path, ``str`` or ``pathlib.Path``, or a list) and ``lakes`` (only
    their ``days``, where given: see :func:`deepwatch.lake.read_lake`) with ``bundle`` into
    ``out`` (``.parquet``, ``.jsonl``, or ``-`` for JSONL on stdout)."""
    from .models.detector import Detector

    inputs, lakes = input_list(inputs), input_list(lakes, "lakes")
    out = os.fspath(out)
    rejects = os.fspath(rejects) if rejects is not None else None

    t0 = time.perf_counter()
    det = detector or Detector(bundle, engine=engine, explain=explain)
    if format_name != det.format:
        raise UsageError(f"the bundle was trained on format {det.format!r}, not {format_name!r}")
    fmt = get_format(format_name)
    if not inputs and not lakes:
        raise UsageError("nothing to score: give input files or --lake DIR")
    from .lake import check_lake_days

    check_lake_days(lakes, days)  # a day mistyped or not ingested, before any scoring
    campaigns = _campaigns(det, alerts_only) if cluster else None
    lines = None
    if campaigns is None and ScoredLineCache.applies(fmt, det):
        lines = ScoredLineCache(fmt, det)  # repeated lines are parsed and scored once
    reader = InputReader(fmt, inputs, progress=progress, lakes=lakes, lake_days=days,
                         parse=lines.parse if lines is not None else None)
    sink = RecordSink(out)
    reject_sink = RejectSink(rejects)
    alerts = 0
    schema = None
    state = det.new_state()
    try:
        for batch, rej, _spec in reader:
            reject_sink.write(rej)
            if campaigns is not None:  # held back until every alert's campaign is known
                alerts += campaigns.add(*det.score_with_outputs(batch, state))
                continue
            scored = batch if reader.scored else det.score_batch(batch, state)
            schema = scored.schema
            malicious = pc.equal(scored.column("verdict"), "malicious")
            n_alerts = pc.sum(malicious).as_py() or 0
            alerts += n_alerts
            if alerts_only:
                scored = scored.filter(malicious)
            sink.write(scored)
        if campaigns is not None:
            for scored in campaigns.batches():
                schema = scored.schema
                sink.write(scored)
        if schema is None:  # no input at all: the output is still made, empty, with its columns
            schema = _output_schema(det, fmt, campaigns is not None)
    except BaseException as exc:
        # a stop (Ctrl-C, SIGTERM) or an input that fails mid-run (a pipe of compressed data, a
        # read error): the rows scored and the records rejected before it are kept, whole, and
        # the one line says so, lest they pass for the whole output
        _close(sink, reject_sink, schema, complete=False)
        kept = _kept_before(sink, reject_sink, out)
        if isinstance(exc, KeyboardInterrupt) and kept:
            raise Interrupted(kept, terminated=getattr(exc, "terminated", False)) from None
        if isinstance(exc, DeepwatchError) and kept and not isinstance(exc, OutputError):
            exc.args = (f"{exc}; {kept}",)
        raise
    _close(sink, reject_sink, schema, complete=True)
    return ScoreReport(reader.stats, sink.rows, alerts, time.perf_counter() - t0, det.engine)


def _close(sink: RecordSink, rejects: RejectSink, schema: pa.Schema | None,
           complete: bool) -> None:
    """Close the outputs of a run, ``complete`` or stopped. A stopped run that scored nothing
    makes no output (an empty one would read as "nothing found"), and a rejects file only
    when it holds records (:meth:`RejectSink.abort`)."""
    kept = complete or sink.rows
    try:
        if kept:
            sink.close(schema)
        else:
            sink.abort()
    finally:
        if kept:
            rejects.close()
        else:
            rejects.abort()


def _kept_before(sink: RecordSink, rejects: RejectSink, out: str) -> str | None:
    """What a stopped run keeps, for its one line (None: nothing)."""
    rows = f"the {sink.rows:,} rows scored before it" if sink.rows and out != "-" else None
    n = rejects.count if rejects.path else 0
    bad = rejects_read(n) if n else None
    if rows and bad:
        return f"{rows} are kept in {out} and {bad} in {rejects.path}, which are incomplete"
    if rows:
        return f"{rows} are kept in {out}, which is incomplete"
    if bad:
        return f"{bad} {'are' if n != 1 else 'is'} kept in {rejects.path}, which is incomplete"
    return None


def _output_schema(det: Any, fmt: Format, cluster: bool) -> pa.Schema:
    """The columns ``score`` writes for ``fmt`` records, known without any record."""
    empty = pa.RecordBatch.from_pylist([], schema=fmt.schema)
    schema = det.score_batch(empty, det.new_state()).schema
    if cluster:
        from .models.campaigns import CLUSTER_COLUMN

        schema = schema.append(pa.field(CLUSTER_COLUMN, pa.int64()))
    return schema
