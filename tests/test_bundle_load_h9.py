"""Review h9: bundles edited by hand (their checksums updated, as an attacker or a careless user
would) that loaded, or were refused in words that were not one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deepwatch.cli import main
from deepwatch.errors import BundleError
from deepwatch.models.detector import Detector

RECORD = "0,tcp,http,SF,181,5450" + ",0" * 35 + ",normal.\n"


def edited(src: Path, dst: Path, manifest: Callable[[dict[str, Any]], None] | None = None,
           featurizer: Callable[[dict[str, Any]], str] | None = None) -> Path:
    """A copy of the bundle ``src`` at ``dst``: ``featurizer`` (the parsed featurizer.json in,
    its new text out) and ``manifest`` change it, and the featurizer's checksum is updated."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    if featurizer is not None:
        f = json.loads((dst / "featurizer.json").read_text())
        data = featurizer(f).encode()
        (dst / "featurizer.json").write_bytes(data)
        m["files"]["featurizer.json"] = hashlib.sha256(data).hexdigest()
    if manifest is not None:
        manifest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def score(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    records = tmp_path / "in.csv"
    records.write_text(RECORD)
    code = main(["score", str(bundle), "--format", "kdd", "--out",
                 str(tmp_path / "out.jsonl"), str(records)])
    return code, capsys.readouterr().err


# ---- 1. the network section's keys ----------------------------------------------------------

@pytest.mark.parametrize("key", ["hidden\nerror: none; the bundle checks out",
                                 "hidden\x1b[2K\x1b[1Gx", "hidden\u2028x"])
def test_a_network_key_with_a_control_character_is_refused_in_one_line(
        key: str, kdd_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A key went out raw in 'the network's network.KEY is ...': the error ran on to a second
    line of the bundle's own words, or an escape reached the terminal."""
    bundle = edited(kdd_bundle, tmp_path / "b",
                    manifest=lambda m: m["network"].update({key: 1 << 30}))
    code, err = score(bundle, tmp_path, capsys)
    assert code == 3
    assert len(err.splitlines()) == 1, err
    assert repr(key) in err, err  # shown escaped
    assert "\x1b" not in err and "\u2028" not in err
    with pytest.raises(BundleError) as info:
        Detector(bundle)
    assert str(info.value).isprintable(), str(info.value)
    assert not (tmp_path / "out.jsonl").exists()


# ---- 2. a featurizer's spread that fit could not have written ----------------------------------

@pytest.mark.parametrize("std", [1e-308, 5e-324, 1e-12, 1e-9])
def test_a_featurizer_std_fit_never_writes_is_refused(
        std: float, kdd_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A spread of 1e-308 passed (only 0, NaN and inf were refused) and saturated the column
    for every record, changing verdicts without a word; fit writes 1.0 for any std at or below
    1e-9, so a featurizer holding one is no featurizer deepwatch wrote."""

    def tiny(f: dict[str, Any]) -> str:
        f["std"]["src_bytes"] = std
        return json.dumps(f)

    bundle = edited(kdd_bundle, tmp_path / "b", featurizer=tiny)
    code, err = score(bundle, tmp_path, capsys)
    assert code == 3
    assert err.splitlines() == [
        f"error: {bundle / 'featurizer.json'} is not a valid featurizer: the std of "
        f"'src_bytes' is {std}, not a finite number above 1e-09 (fit gives a column that "
        "barely varies 1.0)"], err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_featurizer_std_just_above_what_fit_refuses_still_loads(
        kdd_bundle: Path, tmp_path: Path) -> None:
    def small(f: dict[str, Any]) -> str:
        f["std"]["src_bytes"] = 2e-9
        return json.dumps(f)

    Detector(edited(kdd_bundle, tmp_path / "b", featurizer=small))


# ---- 3. repeated keys in featurizer.json -------------------------------------------------------

def _top_std_first(f: dict[str, Any]) -> str:
    """Another 'std' object before the real one: json kept the last, so a tiny spread in the
    first was never seen by the checks."""
    text = json.dumps(f)
    return '{"std": ' + json.dumps({**f["std"], "src_bytes": 1e-308}) + ", " + text[1:]


def _column_twice(f: dict[str, Any]) -> str:
    text = json.dumps(f)
    return text.replace('"std": {', '"std": {"src_bytes": 0.0, ', 1)


@pytest.mark.parametrize(("change", "key"), [(_top_std_first, "std"),
                                             (_column_twice, "src_bytes")])
def test_a_featurizer_giving_a_key_twice_is_refused(
        change: Callable[[dict[str, Any]], str], key: str, kdd_bundle: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Repeated keys in manifest.json were refused, in featurizer.json taken (the last kept)."""
    bundle = edited(kdd_bundle, tmp_path / "b", featurizer=change)
    assert (bundle / "featurizer.json").read_text().count(f'"{key}"') == (
        (kdd_bundle / "featurizer.json").read_text().count(f'"{key}"') + 1)
    code, err = score(bundle, tmp_path, capsys)
    assert code == 3
    assert err.splitlines() == [
        f"error: {bundle / 'featurizer.json'} is not a valid featurizer: it gives {key!r} "
        "twice in one object; it is not a featurizer deepwatch wrote"], err
    assert not (tmp_path / "out.jsonl").exists()


# ---- 4. train --out in directories that are not there yet ----------------------------------------

def test_a_failed_train_leaves_no_directories_its_out_check_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The writability check before training made new/sub for '-o new/sub/b': a run that then
    failed (or was stopped) left them behind, empty."""
    bad = tmp_path / "bad.csv"
    bad.write_text("not a kdd record\n")
    assert main(["train", "-f", "kdd", "-m", "mlp", "-o", str(tmp_path / "new" / "sub" / "b"),
                 str(bad)]) == 4
    assert "too few training records" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_out_under_a_file_is_refused_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'-o file.txt/sub' was refused with 'cannot write a bundle at file.txt/sub: File exists'."""
    (tmp_path / "file.txt").write_text("x")
    records = tmp_path / "in.csv"
    records.write_text(RECORD)
    out = tmp_path / "file.txt" / "sub"
    assert main(["train", "-f", "kdd", "-m", "mlp", "-o", str(out), str(records)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: cannot write a bundle at {out}: {tmp_path.resolve() / 'file.txt'} is not a "
        "directory"]
    assert (tmp_path / "file.txt").read_text() == "x"


def test_saving_still_makes_the_missing_parents(tmp_path: Path) -> None:
    from deepwatch.bundle import check_bundle_target, save_bundle

    out = tmp_path / "new" / "sub" / "b"
    assert check_bundle_target(out) == out.resolve()
    assert not (tmp_path / "new").exists()
    save_bundle(out, {"model_kind": "mlp"}, {"featurizer.json": b"{}"})
    assert sorted(p.name for p in out.iterdir()) == ["featurizer.json", "manifest.json"]
