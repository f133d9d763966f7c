"""``deepwatch demo``: the whole web pipeline offline, on simulated traffic, in a couple of minutes.

1. simulate a day of a web shop's normal traffic (training) and a later day with labelled
   attacks (held out);
2. stream the training day through the embedded file source, chunk by chunk, into the lake;
3. train an autoencoder on the lake (normal traffic only);
4. score the held-out day as one time-ordered stream, per-client state carried across batches;
5. write ECS alerts (JSONL), the scored records (Parquet) and an HTML summary;
6. print per-attack detection and the time each step took.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT = "access"
TRAIN_VISITS = 500
TEST_VISITS = 250
ATTACK_SHARE = 0.12
TARGET_FPR = 0.01
BATCH_ROWS = 2048
SOURCE_CHUNK = 256 << 10


def _model() -> str:
    """The autoencoder when this build has it; else a supervised MLP on labelled traffic."""
    try:
        import deepwatch.train.anomaly  # noqa: F401
    except ImportError:
        return "mlp"
    return "autoencoder"


class _Clock:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.steps: list[tuple[str, float]] = []

    def step(self, name: str, t0: float, detail: str = "") -> None:
        seconds = time.perf_counter() - t0
        self.steps.append((name, seconds))
        self.log(f"[{seconds:6.1f}s] {name}{': ' + detail if detail else ''}")


def _stream_into_lake(paths: dict[str, Path], lake: Path) -> tuple[int, int, int]:
    """The embedded source: each log read in chunks of whole lines, parsed, labelled, written
    to the lake as it arrives. Returns (records, rejects, chunks)."""
    from .formats import get_format
    from .io import with_label
    from .lake import LakeWriter
    from .sources.files import InputSpec, iter_chunks

    fmt = get_format(FORMAT)
    writer = LakeWriter(lake, FORMAT)
    chunks = 0
    for label, path in paths.items():
        spec = InputSpec(str(path), label)
        for chunk in iter_chunks(spec, chunk_bytes=SOURCE_CHUNK):
            result = fmt.parse_bulk(chunk.data, first_line=chunk.first_line)
            writer.write(with_label(result.batch, label, fmt))
            writer.write_rejects(result.rejects)
            chunks += 1
    writer.commit()  # the parts appear in the lake together, now
    return writer.stats.records, writer.stats.rejects, chunks


def _held_out(paths: dict[str, Path]) -> pa.Table:
    """The held-out day as a server would log it: every label's records merged in time order."""
    from .formats import get_format
    from .io import InputReader

    table, _rejects, _stats = InputReader(get_format(FORMAT),
                                          [f"{p}={label}" for label, p in paths.items()]
                                          ).read_all()
    return table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending")]))


def _write_alerts(det: Any, scored: pa.Table, path: Path) -> int:
    flagged = scored.filter(pc.equal(scored.column("verdict"), "malicious"))
    with open(path, "wb") as fh:
        try:
            from .alerts import AlertContext, write_alerts
        except ImportError:  # a build without the alerts module: the record and its score
            from .sinks import write_jsonl

            write_jsonl(flagged, fh)
            return flagged.num_rows
        ctx = AlertContext.from_detector(det)
        return write_alerts(fh, flagged.drop_columns(["label"]), ctx)


def _full_report(path: Path, det: Any, labels: np.ndarray, verdict: np.ndarray,
                 scored: pa.Table, seconds: float) -> bool:
    """The evaluation report (Sankey, per-type detection, scores) where this build has it."""
    try:
        from .evaluate.run import metrics_from, verdict_threshold
        from .viz.report import write_report
    except ImportError:
        return False
    cols = {"label": labels, "verdict": verdict,
            "score": scored.column("score").to_numpy(zero_copy_only=False)}
    if "anomaly_score" in scored.column_names:
        cols["anomaly_score"] = scored.column("anomaly_score").to_numpy(zero_copy_only=False)
    # the cut on score the verdicts were made by, as evaluate reports it
    result = metrics_from(cols, False, verdict_threshold(det.decision, cols), seconds)
    result["bundle"] = {"kind": det.kind, "engine": det.engine, "path": str(det.path)}
    write_report(path, result, cols, title="deepwatch demo: held-out day of a simulated web shop")
    return True


def _per_label(labels: np.ndarray, verdict: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for lab in sorted(set(labels.tolist()), key=lambda v: (v != "normal", v)):
        m = labels == lab
        right = ~verdict[m] if lab == "normal" else verdict[m]
        out[lab] = {"records": int(m.sum()), "detected": float(right.mean())}
    return out


def _summary_html(path: Path, model: str, per_label: dict[str, dict[str, float]],
                  steps: list[tuple[str, float]], alerts: int, top: list[dict[str, Any]]) -> None:
    def row(cells: list[str]) -> str:
        return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"

    detect = "".join(row([lab, f"{v['records']:,}",
                          f"{100 * v['detected']:.1f}%" + (" kept normal" if lab == "normal"
                                                           else " flagged")])
                     for lab, v in per_label.items())
    timing = "".join(row([name, f"{s:.1f} s"]) for name, s in steps)
    alert_rows = "".join(row([str(a.get("client_ip")), str(a.get("label")),
                              f"{a.get('anomaly_score', a.get('score', 0.0)):.3g}",
                              str(a.get("request"))[:120]]) for a in top)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deepwatch demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em}}
th{{background:#f3f3f3;text-align:left}}.alerts td:last-child{{word-break:break-all}}</style>
</head><body>
<h1>deepwatch demo: simulated web shop</h1>
<p>Model: <b>{html.escape(model)}</b>, trained on a simulated day of normal traffic read from the
lake; scored on a later day with labelled attacks. {alerts:,} alerts written to
<code>alerts.jsonl</code> (Elastic Common Schema). The full evaluation report, where this build
has it: <a href="report.html">report.html</a>.</p>
<h2>Detection per label</h2>
<table><tr><th>label</th><th>records</th><th>verdict right</th></tr>{detect}</table>
<h2>Timings</h2><table><tr><th>step</th><th>time</th></tr>{timing}</table>
<h2>Highest-scoring alerts</h2>
<table class="alerts"><tr><th>client</th><th>true label</th><th>anomaly score</th>
<th>request</th></tr>{alert_rows}
</table></body></html>
"""
    path.write_text(page, encoding="utf-8")


#: What the demo writes into its --out directory (and replaces when run again there).
DEMO_FILES = ("scored.parquet", "alerts.jsonl", "report.html", "summary.html", "summary.json")
DEMO_DIRS = ("traffic", "lake", "bundle")


def check_demo_target(out_dir: str | Path) -> None:
    """Refuse, before any work, an ``--out`` the demo would destroy anything in: only a missing
    or empty directory, or an earlier demo's output (nothing in it the demo does not write), is
    written to. Running the demo again replaces its own output; nothing else is ever deleted."""
    from .bundle import check_bundle_target
    from .errors import OutputError
    from .lake import MANIFEST as LAKE_MANIFEST
    from .simulate import ATTACKS

    out = Path(out_dir)
    if not out.is_dir():
        return  # missing (made later), or a file (writable_dir says so)

    def refuse(what: str) -> OutputError:
        return OutputError(f"--out {out_dir} {what}; the demo writes only into a new or empty "
                           "directory, or over an earlier demo's output")

    try:
        held = sorted(p.name for p in out.iterdir())
        foreign = [n for n in held if n not in DEMO_FILES + DEMO_DIRS]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise refuse(f"holds files the demo did not write ({', '.join(foreign[:3])}{more})")
        for name in DEMO_FILES:
            if (out / name).exists() and not (out / name).is_file():
                raise refuse(f"holds {name}, which is not a file")
        for name in DEMO_DIRS:
            if (out / name).exists() and not (out / name).is_dir():
                raise refuse(f"holds {name}, which is not a directory")
        logs = {f"{label}.log" for label in ("normal", *ATTACKS)}
        if (out / "traffic").is_dir():
            for part in sorted((out / "traffic").iterdir()):
                if part.name not in ("train", "test") or not part.is_dir() or any(
                        f.name not in logs for f in part.iterdir()):
                    raise refuse(f"holds traffic/{part.name}, which the demo did not write "
                                 "as it is")
        lake = out / "lake"
        if lake.is_dir() and any(lake.iterdir()) and not (lake / LAKE_MANIFEST).is_file():
            raise refuse("holds a lake/ directory that is not a deepwatch lake")
    except OSError as exc:
        raise OutputError(f"cannot read the directory {out_dir}: {exc.strerror or exc}") from None
    check_bundle_target(out / "bundle")


def run_demo(out_dir: str | Path = "demo-out", log: Callable[[str], None] = print,
             visits: int = TRAIN_VISITS, test_visits: int = TEST_VISITS,
             epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the offline demo into ``out_dir``; returns what it measured."""
    import torch

    from .lake import read_rejects
    from .models.detector import Detector
    from .simulate import ATTACKS, simulate
    from .sinks import writable_dir
    from .train.api import train
    from .train.loop import torch_threads

    # Small networks on a shared CPU train many times faster on one thread than on several.
    os.environ.setdefault("DEEPWATCH_TORCH_THREADS", "1")
    torch.set_num_threads(torch_threads() or 1)
    check_demo_target(out_dir)
    out = writable_dir(out_dir, "--out")
    clock = _Clock(log)
    model = _model()
    started = time.perf_counter()

    t0 = time.perf_counter()
    day1, day2 = datetime(2024, 5, 14, tzinfo=UTC), datetime(2024, 5, 16, tzinfo=UTC)
    # an MLP cannot learn what it never saw: without the autoencoder, train on attacks too
    train_attacks = ATTACKS if model == "mlp" else ()
    train_paths = simulate(out / "traffic" / "train", visits=visits, attacks=train_attacks,
                           attack_share=ATTACK_SHARE, seed=seed + 1, start=day1)
    test_paths = simulate(out / "traffic" / "test", visits=test_visits, attacks=ATTACKS,
                          attack_share=ATTACK_SHARE, seed=seed + 2, start=day2)
    clock.step("simulate", t0, f"training day {sum(_count(p) for p in train_paths.values()):,} "
               f"lines, held-out day {sum(_count(p) for p in test_paths.values()):,} lines")

    t0 = time.perf_counter()
    lake = out / "lake"
    if lake.exists():
        import shutil

        shutil.rmtree(lake)
    records, rejects, chunks = _stream_into_lake(train_paths, lake)
    clock.step("stream into the lake", t0, f"{records:,} records in {chunks} chunks, "
               f"{rejects} rejects -> {lake}")

    t0 = time.perf_counter()
    bundle = out / "bundle"
    train(FORMAT, model, _training_inputs(lake, train_paths), bundle, epochs=epochs, seed=seed,
          target_fpr=TARGET_FPR, **_lake_kwargs(lake))
    clock.step(f"train {model}", t0, str(bundle))

    t0 = time.perf_counter()
    det = Detector(bundle)
    held = _held_out(test_paths)
    state = det.new_state()
    scored = pa.Table.from_batches([det.score_batch(b, state)
                                    for b in held.to_batches(max_chunksize=BATCH_ROWS)])
    seconds = time.perf_counter() - t0
    clock.step("score held-out day", t0, f"{held.num_rows:,} records, "
               f"{held.num_rows / max(seconds, 1e-9):,.0f} records/s ({det.engine})")

    t0 = time.perf_counter()
    import pyarrow.parquet as pq

    pq.write_table(scored, out / "scored.parquet", compression="zstd")
    n_alerts = _write_alerts(det, scored, out / "alerts.jsonl")
    labels = np.asarray(scored.column("label").to_pylist(), dtype=object)
    verdict = np.asarray(pc.equal(scored.column("verdict"), "malicious").to_numpy(
        zero_copy_only=False))
    per_label = _per_label(labels, verdict)
    order = "anomaly_score" if "anomaly_score" in scored.schema.names else "score"
    top = scored.filter(pc.equal(scored.column("verdict"), "malicious")).sort_by(
        [(order, "descending")]).slice(0, 25).to_pylist()
    reported = _full_report(out / "report.html", det, labels, verdict, scored, seconds)
    clock.step("write alerts and reports", t0, f"{n_alerts:,} alerts")
    total = time.perf_counter() - started
    clock.steps.append(("total", total))
    _summary_html(out / "summary.html", model, per_label, clock.steps, n_alerts, top)
    result = {"model": model, "per_label": per_label, "alerts": n_alerts,
              "timings": dict(clock.steps), "lake_rejects": _rows(read_rejects(lake))}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")

    log("")
    log(f"{'label':<12}{'records':>9}  verdict right")
    for lab, v in per_label.items():
        what = "kept normal" if lab == "normal" else "flagged"
        log(f"{lab:<12}{v['records']:>9,}  {100 * v['detected']:5.1f}% {what}")
    report = f", report -> {out / 'report.html'}" if reported else ""
    log(f"\n{n_alerts:,} alerts -> {out / 'alerts.jsonl'}; summary -> {out / 'summary.html'}"
        f"{report}; total {total:.1f}s")
    return result


def _count(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))


def _rows(table: pa.Table | None) -> int:
    return 0 if table is None else table.num_rows


def _lake_kwargs(lake: Path) -> dict[str, Any]:
    """Train from the lake where ``train`` reads lakes; else from the same files."""
    import inspect

    from .train.api import train

    return {"lakes": [str(lake)]} if "lakes" in inspect.signature(train).parameters else {}


def _training_inputs(lake: Path, paths: dict[str, Path]) -> list[str]:
    if _lake_kwargs(lake):
        return []
    return [f"{p}={label}" for label, p in paths.items()]
