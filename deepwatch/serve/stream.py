"""``deepwatch stream``: score records as they arrive, from Kafka or (the embedded default) from
files, a followed log or stdin, and write alerts, verdicts and dead letters.

The loop is the same for every source and sink: take a micro-batch, parse and score it, write
what it produced, wait until the sink acknowledged all of it, then tell the source the batch is
done (Kafka: commit its offsets). SIGTERM or SIGINT ends the loop after the batch in hand.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..alerts import AlertContext
from ..errors import StopSignals, UsageError, keep_ctrl_c_from_polars
from ..formats import get_format
from ._stream_core import DEAD_LETTER, KINDS, StreamProcessor
from ._stream_io import DeliveryError, FileSource, JsonlSink, Sink, Source
from ._stream_metrics import StreamMetrics

if TYPE_CHECKING:
    from ..sources.files import StopCut

log = logging.getLogger("deepwatch.stream")
PROGRESS_EVERY_S = 10.0


@dataclass
class StreamReport:
    records: int = 0
    scored: int = 0
    rejected: int = 0
    alerts: int = 0
    batches: int = 0
    seconds: float = 0.0
    produced: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    #: what a stop left unscored of a compressed named pipe (the source's ``cuts``): text read
    #: but not verified, so neither scored nor counted among the records
    cuts: list[StopCut] = field(default_factory=list)
    #: what a stop left unread of regular files (the source's ``unread``): one sentence each
    unread: list[str] = field(default_factory=list)

    @property
    def unscored_lines(self) -> int:
        return sum(c.lines for c in self.cuts)

    @property
    def unscored_bytes(self) -> int:
        return sum(c.size for c in self.cuts)

    def summary(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.records:,} records: {self.scored:,} scored, {self.rejected:,} rejected; "
                f"{self.alerts:,} alerts; {self.batches:,} batches in {self.seconds:.1f}s "
                f"({rate:,.0f} records/s)")


#: How long written batches may wait for their acknowledgement before the loop waits for it.
SETTLE_EVERY_S = 1.0


def run_loop(source: Source, sink: Sink, processor: StreamProcessor, stop: threading.Event,
             metrics: StreamMetrics | None = None) -> StreamReport:
    """Process micro-batches until the source ends or ``stop`` is set.

    Written batches are committed once the sink has acknowledged everything they produced, never
    before. A sink may let the loop go on with the next batches meanwhile (``max_pending``, e.g.
    Kafka: acknowledgements then arrive while the next batch is scored, instead of the loop
    waiting a broker round trip per batch); the loop waits for them when that many are pending,
    after ``SETTLE_EVERY_S``, when the source is idle, before partitions are revoked and at the
    end. A DeliveryError is raised before anything unacknowledged is committed. Messages are
    counted as produced once acknowledged, as the sink wrote them (a message it replaced by a
    dead letter counts as that dead letter).
    """
    report = StreamReport()
    t_start = last_log = time.perf_counter()
    max_pending = max(1, int(getattr(sink, "max_pending", 1)))
    pending: list[Any] = []
    written: dict[str, int] = {}  # messages of each kind in the pending batches
    # the kinds the sink writes (None: every kind): a kind it has nowhere to write (dead letters
    # without --rejects) is not counted as produced
    kinds = getattr(sink, "kinds", None)
    oldest = 0.0

    def settle() -> None:
        if not pending:
            return
        try:
            sink.flush()
        except DeliveryError:
            if metrics is not None:
                metrics.delivery_errors.inc()
            raise
        for done in pending:
            source.commit(done)
        pending.clear()
        take_replaced = getattr(sink, "take_replaced", None)
        for kind, n in (take_replaced() if take_replaced is not None else {}).items():
            written[kind] = written.get(kind, 0) - n
            written[DEAD_LETTER] = written.get(DEAD_LETTER, 0) + n
        for kind, n in written.items():
            report.produced[kind] = report.produced.get(kind, 0) + n
            if metrics is not None and n:
                metrics.produced.labels(kind).inc(n)
        written.clear()

    if hasattr(source, "before_revoke"):
        source.before_revoke = settle
    # a sink whose client reports errors and logs from its callbacks (Kafka) is served while
    # nothing is written too: its errors are said, and its queue of them does not grow
    serve: Callable[[], None] = getattr(sink, "serve", None) or (lambda: None)
    if hasattr(source, "on_idle"):
        source.on_idle = serve
    for raw in source.batches(stop):
        if pending and _drained(sink):
            settle()  # acknowledged already: committing costs no wait
        if not raw.count:  # the source is idle: nothing to overlap with, commit what is done
            settle()
            serve()
            continue
        t0 = time.perf_counter()
        out = processor.process(raw)
        sink.write(out)
        for kind, msgs in out.messages.items():
            if kinds is None or kind in kinds:
                written[kind] = written.get(kind, 0) + len(msgs)
        if not pending:
            oldest = t0
        pending.append(raw)
        # the batch's own time: parsed, scored and written. Its acknowledgement is waited for
        # later, with other batches' (settle), and is not counted in it (it was, in the batches
        # that happened to settle, though not in the others)
        now = written_at = time.perf_counter()
        if len(pending) >= max_pending or now - oldest >= SETTLE_EVERY_S:
            settle()
            now = time.perf_counter()
        report.batches += 1
        report.records += out.records
        report.scored += out.scored
        report.rejected += out.rejected
        report.alerts += out.alerts
        if metrics is not None:
            _observe(metrics, out, written_at - t0)
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            log.info("progress", extra={"event": "progress", "records": report.records,
                                        "rejected": report.rejected, "alerts": report.alerts,
                                        "records_per_s": round(report.records / (now - t_start))})
    settle()
    report.seconds = time.perf_counter() - t_start
    report.cuts = list(getattr(source, "cuts", ()))
    report.unread = list(getattr(source, "unread", ()))
    return report


def _drained(sink: Sink) -> bool:
    drained = getattr(sink, "drained", None)
    return bool(drained()) if drained is not None else False


def _observe(metrics: StreamMetrics, out: Any, seconds: float) -> None:
    metrics.batches.inc()
    metrics.batch_seconds.observe(seconds)
    metrics.batch_records.observe(out.records)
    metrics.records.labels("scored").inc(out.scored)
    metrics.records.labels("rejected").inc(out.rejected)
    metrics.alerts.inc(out.alerts)
    metrics.last_batch.set_to_current_time()


#: The longest one wait of a :class:`StopEvent` lasts before it looks at the flag again.
STOP_WAKE_S = 0.2


class StopEvent(threading.Event):
    """The worker's stop: a :class:`threading.Event` that the stop's signal handler may set.

    A Python signal handler runs on the main thread between two steps of whatever it
    interrupted, which may be this event's own ``wait`` while it holds the event's lock (on its
    way in, or back out after its timeout). ``threading.Event``'s lock is not reentrant: the
    handler's ``set`` then waited for a lock its own thread held, for ever, and every later
    SIGTERM's handler did the same (the worker following an idle log polls in ``wait`` five
    times a second; only SIGKILL ended it). Here the lock is reentrant, so the handler's
    ``set`` goes through; a set that came between the ``wait``'s look at the flag and its
    sleep is seen when the sleep ends, which is at most ``STOP_WAKE_S`` later, however long
    the ``wait`` was asked to last."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = STOP_WAKE_S if end is None else min(STOP_WAKE_S, end - time.monotonic())
            if super().wait(max(0.0, left)):
                return True
            if end is not None and time.monotonic() >= end:
                return False


def stop_on_signals(stop: threading.Event, received: list[int] | None = None
                    ) -> _SetsStop:
    """SIGTERM and SIGINT set ``stop`` (the batch in hand finishes) instead of killing; each
    signal is added to ``received``. ``stop`` is best a :class:`StopEvent`, which the handler
    sets at once; another event is set by a thread the handler starts (its lock may be held
    by the code the handler interrupted)."""
    return _SetsStop(stop, received)


class _SetsStop(StopSignals):
    """:func:`stop_on_signals`: every stop is logged and sets the event; both signals are
    taken whatever handler they had (an ignored one too)."""

    def __init__(self, stop: threading.Event, received: list[int] | None):
        super().__init__()
        self.stop, self.received = stop, received
        #: called after the stop is set, in the handler (the JSONL sink bounds a write blocked
        #: in an output that takes nothing more)
        self.then: Callable[[], None] = lambda: None

    def _takes(self, signum: int, handler: Any) -> bool:
        return True

    def _begin(self) -> bool:
        keep_ctrl_c_from_polars()  # else polars' own hook would cut the batch in hand on Ctrl-C
        return True

    def _on_stop(self, signum: int, _frame: Any) -> None:
        log.info("stopping after the batch in hand",
                 extra={"event": "signal", "signal": signal.Signals(signum).name})
        if self.received is not None:
            self.received.append(signum)
        if isinstance(self.stop, StopEvent):
            self.stop.set()
        else:  # (see StopEvent: its set could wait here for ever on a lock this thread holds)
            threading.Thread(target=self.stop.set, name="deepwatch-stop", daemon=True).start()
        self.then()


#: The Kafka consumer group where ``--group`` is not given.
DEFAULT_GROUP = "deepwatch"


@dataclass
class StreamOptions:
    """Everything ``deepwatch stream`` is told on its command line."""

    bundle: str
    format: str
    inputs: Sequence[str] = ()
    brokers: str | None = None
    input_topic: str | None = None
    output_topic: str | None = None
    verdict_topic: str | None = None
    dead_letter_topic: str | None = None
    #: the Kafka consumer group (None: ``deepwatch``); only with ``brokers``
    group: str | None = None
    batch_size: int = 10000
    batch_wait_ms: int = 500
    metrics_port: int | None = None
    #: the interface of the metrics port (None: loopback); only with ``metrics_port``
    metrics_host: str | None = None
    follow: bool = False
    #: where the place reached in the followed file is kept, and read on from at start
    #: (``--position-file``); only with ``follow``
    position_file: str | None = None
    out: str = "-"
    verdicts: str | None = None
    rejects: str | None = None
    backend: str = "auto"
    explain: bool | None = None
    alert_record: bool = False
    #: librdkafka settings from ``--kafka-option`` (they override ``kafka_config``'s)
    kafka_options: dict[str, str] = field(default_factory=dict)
    #: a Kafka client properties file (``--kafka-config``): TLS and SASL settings, secrets
    kafka_config: str | None = None

    def check(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.batch_wait_ms < 1:
            raise UsageError(f"--batch-wait-ms must be at least 1, not {self.batch_wait_ms}")
        if self.metrics_host is not None and self.metrics_port is None:
            # (it was ignored: no metrics served anywhere, without a word)
            raise UsageError("--metrics-host is the interface of --metrics-port: give the port "
                             "too")
        if self.brokers:
            missing = [flag for flag, v in (("--input-topic", self.input_topic),
                                            ("--output-topic", self.output_topic)) if not v]
            if missing:
                raise UsageError(f"stream with --brokers needs {' and '.join(missing)}")
            if self.inputs:
                raise UsageError("stream reads either --brokers or files, not both")
            if self.follow:
                raise UsageError("--follow tails files; it does not apply to --brokers")
            if self.position_file:
                raise UsageError("--position-file keeps the place in a followed file; with "
                                 "--brokers the consumer group keeps it (--group)")
            files = [flag for flag, v in (("--out", None if self.out == "-" else self.out),
                                          ("--verdicts", self.verdicts),
                                          ("--rejects", self.rejects)) if v]
            if files:
                raise UsageError(f"{', '.join(files)} name files; with --brokers, records go "
                                 "to --output-topic, --verdict-topic and --dead-letter-topic")
            # an output written to the input topic is read again as records: every alert and
            # verdict a dead letter, and a dead letter read again is rejected again, for ever
            # (one bad record made 217 dead letters in a minute, and more with every second)
            looped = [flag for flag, topic in (("--output-topic", self.output_topic),
                                               ("--verdict-topic", self.verdict_topic),
                                               ("--dead-letter-topic", self.dead_letters))
                      if topic == self.input_topic]
            if looped:
                raise UsageError(f"{' and '.join(looped)} {self.input_topic!r} "
                                 f"{'is' if len(looped) == 1 else 'are'} the input topic: the "
                                 "worker would read what it writes as records (a dead letter "
                                 "read again is rejected again, for ever); give "
                                 f"{'it' if len(looped) == 1 else 'each'} another topic")
        else:
            if self.follow and list(self.inputs or ["-"]) == ["-"]:
                # (it was ignored: stdin is read to its end, with --follow or without)
                raise UsageError("--follow tails a file; stdin (-) is read until it ends "
                                 "without it")
            if self.position_file and not self.follow:
                raise UsageError("--position-file keeps the place reached in a file read with "
                                 "--follow: give --follow and one file")
            kafka_only = [flag for flag, v in (("--input-topic", self.input_topic),
                                               ("--output-topic", self.output_topic),
                                               ("--verdict-topic", self.verdict_topic),
                                               ("--dead-letter-topic", self.dead_letter_topic),
                                               # (it was ignored: files have no group)
                                               ("--group", self.group),
                                               ("--kafka-config", self.kafka_config),
                                               ("--kafka-option", self.kafka_options))
                          if v]
            if kafka_only:
                raise UsageError(f"{', '.join(kafka_only)} "
                                 f"{'needs' if len(kafka_only) == 1 else 'need'} --brokers")
            from ..bundle import MANIFEST
            from ..sinks import check_distinct_outputs

            bundle = [("the bundle", self.bundle)] if os.path.isfile(
                os.path.join(self.bundle, MANIFEST)) else []
            check_distinct_outputs([("--out", None if self.out == "-" else self.out),
                                    ("--verdicts", self.verdicts), ("--rejects", self.rejects),
                                    ("--position-file", self.position_file)],
                                   self.inputs, bundle)

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_topic or f"{self.input_topic}.dead-letter"


def _kafka_io(opts: StreamOptions, metrics: StreamMetrics, stop: threading.Event,
              settings: tuple[dict[str, str], dict[str, str]] | None = None
              ) -> tuple[Source, Sink]:
    """The Kafka source and sink; ``settings``: the librdkafka settings of ``--kafka-config`` and
    ``--kafka-option`` and where each was given (``kafka_settings``; read here when None)."""
    from ._kafka_io import KafkaSink, KafkaSource, check_topic_name, kafka_settings

    assert opts.brokers and opts.input_topic
    check_topic_name("--input-topic", opts.input_topic)
    options, origins = settings or kafka_settings(opts.kafka_config, opts.kafka_options)
    topics = {"alert": opts.output_topic, "verdict": opts.verdict_topic,
              "dead_letter": opts.dead_letters}
    producer_opts = {k: v for k, v in options.items()
                     if not k.startswith(("group.", "session.", "heartbeat.", "auto.offset",
                                          "max.poll", "partition.assignment", "fetch.",
                                          "queued.", "enable.auto"))}
    # The sink first: it refuses an output topic that does not exist before any consumer is
    # made, so a refused start has joined no group and read nothing.
    sink = KafkaSink(opts.brokers, topics, producer_opts, metrics=metrics, stop=stop,
                     origins=origins)
    consumer_opts = dict(options)
    try:
        source = KafkaSource(opts.brokers, opts.input_topic, opts.group or DEFAULT_GROUP,
                             opts.batch_size, opts.batch_wait_ms / 1000.0, consumer_opts,
                             metrics.on_source_event,
                             _input_topic_gauge(metrics), metrics=metrics, origins=origins)
    except BaseException:
        sink.close()
        raise
    return source, sink


def _input_topic_gauge(metrics: StreamMetrics) -> Callable[[bool], None]:
    """``deepwatch_stream_input_topic_missing`` in the worker's metrics (Kafka only): 1 while
    the input topic does not exist on the brokers and the worker waits for it, else 0."""
    from prometheus_client import Gauge

    gauge = Gauge("deepwatch_stream_input_topic_missing",
                  "1 while the input topic does not exist on the brokers (the worker waits for "
                  "it to be created), else 0", registry=metrics.registry)
    gauge.set(0)
    return lambda missing: gauge.set(1 if missing else 0)


def run_stream(opts: StreamOptions, stop: threading.Event | None = None,
               detector: Any = None) -> StreamReport:
    """Build the source, sink and processor ``opts`` asks for and run until done or stopped."""
    from ..models.detector import Detector

    opts.check()
    settings = None
    if opts.brokers:  # a --kafka-config that cannot be read is refused before the bundle loads
        from ._kafka_io import kafka_settings

        settings = kafka_settings(opts.kafka_config, opts.kafka_options)
    det = detector or Detector(opts.bundle, engine=opts.backend, explain=opts.explain)
    if opts.format != det.format:
        raise UsageError(f"the bundle was trained on format {det.format!r}, not {opts.format!r}")
    fmt = get_format(opts.format)
    stop = stop or StopEvent()
    metrics = StreamMetrics()
    if opts.metrics_port is not None:
        host = opts.metrics_host or "127.0.0.1"
        try:
            metrics.serve(opts.metrics_port, host)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host}:{opts.metrics_port}: "
                             f"{exc.strerror or exc}") from None
    received: list[int] = []
    with ExitStack() as signals:
        # SIGTERM while the brokers are asked about the topics at start (up to 10 s each when
        # they cannot be reached) stops the worker as it does later, instead of killing it
        stops = signals.enter_context(stop_on_signals(stop, received))
        if opts.brokers:
            try:
                source, sink = _kafka_io(opts, metrics, stop, settings)
            except BaseException:
                metrics.close()  # a refused start leaves no metrics server behind
                raise
            verdicts = bool(opts.verdict_topic)
        else:
            source = FileSource(opts.inputs, follow=opts.follow, batch_size=opts.batch_size,
                                position_file=opts.position_file,
                                context_after=fmt.context_after if fmt.context_prefixes else None)
            # (with a position kept, a restarted worker appends to its outputs)
            try:
                sink = JsonlSink(opts.out, opts.verdicts, opts.rejects, stop=stop,
                                 resumed=opts.position_file is not None)
            except BaseException:
                source.close()  # (it holds the position file's lock)
                raise
            # a stop while a write waits on an output that takes nothing more (a pipe whose
            # reader stopped reading) ends that write STOP_WRITE_S later: the worker waited in
            # it for ever, deaf to every later SIGTERM and Ctrl-C
            stops.then = sink.on_stop
            verdicts = opts.verdicts is not None
        context = AlertContext.from_detector(det, include_record=opts.alert_record)
        processor = StreamProcessor(det, fmt, verdicts=verdicts, alert_context=context)
        log.info("stream started", extra={
            "event": "start", "bundle": opts.bundle, "format": fmt.name, "engine": det.engine,
            "source": f"kafka:{opts.input_topic}" if opts.brokers else list(opts.inputs or ["-"]),
            "group": (opts.group or DEFAULT_GROUP) if opts.brokers else None,
            "batch_size": opts.batch_size})
        try:
            unopened = getattr(sink, "unopened", None)
            if unopened:  # stopped while an output (a named pipe) waited for its reader
                report = StreamReport(unread=[f"{unopened} had no reader yet: no input was "
                                              "read"])
            else:
                report = run_loop(source, sink, processor, stop, metrics)
        finally:
            # the handlers put back first: a second SIGTERM while closing (the producer waits up
            # to 60 s for its acknowledgements) is not ignored. The source commits only what the
            # sink acknowledged, so closing is safe after a failure.
            signals.close()
            for close in (sink.close, source.close, metrics.close):
                try:
                    close()
                except Exception as exc:  # closing must not hide what stopped the loop
                    log.warning("close failed", extra={"event": "close_error",
                                                       "error": str(exc)})
    # the totals in the last JSON line: a clean stop writes nothing else to stderr. Text a stop
    # cut short unverified (a .gz named pipe) is read but not scored: said here, with the
    # signal's word as a stopped command's last line has it ("terminated: ...")
    message = f"stream stopped: {report.summary()}"
    notes = [c.describe() for c in report.cuts] + report.unread
    if notes:
        word = ("terminated" if signal.SIGTERM in received[:1] else
                "interrupted" if received else "stopped")
        message += "; " + "; ".join(f"{word}: {note}" for note in notes)
    log.log(logging.WARNING if notes else logging.INFO, message, extra={
        "event": "stop", "records": report.records, "scored": report.scored,
        "rejected": report.rejected, "alerts": report.alerts,
        "unscored_lines": report.unscored_lines, "unscored_bytes": report.unscored_bytes,
        "seconds": round(report.seconds, 3)})
    return report
