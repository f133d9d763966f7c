"""The command line: contracts of evaluate JSON and score output, rejects, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepwatch.cli import main

BAD_LINES = "this is not a record\n\n1,2,3\n"
GOOD_UNLABELLED = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,"
                   "0.00,1.00,0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00\n")


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory: pytest.TempPathFactory, small_kdd_test: Path) -> Path:
    good = small_kdd_test.read_text().splitlines(keepends=True)[:3000]
    p = tmp_path_factory.mktemp("cli") / "mixed.csv"
    p.write_text("".join(good[:1000]) + BAD_LINES + "".join(good[1000:]))
    return p


def test_evaluate_writes_the_contract_json(kdd_bundle: Path, small_kdd_test: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(out),
                 str(small_kdd_test)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == len(small_kdd_test.read_text().splitlines())
    assert set(r["binary"]) >= {"precision", "recall", "f1", "accuracy", "roc_auc", "pr_auc",
                                "fpr", "threshold"}
    assert 0.0 <= r["kdd_cost"] <= 4.0 and r["uncategorised"] == {}
    assert list(r["categories"]) == ["normal", "probe", "dos", "u2r", "r2l"]
    assert r["confusion"]["labels"] == ["normal", "probe", "dos", "u2r", "r2l"]
    m = r["confusion"]["matrix"]
    assert len(m) == 5 and sum(map(sum, m)) == r["n"]
    assert sum(v["support"] for v in r["per_label"].values()) == r["n"]
    assert r["rows_per_second"] > 0
    # a small model on 20k records already separates the classes well
    assert r["binary"]["roc_auc"] > 0.9 and r["binary"]["f1"] > 0.85


def test_evaluate_says_which_labels_no_kdd_category_knows(kdd_bundle: Path, small_kdd_test: Path,
                                                        tmp_path: Path) -> None:
    """Labels outside the KDD tables are named in the JSON and on stderr, not silently left out
    of kdd_cost; with none left the cost is null, not a perfect 0.0."""
    lines = small_kdd_test.read_text().splitlines()[:50]
    odd = tmp_path / "odd.csv"
    odd.write_text("".join(ln.replace(",normal.", ",foo.") + "\n" for ln in lines))
    n_foo = sum(ln.endswith(",normal.") for ln in lines)
    assert 0 < n_foo < 50
    r = _run("evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(tmp_path / "e.json"),
             str(odd))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["uncategorised"] == {"foo": n_foo}
    assert sum(map(sum, result["confusion"]["matrix"])) == 50 - n_foo
    assert result["n"] == 50 and result["per_label"]["foo"]["support"] == n_foo
    assert f"warning: {n_foo} records have labels no KDD category knows: 'foo' ({n_foo})" \
        in r.stderr
    only = tmp_path / "only.csv"
    only.write_text("".join(ln.rsplit(",", 1)[0] + ",foo.\n" for ln in lines))
    r = _run("evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(tmp_path / "o.json"),
             str(only))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["kdd_cost"] is None and result["uncategorised"] == {"foo": 50}
    assert "kdd_cost" not in r.stderr.splitlines()[-2]


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_score_output_order_rejects_and_counts(kdd_bundle: Path, mixed_input: Path,
                                               tmp_path: Path, ext: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, rej = tmp_path / f"out.{ext}", tmp_path / "rejects.jsonl"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--rejects", str(rej), str(mixed_input)]) == 0
    if ext == "parquet":
        rows = pq.read_table(out).to_pylist()
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3000
    good = [ln for ln in mixed_input.read_text().splitlines() if ln.count(",") == 41]
    assert [r["src_bytes"] for r in rows] == [int(ln.split(",")[4]) for ln in good]
    assert {"score", "verdict", "attack_type", "category", "label"} <= set(rows[0])
    rejects = [json.loads(line) for line in rej.read_text().splitlines()]
    assert [r["line"] for r in rejects] == [1001, 1002, 1003]
    assert all(r["reason"] and "raw" in r for r in rejects)
    err = capsys.readouterr().err
    assert "3,003 lines read: 3,000 parsed, 3 rejected" in err


def test_alerts_only(kdd_bundle: Path, mixed_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "alerts.parquet"
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 "--alerts-only", str(mixed_input)]) == 0
    verdicts = pq.read_table(out).column("verdict").to_pylist()
    assert verdicts and set(verdicts) == {"malicious"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepwatch.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_user_mistakes_are_one_line_errors(kdd_bundle: Path, tmp_path: Path) -> None:
    r = _run("score", str(kdd_bundle), "--format", "kdd", "--out", str(tmp_path / "o.parquet"),
             str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = _run("train", "--format", "nope", "--model", "mlp", "--out", str(tmp_path / "b"),
             str(kdd_bundle / "manifest.json"))
    assert r.returncode == 2 and "unknown format 'nope'" in r.stderr
    r = _run("score", str(tmp_path), "--format", "kdd", "--out", str(tmp_path / "o.parquet"),
             "-")
    assert r.returncode == 3 and "not a deepwatch bundle" in r.stderr
    assert "Traceback" not in r.stderr
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(GOOD_UNLABELLED * 3)
    for cmd in ("evaluate", "report"):
        target = ["--json", str(tmp_path / "e.json")] if cmd == "evaluate" else \
            ["--out", str(tmp_path / "r.html")]
        r = _run(cmd, str(kdd_bundle), "--format", "kdd", *target, str(unlabelled))
        assert r.returncode == 4 and "needs labelled records" in r.stderr, (cmd, r.stderr)
        assert "PATH=LABEL" in r.stderr and "Traceback" not in r.stderr


def test_a_spark_master_without_the_spark_engine_is_refused(kdd_bundle: Path,
                                                            small_kdd_test: Path,
                                                            tmp_path: Path) -> None:
    """``score --master local[4]`` without ``--engine spark`` scored on the local engine and
    said nothing of the master it left out."""
    out = tmp_path / "o.jsonl"
    r = _run("score", str(kdd_bundle), "--format", "kdd", "--master", "local[4]",
             "--out", str(out), str(small_kdd_test))
    assert r.returncode == 2, r.stderr
    assert "--master works with --engine spark only" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize(("value", "says"), [
    ("abc", "must be a whole number, not 'abc'"),
    ("-2", "must be 1 or more (0: one per core), not -2"),
])
def test_a_bad_torch_threads_setting_is_one_line_before_the_work(small_kdd: Path, tmp_path: Path,
                                                                  value: str, says: str) -> None:
    """``DEEPWATCH_TORCH_THREADS=abc`` made ``train`` read the data, then die with a
    ValueError traceback; ``demo`` died the same way."""
    env = {**os.environ, "DEEPWATCH_TORCH_THREADS": value}
    for args in (["train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                  "--out", str(tmp_path / "b"), str(small_kdd)],
                 ["demo", "--out", str(tmp_path / "demo")]):
        r = subprocess.run([sys.executable, "-m", "deepwatch.cli", *args], capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [f"error: DEEPWATCH_TORCH_THREADS {says}"]
        assert "training data" not in r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "demo").exists()


def test_score_reads_stdin(kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    data = "".join(small_kdd_test.read_text().splitlines(keepends=True)[:50])
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "score", str(kdd_bundle),
                        "--format", "kdd", "--out", str(out), "-"], input=data,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 50


def test_train_summary_names_only_metrics_that_mean_something(
        small_kdd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = small_kdd.read_text().splitlines(keepends=True)
    benign = tmp_path / "benign.csv"
    benign.write_text("".join([ln for ln in lines if ln.rstrip().endswith(",normal.")][:2000]))
    assert main(["train", "--format", "kdd", "--model", "autoencoder", "--epochs", "1",
                 "--out", str(tmp_path / "ae"), f"{benign}=normal"]) == 0
    err = capsys.readouterr().err
    assert "validation: fpr 0.0" in err and "no attacks among the validation records" in err
    assert "precision" not in err and "recall" not in err
    # nor a false-positive rate where no validation record is benign: it read "fpr 0.0000"
    attacks = tmp_path / "attacks.csv"
    attacks.write_text("".join([ln for ln in lines if not ln.rstrip().endswith(",normal.")]
                               [:2000]))
    assert main(["train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                 "--out", str(tmp_path / "attacks"), str(attacks)]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("validation:")]
    assert "fpr" not in line.split("(")[0], line
    assert line.endswith("(no benign records among the validation records: no false-positive "
                         "rate)"), line
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("".join(lines[:3000]))
    assert main(["train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                 "--out", str(tmp_path / "mlp"), str(mixed)]) == 0
    err = capsys.readouterr().err
    assert "validation: precision 0." in err and "recall" in err and "no attacks" not in err


def test_outputs_that_cannot_be_written_are_one_line_errors_before_the_work(
        kdd_bundle: Path, mixed_input: Path, tmp_path: Path) -> None:
    a_dir = tmp_path / "a_dir.parquet"
    a_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    not_bundle = tmp_path / "not_bundle"
    not_bundle.mkdir()
    (not_bundle / "keep.txt").write_text("precious")
    nowhere = "/proc/deepwatch-no-such-dir/out"  # a directory nobody can create
    data = str(mixed_input)
    cases = [
        (["score", str(kdd_bundle), "--format", "kdd", "--out", str(a_dir), data], 2,
         "is a directory"),
        (["score", str(kdd_bundle), "--format", "kdd", "--out", nowhere + ".parquet", data], 2,
         "cannot create the directory of --out"),
        (["score", str(kdd_bundle), "--format", "kdd", "--out", str(tmp_path / "o.parquet"),
          "--rejects", str(a_dir), data], 2, "--rejects"),
        (["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(a_dir), data], 2,
         "is a directory"),
        (["report", str(kdd_bundle), "--format", "kdd", "--out", nowhere + ".html", data], 2,
         "cannot create the directory of --out"),
        (["train", "--format", "kdd", "--model", "mlp", "--out", str(a_file), data], 2,
         "is a file; a bundle is a directory"),
        (["train", "--format", "kdd", "--model", "mlp", "--out", nowhere, data], 2,
         "cannot write a bundle"),
        (["train", "--format", "kdd", "--model", "mlp", "--out", str(not_bundle), data], 2,
         "is not a deepwatch bundle"),
        (["ingest", "--format", "kdd", "--lake", str(a_file), data], 2, "is a file"),
        (["demo", "--out", str(a_file)], 2, "is a file; give a directory"),
    ]
    for args, code, message in cases:
        r = _run(*args)
        assert r.returncode == code and message in r.stderr, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1
        assert "training data" not in r.stderr  # refused before reading, let alone training
    assert (not_bundle / "keep.txt").read_text() == "precious"
    assert a_file.read_text() == "x"



def test_a_dash_for_a_file_output_is_refused_and_dev_stdout_works(
        kdd_bundle: Path, mixed_input: Path, tmp_path: Path) -> None:
    """``-`` is standard output for ``score --out`` and ``stream``; the options that write only
    files used to make a file named ``-`` in the working directory."""
    data = str(mixed_input)
    cases = [
        ["score", str(kdd_bundle), "--format", "kdd", "--out", "o.parquet", "--rejects", "-",
         data],
        ["evaluate", str(kdd_bundle), "--format", "kdd", "--json", "-", data],
        ["evaluate", str(kdd_bundle), "--format", "kdd", "--json", "e.json", "--report", "-",
         data],
        ["evaluate", str(kdd_bundle), "--format", "kdd", "--json", "e.json", "--rejects", "-",
         data],
        ["report", str(kdd_bundle), "--format", "kdd", "--out", "-", data],
        ["train", "--format", "kdd", "--model", "mlp", "--out", "b", "--rejects", "-", data],
    ]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "deepwatch.cli", *args], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        flag = args[args.index("-") - 1]
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: {flag} takes a file path, not '-' (for standard output, give /dev/stdout)")
        assert sorted(os.listdir(tmp_path)) == [], args  # nothing made, '-' least of all
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "score", str(kdd_bundle),
                        "--format", "kdd", "--out", "o.jsonl", "--rejects", "/dev/stdout", data],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rejected = [json.loads(x) for x in r.stdout.splitlines()]
    assert rejected and all(set(x) >= {"line", "raw", "reason"} for x in rejected)
    assert f"{len(rejected)} rejected" in r.stderr

def test_evaluate_writes_its_json_to_dev_stdout_on_a_pipe(kdd_bundle: Path, small_kdd_test: Path,
                                                           tmp_path: Path) -> None:
    """``--json /dev/stdout`` with stdout a pipe (``| jq``) ran the whole evaluation, then said
    "cannot write /dev/stdout: No such file or directory": /dev/stdout resolves to the pipe's
    name under /proc, which is no path, so the whole-or-nothing write looked for a directory
    there to put its temporary file in."""
    r = subprocess.run([sys.executable, "-m", "deepwatch.cli", "evaluate", str(kdd_bundle),
                        "--format", "kdd", "--json", "/dev/stdout", str(small_kdd_test)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)  # pipes
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 10_000
    assert os.listdir(tmp_path) == []


def test_a_stray_unlabelled_line_is_a_reject_in_train_and_evaluate(
        small_kdd: Path, small_kdd_test: Path, kdd_bundle: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One 41-field line inside a labelled file used to stop train/evaluate (exit 4)."""
    lines = small_kdd.read_text().splitlines(keepends=True)[:3000]
    stray = lines[0].rstrip("\n").rsplit(",", 1)[0] + "\n"
    t = tmp_path / "t.csv"
    t.write_text("".join(lines) + stray)
    assert main(["train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                 "--out", str(tmp_path / "b"), str(t)]) == 0
    err = capsys.readouterr().err
    assert "3,001 lines read: 3,000 parsed, 1 rejected" in err
    assert "1 record rejected: no label in labelled training data" in err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["training"]["records"], manifest["training"]["rejected"]) == (3000, 1)

    test_lines = small_kdd_test.read_text().splitlines(keepends=True)[:2000]
    e = tmp_path / "e.csv"
    e.write_text("".join(test_lines[:700]) + stray + "".join(test_lines[700:]))
    out = tmp_path / "e.json"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json", str(out),
                 str(e)]) == 0
    r = json.loads(out.read_text())
    assert r["records"] == {"lines": 2001, "parsed": 2000, "rejected": 1} and r["n"] == 2000
    # a whole input without labels beside a labelled one is still the clear error
    bare = tmp_path / "bare.csv"
    bare.write_text(stray * 3)
    r2 = _run("train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
              "--out", str(tmp_path / "b2"), str(t), str(bare))
    assert r2.returncode == 4 and "3 records have no label" in r2.stderr, r2.stderr
    assert "PATH=LABEL" in r2.stderr and "Traceback" not in r2.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["train", "--format", "kdd", "--model", "mlp", "--epochs", "abc", "--out", "b", "x.csv"],
     "error: Invalid value for '--epochs': 'abc' is not a valid int. "
     "(see 'deepwatch train --help')"),
    (["train", "--format", "kdd", "--model", "mlp", "x.csv"],
     "error: Missing option '--out' / '-o'. (see 'deepwatch train --help')"),
    (["nosuch"], "error: No such command 'nosuch'. (see 'deepwatch --help')"),
])
def test_usage_errors_are_one_line(args: list[str], says: str) -> None:
    r = _run(*args)
    assert r.returncode == 2
    assert r.stderr.strip() == says


def test_train_and_evaluate_keep_their_rejects(small_kdd: Path, small_kdd_test: Path,
                                               kdd_bundle: Path, tmp_path: Path) -> None:
    """Bad lines in training and evaluation data are kept with their reasons, not only
    counted: `--rejects` on train and evaluate, as on score."""
    good = small_kdd.read_text().splitlines(keepends=True)[:3000]
    train_file = tmp_path / "train.csv"
    train_file.write_text("".join(good[:1500]) + BAD_LINES + "".join(good[1500:]))
    rej = tmp_path / "train_rejects.jsonl"
    r = _run("train", "--format", "kdd", "--model", "mlp", "--epochs", "1", "--out",
             str(tmp_path / "b"), "--rejects", str(rej), str(train_file))
    assert r.returncode == 0, r.stderr
    kept = [json.loads(x) for x in rej.read_text().splitlines()]
    assert [k["line"] for k in kept] == [1501, 1502, 1503]
    assert [k["raw"] for k in kept] == BAD_LINES.splitlines()
    assert all(k["reason"] and k["source"] == str(train_file) for k in kept)
    assert "3 rejected records kept in" in r.stderr

    test = small_kdd_test.read_text().splitlines(keepends=True)[:2000]
    test_file = tmp_path / "test.csv"
    bare = test[10].rstrip("\n").rsplit(",", 1)[0]  # a record without its label
    test_file.write_text("".join(test[:10]) + BAD_LINES + bare + "\n" + "".join(test[10:]))
    erej = tmp_path / "eval_rejects.jsonl"
    r = _run("evaluate", str(kdd_bundle), "--format", "kdd", "--json",
             str(tmp_path / "e.json"), "--rejects", str(erej), str(test_file))
    assert r.returncode == 0, r.stderr
    kept = [json.loads(x) for x in erej.read_text().splitlines()]
    assert [k["line"] for k in kept] == [11, 12, 13, 14]
    assert kept[3]["raw"] == bare and kept[3]["reason"] == "no label in labelled evaluation data"
    assert "2,004 lines read: 2,000 parsed, 4 rejected" in r.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["records"] == {"lines": 2004, "parsed": 2000, "rejected": 4}
    # an output that is an input is refused before any work
    r = _run("evaluate", str(kdd_bundle), "--format", "kdd", "--json",
             str(tmp_path / "e2.json"), "--rejects", str(test_file), str(test_file))
    assert r.returncode == 2 and "is also an input" in r.stderr
    r = _run("train", "--format", "kdd", "--model", "mlp", "--out", str(tmp_path / "c"),
             "--rejects", str(train_file), str(train_file))
    assert r.returncode == 2 and "is also an input" in r.stderr


def test_the_backend_option_is_one_name_on_evaluate_and_serve(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """`--backend torch` runs the exported module in torch on evaluate (which still takes the
    older `--engine`) and serve, as on score and stream."""
    import httpx
    from conftest import free_port, stop_server, wait_healthy

    data = tmp_path / "t.csv"
    data.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:300]))
    got = {}
    for flag in ("--backend", "--engine"):
        r = _run("evaluate", str(kdd_bundle), "--format", "kdd", flag, "torch", "--json",
                 str(tmp_path / f"{flag}.json"), str(data))
        assert r.returncode == 0, r.stderr
        got[flag] = json.loads((tmp_path / f"{flag}.json").read_text())["binary"]
    assert got["--backend"] == got["--engine"]
    port = free_port()
    log = tmp_path / "serve.err"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle),
                                 "--port", str(port), "--backend", "torch"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=5).json()
        assert stats["model"]["engine"].startswith("torch")
    finally:
        stop_server(proc)


def test_every_option_help_is_shown_whole(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Help texts pass through rich markup: "[default: ...]" in one was taken for a style tag
    and vanished from `stream --help`. Every option's text must appear as written."""
    import typer

    from deepwatch import cli

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the option table
    cli._register_optional()
    group = typer.main.get_command(cli.app)
    missing = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None) or {name: cmd}
        for sub_name, sub in subs.items():
            argv = [name] if sub is cmd else [name, sub_name]
            assert main([*argv, "--help"]) == 0
            shown = " ".join(capsys.readouterr().out.replace("│", " ").split())
            for param in sub.params:
                text = " ".join((getattr(param, "help", None) or "").split())
                if text and text not in shown:
                    missing.append((argv, param.name, text))
    assert len(group.commands) >= 10  # type: ignore[attr-defined]
    assert not missing, missing


def test_a_file_of_another_format_is_named_with_the_likely_mistake(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Web logs given with --format kdd: every line a reject. score wrote an empty output and
    exit 0 with only the counts to go on, and evaluate/train said nothing of the format."""
    from deepwatch.simulate import simulate

    web = simulate(tmp_path / "sim", visits=5, attacks=[], seed=1)["normal"]
    n = len(web.read_text().splitlines())
    out = tmp_path / "o.jsonl"
    # rejects never stop a run: the good file is scored, the other named in a warning
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out), str(web),
                 str(small_kdd_test)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: none of the {n:,} lines of {web} could be parsed as kdd records; "
            "is --format right?") in err
    assert str(small_kdd_test) not in err.split("warning:", 1)[1]  # only the file at fault
    hint = f"(none of the {n:,} lines read could be parsed as kdd records: is --format right?)"
    assert main(["evaluate", str(kdd_bundle), "--format", "kdd", "--json",
                 str(tmp_path / "e.json"), f"{web}=normal"]) == 4
    assert capsys.readouterr().err.strip().endswith(hint)
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", str(tmp_path / "b"),
                 f"{web}=normal"]) == 4
    assert capsys.readouterr().err.strip().endswith(hint)
    # a file that parses gets no such warning, nor does an empty one
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                 str(small_kdd_test), str(empty)]) == 0
    assert "is --format right" not in capsys.readouterr().err
