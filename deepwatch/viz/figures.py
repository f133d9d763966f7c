"""plotly figures of an evaluation: Sankey of true type -> verdict, confusion matrix, detection
rates, score distributions and the t-SNE map. Each builder takes plain arrays and returns a figure.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._surrogates import shown
from ..evaluate.metrics import label_codes
from ..labels import BENIGN

RIGHT = "rgba(46, 139, 87, 0.45)"  # the verdict was right
WRONG = "rgba(214, 39, 40, 0.55)"  # a missed attack or a false alarm
VERDICT_COLOURS = {"normal": "#2e8b57", "malicious": "#d62728"}

#: Most true types a figure draws one by one (Sankey nodes, detection bars, t-SNE legend
#: entries); the rarest beyond them are drawn together as one "other types". Data with a
#: label per host or per campaign has thousands: one node each made a Sankey 100,000 px tall.
MAX_TYPES = 30
#: Longest label text a figure draws; a longer one is cut (the whole text is in the hover).
#: A 200-character label as an axis tick took the plot's whole width.
MAX_NAME = 48


#: Characters a page would draw as nothing: C0 and C1 controls, the line and paragraph
#: separators, and Unicode's default-ignorable code points (zero-width space, non-joiner and
#: joiner, word joiner, soft hyphen, the bidirectional controls, variation selectors, the tag
#: characters, the Hangul fillers, ...). ``normal\u200b`` was drawn as ``normal``: a label,
#: a URL or a user agent that differs by one looked the same as the other, in a row of its own.
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5"
                     "\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164"
                     "\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
                     "\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
                     # lone surrogates: no character, and UTF-8 has no bytes for them (see
                     # visible)
                     "\ud800-\udfff]")


def visible(text: str) -> str:
    """``text`` with each character a page would draw as nothing (:data:`_HIDDEN`) written as
    ``<U+XXXX>``, as the dashboard writes them: two texts that differ look different.

    A lone surrogate U+DC80..U+DCFF is a byte that is not UTF-8 kept by Python's
    ``surrogateescape`` (a path of such bytes, ``os.fsdecode``): it is written ``\\xHH``, as
    the formats write such bytes of the data; another lone surrogate ``<U+XXXX>``. Left as
    they were, the page could not be encoded: ``deepwatch report`` on a bundle in a directory
    named in Latin-1 ended in a traceback (UnicodeEncodeError) after all its work."""
    return _HIDDEN.sub(lambda m: shown(m.group()), text)


def _as_text(name: str) -> str:
    """``name`` with plotly's markup characters written as entities: plotly draws text as a
    subset of HTML (``<a href>``, ``<b>``, ``<br>``, ``<span style>``), so a label
    ``<a href="https://...">`` was drawn as a link an analyst could click. The entities show
    the characters as they are; a character drawn as nothing is written visibly
    (:func:`visible`)."""
    return visible(name).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def isolate(name: str, ascii_source: bool | None = None) -> str:
    """``name`` as figure text: a bidirectional isolate (FSI ... PDI) where it is not plain
    ASCII, and plotly's markup characters as entities (:func:`_as_text`). ``ascii_source``:
    whether the text ``name`` was made from is plain ASCII (default: whether ``name`` is), for a
    cut name whose ellipsis alone is not ASCII.

    A label is the data's text, and figures draw it beside other text (``name (count)``, ``name:
    rate``): an override (U+202E) in it, or right-to-left letters, would reorder that text too.
    The PDI also ends an override left open in the name."""
    text = _as_text(name)
    plain = name.isascii() if ascii_source is None else ascii_source
    return text if plain else f"\u2068{text}\u2069"


def short(name: str, limit: int = MAX_NAME) -> str:
    """``name`` cut to ``limit`` characters, an ellipsis marking the cut, as figure text as
    :func:`isolate` makes it (the cut comes after :func:`visible` and before the entities, so
    it bounds what is drawn and cuts no entity in half)."""
    shown = visible(name)
    cut = shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"
    return isolate(cut, ascii_source=name.isascii())


def others_name(types: int) -> str:
    """What the types beyond :data:`MAX_TYPES` are called, taken together."""
    return f"{types:,} other types"


def bounded_rates(rates: dict[str, dict[str, Any]], limit: int = MAX_TYPES
                  ) -> list[tuple[str, dict[str, Any]]]:
    """``rates`` (in the order given) as at most ``limit`` rows: the first ``limit - 1`` as
    they are, the rest pooled into one row (their records summed, detection rate over all of
    them)."""
    items = list(rates.items())
    if len(items) <= limit:
        return items
    rest = [r for _, r in items[limit - 1:]]
    support = sum(int(r["support"]) for r in rest)
    hits = sum(float(r["detection_rate"]) * int(r["support"]) for r in rest)
    pooled = {"support": support, "detection_rate": hits / support if support else 0.0}
    return [*items[: limit - 1], (others_name(len(rest)), pooled)]


def verdict_names(verdict: np.ndarray) -> np.ndarray:
    """Verdicts as the words ``normal``/``malicious`` whether given as booleans or words."""
    v = np.asarray(verdict)
    if v.dtype == bool:
        return np.where(v, "malicious", "normal")
    return v.astype(str)


def label_order(labels: np.ndarray) -> list[str]:
    """``normal`` first, then attack types by descending count; each label by its exact text."""
    names, codes = label_codes(labels)
    counts = np.bincount(codes, minlength=len(names))
    order = sorted(zip(names, counts.tolist(), strict=True),
                   key=lambda t: (t[0] != BENIGN, -t[1], t[0]))
    return [u for u, _ in order]


def sankey(labels: np.ndarray, verdict: np.ndarray) -> Any:
    """True type (left) -> verdict (right); a flow's width is its number of records."""
    import plotly.graph_objects as go

    verdicts = verdict_names(verdict)
    order = label_order(labels)
    # at most MAX_TYPES nodes on the left: the rarest types beyond them share the last one
    # (never "normal": label_order puts it first)
    shown = order if len(order) <= MAX_TYPES else order[: MAX_TYPES - 1]
    types = shown + ([others_name(len(order) - len(shown))] if len(shown) < len(order) else [])
    type_index = {t: min(i, len(types) - 1) for i, t in enumerate(order)}
    names, codes = label_codes(labels)
    row = np.array([type_index[u] for u in names], dtype=np.int64)[codes]
    is_bad = (verdicts == "malicious").astype(np.int64)
    counts = np.bincount(row * 2 + is_bad, minlength=2 * len(types)).reshape(-1, 2)
    totals = counts.sum(axis=1)
    src, dst, val, colour, text = [], [], [], [], []
    for i, lab in enumerate(types):
        for j, ver in enumerate(("normal", "malicious")):
            if counts[i, j] == 0:
                continue
            src.append(i)
            dst.append(len(types) + j)
            val.append(int(counts[i, j]))
            right = (i < len(shown) and lab == BENIGN) == (ver == "normal")
            colour.append(RIGHT if right else WRONG)
            text.append(f"{counts[i, j] / totals[i]:.2%} of {short(lab)}")
    node_labels = [f"{short(t)} ({n:,})" for t, n in zip(types, totals.tolist(), strict=True)]
    node_labels += ["verdict: normal", "verdict: malicious"]
    node_colours = ["#7f7f7f"] * len(types) + [VERDICT_COLOURS["normal"],
                                               VERDICT_COLOURS["malicious"]]
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": node_labels, "color": node_colours, "pad": 6, "thickness": 16},
        link={"source": src, "target": dst, "value": val, "color": colour,
              "customdata": text,
              "hovertemplate": "%{source.label} → %{target.label}<br>%{value:,} records "
                               "(%{customdata})<extra></extra>"},
    ))
    fig.update_layout(height=max(420, 22 * len(types)), margin={"l": 10, "r": 10, "t": 10,
                                                                 "b": 10})
    return fig


def confusion(labels: list[str], matrix: list[list[int]]) -> Any:
    """The category confusion matrix; colour is the share of the true row, text the count."""
    import plotly.graph_objects as go

    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = go.Figure(go.Heatmap(
        z=share, x=[isolate(x) for x in labels], y=[isolate(y) for y in labels],
        colorscale="Blues", zmin=0, zmax=1,
        text=[[f"{int(v):,}" for v in row] for row in m], texttemplate="%{text}",
        hovertemplate="true %{y}, predicted %{x}: %{text} (%{z:.1%} of the row)<extra></extra>",
        colorbar={"title": {"text": "share of true"}},
    ))
    fig.update_layout(xaxis_title="predicted category", yaxis_title="true category",
                      yaxis_autorange="reversed", height=420,
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def detection_bars(rates: dict[str, dict[str, Any]], what: str) -> Any:
    """Horizontal bars of detection rate per category or label, with the support on hover.
    One without records has no bar: an empty bar read as "none of them detected"."""
    import plotly.graph_objects as go

    rows = bounded_rates({name: r for name, r in rates.items() if r["support"]})
    rate = [float(r["detection_rate"]) for _, r in rows]
    # bars at positions 0..n-1, named by tick: two long names cut to the same text stay two bars
    fig = go.Figure(go.Bar(
        x=rate, y=list(range(len(rows))), orientation="h",
        customdata=[[int(r["support"]), short(name, 200)] for name, r in rows],
        marker_color=[VERDICT_COLOURS["normal"] if r >= 0.9 else
                      "#ff7f0e" if r >= 0.5 else VERDICT_COLOURS["malicious"] for r in rate],
        hovertemplate=f"%{{customdata[1]}}: %{{x:.2%}} of %{{customdata[0]:,}} {what}"
                      "<extra></extra>",
    ))
    fig.update_layout(xaxis={"range": [0, 1], "tickformat": ".0%", "title": "detection rate"},
                      yaxis={"autorange": "reversed", "tickmode": "array",
                             "tickvals": list(range(len(rows))),
                             "ticktext": [short(name) for name, _ in rows]},
                      height=max(260, 20 * len(rows) + 80),
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def score_histogram(labels: np.ndarray, score: np.ndarray, threshold: float | None) -> Any:
    """How scores of benign and attack records spread, with the decision threshold marked."""
    import plotly.graph_objects as go

    attack = np.asarray(labels, dtype=object) != BENIGN
    bins = np.linspace(0.0, 1.0, 51)
    fig = go.Figure()
    for name, mask, colour in (("normal", ~attack, VERDICT_COLOURS["normal"]),
                               ("attack", attack, VERDICT_COLOURS["malicious"])):
        counts, _ = np.histogram(np.clip(score[mask], 0.0, 1.0), bins=bins)
        fig.add_trace(go.Bar(x=(bins[:-1] + bins[1:]) / 2, y=counts, name=name, opacity=0.7,
                             marker_color=colour, width=0.02))
    if threshold is not None and 0.0 <= threshold <= 1.0:
        fig.add_vline(x=threshold, line_dash="dash", annotation_text="threshold")
    fig.update_layout(barmode="overlay", yaxis_type="log", xaxis_title="score",
                      yaxis_title="records", height=320,
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def tsne_scatter(xy: np.ndarray, labels: np.ndarray, verdict: np.ndarray) -> Any:
    """The t-SNE map: one colour per true type; a cross marks a record given the wrong verdict."""
    import plotly.graph_objects as go

    verdicts = verdict_names(verdict)
    wrong = (np.asarray(labels, dtype=object) == BENIGN) != (verdicts == "normal")
    names, codes = label_codes(labels)
    index = {name: i for i, name in enumerate(names)}
    order = label_order(labels)
    # one legend entry per type up to MAX_TYPES; the rarest beyond share the last trace
    groups = [(lab, codes == index[lab]) for lab in order[: MAX_TYPES - 1]]
    if len(order) > MAX_TYPES:
        rest = np.isin(codes, [index[lab] for lab in order[MAX_TYPES - 1:]])
        groups.append((others_name(len(order) - MAX_TYPES + 1), rest))
    elif len(order) == MAX_TYPES:
        groups.append((order[-1], codes == index[order[-1]]))
    point_names = np.array([short(name) for name in names], dtype=object)[codes]
    fig = go.Figure()
    for lab, m in groups:
        fig.add_trace(go.Scatter(
            x=xy[m, 0], y=xy[m, 1], mode="markers", name=f"{short(lab)} ({int(m.sum())})",
            marker={"size": 5, "symbol": np.where(wrong[m], "x", "circle").tolist()},
            customdata=np.stack([point_names[m], verdicts[m].astype(object)], axis=1),
            hovertemplate="%{customdata[0]}: verdict %{customdata[1]}<extra></extra>",
        ))
    fig.update_layout(height=560, xaxis={"visible": False}, yaxis={"visible": False},
                      legend={"title": {"text": "true type"}},
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig
