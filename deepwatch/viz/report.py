"""The evaluation report: one self-contained HTML page (plotly.js inlined, nothing fetched).

``write_report`` takes the ``evaluate`` result (the contract JSON plus ``records``/``bundle``) and
the per-record columns ``evaluate`` collected: ``label``, ``score``, ``verdict`` and, where the
model gives them, ``attack_type``/``category``; for the t-SNE map also ``_sample_rows`` (record
numbers) and ``_sample_X`` (their feature rows), a per-label sample taken while scoring.
"""

from __future__ import annotations

import html
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError, UsageError, check_flags, sigterm_stops_cleanly
from ..sinks import replace_file, writable_file
from . import figures
from .sample import balanced_pick
from .tsne import MAX_POINTS, tsne_map

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
td, th { border-bottom: 1px solid #ddd; padding: .25rem .8rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
td:first-child { max-width: 40rem; overflow-wrap: anywhere; }
.note { color: #666; font-size: .85rem; }
"""

_METRICS = (("records", "n"), ("precision", "precision"), ("recall", "recall"), ("F1", "f1"),
            ("accuracy", "accuracy"), ("ROC AUC", "roc_auc"), ("PR AUC", "pr_auc"),
            ("false-positive rate", "fpr"), ("threshold", "threshold"))


def _num(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):  # bool too
        return f"{v:,}"
    return f"{float(v):.2%}" if pct else f"{float(v):.4f}"


def _table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(figures.visible(c))}</td>" for c in r)
                   + "</tr>"
                   for r in rows)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _plot(fig: Any, div_id: str, scripts: list[str]) -> str:
    """The figure's ``<div>`` and the inline script that draws it (added to ``scripts``: the
    page's policy lets those run, see :func:`_policy`)."""
    import plotly.io as pio

    # an explicit height: a percentage would collapse inside the page's flow layout
    height = fig.layout.height or 450
    out: str = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"plot-{div_id}",
                           default_width="100%", default_height=f"{int(height)}px",
                           config={"displaylogo": False, "responsive": True})
    scripts += re.findall(r"<script\b[^>]*>(.*?)</script>", out, re.DOTALL)
    return out


def _summary(result: dict[str, Any]) -> str:
    from ..evaluate.run import undefined_rates

    b = result.get("binary") or {}
    # a rate with nothing to measure is no 0: recall 0.0000 on normal records alone read as
    # every attack missed
    missing = undefined_rates(b)
    rows = [[name, f"– ({missing[key]})" if key in missing else
             _num(result["n"] if key == "n" else b.get(key))] for name, key in _METRICS]
    if result.get("kdd_cost") is not None:
        rows.append(["KDD cost per record", _num(result["kdd_cost"])])
    rows.append(["rows per second", f"{float(result.get('rows_per_second') or 0):,.0f}"])
    rec = result.get("records")
    if rec:
        rows.append(["lines read / rejected", f"{rec['lines']:,} / {rec['rejected']:,}"])
    return _table(["metric (binary: every attack is positive)", "value"], rows, "metrics")


#: Most rows of the per-type table; the rarest types beyond are one row (every type and its
#: numbers are in ``evaluate --json``). A label per host made a table of 100,000 rows.
MAX_TABLE_ROWS = 200


def _rates_table(rates: dict[str, dict[str, Any]], table_id: str) -> str:
    # a category without records has no detection rate (the JSON's 0.0 is no measurement)
    rows = [[name, f"{int(r['support']):,}",
             _num(r["detection_rate"] if r["support"] else None, pct=True)]
            for name, r in figures.bounded_rates(rates, MAX_TABLE_ROWS)]
    return _table(["", "records", "detection rate"], rows, table_id)


@contextmanager
def _working(what: str, shown: bool) -> Iterator[None]:
    """A spinner with the time elapsed, on stderr, for a step that tells nothing of its
    progress (scikit-learn's t-SNE has no callback); where ``shown``, else nothing (as the
    other bars: only on a terminal, or under ``DEEPWATCH_PROGRESS=1``). It is gone once the step
    ends, however it ends."""
    if not shown:
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # stderr, as the other bars: stdout may carry a command's output
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True, console=Console(stderr=True)) as bar:
        bar.add_task(what, total=None)
        yield


def _tsne_section(cols: dict[str, np.ndarray], seed: int, scripts: list[str],
                  progress: bool = False) -> str:
    rows, X = cols.get("_sample_rows"), cols.get("_sample_X")
    if rows is None or X is None:
        return '<p class="note">No feature sample was collected, so no map was drawn.</p>'
    if len(rows) < 5:  # (a sample was collected: the records themselves are too few)
        return (f'<p class="note">{len(rows)} record{"" if len(rows) == 1 else "s"}: too few '
                "for a map (it needs 5), so none was drawn.</p>")
    labels = np.asarray(cols["label"], dtype=object)[rows]
    pick = balanced_pick(labels, MAX_POINTS, seed=seed)
    t0 = time.perf_counter()
    with _working(f"t-SNE map of {len(pick):,} records", progress):
        xy = tsne_map(np.asarray(X)[pick], seed=seed)
    took = time.perf_counter() - t0
    fig = figures.tsne_scatter(xy, labels[pick], np.asarray(cols["verdict"])[rows[pick]])
    return (f'<p class="note">{len(pick):,} records, sampled per true type (rare types '
            f"kept whole), mapped from the model's input features in {took:.1f}s; a cross marks "
            f"a wrong verdict.</p>" + _plot(fig, "tsne", scripts))


def render(result: dict[str, Any], cols: dict[str, np.ndarray], title: str, seed: int = 0,
           progress: bool | None = None) -> str:
    """The report page as a string. ``progress``: show a spinner on stderr while the t-SNE
    map is computed (default: where the other bars are shown, :func:`deepwatch.progress.enabled`).

    The title (it holds a bundle's path: the user's text) is a bidi isolate as figure text is:
    a ``<bdi>`` in the page, FSI ... PDI in ``<title>``, where no markup goes and a browser
    draws its own text after it (a window's title); so are the bundle's values in the note.
    There and in the tables, a character a page draws as nothing (a zero-width space, a
    control) is written ``<U+XXXX>`` (:func:`figures.visible`), as in the figures."""
    from plotly.offline import get_plotlyjs

    if progress is None:
        from ..progress import enabled

        progress = enabled()

    for need in ("label", "score", "verdict"):
        if need not in cols:
            raise UsageError(f"a report needs the per-record column {need!r}")
    labels = np.asarray(cols["label"], dtype=object)
    verdict = np.asarray(cols["verdict"])
    b = result.get("binary") or {}
    plotly_js = get_plotlyjs()
    scripts = [plotly_js]  # the page's own: plotly.js, then each figure's (see _plot)
    parts = [f"<h1><bdi>{html.escape(figures.visible(title))}</bdi></h1>",
             f'<p class="note">generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}'
             + _bundle_note(result) + "</p>",
             '<section id="summary"><h2>Metrics</h2>', _summary(result), "</section>",
             '<section id="flows"><h2>True type → verdict</h2><p class="note">Each flow is the '
             "records of one true type given one verdict; red flows are missed attacks or false "
             "alarms.</p>", _plot(figures.sankey(labels, verdict), "sankey", scripts),
             "</section>"]
    if result.get("categories"):
        parts += ['<section id="categories"><h2>Per category</h2><p class="note">Detection '
                  "rate: the share of the category's records given that category (not only "
                  "flagged: an attack named in the wrong category counts as missed here).</p>",
                  _rates_table(result["categories"], "categories-table"),
                  _plot(figures.detection_bars(result["categories"], "records"), "categories",
                        scripts),
                  "</section>"]
    if result.get("confusion"):
        c = result["confusion"]
        parts += ['<section id="confusion-matrix"><h2>Category confusion matrix</h2>',
                  _plot(figures.confusion(c["labels"], c["matrix"]), "confusion", scripts),
                  "</section>"]
    per_label = result.get("per_label") or {}
    if per_label:
        ordered = {k: per_label[k] for k in figures.label_order(labels) if k in per_label}
        ordered.update({k: v for k, v in per_label.items() if k not in ordered})
        parts += ['<section id="labels"><h2>Per true type</h2><p class="note">Detection rate: '
                  "the share of the type's records given the right verdict.</p>",
                  _rates_table(ordered, "labels-table"),
                  _plot(figures.detection_bars(ordered, "records"), "per-label", scripts),
                  "</section>"]
    parts += ['<section id="scores"><h2>Scores</h2>',
              _plot(figures.score_histogram(labels, np.asarray(cols["score"], dtype=np.float64),
                                            b.get("threshold")), "score-histogram", scripts),
              "</section>",
              '<section id="map"><h2>t-SNE map of the traffic</h2>',
              _tsne_section(cols, seed, scripts, progress),
              "</section>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_policy(scripts)}">'
            f"<title>{_isolated(title)}</title><style>{_STYLE}</style>"
            f'<script type="text/javascript">{plotly_js}</script></head>'
            f"<body>{''.join(parts)}</body></html>\n")


def _policy(scripts: list[str]) -> str:
    """The report's Content-Security-Policy (a ``<meta>``: the page is a file, no server sends
    it a header): the page's own inline ``scripts`` run, named by their SHA-256 (plotly.js and
    each figure's call), and no other does, not even one that markup in the data got into the
    page; it fetches nothing, from anywhere. Styles may be inline (plotly sets ``style``
    attributes as it draws: ``'unsafe-inline'``); images only ``data:`` and ``blob:`` (the mode
    bar's "download plot as a png")."""
    import base64
    import hashlib

    digests = {base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in scripts}
    hashes = " ".join(f"'sha256-{d}'" for d in sorted(digests)) or "'none'"
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
            "img-src data: blob:; base-uri 'none'; form-action 'none'")


def _isolated(text: str) -> str:
    """``text`` escaped for HTML, as an FSI ... PDI isolate where it is not plain ASCII (as
    :func:`figures.isolate` makes figure text), for where no ``<bdi>`` can go."""
    out = html.escape(figures.visible(text))
    return out if text.isascii() else f"\u2068{out}\u2069"


def _bundle_note(result: dict[str, Any]) -> str:
    bundle = result.get("bundle")
    if not bundle:
        return ""
    kind, engine, path = (f"<bdi>{html.escape(figures.visible(str(bundle.get(k))))}</bdi>"
                          for k in ("kind", "engine", "path"))
    return f" · model {kind} ({engine}) from {path}"


def writable_report(path: str | Path, what: str = "--out") -> Path:
    """``path`` checked as :func:`~deepwatch.sinks.writable_file` does, then by making (and
    removing) a file beside it, where the page is first written: permission bits do not tell
    everything (``/proc``, a read-only mount, a full directory of a quota), and a report that
    fails there fails after minutes of scoring and a t-SNE map. One clear error, before any
    work. A path that is no regular file (``/dev/stdout``) is written as it is: not probed."""
    import tempfile

    p = writable_file(path, what)
    if os.path.exists(p) and not os.path.isfile(p):
        return p
    real = Path(os.path.realpath(p))
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {p}: no file can be made in {real.parent} "
                          f"({exc.strerror or exc})") from None
    return p


def write_report(path: str | Path, result: dict[str, Any], cols: dict[str, np.ndarray],
                 title: str = "deepwatch report", progress: bool | None = None) -> Path:
    """Write the report page to ``path``; returns the path. SIGTERM while the page is made
    (the t-SNE map takes a while) or written stops it as Ctrl-C does (``terminated``), an older
    report at ``path`` kept whole and no temporary file left."""
    if progress is not None:
        check_flags(progress=progress)
    out = Path(path)
    with sigterm_stops_cleanly():
        page = render(result, cols, title, progress=progress)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            replace_file(out, page.encode("utf-8"))
        except OSError as exc:
            raise OutputError(f"cannot write the report to {out}: {exc.strerror or exc}"
                              ) from None
    return out
