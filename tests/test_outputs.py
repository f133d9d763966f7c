"""Outputs never destroy inputs or each other; failures to write are one-line errors; bundles are
saved only where nothing but a bundle is replaced, checked before the work."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepwatch.bundle import MANIFEST, check_bundle_target, read_manifest, save_bundle
from deepwatch.cli import main
from deepwatch.errors import DataError, OutputError
from deepwatch.sinks import check_distinct_outputs

BAD_LINES = "this is not a record\n\n1,2,3\n"


@pytest.fixture()
def records(small_kdd_test: Path) -> str:
    """200 labelled KDD records, 3 bad lines among them."""
    good = small_kdd_test.read_text().splitlines(keepends=True)[:200]
    return "".join(good[:100]) + BAD_LINES + "".join(good[100:])


@pytest.fixture()
def train_data(small_kdd: Path, tmp_path: Path) -> Path:
    p = tmp_path / "train.csv"
    p.write_text("".join(small_kdd.read_text().splitlines(keepends=True)[:3000]))
    return p


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command writes to stderr."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_an_output_that_is_an_input_is_refused_before_any_work(
        kdd_bundle: Path, records: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = {name: tmp_path / name for name in ("victim.csv", "big.jsonl", "data.json",
                                                  "page.html")}
    for p in inputs.values():
        p.write_text(records)
    os.link(inputs["victim.csv"], tmp_path / "hardlink.csv")
    (tmp_path / "symlink.jsonl").symlink_to(inputs["big.jsonl"])
    b = str(kdd_bundle)
    cases = [
        ["score", b, "-f", "kdd", "--out", "v.jsonl", "--rejects", "victim.csv", "victim.csv"],
        ["score", b, "-f", "kdd", "--out", "big.jsonl", "big.jsonl"],
        ["score", b, "-f", "kdd", "--out", "./sub/../big.jsonl", str(inputs["big.jsonl"])],
        ["score", b, "-f", "kdd", "--out", "v.jsonl", "--rejects", "hardlink.csv",
         "victim.csv"],
        ["score", b, "-f", "kdd", "--out", "symlink.jsonl", "big.jsonl=normal"],
        ["score", b, "-f", "kdd", "--out", "v.jsonl", "--rejects", "victim.csv", "*.csv"],
        ["evaluate", b, "-f", "kdd", "--json", "data.json", "data.json"],
        ["evaluate", b, "-f", "kdd", "--json", "e.json", "--report", "page.html", "page.html"],
        ["report", b, "-f", "kdd", "--out", "page.html", "victim.csv", "page.html"],
    ]
    for args in cases:
        assert main(args) == 2, args
        line = _error_line(capsys)
        assert "is also an input" in line, (args, line)
    for p in inputs.values():
        assert p.read_text() == records, p  # every input as it was
    assert not any(tmp_path.glob("v.jsonl")) and not (tmp_path / "e.json").exists()
    assert not (tmp_path / "sub").exists()


def test_an_output_inside_the_bundle_is_refused(kdd_bundle: Path, tmp_path: Path,
                                               records: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(kdd_bundle, bundle)
    data = tmp_path / "in.csv"
    data.write_text(records)
    before = (bundle / MANIFEST).read_bytes()
    assert main(["evaluate", str(bundle), "-f", "kdd", "--json", str(bundle / MANIFEST),
                 str(data)]) == 2
    assert "inside the bundle" in _error_line(capsys)
    assert (bundle / MANIFEST).read_bytes() == before
    read_manifest(bundle)  # still a whole bundle


def test_two_outputs_at_one_path_are_refused(kdd_bundle: Path, records: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "in.csv"
    data.write_text(records)
    old = tmp_path / "same.out"
    old.write_text("an older result\n")
    b = str(kdd_bundle)
    cases = [
        ["score", b, "-f", "kdd", "--out", str(tmp_path / "o.jsonl"),
         "--rejects", str(tmp_path / "o.jsonl"), str(data)],
        ["score", b, "-f", "kdd", "--out", str(tmp_path / "o.jsonl"),
         "--rejects", str(tmp_path / "x" / ".." / "o.jsonl"), str(data)],
        ["evaluate", b, "-f", "kdd", "--json", str(old), "--report", str(old), str(data)],
    ]
    for args in cases:
        assert main(args) == 2, args
        assert "is the same file as" in _error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists()
    assert old.read_text() == "an older result\n"


def test_devices_may_take_several_outputs(tmp_path: Path) -> None:
    # /dev/null (like a pipe or a terminal) is no file to protect: two outputs may share it
    check_distinct_outputs([("--json", os.devnull), ("--report", os.devnull)], ["-"])
    with pytest.raises(Exception, match="same file"):
        check_distinct_outputs([("--json", str(tmp_path / "a")),
                                ("--report", str(tmp_path / "a"))])


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_empty_input_replaces_an_older_output(kdd_bundle: Path, tmp_path: Path,
                                              ext: str) -> None:
    out = tmp_path / f"o.{ext}"
    if ext == "parquet":
        pq.write_table(pa.table({"stale": [1, 2, 3]}), out)
    else:
        out.write_text('{"stale": 1}\n')
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    rejects = tmp_path / "rejects.jsonl"  # (made when no record was rejected, empty, too)
    rejects.write_text('{"line": 1, "raw": "stale", "reason": "stale"}\n')
    assert main(["score", str(kdd_bundle), "-f", "kdd", "--out", str(out), "--rejects",
                 str(rejects), str(empty)]) == 0
    assert rejects.read_text() == ""
    if ext == "jsonl":
        assert out.read_text() == ""
        return
    table = pq.read_table(out)
    assert table.num_rows == 0
    names = table.schema.names
    assert "stale" not in names
    assert {"duration", "src_bytes", "score", "verdict", "attack_type", "category"} <= set(names)


def test_a_failure_before_any_record_leaves_an_older_output_alone(
        kdd_bundle: Path, tmp_path: Path, records: str) -> None:
    from deepwatch.models.detector import Detector
    from deepwatch.scoring import score_files

    class Failing:  # the bundle's detector, failing on the first batch it scores
        def __init__(self, det: Detector):
            self._det = det

        def __getattr__(self, name: str) -> object:
            return getattr(self._det, name)

        def score_batch(self, *args: object, **kwargs: object) -> pa.RecordBatch:
            raise DataError("scoring failed")

    data = tmp_path / "in.csv"
    data.write_text("".join(line for line in records.splitlines(keepends=True)
                            if line.count(",") > 40))  # (no reject: only its older file)
    out = tmp_path / "o.jsonl"
    out.write_text('{"an": "older result"}\n')
    rejects = tmp_path / "rejects.jsonl"  # was truncated at the start, then removed
    rejects.write_text('{"line": 3, "raw": "x", "reason": "an older reject"}\n')
    with pytest.raises(DataError, match="scoring failed"):
        score_files(str(kdd_bundle), "kdd", [str(data)], str(out), rejects=str(rejects),
                    detector=Failing(Detector(kdd_bundle)))
    assert out.read_text() == '{"an": "older result"}\n'
    assert rejects.read_text() == '{"line": 3, "raw": "x", "reason": "an older reject"}\n'


def test_a_rejects_file_that_cannot_be_written_is_one_line_error(
        kdd_bundle: Path, tmp_path: Path, records: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    data = tmp_path / "in.csv"
    data.write_text(records)
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")
    assert main(["score", str(kdd_bundle), "-f", "kdd", "--out", str(tmp_path / "o.jsonl"),
                 "--rejects", str(full), str(data)]) == 2
    line = _error_line(capsys)
    assert f"cannot write {full}" in line and "No space left on device" in line
    # the same failure on --out reads the same way
    (tmp_path / "full2.jsonl").symlink_to("/dev/full")
    assert main(["score", str(kdd_bundle), "-f", "kdd", "--out", str(tmp_path / "full2.jsonl"),
                 str(data)]) == 2
    assert f"cannot write {tmp_path / 'full2.jsonl'}: No space left" in _error_line(capsys)


def test_an_output_under_a_file_says_the_file_is_no_directory(tmp_path: Path) -> None:
    """Making the directory of ``FILE/x.jsonl`` fails with "File exists" (or "Not a directory"
    a level deeper), which says neither which path is in the way nor why."""
    from deepwatch.sinks import RecordSink, RejectSink, writable_dir, writable_file

    note = tmp_path / "notes.txt"
    note.write_text("a file\n")
    for out in (note / "x.jsonl", note / "sub" / "x.parquet"):
        with pytest.raises(OutputError) as err:
            writable_file(out, "--out")
        assert str(err.value) == f"cannot write --out {out}: {note} is a file, not a directory"
        with pytest.raises(OutputError, match=f"{note} is a file, not a directory$"):
            RecordSink(str(out))
    with pytest.raises(OutputError, match=f"^cannot write --rejects {note}/r.jsonl: {note} is a "
                                          "file, not a directory$"):
        RejectSink(str(note / "r.jsonl"))
    with pytest.raises(OutputError, match=f"^cannot write --out {note}/d: {note} is a file, not a "
                                          "directory$"):
        writable_dir(note / "d", "--out")
    if Path("/dev/full").exists():
        with pytest.raises(OutputError, match="^cannot write --out /dev/full/x.jsonl: /dev/full "
                                              "is a device, not a directory$"):
            writable_file("/dev/full/x.jsonl", "--out")
    # a directory yet to be made under a directory is made, as before
    assert writable_file(tmp_path / "new" / "deeper" / "x.jsonl").parent.is_dir()



def test_a_pipe_or_device_is_written_where_its_directory_is_not_writable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--rejects /dev/stderr`` as a user other than root: ``/dev`` cannot be written, and
    the output used to be refused for it, though the device itself can be."""
    import os

    from deepwatch.sinks import writable_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:  # the directory is not ours
        return False if Path(str(path)) == tmp_path else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    assert writable_file(fifo, "--rejects") == fifo
    with pytest.raises(OutputError, match=f"^cannot write --rejects {tmp_path}/r.jsonl: "
                                          "permission denied$"):
        writable_file(tmp_path / "r.jsonl", "--rejects")
    fifo.chmod(0o400)
    monkeypatch.setattr(os, "access", lambda path, mode, **_k: Path(str(path)) not in (
        tmp_path, fifo))
    with pytest.raises(OutputError, match=f"^cannot write --rejects {fifo}: permission denied$"):
        writable_file(fifo, "--rejects")

def test_score_into_a_path_under_a_file_is_one_line_error(
        kdd_bundle: Path, tmp_path: Path, records: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "in.csv"
    data.write_text(records)
    assert main(["score", str(kdd_bundle), "-f", "kdd", "--out", str(data / "x.jsonl"),
                 str(data)]) == 2
    assert _error_line(capsys) == (f"error: cannot write --out {data}/x.jsonl: {data} is a file, "
                                   "not a directory")


def test_train_into_the_current_empty_directory(train_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    here = tmp_path / "emptydir"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", ".", "--epochs", "1",
                 str(train_data)]) == 0
    assert "saved mlp bundle" in capsys.readouterr().err
    assert os.getcwd() == str(here) and here.stat().st_ino == inode  # written in place
    m = read_manifest(here)
    assert m["model_kind"] == "mlp"
    assert {p.name for p in here.iterdir()} == {MANIFEST, *m["files"]}  # no leftovers
    # now a bundle: `.` may be named again, but a directory holding other things may not
    (here / "notes.txt").write_text("mine")
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", ".", "--epochs", "1",
                 str(train_data)]) == 2  # an output that cannot be written
    line = _error_line(capsys)
    assert "not part of its bundle (notes.txt)" in line
    assert (here / "notes.txt").read_text() == "mine"


def test_only_a_real_bundle_is_replaced(train_data: Path, kdd_bundle: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST).write_text(json.dumps({"name": "some other tool", "files": {}}))
    (foreign / "notes.txt").write_text("precious")
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", str(foreign),
                 "--epochs", "1", str(train_data)]) == 2
    assert "is not a deepwatch bundle" in _error_line(capsys)  # and nothing was read
    assert (foreign / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == [MANIFEST, "notes.txt"]

    real = tmp_path / "real"
    shutil.copytree(kdd_bundle, real)
    assert check_bundle_target(real) == real.resolve()  # a bundle alone may be replaced
    (real / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match=r"not part of its bundle \(notes.txt\)"):
        check_bundle_target(real)
    with pytest.raises(OutputError, match="not part of its bundle"):
        save_bundle(real, {"model_kind": "mlp"}, {"weights.bin": b"new"})
    assert (real / "notes.txt").read_text() == "precious"
    read_manifest(real)  # the old bundle untouched

    (real / "notes.txt").unlink()
    save_bundle(real, {"model_kind": "mlp"}, {"weights.bin": b"new"})
    assert {p.name for p in real.iterdir()} == {MANIFEST, "weights.bin"}
    assert json.loads((real / MANIFEST).read_text())["files"].keys() == {"weights.bin"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside


def test_save_bundle_leaves_unrelated_neighbours_alone(tmp_path: Path) -> None:
    out = tmp_path / "b"
    save_bundle(out, {"model_kind": "mlp"}, {"w.bin": b"1"})
    neighbour = tmp_path / ".b.old"  # a name the old code took for its own and deleted
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("mine")
    save_bundle(out, {"model_kind": "mlp"}, {"w.bin": b"2"})
    assert (out / "w.bin").read_bytes() == b"2"
    assert (neighbour / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("extra", [["--epochs", "0"], ["--val", "nosuch.csv"]])
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_train_mistakes_are_refused_before_reading(
        train_data: Path, tmp_path: Path, extra: list[str], nproc: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    code = main(["train", "--format", "kdd", "--model", "mlp", "--out", str(out),
                 "--nproc", nproc, *extra, str(train_data)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    expected = "epochs (--epochs) must be at least 1, not 0" if "0" in extra else \
        "no such file: nosuch.csv"
    assert expected in err
    assert "training data" not in err and "training in" not in err  # nothing read or started
    assert not out.exists()


@pytest.mark.parametrize("fmt, model, decision, says", [
    ("kdd", "autoencoder", "cost", "decision 'cost' (--decision) decides on a classifier's "
                                   "attack probability"),
    ("kdd", "autoencoder", "threshold", "an autoencoder flags by its threshold calibrated at "
                                        "target_fpr (--target-fpr)"),
    ("access", "mlp", "cost", "it applies to kdd and nslkdd data, not access"),
])
def test_a_decision_that_does_not_apply_is_refused_not_replaced(
        train_data: Path, tmp_path: Path, fmt: str, model: str, decision: str, says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    code = main(["train", "--format", fmt, "--model", model, "--out", str(out),
                 "--decision", decision, str(train_data)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert not out.exists()


def test_an_fpr_decision_records_its_target(train_data: Path, tmp_path: Path) -> None:
    """The manifest says which false-positive rate a --decision fpr threshold was fitted at."""
    out = tmp_path / "fpr"
    assert main(["train", "--format", "kdd", "--model", "mlp", "--out", str(out), "--epochs", "1",
                 "--decision", "fpr", "--target-fpr", "0.05", str(train_data)]) == 0
    thresholds = read_manifest(out)["thresholds"]
    assert thresholds["target_fpr"] == 0.05 and thresholds["policy"] == "threshold"
    assert 0.0 <= thresholds["calibration_fpr"] <= 0.1


def test_jsonl_outputs_escape_unicode_line_separators(kdd_bundle: Path, records: str,
                                                      tmp_path: Path) -> None:
    """U+2028/U+2029 are legal in JSON strings, but splitlines, JavaScript and some SIEM shippers
    break lines at them: a hostile record must not split one output line into two."""
    good = records.splitlines(keepends=True)[:5]
    fields = good[0].split(",")
    fields[2] = "ht\u2028tp\u2029"  # the service: parsed (as a service never seen), then written
    text = "".join(good) + ",".join(fields) + "not\u2028a record\n"
    src = tmp_path / "in.csv"
    src.write_text(text, encoding="utf-8")
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    assert main(["score", str(kdd_bundle), "-f", "kdd", "--out", str(out), "--rejects", str(rej),
                 str(src)]) == 0
    for path, n in ((out, 6), (rej, 1)):
        data = path.read_bytes()
        assert "\u2028".encode() not in data and "\u2029".encode() not in data
        lines = data.decode("utf-8").splitlines()
        assert len(lines) == n
        rows = [json.loads(line) for line in lines]
    assert json.loads(out.read_text().splitlines()[-1])["service"] == "ht\u2028tp\u2029"
    assert "not\u2028a record" in rows[0]["raw"]


@pytest.mark.parametrize(("name", "how"), [("out.parquet", "removed"), ("out.jsonl", "removed"),
                                           ("out.jsonl", "replaced")])
def test_an_output_removed_while_written_is_an_error_not_success(
        tmp_path: Path, name: str, how: str) -> None:
    """Its directory removed (a clean-up run meanwhile) or the file replaced while a run wrote
    it: the writes went on into a file no name reaches, and the run said its rows were written
    to the path, exit 0. Closing it now says they are lost."""
    from deepwatch.sinks import RecordSink, RejectSink

    out = tmp_path / "d" / name
    sink = RecordSink(str(out))
    rejects = RejectSink(str(tmp_path / "d" / "rejects.jsonl"))
    for _ in range(3):  # (the third waits for the first, which makes the file, to be written)
        sink.write(pa.record_batch({"x": [1]}))
    rejects.write(pa.table({"line": [7], "raw": ["?"], "reason": ["bad"]}))
    if how == "removed":
        shutil.rmtree(tmp_path / "d")
    else:
        (tmp_path / "other").write_text("")
        os.replace(tmp_path / "other", out)
    assert _error_of(sink.close) == (f"cannot write {out}: it was {how} while this run wrote "
                                     "it, so the 3 rows written to it are lost")
    assert _error_of(rejects.close) == (None if how == "replaced" else (
        f"cannot write {tmp_path / 'd' / 'rejects.jsonl'}: it was removed while this run wrote "
        "it, so the 1 rejected record written to it is lost"))


def _error_of(close: Callable[[], None]) -> str | None:
    try:
        close()
    except OutputError as exc:
        return str(exc)
    return None
