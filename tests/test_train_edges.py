"""``deepwatch train`` on data too small for what it is asked: one clear error line, exit 4,
no traceback and no bundle directory left behind; and the lines it says of data or options it
can use only in part (validation labels training lacks, --nproc above the usable CPUs)."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import head_lines, run_cli


@pytest.fixture(scope="module")
def ten(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    """Ten KDD records, several labels (normal, smurf, ...)."""
    p = tmp_path_factory.mktemp("edges") / "ten.csv"
    p.write_text("".join(head_lines(kdd_train_file, 10, every=997)))
    return p


@pytest.fixture(scope="module")
def distinct(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    """Ten KDD records of ten labels: none can be held out."""
    seen: dict[str, str] = {}
    with gzip.open(kdd_train_file, "rt") as f:
        for line in f:
            seen.setdefault(line.rsplit(",", 1)[-1], line)
            if len(seen) == 10:
                break
    p = tmp_path_factory.mktemp("edges") / "distinct.csv"
    p.write_text("".join(seen.values()))
    return p



def _refused(r: subprocess.CompletedProcess[str], code: int) -> str:
    """``r``, a run refused with exit status ``code`` and no traceback: its last line."""
    assert "Traceback" not in r.stderr and r.returncode == code, r.stderr
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("extra", "says"), [
    # more folds than records: some folds hold nothing out (was a ValueError traceback)
    (["--folds", "20"], "too few training records (10) for --folds 20"),
    # (said before: "the validation data has no records with labels seen in training")
    (["--folds", "5"], "too few training records (10) for --folds 5"),
    # two --val records, one label each: nothing left to stop early on
    (["--val", "TWO"], "the validation data (--val) is too small to hold out records both"),
    (["--val", "TWO", "--model", "autoencoder"], "the validation data (--val) is too small"),
])
def test_too_small_for_the_split_is_one_line(extra: list[str], says: str, ten: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "b"
    two = tmp_path / "two.csv"
    lines = ten.read_text().splitlines(keepends=True)
    two.write_text(lines[0] + lines[-1])  # a normal record and a smurf
    model = [] if "--model" in extra else ["--model", "mlp"]
    r = run_cli("train", "--format", "kdd", *model, "--epochs", "1", "--out", str(out),
                *[str(two) if a == "TWO" else a for a in extra], str(ten))
    last = _refused(r, 4)
    assert last.startswith("error: ") and says in last, r.stderr
    assert not out.exists()


def test_labels_each_seen_once_cannot_be_held_out(distinct: Path, tmp_path: Path) -> None:
    # (said before: "the validation data has no records with labels seen in training", with
    # no validation data given)
    r = run_cli("train", "--format", "kdd", "--model", "stack", "--epochs", "1",
                "--out", str(tmp_path / "b"), str(distinct))
    assert _refused(r, 4) == (
        "error: the training data (10 records) is too small to hold out records both to stop "
        "early on and to calibrate with (only a label with at least 3 records has some in both)")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("seed", ["-5", "99999999999999999999999"])
def test_a_seed_out_of_range_is_one_line(seed: str, ten: Path, tmp_path: Path) -> None:
    # (was a traceback from numpy or torch, after the data was read)
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1",
                "--seed", seed, "--out", str(tmp_path / "b"), str(ten))
    _refused(r, 2)
    assert r.stderr.strip() == (f"error: seed (--seed) must be between 0 and {2**63 - 1}, "
                                f"not {seed}"), r.stderr
    assert not (tmp_path / "b").exists()


def test_hybrid_without_benign_records_is_refused_before_training(kdd_train_file: Path,
                                                                   tmp_path: Path) -> None:
    # (the stack's three networks were trained first, then the autoencoder found no benign
    # records: minutes lost on real data)
    got: dict[str, list[str]] = {"smurf.\n": [], "neptune.\n": []}
    with gzip.open(kdd_train_file, "rt") as f:
        for line in f:
            kept = got.get(line.rsplit(",", 1)[-1])
            if kept is not None and len(kept) < 15:
                kept.append(line)
            if all(len(v) == 15 for v in got.values()):
                break
    attacks = tmp_path / "attacks.csv"
    attacks.write_text("".join(got["smurf.\n"] + got["neptune.\n"]))
    r = run_cli("train", "--format", "kdd", "--model", "hybrid", "--epochs", "1",
                "--out", str(tmp_path / "b"), str(attacks))
    assert _refused(r, 4) == (
        "error: the training data has no benign records (label 'normal') to learn what normal "
        "looks like")
    assert "epoch" not in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_no_benign_label_is_said(ten: Path, distinct: Path, tmp_path: Path) -> None:
    # benign records labelled "Normal " instead of "normal": every record scores malicious,
    # which the run did not say (it reported fpr 0.0000, having no benign records to count).
    # (The space goes, as from the KDD files' own labels: the case stays.)
    out = tmp_path / "b"
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1", "--out",
                str(out), f"{ten}=Normal ", f"{distinct}=attack")
    assert r.returncode == 0, r.stderr
    assert ("note: no training record is labelled 'normal', the benign label: every label "
            "('Normal', 'attack') counts as an attack, so every record scored will be "
            "malicious") in r.stderr.splitlines(), r.stderr
    assert (out / "manifest.json").exists()


def test_rejects_inside_the_bundle_is_refused_before_training(ten: Path, tmp_path: Path) -> None:
    # (it trained, then refused to save: --out held the rejects file and was no bundle)
    out = tmp_path / "b"
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1", "--out",
                str(out), "--rejects", str(out / "rejects.jsonl"), str(ten))
    _refused(r, 2)
    assert r.stderr.strip() == (f"error: --rejects {out / 'rejects.jsonl'} is inside the bundle "
                                f"directory --out {out}, which is written whole: give a path "
                                "outside it"), r.stderr
    assert not out.exists()


def _by_label(src: Path, wanted: dict[str, int]) -> dict[str, list[str]]:
    """The first ``wanted[label]`` records of each label of ``src`` (KDD labels end in '.')."""
    got: dict[str, list[str]] = {lab: [] for lab in wanted}
    with gzip.open(src, "rt") as f:
        for line in f:
            kept = got.get(line.rsplit(",", 1)[-1].strip())
            if kept is not None and len(kept) < wanted[line.rsplit(",", 1)[-1].strip()]:
                kept.append(line)
            if all(len(got[lab]) == n for lab, n in wanted.items()):
                return got
    raise AssertionError(f"{src} lacks some of {wanted}")


@pytest.fixture(scope="module")
def unseen_val(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path
               ) -> tuple[Path, Path]:
    """Training records of three labels; validation records of those and of three labels
    training lacks: back (7), pod (3), teardrop (1)."""
    d = tmp_path_factory.mktemp("unseen")
    got = _by_label(kdd_train_file, {"normal.": 30, "smurf.": 16, "portsweep.": 16,
                                     "back.": 7, "pod.": 3, "teardrop.": 1})
    train, val = d / "train.csv", d / "val.csv"
    train.write_text("".join(got["normal."][:20] + got["smurf."][:12]
                             + got["portsweep."][:12]))
    val.write_text("".join(got["normal."][20:] + got["smurf."][12:] + got["portsweep."][12:]
                           + got["back."] + got["pod."] + got["teardrop."]))
    return train, val


def test_val_records_of_labels_unseen_in_training_are_said(unseen_val: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    # (early stopping left them out without a word: only the early-stopping and calibration
    # row counts, which include them, were said)
    train, val = unseen_val
    out = tmp_path / "b"
    r = run_cli("train", "--format", "kdd", "--model", "mlp", "--epochs", "1", "--out",
                str(out), "--val", str(val), str(train))
    assert r.returncode == 0, r.stderr
    # each label's records halved (a lone one to the calibration half): back 4 + 3, pod 2 + 1,
    # teardrop 0 + 1
    assert ("note: 11 of the 29 validation records (--val) have a label no training record "
            "has: 'back' (7), 'pod' (3), 'teardrop' (1); early stopping leaves out the 6 in "
            "its half (they know the training labels only); the score threshold and the "
            "calibration metrics count the 5 in the calibration half, any label but 'normal' "
            "as malicious") in r.stderr.splitlines(), r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["early_stopping_rows"] == 5 + 2 + 2 + 6
    cal = manifest["metrics"]["calibration"]
    # the calibration half's attacks: smurf 2, portsweep 2 and the 5 of unseen labels
    assert cal["tp"] + cal["fn"] == 2 + 2 + 5 and cal["tn"] + cal["fp"] == 5, cal


def test_unseen_validation_note_names_what_leaves_them_out() -> None:
    from deepwatch.train.api import Split, unseen_validation_note

    def split(labels: list[str], y: list[int]) -> Split:
        return Split(np.zeros((len(y), 1)), np.array(labels, dtype=object), np.array(y),
                     np.ones(len(y)))

    seen = split(["normal", "smurf"], [0, 1])
    assert unseen_validation_note(seen, seen, "stack", True) is None
    early = split(["normal", "a", "b", "c", "d", "e", "f"], [0, -1, -1, -1, -1, -1, -1])
    calib = split(["normal", "a", "a"], [0, -1, -1])
    assert unseen_validation_note(early, calib, "stack", True) == (
        "note: 8 of the 10 validation records (--val) have a label no training record has: "
        "'a' (3), 'b' (1), 'c' (1), 'd' (1), 'e' (1) and 1 more label; early stopping leaves "
        "out the 6 in its half, the stack's meta-learner the 2 in the calibration half and "
        "--refit's second pass all 8 (they know the training labels only); the score "
        "threshold and the calibration metrics count the 2 in the calibration half, any label "
        "but 'normal' as malicious")
    assert unseen_validation_note(seen, calib, "mlp", False, "fpr") == (
        "note: 2 of the 5 validation records (--val) have a label no training record has: "
        "'a' (2); the calibration metrics count the 2 in the calibration half, any label but "
        "'normal' as malicious")


def test_nproc_above_the_usable_cpus_is_warned_of(tmp_path: Path) -> None:
    # (it started them all without a word, however many fewer CPUs there were)
    from deepwatch._cpus import usable_cores
    from deepwatch.train.distributed import oversubscribed

    assert oversubscribed(2, cores=2) is None and oversubscribed(1, cores=1) is None
    assert oversubscribed(64, cores=2) == (
        "warning: --nproc 64 starts 64 training processes, but this machine gives this process "
        "2 usable CPUs (its CPU affinity and cgroup quota): they will take turns on them, "
        "slower than --nproc 2 or less would train")
    assert "1 usable CPU (" in (oversubscribed(2, cores=1) or "")
    # said before any rank starts: here a missing input then refuses the run, no rank started
    nproc, missing = usable_cores() + 1, tmp_path / "missing.csv"
    r = run_cli("train", "--nproc", str(nproc), "--format", "kdd", "--model", "mlp",
                "--out", str(tmp_path / "b"), str(missing))
    _refused(r, 2)
    assert r.stderr.strip().splitlines() == [oversubscribed(nproc),
                                             f"error: no such file: {missing}"], r.stderr


def test_a_lone_validation_label_goes_to_the_calibration_half() -> None:
    # by design, whatever the seed (docs/models.md): there it counts toward the threshold and
    # the meta-learner; in the early-stopping half one of a label training lacks counts nowhere
    from deepwatch.train.data import stratified_split

    labels = np.array(["normal"] * 6 + ["back"] + ["pod"] * 2, dtype=object)
    for seed in range(8):
        early, calib = stratified_split(labels, (0.5, 0.5), seed)
        assert 6 in calib and 6 not in early
        assert (len(early), len(calib)) == (4, 5)  # normal 3 + 3, pod 1 + 1, back 0 + 1
