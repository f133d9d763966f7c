"""The ``deepwatch stream`` command; ``deepwatch.cli`` calls :func:`register` at start-up."""

from __future__ import annotations

from typing import Annotated

import typer


def stream(
    bundle: Annotated[str, typer.Argument(help="Bundle directory")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="kdd, nslkdd, access or zeek")],
    files: Annotated[list[str] | None, typer.Argument(
        help="Without --brokers: files (.gz, .bz2, .xz ok), globs or - (stdin, the default)",
    )] = None,
    brokers: Annotated[str | None, typer.Option(help="Kafka bootstrap servers HOST:PORT")] = None,
    input_topic: Annotated[str | None, typer.Option(help="Topic of raw records")] = None,
    output_topic: Annotated[str | None, typer.Option(help="Topic for ECS alerts")] = None,
    verdict_topic: Annotated[str | None, typer.Option(
        help="Topic for every record's verdict")] = None,
    dead_letter_topic: Annotated[str | None, typer.Option(
        help="Topic for rejected records (default: INPUT_TOPIC.dead-letter)")] = None,
    group: Annotated[str | None, typer.Option(
        help="Kafka consumer group (default deepwatch); only with --brokers")] = None,
    batch_size: Annotated[int, typer.Option(help="Most records in one micro-batch")] = 10000,
    batch_wait_ms: Annotated[int, typer.Option(
        help="Longest wait to fill a micro-batch (ms)")] = 500,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[str | None, typer.Option(
        help="Interface for --metrics-port (default 127.0.0.1)")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Keep reading a growing file, as tail -F")] = False,
    position_file: Annotated[str | None, typer.Option(
        help="With --follow: keep the place reached in this file, and read on from it when "
             "started again (outputs are then appended to)")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Without --brokers: alerts JSONL "
                                     "(- stdout)")] = "-",
    verdicts: Annotated[str | None, typer.Option(
        help="Without --brokers: every verdict to this JSONL file")] = None,
    rejects: Annotated[str | None, typer.Option(
        help="Without --brokers: rejected records to this JSONL file")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnx or torch")] = "auto",
    explain: Annotated[bool | None, typer.Option(
        "--explain/--no-explain",
        help="Name the features behind each alert (default: when free, i.e. for "
             "autoencoder and hybrid bundles; classifiers' attribution costs ~40 passes)")] = None,
    alert_record: Annotated[bool, typer.Option(
        "--alert-record", help="Copy every parsed field into alerts (deepwatch.record)")] = False,
    kafka_option: Annotated[list[str] | None, typer.Option(
        help="Extra librdkafka setting KEY=VALUE (repeatable; overrides --kafka-config). "
             "Never a password: other local users can read the command line")] = None,
    kafka_config: Annotated[str | None, typer.Option(
        help="Kafka client properties file: KEY=VALUE lines of librdkafka settings (TLS, "
             "SASL, their passwords); keep it chmod 600")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Score records as they arrive: from Kafka, or from files, a followed log or stdin.

    Writes an ECS alert per malicious record, every verdict when asked, and every rejected
    record to the dead-letter topic or file. Logs are JSON lines on stderr.
    """
    from ._jsonlog import setup
    from ._kafka_io import parse_options
    from .stream import StreamOptions, run_stream

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        from ..errors import UsageError

        raise UsageError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    setup(log_level)
    opts = StreamOptions(
        bundle=bundle, format=fmt, inputs=list(files or []), brokers=brokers,
        input_topic=input_topic, output_topic=output_topic, verdict_topic=verdict_topic,
        dead_letter_topic=dead_letter_topic, group=group, batch_size=batch_size,
        batch_wait_ms=batch_wait_ms, metrics_port=metrics_port, metrics_host=metrics_host,
        follow=follow, position_file=position_file, out=out, verdicts=verdicts,
        rejects=rejects, backend=backend,
        explain=explain, alert_record=alert_record, kafka_options=parse_options(kafka_option or []),
        kafka_config=kafka_config,
    )
    import gc

    # A micro-batch is tens of thousands of short-lived message objects: collecting every 700
    # allocations (the default) keeps re-walking them; they die together with their batch.
    gc.set_threshold(100_000, 20, 100)
    run_stream(opts)  # its totals are in its last JSON log line: stderr is JSON lines only


def register(app: typer.Typer) -> None:
    app.command("stream")(stream)
