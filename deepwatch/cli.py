"""The ``deepwatch`` command. Thin: each command parses its options and makes one call.

Heavy libraries load inside the commands, so ``deepwatch --help`` and ``score`` start fast.
"""

from __future__ import annotations

import functools
import os
import sys

# numpy's work in these commands is thin matrix products over many rows: OpenBLAS worker threads
# save nothing there, and they spin after each call, taking the cores from Arrow and ONNX Runtime
# (8% of all CPU time in one profile of ``score``). Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from typing import Annotated, Any

import typer

from . import __version__
from .errors import DeepwatchError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="deepwatch: network intrusion detection with deep learning.",
                  pretty_exceptions_enable=False)
datasets_app = typer.Typer(no_args_is_help=True, help="Known public data sets.")
app.add_typer(datasets_app, name="datasets")


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _progress() -> bool:
    from .progress import enabled

    return enabled()


def _shows_progress() -> bool:
    """Whether progress is shown at all (bars, or training's lines where stderr is no
    terminal)."""
    from .progress import mode

    return mode() != "off"


def _read_dirs(bundle: str, lakes: list[str] | None = None) -> list[tuple[str, str | None]]:
    """The directories a command reads, that no output of it may be written into: the bundle
    (where it is one; anything else is refused as no bundle, in its turn) and lakes."""
    from .bundle import MANIFEST

    dirs: list[tuple[str, str | None]] = [("--lake", d) for d in lakes or []]
    if os.path.isfile(os.path.join(bundle, MANIFEST)):
        dirs.insert(0, ("the bundle", bundle))
    return dirs


Files = Annotated[list[str], typer.Argument(
    help="Input files (.gz, .bz2, .xz ok), globs, PATH=LABEL, or -")]
Format = Annotated[str, typer.Option("--format", "-f", help="kdd, nslkdd, access or zeek")]
OptionalFiles = Annotated[list[str] | None, typer.Argument(
    help="Input files (.gz, .bz2, .xz ok), globs, PATH=LABEL, or - (optional with --lake)")]
LakeOption = Annotated[list[str] | None, typer.Option(
    "--lake", help="Also read the records of this lake directory (see `ingest`)")]
DaysOption = Annotated[list[str] | None, typer.Option(
    "--days", help="Read only these days of the lakes (--lake): a day YYYY-MM-DD, a range "
                   "FIRST..LAST (both in), or unknown (records without a time); repeatable")]
#: The models with no anomaly threshold: ``--target-fpr`` only sets their ``--decision fpr``.
CLASSIFIERS = ("mlp", "resnet", "snn", "stack")


@app.command()
def train(
    fmt: Format,
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="mlp, resnet, snn, stack, autoencoder, hybrid")],
    out: Annotated[str, typer.Option("--out", "-o", help="Bundle directory to write")],
    val: Annotated[list[str] | None, typer.Option("--val", help="Validation file(s)")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs per network")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (splits, init, sampling)")] = 0,
    target_fpr: Annotated[float | None, typer.Option(
        "--target-fpr", help="False-positive rate the anomaly threshold (autoencoder, hybrid) "
                             "or, with --decision fpr, the score threshold is calibrated at "
                             "(default 0.01)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    decision: Annotated[str, typer.Option(
        help="auto (KDD data: least expected contest cost, else threshold; also where a "
             "training label has no KDD category), cost, "
             "threshold (on the attack probability, fitted for fewest errors on held-out "
             "records) or fpr (threshold calibrated on held-out benign records at "
             "--target-fpr)")] = "auto",
    files: OptionalFiles = None,
    lake: LakeOption = None,
    days: DaysOption = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", help="Train data-parallel (torch DDP) in this many processes on this "
                        "machine, one per GPU on CUDA; torchrun -m deepwatch train ... "
                        "spans machines")] = 1,
    rejects: Annotated[str | None, typer.Option(
        help="Keep every rejected training or validation record here (JSONL: line, raw, "
             "reason, source)")] = None,
    folds: Annotated[int, typer.Option(
        "--folds", help="Cross-fit the classifiers over K folds: K members of each network, "
                        "member k trained on all folds but k; records score as their average "
                        "(K times the training and scoring time)")] = 1,
    refit: Annotated[bool, typer.Option(
        "--refit", help="After early stopping, train the classifiers again on all the "
                        "labelled records for the epochs it chose; the stack's meta-learner "
                        "and the thresholds stay fitted on held-out predictions (about twice "
                        "the training time)")] = False,
) -> None:
    """Train a model on labelled (or, for autoencoders, benign) records and save a bundle."""
    if target_fpr is not None and model in CLASSIFIERS and decision != "fpr":
        # (it was ignored: the classifier's threshold was fitted for fewest errors or cost)
        raise typer.BadParameter(f"--target-fpr calibrates an anomaly threshold (autoencoder, "
                                 f"hybrid) or the score threshold of --decision fpr; model "
                                 f"{model!r} with --decision {decision} does not use it")
    if target_fpr is None:
        target_fpr = 0.01
    if rejects and lake and not files and not val:
        _lake_rejects_refused()
    if nproc != 1 and "WORLD_SIZE" not in os.environ:  # (under torchrun: a rank already)
        argv = ["train", "--format", fmt, "--model", model, "--out", out, "--seed", str(seed),
                "--device", device, "--decision", decision]
        if model not in CLASSIFIERS or decision == "fpr":  # (refused by the ranks otherwise)
            argv += ["--target-fpr", str(target_fpr)]
        argv += [a for v in val or [] for a in ("--val", v)]
        argv += [a for v in lake or [] for a in ("--lake", v)]
        argv += [a for d in days or [] for a in ("--days", d)]
        argv += ["--epochs", str(epochs)] if epochs is not None else []
        argv += ["--folds", str(folds)]
        argv += ["--refit"] if refit else []
        argv += ["--rejects", rejects] if rejects else []
        raise typer.Exit(_launch_train(argv, files or [], lake or [], nproc, model, out, device,
                                       target_fpr, decision, folds, val or [], epochs, rejects,
                                       refit, days))
    from .train.api import train as run

    manifest = run(fmt, model, files or [], out, val_inputs=val or (), epochs=epochs, seed=seed,
                   target_fpr=target_fpr, device=device, policy=decision,
                   progress=_shows_progress(), log=_err, lakes=lake or [], folds=folds,
                   rejects=rejects, refit=refit, days=days)
    if manifest["training"].get("rank", 0):
        return  # another rank of a distributed run: rank 0 reports
    cal = manifest["metrics"]["calibration"]
    # without attacks among the validation records, precision and recall mean nothing
    shown: tuple[str, ...] = (("precision", "recall", "f1", "fpr")
                              if cal.get("tp", 0) + cal.get("fn", 0)
                              else ("fpr", "flagged_share"))
    no_benign = "tn" in cal and not cal["tn"] + cal["fp"]
    if no_benign:  # nor does a false-positive rate of 0 (of no benign records)
        shown = tuple(k for k in shown if k != "fpr")
    summary = ", ".join(f"{k} {v:.4f}" for k, v in cal.items()
                        if isinstance(v, float) and k in shown)
    if "tp" in cal and not cal["tp"] + cal["fn"]:
        summary += " (no attacks among the validation records)"
    if no_benign:
        summary += " (no benign records among the validation records: no false-positive rate)"
    _err(f"validation: {summary}")


def _lake_rejects_refused() -> None:
    """``--rejects`` with lakes alone: their records were parsed when ingested, so nothing is
    parsed now and the file came out empty, whatever the lakes had rejected."""
    raise typer.BadParameter("--rejects keeps the input lines that do not parse; --lake records "
                             "were parsed by ingest (its rejects are in LAKE/rejects): give "
                             "input files, or leave --rejects out")


def _launch_train(argv: list[str], files: list[str], lakes: list[str], nproc: int,
                  model: str, out: str, device: str, target_fpr: float, decision: str,
                  folds: int, val: list[str], epochs: int | None,
                  rejects: str | None = None, refit: bool = False,
                  days: list[str] | None = None) -> int:
    """Check what can be checked once, then start ``nproc`` training ranks."""
    from .errors import UsageError
    from .train.api import check_arguments
    from .train.distributed import launch_local, oversubscribed

    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, not {nproc}")
    too_many = oversubscribed(nproc)
    if too_many:  # a warning, not a refusal: said whether or not the checks below refuse
        _err(too_many)
    _refuse_read_once(files, val)
    check_arguments(model, files, out, target_fpr=target_fpr, device=device, policy=decision,
                    lakes=lakes, folds=folds, val_inputs=val, epochs=epochs, rejects=rejects,
                    refit=refit, days=days)
    if device.startswith("cuda"):
        import torch

        if nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {nproc} on CUDA needs as many GPUs; "
                             f"{torch.cuda.device_count()} found")
    _err(f"training in {nproc} processes (torch DDP)")
    return launch_local([sys.executable, "-m", "deepwatch", *argv, "--", *files], nproc, _err)


def _refuse_read_once(files: list[str], val: list[str]) -> None:
    """``--nproc`` ranks each read every input: one that is gone once read (stdin, ``-=LABEL``
    too, a named pipe, ``<(...)``) gave them different data, in training or in ``--val``: a
    page of torch's RuntimeError from DDP (the ranks' networks had different shapes), or one
    rank's 'the validation data has fewer than two records'."""
    import stat

    from .errors import UsageError
    from .sources.files import parse_input_spec

    for text in [*files, *val]:
        for spec in parse_input_spec(text):
            if spec.path == "-":
                raise UsageError("--nproc reads its input once per process: give files, not "
                                 "stdin (-)")
            try:
                regular = stat.S_ISREG(os.stat(spec.path).st_mode)
            except OSError:
                regular = True  # (said in its turn, by the checks that read the inputs)
            if not regular:
                raise UsageError(f"--nproc reads its input once per process: {spec.display} "
                                 "is no regular file (a pipe?) and can be read once only: "
                                 "give files")


@app.command()
def evaluate(
    bundle: Annotated[str, typer.Argument(help="Bundle directory")],
    files: Files,
    fmt: Format,
    json_out: Annotated[str, typer.Option("--json", help="Write metrics JSON here")],
    report: Annotated[str | None, typer.Option(help="Also write an HTML report")] = None,
    backend: Annotated[str, typer.Option(
        "--backend", "--engine", help="auto, onnx or torch (--engine: the older name)")] = "auto",
    rejects: Annotated[str | None, typer.Option(
        help="Keep every rejected record here (JSONL: line, raw, reason, source)")] = None,
) -> None:
    """Score labelled records and write metrics (binary, per type, KDD cost) as JSON."""
    from .errors import OutputError, sigterm_stops_cleanly
    from .evaluate.metrics import to_json
    from .evaluate.run import REPORT_SAMPLE, summary_lines
    from .evaluate.run import evaluate as run
    from .sinks import check_distinct_outputs, replace_file, writable_file

    # before the work, not after it
    check_distinct_outputs([("--json", json_out), ("--report", report), ("--rejects", rejects)],
                           files, _read_dirs(bundle))
    json_path = writable_file(json_out, "--json")
    if report:
        from .viz.report import writable_report

        writable_report(report, "--report")
    result, cols = run(bundle, fmt, files, engine=backend, progress=_progress(),
                       feature_sample=REPORT_SAMPLE if report else 0, rejects=rejects, log=_err)
    try:  # whole or not at all: a full disk or a stop leaves an older eval.json as it was
        with sigterm_stops_cleanly():
            replace_file(json_path, to_json(result).encode())
    except OSError as exc:
        raise OutputError(f"cannot write {json_path}: {exc.strerror or exc}") from None
    for line in summary_lines(result):
        _err(line)
    if report:
        from .viz.report import write_report

        write_report(report, result, cols, title=f"deepwatch evaluation of {bundle}")
        _err(f"report written to {report}")


@app.command()
def score(
    bundle: Annotated[str, typer.Argument(help="Bundle directory")],
    fmt: Format,
    out: Annotated[str, typer.Option("--out", "-o", help="Output .parquet or .jsonl (- stdout)")],
    alerts_only: Annotated[bool, typer.Option("--alerts-only", help="Keep malicious only")] = False,
    rejects: Annotated[str | None, typer.Option(help="Write rejected lines (JSONL) here")] = None,
    engine: Annotated[str, typer.Option(
        help="local (in this process) or spark (a Spark job, see --master); both score "
             "through --backend")] = "local",
    master: Annotated[str | None, typer.Option(help="Spark master URL (engine spark)")] = None,
    backend: Annotated[str, typer.Option(help="auto, onnx or torch")] = "auto",
    cluster: Annotated[bool, typer.Option(
        "--cluster", help="Group alerts into campaigns (needs an autoencoder)")] = False,
    files: OptionalFiles = None,
    lake: LakeOption = None,
    days: DaysOption = None,
    explain: Annotated[bool | None, typer.Option(
        "--explain/--no-explain",
        help="Add the features behind each alert (default: when free, i.e. for autoencoder and "
             "hybrid bundles; a classifier's attribution runs it ~40 more times per alert)")
    ] = None,
) -> None:
    """Score records with a bundle: one row per parsed record, in input order."""
    from .sinks import check_distinct_outputs

    check_distinct_outputs([("--out", None if out == "-" else out), ("--rejects", rejects)],
                           files or [], _read_dirs(bundle, lake or []))
    if engine == "spark":
        from .spark import score_spark

        if cluster:
            raise typer.BadParameter("--cluster works with --engine local only")
        if days:
            raise typer.BadParameter("--days works with --engine local only")
        if lake:  # (it was ignored: the lake's records went unscored, without a word)
            raise typer.BadParameter("--lake works with --engine local only (the spark "
                                     "engine reads text files)")
        report = score_spark(bundle, fmt, files or [], out, alerts_only=alerts_only,
                             rejects=rejects, master=master, backend=backend, explain=explain)
    elif engine == "local":
        from .errors import sigterm_stops_cleanly
        from .scoring import score_files

        if master:  # (it was ignored: the run went to the local engine, without a word)
            raise typer.BadParameter("--master works with --engine spark only")
        if rejects and lake and not files:
            _lake_rejects_refused()

        with sigterm_stops_cleanly():  # the output closed whole (Parquet's footer), said partial
            report = score_files(bundle, fmt, files or [], out, alerts_only=alerts_only,
                                 rejects=rejects, engine=backend, progress=_progress(),
                                 lakes=lake or [], cluster=cluster, explain=explain,
                                 days=days)
    else:
        raise typer.BadParameter(f"unknown engine {engine!r}; use local or spark")
    _err(f"{report.stats.summary()}; {report.alerts:,} malicious; {report.written:,} rows "
         f"written to {out} in {report.seconds:.1f}s ({report.engine})")
    for warning in report.stats.format_warnings(fmt):  # (rejects never stop a run: a warning)
        _err(warning)


@app.command()
def report(
    bundle: Annotated[str, typer.Argument(help="Bundle directory")],
    files: Files,
    fmt: Format,
    out: Annotated[str, typer.Option("--out", "-o", help="HTML file to write")],
    backend: Annotated[str, typer.Option(
        "--backend", "--engine", help="auto, onnx or torch (--engine: the older name)")] = "auto",
    rejects: Annotated[str | None, typer.Option(
        help="Keep every rejected record here (JSONL: line, raw, reason, source)")] = None,
) -> None:
    """An HTML report: per-type detection (Sankey), t-SNE map, metrics."""
    from .evaluate.run import REPORT_SAMPLE, summary_lines
    from .evaluate.run import evaluate as run
    from .sinks import check_distinct_outputs
    from .viz.report import writable_report, write_report

    check_distinct_outputs([("--out", out), ("--rejects", rejects)], files, _read_dirs(bundle))
    writable_report(out, "--out")  # before the work, not after it
    result, cols = run(bundle, fmt, files, engine=backend, progress=_progress(),
                       feature_sample=REPORT_SAMPLE, rejects=rejects, log=_err)
    for line in summary_lines(result):
        _err(line)
    write_report(out, result, cols, title=f"deepwatch report: {bundle}")
    _err(f"report written to {out}")


@app.command()
def serve(
    bundle: Annotated[str, typer.Argument(help="Bundle directory")],
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key_file: Annotated[str | None, typer.Option(
        "--api-key-file", help="Require 'Authorization: Bearer <key>' with this key")] = None,
    workers: Annotated[int, typer.Option(
        help="Processes answering on the port (metrics, dashboard and reloads span them)")] = 1,
    backend: Annotated[str, typer.Option(help="auto, onnx or torch")] = "auto",
    body_timeout: Annotated[float, typer.Option(
        help="Seconds a request body may take to arrive in whole; a slower one gets 408")] = 30.0,
    body_min_rate: Annotated[float, typer.Option(
        help="Bytes a second a request body must average once it has been arriving "
             "--body-rate-grace seconds; a slower one gets 408 (0: no minimum)")] = 1024.0,
    body_rate_grace: Annotated[float | None, typer.Option(
        help="Seconds from the start of a request body before --body-min-rate applies to it "
             "(default 5; above 0; --body-timeout or more: no minimum)")] = None,
    max_uploads: Annotated[int, typer.Option(
        help="Request bodies arriving at once from all clients, per worker process; a request "
             "past it gets 503 (1 or more)")] = 256,
    max_client_uploads: Annotated[int, typer.Option(
        help="Request bodies one client address may be sending at once, per worker process "
             "(they hold no request slot while they arrive); a request past it waits up to "
             "--upload-wait seconds for one of them to come in whole, then gets 429 "
             "(0: no cap)")] = 16,
    upload_wait: Annotated[float | None, typer.Option(
        help="Seconds a request past --max-client-uploads waits for its client's turn before "
             "429 (default 5; 0: 429 at once)")] = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="Comma-separated addresses or networks of reverse proxies trusted to name the "
             "client in X-Forwarded-For (default: none, the header is ignored)")] = None,
    tls_cert: Annotated[str | None, typer.Option(
        "--tls-cert", help="Serve HTTPS with this certificate (PEM, the chain after it); "
                           "needs --tls-key")] = None,
    tls_key: Annotated[str | None, typer.Option(
        "--tls-key", help="The certificate's private key (PEM); needs --tls-cert")] = None,
    tls_key_password_file: Annotated[str | None, typer.Option(
        "--tls-key-password-file",
        help="File whose first line is the password of an encrypted --tls-key")] = None,
) -> None:
    """Serve the REST API, dashboard and metrics."""
    from .serve._service import Limits
    from .serve.app import run_server

    # (each was ignored: with no minimum rate nothing waits for a grace, with no cap no request
    # waits for its client's turn)
    if body_rate_grace is not None and body_min_rate == 0:
        raise typer.BadParameter("--body-rate-grace delays --body-min-rate; with "
                                 "--body-min-rate 0 (no minimum) it has nothing to delay")
    if upload_wait is not None and max_client_uploads == 0:
        raise typer.BadParameter("--upload-wait is how long a request past --max-client-uploads "
                                 "waits; with --max-client-uploads 0 (no cap) none waits")
    defaults = Limits()
    limits = Limits(body_timeout_seconds=body_timeout, body_min_rate=body_min_rate,
                    body_rate_grace_seconds=(defaults.body_rate_grace_seconds
                                             if body_rate_grace is None else body_rate_grace),
                    max_uploads=max_uploads, max_client_uploads=max_client_uploads,
                    upload_wait_seconds=(defaults.upload_wait_seconds
                                         if upload_wait is None else upload_wait))
    run_server(bundle, host=host, port=port, api_key_file=api_key_file, workers=workers,
               engine=backend, limits=limits,
               forwarded_allow_ips=[forwarded_allow_ips] if forwarded_allow_ips else [],
               tls_cert=tls_cert, tls_key=tls_key,
               tls_key_password_file=tls_key_password_file)


@app.command()
def demo(out: Annotated[str, typer.Option(help="Directory for the demo's outputs")] = "demo-out",
         ) -> None:
    """Run the whole pipeline offline on simulated web traffic and print what it found."""
    from .demo import run_demo

    run_demo(out, log=_err)


@datasets_app.command("list")
def datasets_list() -> None:
    """List the known data sets and where each is found."""
    from .datasets import describe_all

    for line in describe_all():
        typer.echo(line)


@datasets_app.command("fetch")
def datasets_fetch(
    name: Annotated[str, typer.Argument(help="Data set name (see `datasets list`)")],
    from_dir: Annotated[str | None, typer.Option("--from", help="Copy from this directory")] = None,
) -> None:
    """Download a data set into the cache (or copy it from a local directory)."""
    from .datasets import iter_fetch

    for path in iter_fetch(name, from_dir=from_dir, progress=_progress()):
        typer.echo(path)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deepwatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                 is_eager=True)] = False) -> None:
    pass


_registered: list[str] = []  # the modules whose commands are on ``app`` already


def _register_optional() -> None:
    """Commands that live with their subsystems (stream, ingest, simulate); registered once
    however often :func:`main` is called (the tests call it many times in one process)."""
    import importlib

    for module in ("deepwatch.serve.cli", "deepwatch.web_cli"):
        if module in _registered:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)
        _registered.append(module)


class _Interrupted(Exception):
    """Ctrl-C inside a command. Typer turns a KeyboardInterrupt into a silent exit 130; this
    carries it past typer to :func:`main`, which says so in one line (with what was kept, when
    the command said: :class:`~deepwatch.errors.Interrupted`)."""

    def __init__(self, detail: str | None = None, terminated: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.terminated = terminated


def _interruptible(fn: Any) -> Any:
    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _Interrupted(getattr(exc, "detail", None),
                               getattr(exc, "terminated", False)) from None

    command._deepwatch_interruptible = True  # type: ignore[attr-defined]
    return command


def _report_interrupts(typer_app: typer.Typer) -> None:
    """Wrap every command of ``typer_app`` (and its groups) with :func:`_interruptible`."""
    for info in typer_app.registered_commands:
        if info.callback is not None and not hasattr(info.callback,
                                                     "_deepwatch_interruptible"):
            info.callback = _interruptible(info.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _report_interrupts(group.typer_instance)


def _usage_line(exc: Exception) -> str:
    """A click usage error as one line: what is wrong, and where the help is."""
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    if message.startswith("No such option: -="):  # stdin with a label, taken for an option
        where = "; to label stdin, end the options first: -- -=LABEL"
    return f"error: {message}{where}"


def main(argv: list[str] | None = None) -> int:
    """Run the ``deepwatch`` command line ``argv``; ``None``: this process's own (``sys.argv``),
    as the console script and ``python -m deepwatch`` run it; the exit status."""
    from ._arrow import skip_pandas_probe

    if argv is None:  # the process is this command: a stop, once begun, is held to the end
        from .errors import hold_stops_to_exit

        hold_stops_to_exit()
    skip_pandas_probe()
    _register_optional()
    _report_interrupts(app)
    import gc

    gc.freeze()  # what start-up loaded lives as long as the process: the collector skips it
    try:
        # without standalone mode click hands a typer.Exit's code back instead of raising it
        code = app(args=argv, prog_name="deepwatch", standalone_mode=False)
        if isinstance(code, int):
            return code
    except DeepwatchError as exc:
        _err(f"error: {exc}")
        return exc.exit_code
    except _Interrupted as exc:  # exit status as a shell gives for the signal: 128 + its number
        from .errors import stop_reported

        stop_reported()
        word, code = ("terminated", 143) if exc.terminated else ("interrupted", 130)
        _err(word if exc.detail is None else f"{word}: {exc.detail}")
        return code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        _err("aborted")
        return 130
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as exc:  # click usage errors (recent typer vendors its own click)
        import importlib.util

        kinds: list[type[BaseException]] = []
        if hasattr(typer, "TyperException"):
            kinds.append(typer.TyperException)
        if importlib.util.find_spec("click") is not None:  # a standalone click, if installed
            import click

            kinds.append(click.ClickException)
        usage = tuple(kinds)
        if usage and isinstance(exc, usage) and hasattr(exc, "format_message"):
            if exc.format_message().strip():  # (empty after the help shown for no arguments)
                _err(_usage_line(exc))
            return int(getattr(exc, "exit_code", 2))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
