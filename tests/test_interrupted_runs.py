"""Runs stopped part-way (Ctrl-C, SIGTERM) or failing late (a full disk) leave an older output
whole, no temporary files beside it, and one line saying what happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import signal_when

from deepwatch.bundle import MANIFEST, read_manifest, save_bundle

EXE = Path(sys.executable).with_name("deepwatch")


def _fsize_limit(limit: int) -> None:  # runs in the child before exec
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _child_env() -> dict[str, str]:
    # under a file-size limit coverage's own data file would fail too: children run unmeasured
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    env["DEEPWATCH_PROGRESS"] = "0"
    return env


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture()
def labelled(small_kdd_test: Path, tmp_path: Path) -> Path:
    p = tmp_path / "in.csv"
    p.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:300]))
    return p


def test_a_report_that_cannot_be_written_whole_leaves_the_older_one(
        kdd_bundle: Path, labelled: Path, tmp_path: Path) -> None:
    """The page (plotly inlined: megabytes) meets a full disk, here a file-size limit of 1 MiB:
    the older report is kept as it was, not replaced by its first megabyte."""
    out = tmp_path / "out"
    out.mkdir()
    page = out / "r.html"
    older = "<html>an older report</html>\n"
    page.write_text(older)
    for cmd in (["report", str(kdd_bundle), "-f", "kdd", "--out", str(page), str(labelled)],
                ["evaluate", str(kdd_bundle), "-f", "kdd", "--json", str(out / "e.json"),
                 "--report", str(page), str(labelled)]):
        done = subprocess.run([str(EXE), *cmd], capture_output=True, timeout=180,
                              env=_child_env(), preexec_fn=lambda: _fsize_limit(1 << 20))
        err = done.stderr.decode()
        assert done.returncode == 2, err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == (f"error: cannot write the report to {page}: "
                                                "File too large"), err
        assert page.read_text() == older
        assert _hidden(out) == []  # no temporary file left beside it


_PAUSED_IN_REPLACE = """
import os, pathlib, sys, time
replace = os.replace
def paused(src, dst):
    if str(dst).endswith(".html"):  # the page is written whole, not yet in place
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(120)
    replace(src, dst)
os.replace = paused
from deepwatch.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _stop_when_ready(cmd: list[str], ready: Path) -> tuple[int, str]:
    """Run ``cmd`` (a child that touches ``ready`` and waits) and stop it with SIGTERM there:
    its exit code and stderr."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=_child_env())
    try:
        signal_when(proc, ready.exists, signal.SIGTERM)
    finally:
        proc.kill()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    return proc.returncode, err


def test_a_report_stopped_by_sigterm_while_written_leaves_the_older_one(
        kdd_bundle: Path, labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    page = out / "r.html"
    page.write_text("<html>an older report</html>\n")
    code, err = _stop_when_ready(
        [sys.executable, "-c", _PAUSED_IN_REPLACE, str(tmp_path / "writing"), "report",
         str(kdd_bundle), "-f", "kdd", "--out", str(page), str(labelled)], tmp_path / "writing")
    assert code == 143, err  # 128 + SIGTERM, as a shell reports it
    assert err.strip().splitlines()[-1] == "terminated" and "Traceback" not in err, err
    assert page.read_text() == "<html>an older report</html>\n"
    assert _hidden(out) == []  # the page written whole beside it is gone


_PAUSED_IN_SAVE = """
import pathlib, sys, time
write = pathlib.Path.write_bytes
def paused(self, data):
    done = write(self, data)
    if self.parent.name.startswith("."):  # a file of the bundle being assembled
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(120)
    return done
pathlib.Path.write_bytes = paused
from deepwatch.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("into", ["a bundle", "an empty directory"])
def test_train_stopped_by_sigterm_while_saving_leaves_no_trace(
        kdd_bundle: Path, labelled: Path, tmp_path: Path, into: str) -> None:
    """SIGTERM (``timeout``, a scheduler's stop) while the bundle is being written: the older
    bundle, or the empty directory, is as it was, with no temporary directory beside or in it
    (one in an empty ``--out`` made the next run refuse it as no bundle)."""
    import shutil

    out = tmp_path / "b"
    if into == "a bundle":
        shutil.copytree(kdd_bundle, out)
    else:
        out.mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ready = tmp_path / "saving"
    code, err = _stop_when_ready([sys.executable, "-c", _PAUSED_IN_SAVE, str(ready), "train",
                                  "-f", "kdd", "-m", "mlp", "--epochs", "1", "--out", str(out),
                                  str(labelled)], ready)
    assert code == 143, err  # 128 + SIGTERM, as a shell reports it
    assert err.strip().splitlines()[-1] == "terminated", err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _hidden(tmp_path) == []
    if into == "a bundle":
        read_manifest(out)


@pytest.mark.parametrize("into", ["a bundle", "an empty directory"])
def test_a_bundle_save_stopped_between_its_moves_leaves_what_was_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, into: str) -> None:
    """Ctrl-C between the moves that put a bundle in place: replacing one, after the old bundle
    was moved aside and before the new one took its place (``--out`` was left missing, the old
    bundle under a hidden name); into an empty directory, after some files were moved in and
    before the manifest (the directory was left holding files but no bundle, which the next
    run refused to replace)."""
    out = tmp_path / "b"
    if into == "a bundle":
        save_bundle(out, {"model_kind": "mlp"}, {"w.bin": b"old"})
    else:
        out.mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replace = os.replace
    calls = []

    def stopped(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_bundle(out, {"model_kind": "mlp"}, {"w.bin": b"new", "x.bin": b"new"})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _hidden(tmp_path) == [] and _hidden(out) == []
    save_bundle(out, {"model_kind": "mlp"}, {"w.bin": b"new"})  # and it can be run again
    assert (out / "w.bin").read_bytes() == b"new" and (out / MANIFEST).is_file()


def test_an_eval_json_that_cannot_be_written_whole_leaves_the_older_one(
        kdd_bundle: Path, labelled: Path, tmp_path: Path) -> None:
    """evaluate --json wrote in place: under a full disk (a 1,000-byte file-size limit) an older
    eval.json became its first 1,000 bytes, invalid JSON that a script would then fail on or,
    worse, half read. Now the older file is kept whole and nothing is left beside it."""
    import json

    out = tmp_path / "out"
    out.mkdir()
    metrics = out / "eval.json"
    older = {"note": "an older evaluation"}
    metrics.write_text(json.dumps(older))
    done = subprocess.run([str(EXE), "evaluate", str(kdd_bundle), "-f", "kdd", "--json",
                           str(metrics), str(labelled)], capture_output=True, timeout=180,
                          env=_child_env(), preexec_fn=lambda: _fsize_limit(1000))
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {metrics}: "), err
    assert "Traceback" not in err, err
    assert json.loads(metrics.read_text()) == older
    assert _hidden(out) == []
    again = subprocess.run([str(EXE), "evaluate", str(kdd_bundle), "-f", "kdd", "--json",
                            str(metrics), str(labelled)], capture_output=True, timeout=180,
                           env=_child_env())
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads(metrics.read_text())["binary"]["f1"] > 0.5


# -- rejects kept by evaluate, report and train when stopped while reading --------------------

@pytest.fixture(scope="module")
def with_bad_lines(kdd_test_file: Path) -> bytes:
    """More than one chunk of KDD records, every 50th line followed by one that is no record."""
    from conftest import head_lines

    lines = head_lines(kdd_test_file, 100_000)
    data = "".join(line + (f"not a record {i}\n" if i % 50 == 0 else "")
                   for i, line in enumerate(lines)).encode()
    assert len(data) > 8 << 20  # the first chunk is read while stdin stays open
    return data


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["evaluate", "report", "train"])
def test_rejects_of_a_run_stopped_while_reading_are_kept_whole_and_said_incomplete(
        kdd_bundle: Path, with_bad_lines: bytes, tmp_path: Path, command: str,
        sig: signal.Signals) -> None:
    """evaluate, report and train stopped while reading stdin (kept open, as when the signal
    reaches deepwatch alone): the rejects read so far were left under the file's final name,
    and nothing said they were only part of them. Ctrl-C said a bare "interrupted"; SIGTERM
    killed evaluate and report with the last rejects still in the file's buffer (an empty file
    where records had been rejected); train, which kept its rejects in memory until all was
    read, lost them and left an older rejects file in place, as though this run's. Now the file
    holds, whole, the rejects read so far, and the one line says how many and that it is
    incomplete, as score says of its output."""
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text('{"older": "run"}\n')
    out = tmp_path / "out"
    args = {"evaluate": ["evaluate", str(kdd_bundle), "-f", "kdd", "--json", str(out)],
            "report": ["report", str(kdd_bundle), "-f", "kdd", "--out", str(out)],
            "train": ["train", "-f", "kdd", "-m", "mlp", "--epochs", "1", "--out", str(out)]}
    proc = subprocess.Popen([sys.executable, "-m", "deepwatch", *args[command],
                             "--rejects", str(rejects), "-"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(with_bad_lines)
        proc.stdin.flush()
        # the first chunk's rejects reached the file (hundreds: more than its buffer holds)
        signal_when(proc, lambda: "not a record" in rejects.read_text(), sig, within=60)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stderr.close()
    import json

    text = rejects.read_text()
    assert text.endswith("\n"), err
    kept = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert 0 < len(kept) < 2000, err
    assert all(r["raw"].startswith("not a record ") and r["reason"] for r in kept)
    word, code = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"{word}: the {len(kept):,} rejected records read before it are kept in {rejects}, "
        "which is incomplete"), err
    assert not out.exists()


class _StoppedAfterWrite:
    """A rejects file whose write is followed by a Ctrl-C, as when one comes while the write
    is under way: Python raises it as the write returns."""

    def __init__(self, fh: object) -> None:
        self.fh = fh

    def write(self, data: bytes) -> int:
        n = self.fh.write(data)  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGINT)
        return int(n)

    def __getattr__(self, name: str) -> object:
        return getattr(self.fh, name)


@pytest.mark.parametrize("when", ["while its lines are made", "as its write returns"])
@pytest.mark.usefixtures("python_sigint")
def test_a_stop_during_a_rejects_write_counts_what_the_file_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Ctrl-C lands wherever it lands: the records the one line says are kept are those the
    file holds. Counted before the write, a stop while the lines were made claimed records
    the file never got; counted after it, a stop as the write returned left them out (and,
    for the first write, removed a file that held them, as though nothing was rejected)."""
    import json

    from deepwatch import sinks
    from deepwatch.errors import Interrupted
    from deepwatch.formats._base import make_rejects

    path = tmp_path / "rejects.jsonl"
    batch = make_rejects([1, 2, 3], ["a", "b", "c"], ["no record"] * 3)
    with pytest.raises(Interrupted) as stop, sinks.keeping_rejects(str(path)) as sink:
        sink.write(batch)
        if when == "as its write returns":
            sink._fh = _StoppedAfterWrite(sink._fh)  # type: ignore[assignment]
        else:
            dumps = json.dumps

            def stopped(*args: object, **kwargs: object) -> str:
                os.kill(os.getpid(), signal.SIGINT)
                return dumps(*args, **kwargs)

            monkeypatch.setattr(sinks.json, "dumps", stopped)
        sink.write(batch)
    monkeypatch.undo()
    held = [json.loads(line)["raw"] for line in path.read_text().splitlines()]
    assert held == (["a", "b", "c"] * (2 if when == "as its write returns" else 1))
    assert stop.value.detail == (f"the {len(held)} rejected records read before it are kept "
                                 f"in {path}, which is incomplete")
