"""Command-line paths a user relies on that no other test walked: Ctrl-C, progress bars beside
records on stdout, the inference backends (and onnxruntime missing), rejects files of runs that
fail, classifiers given unlabelled validation data, and the scoring cache when it fills up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import head_lines, output_begun, signal_until_it_ends, signal_when

from deepwatch.cli import main

QUIET = {**os.environ, "DEEPWATCH_PROGRESS": "0"}


def _cli(*args: str, env: dict[str, str] | None = None, prelude: str = "",
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``deepwatch ARGS`` in a fresh interpreter; ``prelude`` runs first (e.g. hides a module)."""
    code = f"{prelude}\nimport sys\nfrom deepwatch.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env=env or QUIET, input=stdin)


def _one_error_line(err: str, says: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], err


@pytest.fixture(scope="module")
def records(small_kdd_test: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("paths") / "records.csv"
    p.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:400]))
    return p


def _jsonl(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


# -- Ctrl-C and progress bars --------------------------------------------------------------------

def _stop_scoring(bundle: Path, out: Path, sig: signal.Signals,
                  data: bytes = b"") -> tuple[int, str]:
    """``score --out OUT -`` fed ``data`` on stdin, stopped by ``sig`` once OUT is begun (the
    first chunk is being written; with no data, after a moment): the exit status and stderr.
    Stdin stays open and idle, as when the signal reaches deepwatch alone (``kill``, a
    scheduler) and not the program writing to it: the run used to hang there until the writer
    closed the pipe, the signal having gone to one of its other threads."""
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch", "score", str(bundle),
                             "--format", "kdd", "--out", str(out), "-"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=QUIET)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        if data:
            proc.stdin.write(data)
            proc.stdin.flush()
            signal_when(proc, lambda: output_begun(out), sig)
        else:
            time.sleep(3)  # started, waiting on stdin
            proc.send_signal(sig)
            proc.wait(timeout=60)
        return proc.returncode, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stderr.close()


def test_ctrl_c_while_scoring_is_one_line_exit_130_and_whole_records(
        kdd_bundle: Path, kdd_test_file: Path, tmp_path: Path) -> None:
    """Typer turned Ctrl-C into a silent exit 130: the user was told nothing. The records
    scored before it stay in the output as whole JSON lines, and the one line says how many and
    that the output is incomplete (as an input failing mid-run does)."""
    data = "".join(head_lines(kdd_test_file, 100_000)).encode()
    assert len(data) > 8 << 20  # more than one chunk: the first is scored while stdin is open
    out = tmp_path / "out.jsonl"
    code, err = _stop_scoring(kdd_bundle, out, signal.SIGINT, data)
    assert code == 130, err
    text = out.read_text()
    assert text.endswith("\n"), (err, len(text))
    rows = _jsonl(text)
    # (every line read of the pipe is scored: all of them, if the writer had sent them all)
    assert 0 < len(rows) <= 100_000 and all(r["verdict"] in ("normal", "malicious")
                                            for r in rows)
    assert err.strip() == (f"interrupted: the {len(rows):,} rows scored before it are kept in "
                           f"{out}, which is incomplete"), err


def test_sigterm_while_scoring_to_parquet_leaves_a_whole_file_said_to_be_partial(
        kdd_bundle: Path, kdd_test_file: Path, tmp_path: Path) -> None:
    """SIGTERM (a scheduler's stop, ``timeout``) ended the process mid-write: the Parquet file
    had no footer and could not be read. Now it stops as Ctrl-C does: the rows scored so far
    are a readable file, and the one line says how many, that the file is incomplete, and exit
    143 (128 + SIGTERM)."""
    import pyarrow.parquet as pq

    data = "".join(head_lines(kdd_test_file, 100_000)).encode()
    out = tmp_path / "out.parquet"
    code, err = _stop_scoring(kdd_bundle, out, signal.SIGTERM, data)
    assert code == 143, err
    table = pq.read_table(out)  # whole: footer written
    assert 0 < table.num_rows <= 100_000  # (every line read of the pipe is scored)
    assert set(table.column("verdict").to_pylist()) <= {"normal", "malicious"}
    assert err.strip() == (f"terminated: the {table.num_rows:,} rows scored before it are kept "
                           f"in {out}, which is incomplete"), err


@pytest.mark.parametrize(("sig", "word", "code", "suffix"), [
    (signal.SIGINT, "interrupted", 130, ".jsonl"), (signal.SIGTERM, "terminated", 143, ".parquet")])
def test_stops_sent_again_and_again_are_held_until_the_output_is_closed(
        kdd_bundle: Path, kdd_test_file: Path, tmp_path: Path, sig: signal.Signals, word: str,
        code: int, suffix: str) -> None:
    """A user pressing Ctrl-C again while the first one is being handled (or a supervisor
    repeating SIGTERM) cut the close short: the second signal raised inside it, so the line
    saying what was kept was lost, tracebacks came from the exit handlers, the exit status was
    -2, and a JSONL output came out empty (polars' own Ctrl-C hook stopped the writer thread
    mid-batch). Now only the first stop counts; the ones after are held, said so once."""
    import pyarrow.parquet as pq

    data = "".join(head_lines(kdd_test_file, 100_000)).encode()
    out = tmp_path / f"out{suffix}"
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch", "score", str(kdd_bundle),
                             "--format", "kdd", "--out", str(out), "-"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=QUIET)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        sent = signal_until_it_ends(proc, lambda: output_begun(out), sig)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stderr.close()
    assert sent > 1
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if suffix == ".jsonl":
        text = out.read_text()
        assert text.endswith("\n"), (err, len(text))
        rows = len(_jsonl(text))
    else:
        rows = pq.read_table(out).num_rows
    assert 0 < rows <= 100_000, err  # (every line read of the pipe is scored)
    lines = err.strip().splitlines()
    assert lines[-1] == (f"{word}: the {rows:,} rows scored before it are kept in {out}, "
                         "which is incomplete"), err
    # (said once: while the lines read of the pipe are scored, or while the output is closed)
    assert lines[:-1] in ([], ["already stopping: the clean-up under way is finished first"],
                          ["already stopping: the lines read of <stdin> are scored first"]), err


def _stop_scoring_with_rejects(bundle: Path, out: Path, rejects: Path,
                               data: bytes) -> tuple[int, str]:
    """``score --out OUT --rejects REJECTS -`` fed ``data`` (stdin left open), stopped by
    Ctrl-C once REJECTS holds a record: the exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch", "score", str(bundle),
                             "--format", "kdd", "--out", str(out), "--rejects", str(rejects),
                             "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=QUIET)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        signal_when(proc, lambda: rejects.exists() and rejects.stat().st_size > 0,
                    signal.SIGINT)
        return proc.returncode, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stderr.close()


def test_a_stopped_score_says_its_rejects_are_kept_and_incomplete_too(
        kdd_bundle: Path, kdd_test_file: Path, tmp_path: Path) -> None:
    """The line named the rows kept, not the rejects file beside them, which was as partial;
    with nothing scored yet it said a bare "interrupted" though rejects were kept."""
    garbage = "".join(f"not a record {i},x\n" for i in range(150_000)).encode()
    good = "".join(head_lines(kdd_test_file, 60_000)).encode()
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    code, err = _stop_scoring_with_rejects(kdd_bundle, out, rejects, garbage + good)
    assert code == 130, err
    rows = len(_jsonl(out.read_text()))
    bad = _jsonl(rejects.read_text())
    # every line read of the pipe is scored or rejected (one cut short by the stop: a reject)
    assert 0 < rows <= 60_000 and 0 < len(bad) <= 150_001
    assert all(r["reason"] for r in bad)
    assert err.strip() == (f"interrupted: the {rows:,} rows scored before it are kept in {out} "
                           f"and the {len(bad):,} rejected records read before it in "
                           f"{rejects}, which are incomplete"), err


def test_a_score_stopped_before_any_row_keeps_its_rejects_and_makes_no_output(
        kdd_bundle: Path, tmp_path: Path) -> None:
    """A first chunk all rejects made the output file (an empty Parquet file), which a stop
    then left behind: read as "nothing malicious" though nothing was scored."""
    garbage = "".join(f"not a record {i},x\n" for i in range(600_000)).encode()
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.jsonl"
    code, err = _stop_scoring_with_rejects(kdd_bundle, out, rejects, garbage)
    assert code == 130, err
    assert not out.exists()
    bad = _jsonl(rejects.read_text())
    assert 0 < len(bad) <= 600_000  # (every line read of the pipe is taken)
    assert err.strip() == (f"interrupted: the {len(bad):,} rejected records read before it are "
                           f"kept in {rejects}, which is incomplete"), err


def test_ctrl_c_before_any_record_is_scored_is_plain_interrupted(
        kdd_bundle: Path, tmp_path: Path) -> None:
    """Nothing scored yet (stdin still empty): no output is made, and nothing is claimed kept."""
    out = tmp_path / "out.jsonl"
    code, err = _stop_scoring(kdd_bundle, out, signal.SIGINT)
    assert code == 130, err
    assert err.strip() == "interrupted", err
    assert not out.exists()


def test_progress_bars_never_touch_the_records_on_stdout(kdd_bundle: Path,
                                                         records: Path) -> None:
    """rich writes to stdout unless told otherwise: with progress on (stderr a terminal),
    `score --out -` put a blank line before the records."""
    r = _cli("score", str(kdd_bundle), "--format", "kdd", "--out", "-", str(records),
             env={**os.environ, "DEEPWATCH_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 400
    assert len(_jsonl(r.stdout)) == 400
    assert "400 rows written to -" in r.stderr


# -- inference backends --------------------------------------------------------------------------

def test_backends_onnx_torch_and_onnxruntime_missing(kdd_bundle: Path, records: Path,
                                                     tmp_path: Path) -> None:
    base = ["score", str(kdd_bundle), "--format", "kdd", "--out", "-", str(records)]
    onnx = _cli(*base, "--backend", "onnx")
    torch = _cli(*base, "--backend", "torch")
    assert onnx.returncode == 0 and torch.returncode == 0, onnx.stderr + torch.stderr
    assert "(onnxruntime:CPU)" in onnx.stderr and "(torch:cpu)" in torch.stderr
    a, b = _jsonl(onnx.stdout), _jsonl(torch.stdout)
    assert [r["verdict"] for r in a] == [r["verdict"] for r in b]
    assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)

    # without onnxruntime (it is an optional speed-up): auto scores with torch, onnx says why
    hide = "import sys; sys.modules['onnxruntime'] = None"
    auto = _cli(*base, prelude=hide)
    assert auto.returncode == 0 and "(torch:cpu)" in auto.stderr, auto.stderr
    assert _jsonl(auto.stdout) == b
    r = _cli(*base, "--backend", "onnx", prelude=hide)
    assert r.returncode == 2
    _one_error_line(r.stderr, "onnxruntime is not installed")

    r = _cli(*base, "--backend", "tensorflow")
    assert r.returncode == 2
    _one_error_line(r.stderr, "unknown engine 'tensorflow'; use auto, onnx or torch")

    no_onnx = tmp_path / "no_onnx"
    import shutil

    shutil.copytree(kdd_bundle, no_onnx)
    manifest = json.loads((no_onnx / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (no_onnx / "model.onnx").unlink()
    (no_onnx / "manifest.json").write_text(json.dumps(manifest))
    r = _cli("score", str(no_onnx), "--format", "kdd", "--out", "-", "--backend", "onnx",
             str(records))
    assert r.returncode == 3 and r.stdout == ""
    _one_error_line(r.stderr, "has no model.onnx")


def test_score_engine_and_output_mistakes_are_one_line_before_any_output(
        kdd_bundle: Path, records: Path, tmp_path: Path) -> None:
    rej = tmp_path / "rejects.jsonl"
    cases = [
        (["--out", str(tmp_path / "o.csv")], "--out must end in .parquet or .jsonl"),
        (["--out", str(tmp_path / "o.jsonl"), "--engine", "dask"], "unknown engine 'dask'"),
        (["--out", str(tmp_path / "o.jsonl"), "--engine", "spark", "--cluster"],
         "--cluster works with --engine local only"),
    ]
    for extra, says in cases:
        r = _cli("score", str(kdd_bundle), "--format", "kdd", "--rejects", str(rej), *extra,
                 str(records))
        assert r.returncode == 2, (extra, r.stderr)
        _one_error_line(r.stderr, says)
        assert not rej.exists() and not list(tmp_path.glob("o.*")), extra


# -- runs that fail keep no empty rejects file; classifiers need labelled validation -------------

def test_a_failed_evaluate_or_train_leaves_no_empty_rejects_file(
        kdd_bundle: Path, small_kdd: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An empty rejects file reads as "nothing was rejected" (score removed it; evaluate and
    train left one behind, and train left its file open)."""
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("".join(line.rsplit(",", 1)[0] + "\n"
                                  for line in small_kdd.read_text().splitlines()[:50]))
    rej = tmp_path / "rej.jsonl"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json",
                 str(tmp_path / "e.json"), "--rejects", str(rej), str(unlabelled)]) == 4
    assert "needs labelled records" in capsys.readouterr().err
    assert not rej.exists() and not (tmp_path / "e.json").exists()

    few = tmp_path / "few.csv"
    few.write_text("".join(small_kdd.read_text().splitlines(keepends=True)[:3]))
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", str(tmp_path / "b"),
                 "--rejects", str(rej), str(few)]) == 4
    assert "too few training records (3)" in capsys.readouterr().err
    assert not rej.exists() and not (tmp_path / "b").exists()

    # what was rejected stays: it says why the run had too few records
    few.write_text(few.read_text() + "not a record\n")
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", str(tmp_path / "b"),
                 "--rejects", str(rej), str(few)]) == 4
    capsys.readouterr()
    assert [r["raw"] for r in _jsonl(rej.read_text())] == ["not a record"]


@pytest.mark.parametrize("model", ["mlp", "hybrid"])
def test_a_classifier_with_unlabelled_validation_data_is_one_clear_error(
        model: str, small_kdd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    """It was an AssertionError traceback after the data was read and featurised."""
    lines = small_kdd.read_text().splitlines(keepends=True)
    train = tmp_path / "train.csv"
    train.write_text("".join(lines[:3000]))
    val = tmp_path / "val.csv"  # 41 fields: records without their label
    val.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines[3000:3300]))
    assert main(["train", "--format", "kdd", "--model", model, "--epochs", "1", "--out",
                 str(tmp_path / "b"), "--val", str(val), str(train)]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: model {model!r} stops early and sets its threshold on labelled validation "
        "records, but the validation data has no labels: label it (PATH=LABEL) or drop the "
        "validation inputs (--val)")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("model", ["mlp", "hybrid"])
def test_decision_fpr_without_benign_validation_records_is_refused_before_training(
        model: str, small_kdd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It was refused only once every network had been trained."""
    import deepwatch.train.supervised as supervised

    def trained(*_a: object, **_k: object) -> None:
        raise AssertionError("a network was trained before the refusal")

    monkeypatch.setattr(supervised, "train_supervised", trained)
    lines = small_kdd.read_text().splitlines(keepends=True)
    train = tmp_path / "train.csv"
    train.write_text("".join(lines[:3000]))
    val = tmp_path / "val.csv"  # labelled, but attacks only
    val.write_text("".join(x for x in lines[3000:] if not x.rstrip().endswith("normal."))[:60000])
    assert main(["train", "--format", "kdd", "--model", model, "--decision", "fpr", "--epochs",
                 "1", "--out", str(tmp_path / "b"), "--val", str(val), str(train)]) == 4
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: --decision fpr needs benign ('normal') records in the validation data"), err
    assert not (tmp_path / "b").exists()



@pytest.mark.parametrize("model", ["mlp", "hybrid"])
def test_decision_cost_with_labels_no_kdd_category_knows_is_refused_before_training(
        model: str, small_kdd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost matrix has no row for such a label: an explicit ``--decision cost`` used to
    give a bundle deciding by threshold, without a word."""
    import deepwatch.train.supervised as supervised

    def trained(*_a: object, **_k: object) -> None:
        raise AssertionError("a network was trained before the refusal")

    lines = small_kdd.read_text().splitlines(keepends=True)[:3000]
    odd = [x for x in lines if x.rstrip().endswith(",smurf.")]
    assert len(odd) > 50
    train = tmp_path / "train.csv"
    train.write_text("".join(x.replace(",smurf.", ",foo.") for x in lines))
    with monkeypatch.context() as patched:
        patched.setattr(supervised, "train_supervised", trained)
        assert main(["train", "--format", "kdd", "--model", model, "--decision", "cost",
                     "--epochs", "1", "--out", str(tmp_path / "b"), str(train)]) == 4
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: --decision cost weighs the KDD contest's cost matrix, which has no row for the "
        "training labels no KDD category knows: 'foo' (give --decision threshold or fpr, or "
        "leave --decision out: the bundle then decides by threshold)"), err
    assert not (tmp_path / "b").exists()
    if model == "mlp":  # left to the default, the same data gives a threshold bundle
        assert main(["train", "--format", "kdd", "--model", model, "--epochs", "1", "--out",
                     str(tmp_path / "b"), str(train)]) == 0
        manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
        assert manifest["decision"]["policy"] == "threshold"

# -- the scoring cache of a long-running service, when it fills up -----------------------------

def test_the_result_cache_starts_again_when_full_and_stays_right(kdd_bundle: Path,
                                                                 kdd_test_file: Path) -> None:
    from deepwatch.formats import get_format
    from deepwatch.models.detector import (
        DEDUPE_MIN_ROWS,
        Detector,
        ResultCache,
        distinct_rows,
    )

    batch = get_format("kdd").parse("".join(head_lines(kdd_test_file, 60_000, every=3))).batch
    parts = [batch.slice(i, 6000) for i in range(0, 18_000, 6000)]
    assert all(p.num_rows >= DEDUPE_MIN_ROWS for p in parts)
    reference = Detector(kdd_bundle)  # scored without the cache: score_with_outputs

    def uncached(b: pa.RecordBatch) -> pa.RecordBatch:
        return reference.score_with_outputs(b)[0]

    distinct = [len(distinct_rows(p, reference.featurizer.input_columns)[0]) for p in parts]
    seen = len(distinct_rows(pa.Table.from_batches(parts),
                             reference.featurizer.input_columns)[0])
    det = Detector(kdd_bundle)
    # (floods repeat records: the parts hold a few hundred to a few thousand distinct ones)
    det._cache = ResultCache(max_rows=distinct[0] + 10)  # full by the second part
    for p in [*parts, parts[0], parts[1].slice(0, 4096), parts[0]]:
        got = det.score_batch(p)
        assert got.equals(uncached(p))
    assert det._cache.misses and det._cache.hits  # it both filled up and answered from memory
    assert len(det._cache) <= max(distinct) < seen  # it started again instead of growing


def test_main_registers_the_optional_commands_once() -> None:
    from deepwatch.cli import app, main

    assert main(["--version"]) == 0
    def names() -> list[str]:
        return [c.name or getattr(c.callback, "__name__", "") for c in app.registered_commands]

    first = names()
    assert main(["--version"]) == 0
    assert names() == first
    assert len(first) == len(set(first)) and {"stream", "ingest", "simulate"} <= set(first)
