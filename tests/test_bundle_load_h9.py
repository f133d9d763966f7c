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
