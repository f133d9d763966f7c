"""Regressions from an audit of what an attacker's text in a web access log does to the outputs
an analyst or a SIEM reads (alerts on stdout and in files, scored rows, rejects).

- a raw control character in the ident or user (the user is the name a client sent for HTTP
  authentication) was accepted and carried into ``user.name``; servers escape such bytes, so it
  is now a reject with a reason, as in the client;
- raw control characters in the request, referer and user agent (a logger that does not escape:
  NGINX's ``escape=none``) were kept raw; JSON escapes C0, but DEL and the C1 controls (U+009B is
  CSI, ``ESC [`` to terminals that act on 8-bit controls) went out raw. They are now written as
  NGINX writes them, ``\\xHH``, and the record kept: it is evidence to alert on;
- ``deepwatch stream`` wrote alerts, verdicts and dead letters with U+2028/U+2029, DEL and C1 raw
  (``score`` escaped the line separators, the stream did not): a user agent holding U+2028 split
  an alert line in two for ``splitlines``, JavaScript and some shippers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_file, head_lines

ESC, BEL = "\x1b", "\x07"
SCANNER = "w3af.org"
#: What no JSONL output may hold raw: C0 controls but the line end, DEL, C1, U+2028/U+2029,
#: the bidirectional controls (ALM, LRM/RLM, LRE..RLO, LRI..PDI) and the zero-width and other
#: invisible format characters (U+200B-U+200D, U+2060-U+206F, U+FEFF).
#: (Searched in the bytes, each character as its UTF-8 sequence.)
UNSAFE = re.compile(b"|".join(re.escape(chr(c).encode()) for c in [
    *range(0x0a), *range(0x0b, 0x20), *range(0x7f, 0xa0), 0x61c, *range(0x200b, 0x2010),
    *range(0x2028, 0x202f), *range(0x2060, 0x2070), 0xfeff]))


@pytest.fixture(scope="module")
def access_bundle(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small access-log `mlp` bundle: Apache's own log normal, w3af's scan the attack."""
    from deepwatch.train.api import train

    root = tmp_path_factory.mktemp("injection")
    (root / "site.log").write_text(
        "".join(head_lines(data_file("weblogs/apache_access.log.gz"), 3000)))
    (root / "scan.log").write_text(
        "".join(head_lines(data_file("weblogs/scan_w3af.log.gz"), 1500)))
    out = bundle_root / "bundle_access_injection"
    train("access", "mlp", [f"{root / 'site.log'}=normal", f"{root / 'scan.log'}=scanner"], out,
          epochs=2, seed=0)
    return out


def _line(client: str = "182.118.20.213", ident: str = "-", user: str = "-",
          request: str = "GET /templates/beez_20/favicon.ico HTTP/1.1", referer: str = "-",
          agent: str = SCANNER) -> str:
    return (f'{client} {ident} {user} [18/May/2015:08:55:06 +0000] "{request}" 200 1449 '
            f'"{referer}" "{agent}"')


#: (line, the user agent, request and referer the record keeps); lines with None: rejects
LINES: list[tuple[str, tuple[str, str, str] | None]] = [
    (_line(), (SCANNER, "GET /templates/beez_20/favicon.ico HTTP/1.1", "-")),
    (_line(agent=f"{SCANNER}{ESC}]2;pwned{BEL}{ESC}[2J"),
     (SCANNER + r"\x1B]2;pwned\x07\x1B[2J", "GET /templates/beez_20/favicon.ico HTTP/1.1", "-")),
    (_line(request=f"GET /a{ESC}[31m HTTP/1.1", referer="http://x/\x00",
           agent=SCANNER + "\x7f\x9b1m"),
     (SCANNER + r"\x7F\xC2\x9B1m", r"GET /a\x1B[31m HTTP/1.1", r"http://x/\x00")),
    (_line(agent=SCANNER + r"\x1B[31m"), (SCANNER + r"\x1B[31m",  # escaped by the server: as is
                                          "GET /templates/beez_20/favicon.ico HTTP/1.1", "-")),
    (_line(agent=SCANNER + '\u2028{\\"forged\\": 1}'),  # a quote as NGINX escapes it
     (SCANNER + '\u2028{\\"forged\\": 1}', "GET /templates/beez_20/favicon.ico HTTP/1.1", "-")),
    (_line(user=f"admin{ESC}[2J"), None),
    (_line(ident="id\x00x"), None),
    (_line(user="adm\x9bin"), None),
    (_line(client="\x9b31m182.118.20.213"), None),
]
REASONS = [
    "user holds a control character (U+001B), which servers escape (\\xHH), never write raw: "
    f"'admin{ESC}[2J'",
    "ident holds a control character (U+0000), which servers escape (\\xHH), never write raw: "
    "'id\x00x'",
    "user holds a control character (U+009B), which servers escape (\\xHH), never write raw: "
    "'adm\x9bin'",
    "client holds a control character (U+009B), never part of an address or host name: "
    "'\x9b31m182.118.20.213'",
]


def _deepwatch(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "deepwatch", *args], capture_output=True,
                          timeout=120, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})


def _json_lines(data: bytes) -> list[dict]:
    """The JSON documents of a JSONL output, checked to hold nothing a terminal or a line-based
    reader would act on: as many lines for ``splitlines`` as there are ``\\n``."""
    assert UNSAFE.findall(data) == []
    text = data.decode("utf-8")
    assert len(text.splitlines()) == data.count(b"\n")
    return [json.loads(line) for line in text.splitlines()]


def _log(tmp_path: Path) -> Path:
    log = tmp_path / "hostile.log"
    log.write_bytes("".join(line + "\n" for line, _ in LINES).encode() + b"\xff\xfe\n")
    return log


def test_score_escapes_controls_in_quoted_fields_and_rejects_them_in_the_frame(
        access_bundle: Path, tmp_path: Path) -> None:
    """Every record is scored or a counted reject with its reason; the scored rows keep the
    quoted fields with their control characters written ``\\xHH``; no output holds a raw one."""
    out, rejects = tmp_path / "scored.jsonl", tmp_path / "rejects.jsonl"
    done = _deepwatch("score", str(access_bundle), "--format", "access", "--out", str(out),
                      "--rejects", str(rejects), str(_log(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert UNSAFE.findall(done.stderr) == []
    assert b"10 lines read: 5 parsed, 5 rejected" in done.stderr
    rows = _json_lines(out.read_bytes())
    kept = [want for _, want in LINES if want is not None]
    assert [(r["user_agent"], r["request"], r["referer"] or "-") for r in rows] == kept
    assert [r["user"] for r in rows] == [None] * len(kept)
    assert rows[2]["url"] == r"/a\x1B[31m"  # split from the escaped request line
    rejected = _json_lines(rejects.read_bytes())
    assert [r["line"] for r in rejected] == [6, 7, 8, 9, 10]
    assert [r["raw"] for r in rejected[:4]] == [line for line, want in LINES if want is None]
    assert [r["reason"] for r in rejected[:4]] == REASONS
    assert rejected[4]["reason"] == "not in common or combined log format"


def test_stream_alerts_on_stdout_hold_no_terminal_controls_nor_line_separators(
        access_bundle: Path, tmp_path: Path) -> None:
    """``deepwatch stream`` to stdout (an analyst's terminal, or a shipper reading lines): one
    JSON alert per line, user agents escaped, and the dead letters as safe."""
    rejects = tmp_path / "dead.jsonl"
    done = _deepwatch("stream", str(access_bundle), "--format", "access", "--alert-record",
                      "--rejects", str(rejects), str(_log(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert UNSAFE.findall(done.stderr) == []
    alerts = _json_lines(done.stdout)
    agents = {a["user_agent"]["original"] for a in alerts}
    assert SCANNER + r"\x7F\xC2\x9B1m" in agents
    assert SCANNER + '\u2028{\\"forged\\": 1}' in agents
    assert all(a["event"]["kind"] == "alert" for a in alerts)
    assert all(a["user"]["name"] is None for a in alerts)
    dead = _json_lines(rejects.read_bytes())
    assert [d["reason"] for d in dead[:4]] == REASONS
    assert [d["raw"] for d in dead[:4]] == [line for line, want in LINES if want is None]


def test_the_rest_answer_holds_no_terminal_controls_nor_line_separators(
        access_bundle: Path) -> None:
    """A real ``serve``'s /v1/score answer to the hostile lines: its rejects quote what the
    client sent (DEL, C1 such as U+009B, CSI, and U+2028 were written raw by orjson), now
    escaped; decoded, the JSON gives the same text back."""
    import httpx
    from conftest import serving

    lines = [line for line, _ in LINES]
    with serving(access_bundle) as (_, url):
        r = httpx.post(url + "/v1/score", json={"records": lines}, timeout=30)
    assert r.status_code == 200
    assert UNSAFE.findall(r.content) == []
    answer = r.json()
    assert len(answer["results"]) == 5
    assert [x["reason"] for x in answer["rejects"]] == REASONS


# -- bidirectional controls ("Trojan Source") ----------------------------------------------------

RLO, PDF, LRI, PDI, ALM, LRM, ZWSP, BOM = ("\u202e", "\u202c", "\u2066", "\u2069", "\u061c",
                                           "\u200e", "\u200b", "\ufeff")
#: An agent that a terminal shows as "w3af.org exe.gpj"; a URL with isolates and marks around
#: its parts; a referer that two invisible characters make look like another (the scanner's
#: record is still an alert).
BIDI_AGENT = f"{SCANNER} {RLO}gpj.exe"
BIDI_URL = f"/templates/{LRI}beez_20{PDI}/{ALM}favicon.ico{LRM}"
BIDI_REQUEST = f"GET {BIDI_URL} HTTP/1.1"
BIDI_REFERER = f"http://ev{ZWSP}il.example/{BOM}{PDF}"
#: after four plain requests of the scan (the model weighs a client's other requests)
BIDI_LINES = [*[_line()] * 4, _line(agent=BIDI_AGENT, request=BIDI_REQUEST, referer=BIDI_REFERER),
              _line(client=f"{RLO}182.118.20.213")]
BIDI_REASON = ("client holds an invisible format character (U+202E), never part of an address "
               f"or host name: '{RLO}182.118.20.213'")


def _bidi_log(tmp_path: Path) -> Path:
    log = tmp_path / "bidi.log"
    log.write_text("".join(line + "\n" for line in BIDI_LINES), encoding="utf-8")
    return log


def test_score_and_rejects_write_bidi_controls_as_json_escapes(access_bundle: Path,
                                                               tmp_path: Path) -> None:
    """An RLO in a user agent made a terminal or an editor show the scored line reordered
    (CVE-2021-42574): ``score --out`` and ``--rejects`` now write bidirectional controls and
    invisible characters as ``\\uXXXX``; the decoded record is the text sent, unchanged."""
    out, rejects = tmp_path / "scored.jsonl", tmp_path / "rejects.jsonl"
    done = _deepwatch("score", str(access_bundle), "--format", "access", "--out", str(out),
                      "--rejects", str(rejects), str(_bidi_log(tmp_path)))
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    assert b"\\u202e" in data and b"\\u2066" in data and b"\\u200b" in data
    row = _json_lines(data)[-1]
    assert (row["user_agent"], row["request"], row["referer"]) == (
        BIDI_AGENT, BIDI_REQUEST, BIDI_REFERER)
    assert row["url"] == BIDI_URL
    [reject] = _json_lines(rejects.read_bytes())
    assert (reject["raw"], reject["reason"]) == (BIDI_LINES[-1], BIDI_REASON)


def test_stream_alerts_write_bidi_controls_as_json_escapes(access_bundle: Path,
                                                           tmp_path: Path) -> None:
    """``stream``'s alerts on stdout and its dead letters, escaped the same way."""
    dead = tmp_path / "dead.jsonl"
    done = _deepwatch("stream", str(access_bundle), "--format", "access", "--alert-record",
                      "--rejects", str(dead), str(_bidi_log(tmp_path)))
    assert done.returncode == 0, done.stderr
    alerts = _json_lines(done.stdout)
    assert BIDI_AGENT in {a["user_agent"]["original"] for a in alerts}
    assert [d["raw"] for d in _json_lines(dead.read_bytes())] == [BIDI_LINES[-1]]


def test_the_rest_answers_write_bidi_controls_as_json_escapes(access_bundle: Path) -> None:
    """A real ``serve``: the /v1/score rejects quote the client's text, and /v1/stats (the
    dashboard's data) the recent alerts' agents and URLs; both escaped."""
    import httpx
    from conftest import serving

    with serving(access_bundle) as (_, url):
        r = httpx.post(url + "/v1/score", json={"records": BIDI_LINES}, timeout=30)
        stats = httpx.get(url + "/v1/stats", timeout=30)
    assert r.status_code == 200 and stats.status_code == 200
    assert UNSAFE.findall(r.content) == [] and UNSAFE.findall(stats.content) == []
    answer = r.json()
    assert len(answer["results"]) == 5
    assert [x["reason"] for x in answer["rejects"]] == [BIDI_REASON]
    assert answer["results"][-1]["verdict"] == "malicious"
    assert BIDI_URL in {a["url"] for a in stats.json()["recent_alerts"]}


# -- the pages: an override reorders its own value, never the text beside it -------------------

#: A probe added at the end of a page: once ``READY`` holds, for each element of ``SELECTOR``
#: its text and the (top, left) where the first letter of each match of ``PATTERN`` in it is
#: drawn (the group's text, for ``key=`` the key), in the text's order, as JSON in
#: ``data-probe`` on the page's ``<html>`` (read back with ``--dump-dom``).
PROBE = """<script>
function place(cell) {
  const nodes = [], walk = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
  let text = "";
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    nodes.push([text.length, n]);
    text += n.data;
  }
  const found = [];
  for (const m of text.matchAll(/PATTERN/g)) {
    const at = m.index + m[0].indexOf(m[1]);
    const [start, node] = nodes.filter(([s]) => s <= at).pop();
    const r = document.createRange();
    r.setStart(node, at - start); r.setEnd(node, at - start + 1);
    const box = r.getBoundingClientRect();
    found.push([m[1], Math.round(box.top), Math.round(box.left)]);
  }
  return [text, found];
}
function probe() {
  if (!(READY)) { setTimeout(probe, 50); return; }
  document.documentElement.dataset.probe =
    JSON.stringify([...document.querySelectorAll("SELECTOR")].map(place));
}
probe();
</script>"""


def _drawn_keys(page: str, ready: str, selector: str, pattern: str = r"(?:^| )([a-z_]+)="
                ) -> list[tuple[str, list[list]]]:
    """The text and the (key, top, left) of each ``key=`` (or match of ``pattern``, its first
    group the key) of each element of ``selector``, as a
    real headless Chromium draws ``page`` (HTML text) with :data:`PROBE` added; web security
    is off, so a page given a ``<base>`` on a server may poll it from a file."""
    import base64
    import hashlib
    import html as html_lib
    import shutil
    import tempfile

    from conftest import need

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    need(browser is not None, "chromium (apt-get install -y chromium)")
    assert browser is not None
    probe = (PROBE.replace("READY", ready).replace("SELECTOR", selector)
             .replace("PATTERN", pattern))
    with tempfile.TemporaryDirectory() as profile:
        path = Path(profile) / "page.html"
        # a page's own policy (the report's <meta>) lets only its own scripts run: the probe's
        # added by its SHA-256, the policy otherwise as it is
        digest = base64.b64encode(hashlib.sha256(
            probe.removeprefix("<script>").removesuffix("</script>").encode()).digest()).decode()
        page = page.replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
        path.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
        run = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-web-security",
             "--disable-background-networking", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}/data", "--window-size=1600,1000",
             "--virtual-time-budget=15000", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r'data-probe="([^"]*)"', run.stdout)
    assert m, (run.stdout[:2000], run.stderr[-2000:])
    return [(text, keys) for text, keys in json.loads(html_lib.unescape(m.group(1)))]


def _in_reading_order(keys: list[list]) -> bool:
    return [(top, left) for _, top, left in keys] == sorted((top, left) for _, top, left in keys)


def test_dashboard_draws_each_field_of_an_alert_in_its_place(access_bundle: Path) -> None:
    """The dashboard's alert list wrote a record's fields as one text, ``url=... path=...
    query=``: an RLO in the URL drew ``query=`` before ``path=``, the rest of the row reversed.
    Each value is now isolated: the fields are drawn in order, whatever one of them holds. And
    a character drawn as nothing (the RLO itself, a zero-width space) is written ``<U+XXXX>``:
    the URL did not look like the one requested."""
    import httpx
    from conftest import serving

    url = f"/templates/{RLO}gpj.exe/fav{ZWSP}icon.ico"
    shown = "/templates/<U+202E>gpj.exe/fav<U+200B>icon.ico"
    lines = [*[_line()] * 4, _line(request=f"GET {url} HTTP/1.1")]
    with serving(access_bundle) as (_, base):
        r = httpx.post(base + "/v1/score", json={"records": lines}, timeout=30)
        verdicts = [x["verdict"] for x in r.json()["results"]]
        assert verdicts[-1] == "malicious"
        # the served page, polling the server from a file (the probe reads it as drawn)
        page = httpx.get(base + "/", timeout=30).text.replace(
            "<head>", f'<head><base href="{base}/">')
        cells = _drawn_keys(page, 'document.querySelector("tr.alert-row")',
                            "tr.alert-row td:last-child")
    assert len(cells) == verdicts.count("malicious")
    assert sum(shown in text for text, _ in cells) == 1
    assert not any(RLO in text or ZWSP in text for text, _ in cells)
    for text, keys in cells:
        assert [k for k, _, _ in keys] == ["client_ip", "timestamp", "method", "url", "path",
                                           "query"], text
        assert _in_reading_order(keys), (text, keys)


def test_report_draws_a_count_beside_a_label_in_its_place(access_bundle: Path,
                                                          tmp_path: Path) -> None:
    """The report's figures draw a label beside its count (``name (200)``, in the Sankey and
    the map's legend): an RLO in a label (the data's text) drew the count as ``)002(``. A label
    that is not plain ASCII is now an isolate there, the RLO is written ``<U+202E>``, and the
    count is drawn as written."""
    label = f"w3af {RLO}gpj.exe"
    site, scan = tmp_path / "site.log", tmp_path / "scan.log"
    site.write_text("".join(head_lines(data_file("weblogs/apache_access.log.gz"), 200)))
    scan.write_text("".join(head_lines(data_file("weblogs/scan_w3af.log.gz"), 200)))
    page = tmp_path / "report.html"
    done = _deepwatch("report", str(access_bundle), "--format", "access", "--out", str(page),
                      f"{site}=normal", f"{scan}={label}")
    assert done.returncode == 0, done.stderr
    drawn = _drawn_keys(page.read_text(encoding="utf-8"),
                        'document.querySelector("#plot-tsne .legendtext")',
                        "#plot-sankey text.node-label, #plot-tsne text.legendtext", r"([()])")
    counted = [(text, keys) for text, keys in drawn if "w3af <U+202E>gpj.exe" in text]
    assert len(counted) == 2, drawn  # the Sankey's node and the legend's entry
    for text, keys in counted:
        assert [k for k, _, _ in keys] == ["(", ")"], text
        assert _in_reading_order(keys), (text, keys)
