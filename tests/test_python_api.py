"""deepwatch from Python, as a notebook uses it: the inputs a data scientist naturally passes
(one path as a str or a pathlib.Path, a pandas or polars frame, a pyarrow Table), the errors
they get for wrong ones, what is printed, and the reprs they look at."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import ROOT, data_file, head_lines

from deepwatch.errors import UsageError


@pytest.fixture(scope="module")
def tiny_kdd(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    """A few thousand records with both classes (every 100th line of the 10% file)."""
    p = tmp_path_factory.mktemp("api") / "kdd_tiny.csv"
    p.write_text("".join(head_lines(kdd_train_file, 3000, every=100)))
    return p


@pytest.mark.parametrize("as_", [str, Path])
def test_one_input_path_is_one_input_not_its_characters(tiny_kdd: Path, kdd_bundle: Path,
                                                        tmp_path: Path, as_: type) -> None:
    """``evaluate(bundle, "kdd", "file.csv")``: a str is a Sequence[str], and each of its
    characters was taken for an input ("/ is a directory"); a Path failed with a TypeError."""
    from deepwatch.evaluate.run import evaluate
    from deepwatch.scoring import score_files
    from deepwatch.train.api import train

    one = as_(tiny_kdd)
    result, _ = evaluate(as_(kdd_bundle), "kdd", one)
    assert result["n"] == 3000
    report = score_files(as_(kdd_bundle), "kdd", one, as_(tmp_path / "v.parquet"))
    assert report.stats.parsed == 3000
    assert (tmp_path / "v.parquet").is_file()
    manifest = train("kdd", "mlp", one, as_(tmp_path / "b"), val_inputs=one, epochs=1)
    assert [d["role"] for d in manifest["data"]] == ["training", "validation"]


def test_a_list_of_paths_is_read(tiny_kdd: Path, kdd_bundle: Path) -> None:
    from deepwatch.evaluate.run import evaluate

    result, _ = evaluate(kdd_bundle, "kdd", [tiny_kdd, tiny_kdd])
    assert result["n"] == 6000


def test_inputs_that_are_no_paths_are_one_clear_error(kdd_bundle: Path) -> None:
    from deepwatch.evaluate.run import evaluate

    with pytest.raises(UsageError, match="inputs must be paths .* not int"):
        evaluate(kdd_bundle, "kdd", [3])
    with pytest.raises(UsageError, match="inputs must be a path .* not int"):
        evaluate(kdd_bundle, "kdd", 3)  # type: ignore[arg-type]
    # a frame iterated as its column names ("no such file: duration"), None a TypeError
    import pandas as pd
    import polars as pl

    from deepwatch.sources.files import read_inputs

    for frame in (pd.DataFrame({"duration": [0]}), pl.DataFrame({"duration": [0]}),
                  pa.table({"duration": [0]})):
        with pytest.raises(UsageError, match=r"not (DataFrame|Table): inputs here are files; "
                                             "a frame of records is scored with"):
            evaluate(kdd_bundle, "kdd", frame)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not dict"):
        evaluate(kdd_bundle, "kdd", {"a.csv": 1})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="inputs must be a path .* not NoneType"):
        read_inputs(None, "kdd")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def parsed(small_kdd: Path) -> pa.RecordBatch:
    from deepwatch.formats import get_format

    return get_format("kdd").parse(small_kdd.read_bytes()).batch


def test_score_batch_takes_tables_and_frames(kdd_bundle: Path, parsed: pa.RecordBatch) -> None:
    """A lake's ``read_lake`` gives a Table (of 4,096 rows or more it failed inside pyarrow:
    "Cannot convert ChunkedArray to Array"); a notebook holds pandas or polars frames (they
    failed with ``AttributeError: num_rows``; polars' string_view columns then failed in
    pyarrow's ``take``, on a detector that had not seen the records before). Each scores as
    the RecordBatch does."""
    import polars as pl

    from deepwatch.models.detector import Detector

    assert parsed.num_rows > 4096
    table = pa.Table.from_batches([parsed.slice(0, 5000), parsed.slice(5000)])
    small = parsed.slice(0, 10)
    for rows in (parsed, small):
        want = Detector(kdd_bundle).score_batch(rows)
        views = pa.table(pl.from_arrow(rows)).combine_chunks().to_batches()[0]
        assert views.schema.field("service").type == pa.string_view()
        givens = [rows.to_pandas(), pl.from_arrow(rows), views] + (
            [table] if rows is parsed else [])
        for given in givens:  # each to a new detector: no result is taken from its cache
            got = Detector(kdd_bundle).score_batch(given)
            assert isinstance(got, pa.RecordBatch)
            assert got.column("score").equals(want.column("score")), type(given)
            assert got.column("verdict").equals(want.column("verdict"))


def test_score_batch_refuses_what_it_cannot_score_in_one_sentence(
        kdd_bundle: Path, parsed: pa.RecordBatch) -> None:
    from deepwatch.errors import InputError
    from deepwatch.models.detector import Detector

    det = Detector(kdd_bundle)
    with pytest.raises(InputError, match=r"parse_records\(records\)"):
        det.score_batch(parsed.slice(0, 3).to_pylist())
    with pytest.raises(InputError, match="not ndarray"):
        det.score_batch(np.zeros((3, 41)))
    with pytest.raises(InputError, match="no column 'service', which this kdd model reads"):
        det.score_batch(parsed.drop_columns(["service"]))
    # a frame's column of text where the model reads numbers failed in the featurizer with
    # pyarrow's ArrowInvalid ("Failed to parse string"); numbers written as text still score
    frame = parsed.slice(0, 3).to_pandas()
    frame["src_bytes"] = frame["src_bytes"].astype(str)
    assert det.score_batch(frame).column("score").equals(
        det.score_batch(parsed.slice(0, 3)).column("score"))
    frame.loc[1, "src_bytes"] = "n/a"
    with pytest.raises(InputError, match="column 'src_bytes' holds values that are not "
                                         "numbers .*, which this kdd model reads as numbers"):
        det.score_batch(frame)


def test_train_from_python_is_quiet_unless_asked(tiny_kdd: Path, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``train(progress=False)`` (the default) printed a line per epoch to stderr wherever
    stderr was no terminal (a notebook's is not) and drew rich bars where it was one: the
    flag governed the reading bar only. With ``progress=True`` it shows what the command
    shows.

    Nor does it change the process's global state: it left torch's and numpy's global random
    generators seeded with the training seed (a notebook's later draws repeated), and torch's
    thread count at the training's."""
    import torch

    from deepwatch.train.api import train

    monkeypatch.delenv("DEEPWATCH_PROGRESS", raising=False)
    monkeypatch.setenv("DEEPWATCH_TORCH_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(7)
        np.random.seed(7)
        expected = torch.rand(3), np.random.rand(3)
        torch.manual_seed(7)
        np.random.seed(7)
        train("kdd", "mlp", tiny_kdd, tmp_path / "quiet", epochs=2)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.rand(3), expected[0])
        assert np.array_equal(np.random.rand(3), expected[1])
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    train("kdd", "mlp", tiny_kdd, tmp_path / "told", epochs=2, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("mlp: training, up to 2 epochs") and "mlp: epoch 2/2" in err, err


def test_featurizer_fits_frames_and_says_what_is_wrong(parsed: pa.RecordBatch) -> None:
    """Unfitted, it failed with ``AttributeError: feature_names_``; a pandas frame with
    ``AttributeError: num_rows``; a missing column with pyarrow's ``KeyError``."""
    from deepwatch.errors import InputError
    from deepwatch.features import Featurizer
    from deepwatch.formats import get_format

    spec = get_format("kdd").feature_spec()
    f = Featurizer(spec)
    assert repr(f) == "Featurizer(3 categorical + 38 numeric columns, not fitted)"
    for use in (lambda: f.transform(parsed), lambda: f.n_features, f.to_json):
        with pytest.raises(UsageError, match=r"not fitted: call fit\(table\) first"):
            use()
    with pytest.raises(InputError, match="no column 'service', which the featurizer reads"):
        f.fit(parsed.drop_columns(["service"]))
    f.fit(parsed.to_pandas())
    assert repr(f) == f"Featurizer(3 categorical + 38 numeric columns -> {f.n_features} features)"
    assert np.array_equal(f.transform(parsed.to_pandas()), Featurizer(spec).fit(parsed)
                          .transform(parsed))
    with pytest.raises(InputError, match="no column 'flag', which the featurizer reads"):
        f.transform(parsed.drop_columns(["flag"]))


def test_formats_say_what_they_take(tiny_kdd: Path, parsed: pa.RecordBatch) -> None:
    """``parse(Path)`` failed with ``TypeError: no len()``, ``parse(list_of_lines)`` with
    ``AttributeError: endswith``; ``parse_records(DataFrame)`` iterated the frame's column
    names and failed with an IndexError. A ParseResult's repr printed every record."""
    from deepwatch.formats import get_format

    kdd = get_format("kdd")
    assert repr(kdd) == "get_format('kdd')"
    with pytest.raises(UsageError, match=r"raw text .* not PosixPath: read the file first"):
        kdd.parse(tiny_kdd)
    with pytest.raises(UsageError, match="raw text .* not list: join the lines"):
        kdd.parse(tiny_kdd.read_text().splitlines())
    result = kdd.parse(tiny_kdd.read_bytes())
    assert repr(result) == "ParseResult(lines=3,000, parsed=3,000, rejected=0, skipped=0)"
    rows = parsed.slice(0, 50)
    from_frame = kdd.parse_records(rows.to_pandas())
    assert from_frame.batch.equals(kdd.parse_records(rows.to_pylist()).batch)
    assert from_frame.batch.num_rows == 50


def test_a_detector_says_what_it_is(kdd_bundle: Path) -> None:
    from deepwatch.models.detector import Detector

    assert repr(Detector(kdd_bundle, engine="torch")) == (
        f"Detector({str(kdd_bundle)!r}, kind='mlp', format='kdd', engine='torch:cpu', "
        "policy='cost')")


def test_a_misspelt_training_option_is_refused(tiny_kdd: Path, tmp_path: Path) -> None:
    """``options={"latnet": 8}`` was ignored without a word: the model trained with its
    default bottleneck, and the user believed it had 8."""
    from deepwatch.train.api import train

    with pytest.raises(UsageError, match="unknown training option 'latnet'; the options are "
                                         r".*\blatent\b"):
        train("kdd", "autoencoder", tiny_kdd, tmp_path / "b", epochs=1, options={"latnet": 8})
    assert not (tmp_path / "b").exists()
    manifest = train("kdd", "autoencoder", tiny_kdd, tmp_path / "b", epochs=1,
                     options={"latent": 5, "batch_size": 256})
    assert manifest["training"]["autoencoder"]["latent"] == 5


@pytest.mark.parametrize(("model", "options", "foreign"), [
    ("mlp", {"hidden": 256}, "hidden"),
    ("stack", {"lr": 1e-3, "latent": 8}, "latent"),
    ("resnet", {"novel_category": "dos"}, "novel_category"),
    ("autoencoder", {"class_balance": 0.5}, "class_balance"),
    ("autoencoder", {"novel_category": "dos"}, "novel_category"),
])
def test_an_option_of_another_model_is_refused(tiny_kdd: Path, tmp_path: Path, model: str,
                                               options: dict[str, object], foreign: str) -> None:
    """The autoencoder's ``hidden`` given to an ``mlp`` was taken and did nothing: the network
    stayed 128 wide, and the manifest gave no hint (``class_balance`` for an autoencoder,
    which samples benign rows by weight alone, the same)."""
    from deepwatch.train.api import train

    with pytest.raises(UsageError, match=re.escape(
            f"option {foreign!r} does not apply to model {model!r}; its options are ")):
        train("kdd", model, tiny_kdd, tmp_path / "b", epochs=1, options=options)
    assert not (tmp_path / "b").exists()


def test_a_device_the_machine_lacks_is_a_usage_error(kdd_bundle: Path) -> None:
    """``Detector(b, engine="torch", device="gpu")`` (or ``"cuda"`` on a machine without one)
    raised a BundleError, "the bundle cannot be loaded (RuntimeError: Expected one of cpu,
    cuda, ipu, ...)": the bundle is fine, the argument is not. ``device="auto"``, as
    ``train`` takes it, failed the same way."""
    import torch

    from deepwatch.errors import BundleError
    from deepwatch.models.detector import Detector

    with pytest.raises(UsageError, match="unknown device 'gpu'; use auto, cpu or cuda") as err:
        Detector(kdd_bundle, engine="torch", device="gpu")
    assert not isinstance(err.value, BundleError)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is available"):
            Detector(kdd_bundle, engine="torch", device="cuda")
    want = "torch:cuda" if torch.cuda.is_available() else "torch:cpu"
    assert Detector(kdd_bundle, engine="torch", device="auto").engine == want


def test_web_records_without_a_column_the_deriver_reads(tmp_path: Path) -> None:
    """For access logs the featurizer derives its features (URL, user agent...) first: a
    column missing failed there with pyarrow's ``KeyError: Field "path" does not exist``."""
    from deepwatch.errors import InputError
    from deepwatch.formats import get_format
    from deepwatch.models.detector import Detector
    from deepwatch.train.api import train

    site = data_file("weblogs/apache_access.log.gz")
    log = tmp_path / "site.log"
    log.write_text("".join(head_lines(site, 2000)))
    train("access", "autoencoder", f"{log}=normal", tmp_path / "b", epochs=1)
    det = Detector(tmp_path / "b")
    batch = get_format("access").parse(log.read_bytes()).batch
    assert det.score_batch(batch.to_pandas()).num_rows == 2000
    with pytest.raises(InputError, match="no column 'user_agent', which the featurizer reads"):
        det.score_batch(batch.drop_columns(["user_agent"]))


def test_the_readme_python_example_runs_as_written(tmp_path: Path, kdd_train_file: Path,
                                                   kdd_test_file: Path) -> None:
    """The README's "From Python" block, run by a fresh interpreter in a directory holding
    small copies of the files it names: it runs as written, and prints nothing but its own
    output (no epoch lines, no bars)."""
    import gzip
    import os
    import re
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    [code] = re.findall(r"### From Python\n.*?```python\n(.*?)```", text, re.S)
    data = tmp_path / "data" / "kddcup99"
    data.mkdir(parents=True)
    for src, name, every in ((kdd_train_file, "kddcup.data_10_percent.gz", 100),
                             (kdd_test_file, "corrected.gz", 100)):
        with gzip.open(data / name, "wt") as f:
            f.write("".join(head_lines(src, 2000, every=every)))
    # DEEPWATCH_DATA as the README's set-up exports it, here the small copies (with the
    # real directory, the example trains on the whole 10% file)
    env = {**os.environ, "DEEPWATCH_DATA": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    f1, cost = lines[0].split()
    assert 0.5 < float(f1) <= 1 and float(cost) >= 0
    assert lines[1] == "verdict" and "malicious" in r.stdout
    assert r.stderr == ""


def test_datasets_fetch_does_its_work_when_called(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``deepwatch.datasets.fetch(...)`` was a generator: called on its own line, as a
    notebook calls it, it copied nothing and refused nothing."""
    from deepwatch import datasets

    monkeypatch.setenv("DEEPWATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPWATCH_DATA", raising=False)
    src = tmp_path / "downloads"
    src.mkdir()
    (src / "KDDTest+.txt.gz").write_bytes(data_file("nslkdd/KDDTest+.txt.gz").read_bytes())
    got = datasets.fetch("nslkdd-test", from_dir=src)
    assert got == [tmp_path / "cache" / "datasets" / "nslkdd" / "KDDTest+.txt.gz"]
    assert got[0].is_file()
    with pytest.raises(UsageError, match="unknown data set 'kdd2000'"):
        datasets.fetch("kdd2000")


def test_simulate_takes_one_attack_by_name(tmp_path: Path) -> None:
    """``simulate(out, attacks="sqli")``: the string was taken for its letters, refused as
    ``unknown attack 's'``."""
    from deepwatch.simulate import simulate

    paths = simulate(tmp_path, visits=50, attacks="sqli", attack_share=0.5)
    assert sorted(paths) == ["normal", "sqli"]


def test_a_lake_read_for_one_day_given_as_a_string(tiny_kdd: Path, tmp_path: Path,
                                                   kdd_bundle: Path) -> None:
    """``read_lake(lake, days="2024-05-14")`` took the string for its characters ("no records
    for days 2, 0, 2, 4, -, ..."). The lake's Table then scores as it is."""
    from deepwatch.lake import lake_days, lake_sha256, read_lake
    from deepwatch.models.detector import Detector
    from deepwatch.web_cli import ingest

    lake = tmp_path / "lake"
    ingest("kdd", str(lake), tiny_kdd)
    [day] = lake_days(lake)
    table = read_lake(lake, days=day)
    assert table.num_rows == 3000
    assert lake_sha256(lake, days=day) == lake_sha256(lake, days=[day])
    assert Detector(kdd_bundle).score_batch(table).num_rows == 3000


@pytest.mark.parametrize("given,said", [
    ({"seed": None}, "seed must be a whole number, not None"),
    ({"epochs": 2.0}, "epochs must be a whole number, not 2.0"),
    ({"epochs": "2"}, "epochs must be a whole number, not '2'"),
    ({"target_fpr": "0.01"}, "target_fpr must be a number between 0 and 1, not '0.01'"),
    # values of the right type but out of range: the parameter is named as Python spells it
    # (these said only "--epochs", "--folds", ...: the CLI's flags)
    ({"epochs": 0}, "epochs (--epochs) must be at least 1, not 0"),
    ({"folds": 0}, "folds (--folds) must be between 1 and 20, not 0"),
    ({"target_fpr": 1.5}, "target_fpr (--target-fpr) must be between 0 and 1, not 1.5"),
    ({"refit": True, "model": "autoencoder"}, "refit (--refit) trains classifiers again"),
])
def test_train_numbers_of_the_wrong_type_are_refused_first(
        tiny_kdd: Path, tmp_path: Path, given: dict[str, object], said: str) -> None:
    """Each failed with a raw TypeError (from torch, from a comparison; ``epochs=2.0`` only
    after the data was read and featurised)."""
    from deepwatch.train.api import train

    model = str(given.pop("model", "mlp"))
    with pytest.raises(UsageError, match=re.escape(said)):
        train("kdd", model, tiny_kdd, tmp_path / "b", **given)  # type: ignore[arg-type]
    assert not (tmp_path / "b").exists()


def test_a_filtered_pandas_frame_gets_its_index_back(kdd_bundle: Path,
                                                     parsed: pa.RecordBatch) -> None:
    """The result of scoring ``df[df.protocol_type == "icmp"]`` came back, through
    ``to_pandas()``, with a fresh RangeIndex and an ``__index_level_0__`` column: assigned
    back to the frame (``df["verdict"] = ...``), verdicts landed on the wrong rows."""
    import pandas as pd

    from deepwatch.models.detector import Detector

    det = Detector(kdd_bundle)
    frame = parsed.slice(0, 3000).to_pandas()
    icmp = frame[frame.protocol_type == "icmp"]
    assert 0 < len(icmp) < len(frame) and not icmp.index.equals(pd.RangeIndex(len(icmp)))
    out = det.score_batch(icmp).to_pandas()
    assert out.index.equals(icmp.index)
    assert "__index_level_0__" not in out.columns
    want = det.score_batch(parsed.slice(0, 3000)).to_pandas()
    assert np.array_equal(out["score"].to_numpy(), want["score"][icmp.index].to_numpy())


def test_a_frame_read_without_its_header_is_told_how_to_name_its_columns(
        kdd_bundle: Path, tiny_kdd: Path) -> None:
    """``pd.read_csv(path, header=None)``: the error listed all 41 column names in one
    line, and did not say what to do."""
    import pandas as pd

    from deepwatch.errors import InputError
    from deepwatch.formats import get_format
    from deepwatch.models.detector import Detector

    det = Detector(kdd_bundle)
    frame = pd.read_csv(tiny_kdd, header=None)
    with pytest.raises(InputError) as err:
        det.score_batch(frame)
    said = str(err.value)
    assert said.startswith("the records lack 41 of the columns this kdd model reads "
                           "('protocol_type', 'service', 'flag', 'duration', ...; they have "
                           "'0', '1', '2', '3', ...): give their columns the names in "
                           "deepwatch.formats.get_format('kdd').schema.names"), said
    frame.columns = get_format("kdd").schema.names
    assert det.score_batch(frame).num_rows == 3000


def test_a_policy_evaluate_cannot_rescore_by_says_why(kdd_bundle: Path, tiny_kdd: Path) -> None:
    """``evaluate(..., policy="fpr")`` (a policy ``train`` takes) was refused as "not
    available for this bundle", as if another bundle had it; no bundle has it when scoring."""
    from deepwatch.evaluate.run import evaluate

    with pytest.raises(UsageError, match="'fpr' cannot be chosen when scoring: use threshold "
                                         r"\(the bundle's calibrated threshold\) or cost"):
        evaluate(kdd_bundle, "kdd", tiny_kdd, policy="fpr")
    result, _ = evaluate(kdd_bundle, "kdd", tiny_kdd, policy="threshold")
    assert result["binary"]["threshold"] is not None


def test_alerts_from_a_pandas_frame_and_from_unscored_records(kdd_bundle: Path,
                                                              parsed: pa.RecordBatch) -> None:
    """``alert_lines`` of scored records as a pandas frame failed on a bare ``assert`` (no
    message at all); of records not scored, with polars' ``ColumnNotFoundError``."""
    import json
    from datetime import UTC, datetime

    from deepwatch.alerts import AlertContext, alert_lines, malicious
    from deepwatch.errors import InputError
    from deepwatch.models.detector import Detector

    det = Detector(kdd_bundle)
    ctx = AlertContext.from_detector(det)
    flagged = malicious(det.score_batch(parsed.slice(0, 2000)))
    assert flagged.num_rows > 0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    from_pandas = alert_lines(flagged.to_pandas(), ctx, now=now)
    assert from_pandas == alert_lines(flagged, ctx, now=now)
    assert json.loads(from_pandas[0])["event"]["kind"] == "alert"
    with pytest.raises(InputError, match="alerts are made of scored records .* no 'score'"):
        alert_lines(parsed.slice(0, 10), ctx)


def test_read_inputs_takes_a_format_name(tiny_kdd: Path) -> None:
    """``read_inputs(path, "kdd")`` failed with ``AttributeError: 'str' object has no
    attribute 'parse_bulk'``: only a Format object was taken."""
    from deepwatch.formats import get_format
    from deepwatch.sources.files import read_inputs

    table, rejects, stats = read_inputs(tiny_kdd, "kdd")
    assert (table.num_rows, rejects.num_rows, stats.parsed) == (3000, 0, 3000)
    assert table.equals(read_inputs([tiny_kdd], get_format("kdd"))[0])


def test_evaluate_without_inputs_says_so(kdd_bundle: Path) -> None:
    """``evaluate(bundle, "kdd", [])`` said "no records could be parsed from the evaluation
    inputs", a DataError (exit 4) as if the inputs held garbage."""
    from deepwatch.evaluate.run import evaluate

    with pytest.raises(UsageError, match="nothing to evaluate on: give one or more labelled"):
        evaluate(kdd_bundle, "kdd", [])


def test_deepwatch_api_names_the_python_api_and_loads_it_lazily() -> None:
    """``from deepwatch.api import ...`` gives the very objects of their modules, and importing
    ``deepwatch.api`` loads neither torch nor onnxruntime (a fresh interpreter checks)."""
    import subprocess
    import sys

    code = """
import importlib, sys
import deepwatch.api as api
heavy = sorted(m for m in ('torch', 'onnxruntime', 'polars') if m in sys.modules)
assert not heavy, heavy
assert api.__all__ == sorted(api._WHERE), api.__all__
for name in api.__all__:
    assert getattr(api, name) is getattr(importlib.import_module(api._WHERE[name]), name), name
assert set(api.__all__) <= set(dir(api))
from deepwatch.api import Detector, evaluate, train
from deepwatch.models.detector import Detector as D
assert Detector is D and callable(evaluate) and callable(train)
try:
    api.nothing_here
except AttributeError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "module 'deepwatch.api' has no attribute 'nothing_here'\n"


def test_two_threads_may_train_at_once(tiny_kdd: Path, tmp_path: Path) -> None:
    """Two ``train`` calls from two threads: one failed in torch's ONNX export
    (``AssertionError: GLOBALS.in_onnx_export must be True``: it keeps process-wide state),
    and both seeded the global generators their weights are drawn from, so neither got the
    model its seed gives. They now run one after the other, each as it would alone."""
    from concurrent.futures import ThreadPoolExecutor

    from deepwatch.train.api import train

    few = tmp_path / "few.csv"
    few.write_text("".join(tiny_kdd.read_text().splitlines(keepends=True)[:400]))

    def fit(name: str) -> dict:
        return train("kdd", "mlp", few, tmp_path / name, epochs=1, seed=3,
                     options={"epoch_size": 512})

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(fit, ["a", "b"])
    weights = [(tmp_path / n / "weights.safetensors").read_bytes() for n in "ab"]
    assert weights[0] == weights[1]
    assert first["training"]["history"] == second["training"]["history"]


@pytest.mark.parametrize(("out", "given", "said"), [
    (None, {}, "out must be a path (str or pathlib.Path), not NoneType"),
    (3, {}, "out must be a path (str or pathlib.Path), not int"),
    ("b", {"rejects": 3}, "rejects must be a path (str or pathlib.Path), not int"),
    ("b", {"device": None}, "device must be auto, cpu or cuda[:N], not None"),
])
def test_train_paths_and_device_of_the_wrong_type_are_refused(
        tiny_kdd: Path, tmp_path: Path, out: object, given: dict[str, object],
        said: str) -> None:
    """Each failed with a raw TypeError from pathlib or torch, not one of deepwatch's."""
    from deepwatch.train.api import train

    target = tmp_path / out if isinstance(out, str) else out
    with pytest.raises(UsageError, match=re.escape(said)):
        train("kdd", "mlp", tiny_kdd, target, **given)  # type: ignore[arg-type]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("options", "said"), [
    ({"batch_size": 0}, "option batch_size must be a whole number at least 1, not 0"),
    ({"lr": "1e-3"}, "option lr must be a number, not '1e-3'"),
    ({"class_balance": float("nan")}, "option class_balance must be a number, not nan"),
    ({"dropout": 1.5}, "option dropout must be a number at least 0 and below 1, not 1.5"),
    ({"novel_category": 5}, "option novel_category must be a category name (str), not 5"),
])
def test_a_training_option_value_it_cannot_take_is_refused_first(
        tiny_kdd: Path, tmp_path: Path, options: dict[str, object], said: str) -> None:
    """Each failed only after the data was read and featurised: ``batch_size=0`` with a
    ZeroDivisionError, ``lr="1e-3"`` and ``dropout=1.5`` with torch's TypeError and
    ValueError, ``class_balance=nan`` with numpy's "Probabilities contain NaN"."""
    from deepwatch.train.api import train

    with pytest.raises(UsageError, match=re.escape(said)):
        train("kdd", "hybrid", tiny_kdd, tmp_path / "b", epochs=1, options=options)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("path", [None, 3])
def test_a_detector_of_no_path_says_so(path: object) -> None:
    """``Detector(None)`` (a path variable not set) failed with pathlib's TypeError, not one
    of deepwatch's errors; ``evaluate(None, ...)`` the same way."""
    from deepwatch.api import Detector, evaluate

    said = f"give its path (str or pathlib.Path), not {type(path).__name__}"
    with pytest.raises(UsageError, match=re.escape(said)):
        Detector(path)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=re.escape(said)):
        evaluate(path, "kdd", __file__)  # type: ignore[arg-type]


@pytest.mark.parametrize("call", ["detector", "score_files", "train", "evaluate", "fetch",
                                  "read_inputs", "write_report"])
def test_a_flag_that_is_not_a_bool_is_refused(call: str, kdd_bundle: Path, tiny_kdd: Path,
                                              tmp_path: Path) -> None:
    """The README promises a DeepwatchError for an argument of the wrong type, but a flag took
    any value: ``score_files(..., alerts_only="no")`` wrote only the alerts,
    ``Detector(b, explain="no")`` explained, ``train(..., refit="no")`` refitted and wrote
    ``"refit": "no"`` into the manifest."""
    from deepwatch import api

    out = tmp_path / "out.jsonl"
    calls = {
        "detector": (lambda: api.Detector(kdd_bundle, explain="no"), "explain"),
        "score_files": (lambda: api.score_files(kdd_bundle, "kdd", tiny_kdd, out,
                                                alerts_only="no"), "alerts_only"),
        "train": (lambda: api.train("kdd", "mlp", tiny_kdd, tmp_path / "b", refit="no"),
                  "refit"),
        "evaluate": (lambda: api.evaluate(kdd_bundle, "kdd", tiny_kdd, progress="no"),
                     "progress"),
        "fetch": (lambda: api.fetch("kdd99-corrected", progress=1), "progress"),
        "read_inputs": (lambda: api.read_inputs(tiny_kdd, "kdd", progress="off"), "progress"),
        "write_report": (lambda: api.write_report(tmp_path / "r.html", {}, {}, progress="no"),
                         "progress"),
    }
    run, name = calls[call]
    with pytest.raises(UsageError, match=rf"^{name} must be True or False, not "):
        run()
    assert not out.exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "r.html").exists()


def test_numpy_bools_are_taken_as_flags(kdd_bundle: Path, tiny_kdd: Path,
                                        tmp_path: Path) -> None:
    import numpy as np

    from deepwatch import api

    report = api.score_files(kdd_bundle, "kdd", tiny_kdd, tmp_path / "o.jsonl",
                             alerts_only=np.bool_(True))
    assert report is not None
    rows = (tmp_path / "o.jsonl").read_text().splitlines()
    assert rows and all('"verdict":"malicious"' in r for r in rows)


@pytest.mark.parametrize(("given", "said"), [
    ({"feature_sample": "10"}, "feature_sample must be a whole number, 0 or more, not '10'"),
    ({"feature_sample": 1.5}, "feature_sample must be a whole number, 0 or more, not 1.5"),
    ({"feature_sample": -1}, "feature_sample must be a whole number, 0 or more, not -1"),
    ({"rejects": 3}, "rejects must be a path (str or pathlib.Path), not int"),
    ({"log": "warnings.txt"}, "log must be a function taking a line (str), not str"),
])
def test_an_evaluate_argument_it_cannot_take_is_refused_first(
        kdd_bundle: Path, tiny_kdd: Path, given: dict[str, object], said: str) -> None:
    """``feature_sample="10"`` and ``rejects=3`` failed with Python's TypeError, ``1.5`` only
    after every record was scored, ``-1`` was taken as 0."""
    from deepwatch.api import evaluate

    with pytest.raises(UsageError, match=re.escape(said)):
        evaluate(kdd_bundle, "kdd", tiny_kdd, **given)  # type: ignore[arg-type]


def test_read_inputs_of_no_format_says_so(tiny_kdd: Path) -> None:
    """``read_inputs(path, 3)`` failed with ``AttributeError: parse_bulk``."""
    from deepwatch.api import read_inputs
    from deepwatch.formats import get_format

    with pytest.raises(UsageError, match=re.escape("fmt must be a format or its name")):
        read_inputs(tiny_kdd, 3)  # type: ignore[arg-type]
    table, _rejects, _stats = read_inputs(tiny_kdd, get_format("kdd"))
    assert table.num_rows > 0
