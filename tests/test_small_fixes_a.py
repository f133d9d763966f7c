"""Small fixes: the featurizer's errors for values of the wrong kind, the rejects read from a
lake's files whatever their names, the dashboard's alert fields cut, the report's CSP."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest


def test_featurizer_names_the_column_whose_values_are_of_the_wrong_kind() -> None:
    # Text in a numeric column escaped Featurizer.transform (and fit) as pyarrow's
    # ArrowInvalid "Failed to parse string: '12x' as a scalar of type double", naming no column;
    # a list where a category goes, as ArrowNotImplementedError.
    from deepwatch.api import Featurizer, InputError

    f = Featurizer({"categorical": ["proto"], "numeric": ["bytes", "dur"], "log1p": ["bytes"]})
    f.fit(pa.table({"proto": ["tcp", "udp"], "bytes": [1, 2], "dur": [0.1, 0.2]}))
    with pytest.raises(InputError, match=r"^column 'bytes' holds values that are not numbers "
                                         r"\(string\).*'12x'"):
        f.transform(pa.table({"proto": ["tcp"], "bytes": ["12x"], "dur": [0.3]}))
    with pytest.raises(InputError, match=r"^column 'proto' holds values that are not categories"):
        f.transform(pa.table({"proto": [[1]], "bytes": [1], "dur": [0.3]}))
    with pytest.raises(InputError, match=r"^column 'dur' holds values that are not numbers"):
        Featurizer({"numeric": ["dur"]}).fit(pa.table({"dur": ["1", "zz"]}))
    # text that is a number is read as one, as before
    x = f.transform(pa.table({"proto": ["tcp"], "bytes": ["1"], "dur": ["0.1"]}))
    assert x.tolist() == f.transform(pa.table({"proto": ["tcp"], "bytes": [1],
                                               "dur": [0.1]})).tolist()


#: A KDD smurf record (the bundle flags it) whose service is replaced.
SMURF = ("0,icmp,{service},SF,1032,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,511,511,0.00,0.00,0.00,0.00,"
         "1.00,0.00,0.00,208,63,0.30,0.01,0.30,0.00,0.00,0.00,0.00,0.00")


@pytest.mark.integration
def test_the_dashboard_cuts_a_long_field_of_an_alert(kdd_bundle: Path) -> None:
    # A field of 20,000 characters (100,000 as well: a padded URL) was drawn whole in the
    # dashboard's alert list; cut now to MAX_FIELD_CHARS characters as alerts are, a marker
    # beside (outside the sender's <bdi>) saying how many it had.
    import re
    from importlib import resources

    import httpx
    from conftest import ThreadServer, chromium_dom

    from deepwatch.alerts import MAX_FIELD_CHARS
    from deepwatch.serve.app import create_app

    page = resources.files("deepwatch.serve").joinpath("dashboard.html").read_text()
    assert f"const MAX_FIELD_CHARS = {MAX_FIELD_CHARS};" in page  # the page's is the alerts'
    services = ["Z" * 20_000, "Y" * MAX_FIELD_CHARS, "\U0001f600" * (MAX_FIELD_CHARS + 5)]
    with ThreadServer(create_app(kdd_bundle)) as srv:
        r = httpx.post(srv.url + "/v1/score", timeout=30,
                       json={"records": [SMURF.format(service=s) for s in services]})
        assert [x["verdict"] for x in r.json()["results"]] == ["malicious"] * 3, r.text
        run = chromium_dom(srv.url + "/")
    dom = run.stdout
    assert 'data-state="live"' in dom, (dom[:2000], run.stderr[-2000:])
    drawn = re.findall(r"service</bdi>=<bdi>([^<]*)</bdi>(<span class=\"cut\">[^<]*</span>)?",
                       dom)
    assert sorted(drawn) == sorted([
        ("Z" * MAX_FIELD_CHARS, '<span class="cut">\u2026 (cut: 20,000 characters)</span>'),
        ("Y" * MAX_FIELD_CHARS, ""),  # as long as an alert's may be: whole, no marker
        ("\U0001f600" * MAX_FIELD_CHARS,  # characters, not UTF-16 units, as the alerts count
         f'<span class="cut">\u2026 (cut: {MAX_FIELD_CHARS + 5:,} characters)</span>')])
