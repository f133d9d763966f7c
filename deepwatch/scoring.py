"""``deepwatch score``: stream inputs through a Detector into a sink, rejects kept apart."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pyarrow as pa
import pyarrow.compute as pc

from ._line_cache import ScoredLineCache
from .errors import DeepwatchError, Interrupted, OutputError, StopSignals, UsageError, check_flags
from .formats import Format, get_format
from .io import InputReader, Stats
from .sinks import RecordSink, RejectSink, rejects_read
from .sources.files import (
    Inputs,
    InputSpec,
    cannot_be_read_again,
    input_list,
    stop_reads_on,
)

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
    check_flags(alerts_only=alerts_only, progress=progress, cluster=cluster,
                **({} if explain is None else {"explain": explain}))
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
    try:
        reject_sink = RejectSink(rejects)
    except BaseException:
        # (the output's lock let go now: held by the sink a caught error's traceback keeps,
        # it refused the next run given the same --out, in the same Python, as another's)
        sink.abort()
        raise
    alerts = 0
    schema = None
    state = det.new_state()

    def take(batch: pa.RecordBatch, rej: pa.Table) -> None:
        nonlocal alerts, schema
        reject_sink.write(rej)
        if campaigns is not None:  # held back until every alert's campaign is known
            alerts += campaigns.add(*det.score_with_outputs(batch, state))
            return
        scored = batch if reader.scored else det.score_batch(batch, state)
        schema = scored.schema
        malicious = pc.equal(scored.column("verdict"), "malicious")
        n_alerts = pc.sum(malicious).as_py() or 0
        alerts += n_alerts
        if alerts_only:
            scored = scored.filter(malicious)
        sink.write(scored)

    stops = _PipeStops(reader.specs)
    try:
        with stops, stop_reads_on(stops.event):
            for batch, rej, spec in reader:
                if stops.event.is_set() and spec is not stops.spec:
                    break  # (the inputs after the one the stop came in are not read)
                stops.reading(spec)
                take(batch, rej)
            stops.raise_held()
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


class _PipeStops(StopSignals):
    """Ctrl-C and SIGTERM while ``score`` reads stdin or a named pipe: the lines read of it
    cannot be read again, so the stop is held, as ``deepwatch stream``'s is: ``event`` is set,
    which ends the pipe's reads where they are (see :func:`stop_reads_on`), every line read is
    scored (the batch in hand; a last line without its line break is a reject, see
    :data:`~deepwatch.sources.files.STOP_CUT`), and the stop is then
    raised by the handler that was there (:meth:`raise_held`: the output closed, said partial).
    While a file is read, a stop is raised at once, as before (the file can be read again).
    Main thread only, and only where the signal has a Python handler; a second stop while one
    is held is held with it, and one line says so (``already stopping: ...``)."""

    def __init__(self, specs: Sequence[InputSpec]):
        super().__init__()
        self.event = threading.Event()
        self.spec: InputSpec | None = None  # the input read when the stop came
        self._signum: int | None = None
        self._pipe = bool(specs) and cannot_be_read_again(specs[0].path)
        self._current = specs[0] if specs else None

    def reading(self, spec: InputSpec) -> None:
        if spec is not self._current:
            self._current = spec
            self._pipe = cannot_be_read_again(spec.path)
            self._arrow_cancels()

    def _arrow_cancels(self) -> None:
        # pyarrow cancels a CSV parse on Ctrl-C or SIGTERM, counting on the handler it then
        # calls to raise: the held stop left its ArrowCancelled to end the run (a traceback),
        # and the chunk being parsed was lost. While a pipe is read, the parse goes on.
        if self._before:
            pa.enable_signal_handlers(not self._pipe)

    def _takes(self, signum: int, handler: Any) -> bool:
        return callable(handler)

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self._signum is None and not self._pipe:
            self._before[signum](signum, frame)  # a file: stopped at once
            return
        if self._signum is None:
            self._signum, self.spec = signum, self._current
            self.event.set()
        else:  # held with the first: said once, as errors' held stops are, and those held
            # after it, while the output is closed, say nothing more
            where = self.spec.display if self.spec is not None else "the input"
            self._say_held(f"already stopping: the lines read of {where} are scored first\n",
                           reported=True)

    def __enter__(self) -> Self:
        super().__enter__()
        self._arrow_cancels()
        return self

    def _restore(self) -> dict[int, Any]:
        before = super()._restore()
        if before:
            pa.enable_signal_handlers(True)  # (as pyarrow has it: deepwatch never turns it off)
        return before

    def raise_held(self) -> None:
        """Raise the stop that was held (as its handler raises it), if one was."""
        signum, before = self._signum, self._restore()
        if signum is not None:
            before[signum](signum, None)
            # (a handler that does not raise: the reads were ended all the same, so the output
            # is not the whole of the input, and is not passed off as such)
            raise Interrupted(terminated=signum == signal.SIGTERM)


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
