"""The HTML report: sampling for the t-SNE map, the figures' numbers, and the page in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import need

from deepwatch.viz import figures
from deepwatch.viz.sample import LabelSample, balanced_pick


def _stream(labels: np.ndarray, cuts: list[int], per_label: int) -> tuple[np.ndarray, np.ndarray]:
    X = np.arange(len(labels), dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    sample = LabelSample(per_label=per_label, seed=7)
    for a, b in zip([0, *cuts], [*cuts, len(labels)], strict=True):
        sample.add(labels[a:b], X[a:b], a)
    return sample.result()


def test_label_sample_is_bounded_per_label_and_independent_of_batching() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array(["normal", "smurf", "neptune", "perl"]), size=5000,
                        p=[0.5, 0.3, 0.199, 0.001])
    rows, X = _stream(labels, [1000, 1001, 3333], per_label=200)
    rows2, _ = _stream(labels, [2500], per_label=200)
    assert np.array_equal(rows, rows2)  # the same sample however the stream is cut
    assert np.all(np.diff(rows) > 0)
    assert np.array_equal(X[:, 0], rows)  # feature rows travel with their record numbers
    kept = dict(zip(*np.unique(labels[rows], return_counts=True), strict=True))
    total = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    assert kept == {k: min(200, v) for k, v in total.items()}


def test_label_sample_stays_bounded_whatever_the_number_of_labels() -> None:
    # Bounded only per label (3,000 each, as evaluate keeps it), a label per host kept the
    # features of every record: 2,000 hosts of 10 records kept all 20,000.
    from deepwatch.viz.tsne import MAX_POINTS

    def sampled(labels: np.ndarray, size: int) -> np.ndarray:
        X = np.zeros((len(labels), 4), np.float32)
        sample = LabelSample(per_label=3000, seed=1)
        for a in range(0, len(labels), size):
            sample.add(labels[a:a + size], X[a:a + size], a)
        return sample.result()[0]

    rng = np.random.default_rng(3)
    for hosts in (2000, 5000):  # fewer labels than the map has points, and more
        labels = rng.permutation(np.array([f"host{i % hosts}" for i in range(20_000)]
                                          + ["normal"] * 5000, dtype=object))
        rows = {size: sampled(labels, size) for size in (4096, 1000, len(labels))}
        assert len(rows[4096]) <= MAX_POINTS
        assert "normal" in set(labels[rows[4096]])  # the most common label keeps its place
        # the same rows however the stream is cut: with more labels than points, ranked by
        # the counts seen so far, a label cut early kept only its later rows (642 differed)
        assert np.array_equal(rows[4096], rows[len(labels)]), hosts
        assert np.array_equal(rows[1000], rows[len(labels)]), hosts


def test_label_sample_keeps_what_the_map_draws() -> None:
    # bounded in all, the sample still holds every row the map's balanced pick would take
    # from all the records: rare types whole, the common ones at one level
    labels = np.array(["a"] * 9000 + ["b"] * 9000 + ["c"] * 3000 + ["perl"] * 5 + ["nmap"] * 40,
                      dtype=object)
    labels = np.random.default_rng(5).permutation(labels)
    rows, _ = _stream(labels, [1000, 1001, 7777, 15000], per_label=3000)
    rows2, _ = _stream(labels, [20000], per_label=3000)
    assert np.array_equal(rows, rows2)  # the same sample however the stream is cut
    kept = dict(zip(*np.unique(labels[rows], return_counts=True), strict=True))
    full = dict(zip(*np.unique(labels[balanced_pick(labels, 3000)], return_counts=True),
                    strict=True))
    assert kept == full == {"a": 985, "b": 985, "c": 985, "perl": 5, "nmap": 40}


def test_balanced_pick_keeps_rare_types_and_respects_the_cap() -> None:
    labels = np.array(["smurf"] * 9000 + ["normal"] * 3000 + ["perl"] * 3 + ["nmap"] * 40)
    pick = balanced_pick(labels, 500, seed=1)
    assert len(pick) == 500 and len(set(pick.tolist())) == 500
    got = dict(zip(*np.unique(labels[pick], return_counts=True), strict=True))
    assert got["perl"] == 3 and got["nmap"] == 40
    assert abs(got["smurf"] - got["normal"]) <= 1
    assert np.array_equal(balanced_pick(labels[:10], 500), np.arange(10))


def test_sankey_flows_count_every_record_once() -> None:
    labels = np.array(["normal"] * 5 + ["smurf"] * 4 + ["perl"] * 2)
    verdict = np.array([False, False, False, False, True, True, True, True, True, False, False])
    fig = figures.sankey(labels, verdict)
    node = list(fig.data[0].node.label)
    link = fig.data[0].link
    flows = {(node[s], node[t]): v for s, t, v in zip(link.source, link.target, link.value,
                                                       strict=True)}
    assert flows == {("normal (5)", "verdict: normal"): 4,
                     ("normal (5)", "verdict: malicious"): 1,
                     ("smurf (4)", "verdict: malicious"): 4,
                     ("perl (2)", "verdict: normal"): 2}
    colours = dict(zip(zip(link.source, link.target, strict=True), link.color, strict=True))
    assert colours[(node.index("perl (2)"), node.index("verdict: normal"))] == figures.WRONG
    assert colours[(node.index("smurf (4)"), node.index("verdict: malicious"))] == figures.RIGHT
    # verdicts given as words draw the same flows
    words = figures.sankey(labels, np.where(verdict, "malicious", "normal"))
    assert list(words.data[0].link.value) == list(link.value)


def test_page_without_a_feature_sample_says_so_and_escapes_names() -> None:
    from deepwatch.viz.report import render

    labels = np.array(["normal"] * 6 + ["<script>x</script>"] * 4, dtype=object)
    verdict = np.array([False] * 5 + [True] * 5)
    result = {"n": 10, "binary": {"precision": 0.8, "recall": 1.0, "f1": 0.889,
                                  "threshold": 0.5},
              "kdd_cost": None, "categories": None, "confusion": None,
              "per_label": {"normal": {"support": 6, "detection_rate": 5 / 6},
                            "<script>x</script>": {"support": 4, "detection_rate": 1.0}},
              "rows_per_second": 100.0}
    page = render(result, {"label": labels, "score": verdict * 0.9, "verdict": verdict},
                  title="a <b>title</b>")
    assert "No feature sample was collected" in page
    assert "<h1><bdi>a &lt;b&gt;title&lt;/b&gt;</bdi></h1>" in page
    assert "<td>&lt;script&gt;x&lt;/script&gt;</td><td>4</td><td>100.00%</td>" in page
    assert 'id="plot-categories"' not in page and 'id="plot-sankey"' in page
    # a label cannot close the page's scripts early (plotly escapes it in the figure JSON)
    assert page.count("<script") == page.count("</script>")


def test_short_is_isolate_on_the_cut_name() -> None:
    # (short repeated isolate's lines; it now calls it: the text it gives is as before)
    assert figures.short("x" * 60) == "x" * 47 + "\u2026"  # an ASCII name: no isolate
    assert figures.short("<b>" + "x" * 60) == "&lt;b&gt;" + "x" * 44 + "\u2026"
    assert figures.short("\u202eabc") == "\u2068&lt;U+202E&gt;abc\u2069"
    assert (figures.short("\u202e" + "y" * 60)
            == "\u2068&lt;U+202E&gt;" + "y" * 39 + "\u2026\u2069")  # the cut counts what is drawn
    assert figures.short("ok") == figures.isolate("ok") == "ok"


def test_characters_drawn_as_nothing_are_written_visibly() -> None:
    # "normal\u200b" was drawn as "normal": a second row "normal" of the attacker's records
    # (0% detected), a second "normal" node in the Sankey, with red flows
    from deepwatch.viz.report import render

    hidden = ["\u200b", "\u200d", "\u2060", "\ufeff", "\xad", "\x01", "\x9b", "\u2028", "\u200e",
              "\u202e", "\u2069", "\ufe0f", "\U000e0041", "\u3164"]
    for c in hidden:
        assert figures.visible(f"a{c}b") == f"a<U+{ord(c):04X}>b"
        drawn = f"a&lt;U+{ord(c):04X}&gt;b"
        assert figures.isolate(f"a{c}b") == (drawn if c.isascii() else f"\u2068{drawn}\u2069")
    shown = "caf\u00e9 \u0627\u0644 \U0001f600 <b>"  # letters, an emoji, markup: as they are
    assert figures.visible(shown) == shown
    labels = np.array(["normal"] * 3 + ["normal\u200b"] * 3, dtype=object)
    verdict = np.array([False] * 6)
    result = {"n": 6, "binary": {"threshold": 0.5}, "kdd_cost": None, "categories": None,
              "confusion": None, "rows_per_second": 1.0,
              "per_label": {"normal": {"support": 3, "detection_rate": 1.0},
                            "normal\u200b": {"support": 3, "detection_rate": 0.0}},
              "bundle": {"kind": "mlp", "engine": "onnx", "path": "/m/\ufeffb"}}
    page = render(result, {"label": labels, "score": verdict * 0.9, "verdict": verdict},
                  title="report: /m/\ufeffb", progress=False)
    assert "<td>normal&lt;U+200B&gt;</td><td>3</td><td>0.00%</td>" in page
    assert "<h1><bdi>report: /m/&lt;U+FEFF&gt;b</bdi></h1>" in page
    assert "<title>\u2068report: /m/&lt;U+FEFF&gt;b\u2069</title>" in page
    assert "from <bdi>/m/&lt;U+FEFF&gt;b</bdi>" in page
    assert "\u200b" not in page and "\ufeff" not in page


def test_the_title_and_the_bundle_note_are_isolated() -> None:
    # A title holds a bundle's path (the user's text): an override in it was written bare, in
    # <h1> and in <title>, where a browser draws its own text after it (" - Chromium").
    from deepwatch.viz.report import render

    labels = np.array(["normal"] * 3 + ["smurf"] * 3, dtype=object)
    verdict = np.array([False, False, True, True, True, True])
    result = {"n": 6, "binary": {"threshold": 0.5}, "kdd_cost": None, "categories": None,
              "confusion": None, "per_label": {}, "rows_per_second": 1.0,
              "bundle": {"kind": "mlp\u05d0", "engine": "onnx", "path": "/m/\u202ex<b>"}}
    page = render(result, {"label": labels, "score": verdict * 0.9, "verdict": verdict},
                  title="deepwatch report: /m/\u05d0x<b>", progress=False)
    assert "<h1><bdi>deepwatch report: /m/\u05d0x&lt;b&gt;</bdi></h1>" in page
    assert "<title>\u2068deepwatch report: /m/\u05d0x&lt;b&gt;\u2069</title>" in page
    # (an override is written visibly: it reorders nothing)
    assert (" · model <bdi>mlp\u05d0</bdi> (<bdi>onnx</bdi>) from "
            "<bdi>/m/&lt;U+202E&gt;x&lt;b&gt;</bdi>") in page
    plain = render(result, {"label": labels, "score": verdict * 0.9, "verdict": verdict},
                   title="deepwatch report: /m/b", progress=False)
    assert "<title>deepwatch report: /m/b</title>" in plain  # plain ASCII: as it is


def test_a_sample_too_small_for_a_map_says_so() -> None:
    # four records said "No feature sample was collected", which was not what happened
    from deepwatch.viz.report import render

    labels = np.array(["normal", "normal", "sqli", "sqli"], dtype=object)
    verdict = np.array([False, True, True, True])
    result = {"n": 4, "binary": {"precision": 0.667, "recall": 1.0, "f1": 0.8, "threshold": 0.5},
              "kdd_cost": None, "categories": None, "confusion": None,
              "per_label": {"normal": {"support": 2, "detection_rate": 0.5},
                            "sqli": {"support": 2, "detection_rate": 1.0}},
              "rows_per_second": 100.0}
    cols = {"label": labels, "score": verdict * 0.9, "verdict": verdict,
            "_sample_rows": np.arange(4), "_sample_X": np.ones((4, 3), np.float32)}
    page = render(result, cols, title="tiny")
    assert "No feature sample was collected" not in page
    assert "4 records: too few for a map (it needs 5)" in page
    assert 'id="plot-tsne"' not in page


# ---- the page, end to end -------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_page(kdd_bundle: Path, small_kdd_test: Path, tmp_path_factory: pytest.TempPathFactory,
                ) -> tuple[Path, dict]:
    """``deepwatch evaluate --report`` on 10k KDD test records (a 600-point map, to stay fast)."""
    import json

    from deepwatch import cli
    from deepwatch.viz import report

    out = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "MAX_POINTS", 600)
    try:
        rc = cli.main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json",
                       str(out / "eval.json"), "--report", str(out / "report.html"),
                       str(small_kdd_test)])
    finally:
        mp.undo()
    assert rc == 0
    return out / "report.html", json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_report_page_is_self_contained_and_carries_the_numbers(report_page: tuple[Path, dict]
                                                               ) -> None:
    page, result = report_page
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # plotly.js is inlined (its own code mentions URLs); nothing else is loaded from elsewhere
    head, _, rest = text.partition('<script type="text/javascript">')
    assert "Plotly" in rest.partition("</script>")[0]
    outside = head + rest.partition("</script>")[2]
    assert not re.search(r"<script[^>]+src=", outside)
    assert not re.search(r"""(src|href)=["']https?://""", outside)
    for div in ("plot-sankey", "plot-categories", "plot-confusion", "plot-per-label",
                "plot-score-histogram", "plot-tsne"):
        assert f'id="{div}"' in text
    # a policy lets only the page's own scripts run (plotly.js and one per figure, by their
    # SHA-256) and fetch nothing; plotly's inline styles may be applied
    policy = _policy(text)
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", text, re.DOTALL)
    assert len(scripts) == 7
    assert policy["script-src"] == sorted(_sha256(s) for s in scripts)
    assert policy["default-src"] == policy["base-uri"] == policy["form-action"] == ["'none'"]
    assert policy["style-src"] == ["'unsafe-inline'"] and policy["img-src"] == ["data:", "blob:"]
    assert set(policy) == {"default-src", "script-src", "style-src", "img-src", "base-uri",
                           "form-action"}
    assert f"{result['n']:,}" in text
    assert f"{result['binary']['precision']:.4f}" in text
    assert f"{result['kdd_cost']:.4f}" in text
    smurf = result["per_label"]["smurf"]
    assert f"<td>smurf</td><td>{smurf['support']:,}</td>" in text


def _sha256(script: str) -> str:
    import base64
    import hashlib

    return f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"


def _policy(page: str) -> dict[str, list[str]]:
    """The page's Content-Security-Policy (its ``<meta>``, before any script), by directive."""
    import html

    m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page)
    assert m and m.start() < page.index("<script"), page[:500]
    return {d.split()[0]: d.split()[1:] for d in html.unescape(m.group(1)).split("; ")}


#: Markup that, were it ever to reach the report (it draws labels, a bundle's path), would run.
INJECTED = ("<img src=x onerror=\"document.title='pwned by onerror'\">"
            "<script>document.title='pwned by script'</script>")


@pytest.mark.slow
@pytest.mark.integration
def test_markup_in_the_report_does_not_run_under_its_policy(report_page: tuple[Path, dict],
                                                            tmp_path: Path) -> None:
    # The report had no Content-Security-Policy (the dashboard has one): any markup that got
    # into it would have run. Chromium, on the page with INJECTED added: the figures are
    # drawn, the injected handler and script are refused (and said so on the console).
    browser = _chromium()
    need(browser is not None, "chromium (apt-get install -y chromium)")
    assert browser is not None
    page, _ = report_page
    text = page.read_text()
    bad = tmp_path / "injected.html"
    bad.write_text(text.replace('<section id="summary">', INJECTED + '<section id="summary">'))
    run = _headless(browser, "--dump-dom", bad.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pwned" not in run.stdout.partition("</title>")[0], run.stdout[:500]
    refused = re.findall(r'"(Executing inline [a-z ]+?|Loading the image)(?: \'[^\']*\')? '
                         r"violates the following Content Security Policy", run.stderr)
    assert sorted(refused) == ["Executing inline event handler", "Executing inline script",
                               "Loading the image"], run.stderr[-3000:]
    assert re.search(r'<div id="plot-sankey" class="[^"]*js-plotly-plot', run.stdout)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a page: its console (a policy's refusals among it) on stderr."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", *args],
            capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.integration
def test_report_renders_in_headless_chromium(report_page: tuple[Path, dict], tmp_path: Path
                                             ) -> None:
    browser = _chromium()
    need(browser is not None, "chromium (apt-get install -y chromium)")
    assert browser is not None
    page, result = report_page
    run = _headless(browser, "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    # under the page's Content-Security-Policy, which refused nothing of its own
    assert 'http-equiv="Content-Security-Policy"' in dom
    assert "Content Security Policy" not in run.stderr, run.stderr[-3000:]
    # every figure was drawn by plotly.js, not just declared
    for div in ("plot-sankey", "plot-categories", "plot-confusion", "plot-per-label",
                "plot-score-histogram", "plot-tsne"):
        m = re.search(rf'<div id="{div}" class="([^"]*)"', dom)
        assert m and "js-plotly-plot" in m.group(1), f"{div} was not rendered"
    # the Sankey: one node per true type plus the two verdicts
    n_types = len(result["per_label"])
    assert dom.count('class="sankey-node"') == n_types + 2
    assert dom.count('class="sankey-link"') >= n_types
    # the t-SNE map: hundreds of drawn points
    tsne = dom[dom.index('id="plot-tsne"'):]
    assert len(re.findall(r'<path class="point', tsne)) >= 300
    # the confusion heatmap shows its counts
    assert "predicted category" in dom
    shot = tmp_path / "report.png"
    run = _headless(browser, "--window-size=1200,3000", "--hide-scrollbars",
                    f"--screenshot={shot}", page.as_uri())
    assert run.returncode == 0 and shot.stat().st_size > 50_000


def _report_dom(bundle: Path, data: Path, tmp_path: Path) -> str:
    """``deepwatch report`` of ``data`` (KDD) run as a user runs it, and the page's DOM as
    headless Chromium renders it."""
    import sys

    browser = _chromium()
    need(browser is not None, "chromium (apt-get install -y chromium)")
    assert browser is not None
    page = tmp_path / "report.html"
    run = subprocess.run([sys.executable, "-m", "deepwatch", "report", str(bundle),
                          "--format", "kdd", "--out", str(page), str(data)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "t-SNE" not in run.stderr  # stderr is no terminal: no spinner (as no bar)
    shown = _headless(browser, "--dump-dom", page.as_uri())
    assert shown.returncode == 0, shown.stderr[-2000:]
    return shown.stdout


def _write_many_types(path: Path, src: Path, types: int) -> int:
    """``types`` attack labels of one record each (every other one 200 characters long), then
    100 ``normal`` records; returns how many records."""
    rows = [line.rsplit(",", 1)[0] for line in src.read_text().splitlines()]
    out = [f"{rows[i % len(rows)]},attack_{i:05d}_{'x' * (200 if i % 2 else 0)}."
           for i in range(types)]
    out += [f"{rows[i]},normal." for i in range(100)]
    path.write_text("\n".join(out) + "\n")
    return len(out)


@pytest.mark.integration
def test_a_report_on_thousands_of_types_stays_bounded_in_chromium(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    # One Sankey node, one bar and one legend entry per type made a page 100,000 px tall for
    # a label per host; and the t-SNE sample, rationed in name order, left "normal" out.
    MAX_TYPES = 30  # figures.MAX_TYPES: types a figure draws one by one
    data = tmp_path / "many.kdd"
    n = _write_many_types(data, small_kdd_test, 3100)
    dom = _report_dom(kdd_bundle, data, tmp_path)
    sankey = dom[dom.index('id="plot-sankey"'):dom.index('id="plot-categories"')]
    assert sankey.count('class="sankey-node"') == MAX_TYPES + 2
    # every record is in one flow: the nodes' counts add up to the records scored
    nodes = re.findall(r'class="node-label"[^>]*>([^<]*) \(([\d,]+)\)</text>', sankey)
    assert len(nodes) == MAX_TYPES
    assert sum(int(c.replace(",", "")) for _, c in nodes) == n
    assert (f"{3100 - MAX_TYPES + 2:,} other types", f"{3100 - MAX_TYPES + 2:,}") in nodes
    assert all(len(name) <= 48 for name, _ in nodes)
    # no figure taller than a few screens
    heights = [int(h) for h in re.findall(r'<svg class="main-svg"[^>]* height="(\d+)"', dom)]
    assert heights and max(heights) <= 1000, heights
    tsne = dom[dom.index('id="plot-tsne"'):]
    assert tsne.count('class="traces"') == MAX_TYPES
    assert "normal (1)" in tsne  # "normal" is on the map (a slot for each of 3,000 types)
    table = dom[dom.index('id="labels-table"'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 200


@pytest.mark.integration
def test_categories_without_records_show_no_detection_rate(kdd_bundle: Path,
                                                           small_kdd_test: Path,
                                                           tmp_path: Path) -> None:
    # Normal traffic only: the page said probe, dos, u2r and r2l were each detected 0.00%
    # of the time, with an empty bar each, as if every one had been missed.
    data = tmp_path / "normal.kdd"
    normal = [line for line in small_kdd_test.read_text().splitlines()
              if line.endswith(",normal.")]
    data.write_text("\n".join(normal[:60]) + "\n")
    dom = _report_dom(kdd_bundle, data, tmp_path)
    table = dom[dom.index('id="categories-table"'):]
    table = table[:table.index("</table>")]
    for category in ("probe", "dos", "u2r", "r2l"):
        assert f"<td>{category}</td><td>0</td><td>–</td>" in table
    assert re.search(r"<td>normal</td><td>60</td><td>\d+\.\d\d%</td>", table)
    bars = dom[dom.index('id="plot-categories"'):dom.index('id="plot-confusion"')]
    ticks = re.findall(r'<g class="ytick">.*?<text[^>]*>([^<]*)</text>', bars)
    assert ticks == ["normal"]


@pytest.mark.integration
def test_a_label_holding_markup_is_drawn_as_text_not_as_a_link(kdd_bundle: Path,
                                                               small_kdd_test: Path,
                                                               tmp_path: Path) -> None:
    # plotly draws figure text as a subset of HTML: a label '<a href="...">click</a>' (the
    # data's text, an attacker's where labels come from a file name or a feed) became a real
    # link in the Sankey, the bars and the legend.
    label = '<a href="https://example.com/x">click</a><b>bold</b>'
    lines = small_kdd_test.read_text().splitlines()[:80]
    data = tmp_path / "markup.kdd"
    # and a label "normal" but for a zero-width space, drawn as "normal" (a second row and node
    # "normal", its records missed attacks) before it was written visibly
    labels = {0: label, 1: "normal\u200b"}
    data.write_text("\n".join(line.rsplit(",", 1)[0] + f",{labels[i % 4]}." if i % 4 in labels
                              else line for i, line in enumerate(lines)) + "\n")
    # the bundle's path, in the title and the note, holds an override: written visibly,
    # isolated
    bundle = tmp_path / "\u202eb<i>"
    bundle.symlink_to(kdd_bundle, target_is_directory=True)
    dom = _report_dom(bundle, data, tmp_path)
    assert f"<h1><bdi>deepwatch report: {tmp_path}/&lt;U+202E&gt;b&lt;i&gt;</bdi></h1>" in dom
    assert (f"<title>\u2068deepwatch report: {tmp_path}/&lt;U+202E&gt;b&lt;i&gt;\u2069</title>"
            in dom)
    assert re.search(r"from <bdi>[^<]*&lt;U\+202E&gt;b&lt;i&gt;</bdi></p>", dom)
    assert "\u200b" not in dom and "\u202e" not in dom
    assert re.search(r"<td>normal&lt;U\+200B&gt;</td><td>20</td>", dom)
    nodes = re.findall(r'class="node-label"[^>]*>([^<]*)</text>', dom)
    assert "\u2068normal&lt;U+200B&gt;\u2069 (20)" in nodes, nodes
    figures = dom[dom.index('id="plot-sankey"'):]
    assert "example.com" in figures  # the label is drawn...
    assert not re.search(r"<a [^>]*href=\"https://example\.com", figures)  # ...not as a link
    assert "font-weight: bold" not in figures and "<b>" not in figures
    assert "&lt;a href=" in figures  # its characters shown as they are


@pytest.mark.parametrize("command", ["report", "evaluate"])
def test_an_output_where_no_file_can_be_made_fails_before_the_work(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    # /proc passes the permission check (root may write anywhere, by the bits): the report
    # failed at the last write, after the scoring and the t-SNE map (evaluate --report too)
    from deepwatch import cli

    data = tmp_path / "in.kdd"
    data.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:300]))
    flag, args = {"report": ("--out", ["--out", "/proc/x.html"]),
                  "evaluate": ("--report", ["--json", str(tmp_path / "e.json"),
                                            "--report", "/proc/x.html"])}[command]
    rc = cli.main([command, str(kdd_bundle), "--format", "kdd", *args, str(data)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.splitlines() == [f"error: cannot write {flag} /proc/x.html: no file can be made "
                                "in /proc (No such file or directory)"], err
    assert not (tmp_path / "e.json").exists()


def _pty_run(cmd: list[str], until: str, sig: int, within: float = 180
             ) -> tuple[int, str, bool]:
    """Run ``cmd`` with its stderr on a terminal (a pseudo-terminal, as a user's shell gives
    it); once ``until`` shows there, send ``sig``. The exit status, what the terminal got (escape
    sequences removed) and whether ``until`` showed."""
    import os
    import pty
    import select
    import sys
    import time

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "DEEPWATCH_PROGRESS"}
    env.update(TERM="xterm", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch", *cmd], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    got, seen = b"", False
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child has closed its end
                    break
                if not chunk:
                    break
                got += chunk
                if not seen and until.encode() in got:
                    seen = True
                    proc.send_signal(sig)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", got.decode(errors="replace"))
    return code, text, seen


@pytest.mark.slow
def test_the_tsne_step_shows_a_spinner_and_stops_on_sigterm(kdd_bundle: Path,
                                                            small_kdd_test: Path,
                                                            tmp_path: Path) -> None:
    # The t-SNE map (seconds to minutes) showed nothing on a terminal; SIGTERM there ended the
    # process without a word (exit status -15) instead of "terminated" as other commands say.
    import signal

    out = tmp_path / "out"
    out.mkdir()
    page = out / "r.html"
    page.write_text("<html>an older report</html>\n")
    code, err, seen = _pty_run(["report", str(kdd_bundle), "--format", "kdd", "--out",
                                str(page), str(small_kdd_test)], "t-SNE map of ",
                               signal.SIGTERM)
    assert seen, err  # the spinner, on stderr, once the records are scored
    assert code == 143, err  # 128 + SIGTERM, as the other commands exit
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", err) if ln.strip()]
    assert lines[-1] == "terminated" and "Traceback" not in err, err
    assert page.read_text() == "<html>an older report</html>\n"
    assert sorted(p.name for p in out.iterdir()) == ["r.html"]  # no page half written beside
