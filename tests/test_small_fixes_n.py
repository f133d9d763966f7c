"""Small defects found by reviews (batch n): lakes named twice, ingest's checks, the
featurizer's spec, the Python API's error wording."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import data_file, head_lines

from deepwatch.cli import main


@pytest.fixture
def site_log(tmp_path: Path) -> Path:
    """The first 50 lines of the real site log, plain text."""
    path = tmp_path / "site.log"
    path.write_text("".join(head_lines(data_file("weblogs/apache_access.log.gz"), 50)))
    return path


def test_a_lake_named_twice_is_warned_about(
        tmp_path: Path, site_log: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # score/train --lake L1 --lake ./L1 read the lake twice without a word (doubling its
    # records); a file given twice is read twice, so the lake is too, but now it is said
    from deepwatch.formats import get_format
    from deepwatch.io import InputReader

    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--format", "access", "--lake", "L1", str(site_log)]) == 0
    capsys.readouterr()
    reader = InputReader(get_format("access"), [], lakes=["L1", "./L1", str(tmp_path / "L1")])
    err = capsys.readouterr().err
    assert "warning: the lake ./L1 was named twice (also as L1)" in err
    assert f"warning: the lake {tmp_path / 'L1'} was named twice (also as L1)" in err
    assert err.count("warning") == 2
    assert sum(batch.num_rows for batch, _r, _s in reader) == 150  # as named, like files


@pytest.mark.parametrize("missing", ["nope.log", "nope-*.log"])
def test_an_ingest_of_a_missing_input_makes_no_lake(
        tmp_path: Path, site_log: Path, missing: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # the lake (its directory and _lake.json) was made before the inputs were looked at
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "--format", "access", "--lake", "NEW", str(site_log), missing]) == 2
    assert "error: no " in capsys.readouterr().err
    assert not (tmp_path / "NEW").exists()


@pytest.mark.parametrize(("spec", "says"), [
    (None, "a spec is a dict"),
    ({"foo": 1}, "spec key 'foo' is not one of categorical, numeric"),
    ({}, "the spec names no column"),
    ({"numeric": "dur"}, "spec 'numeric' is not a list of column names"),
    ({"numeric": ["dur"], "min_count": 0}, "spec 'min_count' is 0"),
    ({"numeric": ["dur"], "derive": {"name": "nope"}}, "nope"),
])
def test_a_featurizer_spec_is_checked_as_a_saved_one_is(spec: object, says: str) -> None:
    # Featurizer(None) raised AttributeError (at fit); Featurizer({"foo": 1}) was taken and
    # fitted 0 features
    from deepwatch.errors import UsageError
    from deepwatch.features import Featurizer

    with pytest.raises(UsageError, match=says):
        Featurizer(spec)  # type: ignore[arg-type]
    if spec is not None:  # as from_dict says of a saved one
        with pytest.raises(ValueError, match=says):
            Featurizer.from_dict({"kind": "tabular/v1", "spec": spec, "vocab": {}, "mean": {},
                                  "std": {}, "feature_names": []})
    Featurizer({"numeric": ["dur"], "min_count": 2})  # a good one is taken


def test_a_failed_download_says_how_to_copy_it_in_python_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fetch() told its Python caller only to run `deepwatch datasets fetch ... --from DIR`
    import dataclasses

    from conftest import free_port

    from deepwatch import datasets
    from deepwatch.api import fetch
    from deepwatch.errors import DataError

    monkeypatch.setenv("DEEPWATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPWATCH_DATA", raising=False)
    ds = dataclasses.replace(datasets.DATASETS["nslkdd-test"],
                             urls=(f"http://127.0.0.1:{free_port()}/KDDTest+.txt",))
    monkeypatch.setitem(datasets.DATASETS, "nslkdd-test", ds)
    with pytest.raises(DataError, match=r"with `deepwatch datasets fetch nslkdd-test --from DIR` "
                                        r"\(in Python: fetch\('nslkdd-test', from_dir=DIR\)\)$"):
        fetch("nslkdd-test")


def test_a_file_given_twice_to_one_ingest_is_said_to_be_given_twice(
        tmp_path: Path, site_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the second site.log of one run was said to be "already ingested into LAKE": it was not,
    # the lake was new
    copy = tmp_path / "copy.log"
    copy.write_bytes(site_log.read_bytes())
    assert main(["ingest", "--format", "access", "--lake", str(tmp_path / "lake"),
                 str(site_log), str(tmp_path / "*.log")]) == 0
    err = capsys.readouterr().err
    assert "already ingested" not in err
    assert (f"warning: {copy} was given twice in this run (same size and sha256 as "
            f"{site_log}); its records are stored twice") in err
    assert f"warning: {site_log} was given twice in this run; its records are stored twice" in err
    assert main(["ingest", "--format", "access", "--lake", str(tmp_path / "lake"),
                 str(site_log)]) == 0
    assert f"{site_log} (same size and sha256) was already ingested" in capsys.readouterr().err
