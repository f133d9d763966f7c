"""The documentation's examples, run as a newcomer copies them: the README's Python API example
(every ```python block of README.md) and docs/rest.md's scoring request, so they cannot drift
from the code again. No model is trained here: the README's ``train(...)`` is answered with the
session's small KDD bundle (its arguments checked against the real ``train``), everything else
runs for real on a few thousand records of ``corrected``; the REST example goes to a real
uvicorn server. (The command lines in the docs are checked by tests/test_docs_audit_h12.py.)"""

from __future__ import annotations

import gzip
import inspect
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ThreadServer, head_lines

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(doc: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", doc.read_text(), flags=re.S | re.M)


def test_the_readme_python_example_runs_as_written(
        kdd_bundle: Path, kdd_train_file: Path, kdd_test_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import deepwatch.api as api

    blocks = _python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no ```python block"
    # DEEPWATCH_DATA as the README exports it, the files under their real names: the training
    # file is the real one (the stand-in train below checks the name, reads nothing), the test
    # file 2,000 records of corrected.
    data = tmp_path / "data" / "kddcup99"
    data.mkdir(parents=True)
    (data / kdd_train_file.name).symlink_to(kdd_train_file)
    with gzip.open(data / kdd_test_file.name, "wt") as f:
        f.write("".join(head_lines(kdd_test_file, 2000, every=150)))
    monkeypatch.setenv("DEEPWATCH_DATA", str(tmp_path / "data"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    real_train = api.train
    calls: list[Any] = []

    def train(*args: Any, **kwargs: Any) -> dict[str, Any]:
        """The real train's arguments, the session's bundle as what it made."""
        bound = inspect.signature(real_train).bind(*args, **kwargs)
        calls.append(bound)
        inputs = bound.arguments["inputs"]
        for one in inputs if isinstance(inputs, list | tuple) else [inputs]:
            assert Path(one).exists(), f"the README trains on {one}, which is not there"
        shutil.copytree(kdd_bundle, Path(bound.arguments["out"]))
        manifest: dict[str, Any] = json.loads((kdd_bundle / "manifest.json").read_text())
        return manifest

    monkeypatch.setattr(api, "train", train)
    capsys.readouterr()
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    out, err = capsys.readouterr()

    assert calls, "the README's example no longer trains (update this test)"
    assert err == ""  # README: "Nothing is printed unless asked"
    lines = out.splitlines()
    f1, cost = (float(x) for x in lines[0].split())  # print(result["binary"]["f1"], ...)
    assert 0 <= f1 <= 1 and cost >= 0
    assert lines[1] == "verdict"  # print(verdicts["verdict"].value_counts())
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in lines[2:] if ln.split()[0] in
              ("normal", "malicious")}
    assert sum(counts.values()) == 2000 and counts


def _rest_example() -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """docs/rest.md's scoring request (its headers and body) and the answer it shows."""
    text = (ROOT / "docs" / "rest.md").read_text()
    section = text[text.index("\n## Scoring\n"):]
    curl = re.search(r"^```\n(curl .*?)^```", section, flags=re.S | re.M)
    assert curl, "docs/rest.md: no curl example under 'Scoring'"
    headers = dict(h.split(": ", 1) for h in re.findall(r"-H '([^']*)'", curl.group(1)))
    body = json.loads(re.search(r"-d '(.*)'", curl.group(1), flags=re.S).group(1))  # type: ignore[union-attr]
    answer = re.search(r"^```json\n(.*?)^```", section, flags=re.S | re.M)
    assert answer, "docs/rest.md: no answer shown under 'Scoring'"
    return headers, body, json.loads(answer.group(1))


def test_the_rest_scoring_example_gets_the_answer_shown(kdd_bundle: Path) -> None:
    from deepwatch.serve.app import create_app

    headers, body, shown = _rest_example()
    assert headers["Authorization"] == "Bearer KEY"
    with ThreadServer(create_app(kdd_bundle, api_key="KEY")) as srv:
        got = httpx.post(srv.url + "/v1/score", content=json.dumps(body), headers=headers,
                         timeout=30)
    assert got.status_code == 200, got.text
    answer = got.json()
    assert [r["index"] for r in answer["results"]] == [r["index"] for r in shown["results"]]
    for mine, doc in zip(answer["results"], shown["results"], strict=True):
        assert mine.keys() == doc.keys()
    assert answer["rejects"] == shown["rejects"]
