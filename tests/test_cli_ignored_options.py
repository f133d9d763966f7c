"""Options that did nothing in some combination are refused there, in one line, before any work:
a user who gives an option expects it to count, and a run that quietly leaves it out looks right
while it is not what was asked for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepwatch.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _refused(r: subprocess.CompletedProcess[str], says: str) -> None:
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_target_fpr_with_a_classifier_is_refused_unless_decision_fpr(tmp_path: Path) -> None:
    """``train --model mlp --target-fpr 0.3`` trained a bundle identical to one without it: a
    classifier's threshold is fitted for fewest errors (or the KDD cost) unless --decision fpr."""
    data = tmp_path / "missing.csv"  # never read: the refusal comes first
    for model, decision in (("mlp", []), ("stack", ["--decision", "threshold"]),
                            ("resnet", ["--decision", "cost"])):
        r = _run("train", "--format", "kdd", "--model", model, *decision, "--target-fpr", "0.3",
                 "--out", str(tmp_path / "b"), str(data))
        _refused(r, f"--target-fpr calibrates an anomaly threshold (autoencoder, hybrid) or the "
                    f"score threshold of --decision fpr; model {model!r}")
    assert not (tmp_path / "b").exists()
    # where it counts it is taken: these go on to find the missing input
    for model, decision in (("mlp", ["--decision", "fpr"]), ("autoencoder", []),
                            ("hybrid", [])):
        r = _run("train", "--format", "kdd", "--model", model, *decision, "--target-fpr", "0.3",
                 "--out", str(tmp_path / "b"), str(data))
        assert r.returncode == 2 and "no such file" in r.stderr, (model, r.stderr)


def test_attack_share_with_no_attacks_is_refused(tmp_path: Path) -> None:
    """``simulate --attacks none --attack-share 0.5`` wrote normal traffic only, as without it."""
    out = tmp_path / "sim"
    r = _run("simulate", "--out", str(out), "--visits", "5", "--attacks", "none",
             "--attack-share", "0.5")
    _refused(r, "--attack-share sets how many attack lines --attacks adds; with --attacks none "
                "there are none")
    assert not out.exists()
    # a share of 0 says the same as none: taken
    r = _run("simulate", "--out", str(out), "--visits", "5", "--attacks", "none",
             "--attack-share", "0")
    assert r.returncode == 0 and sorted(p.name for p in out.iterdir()) == ["normal.log"], r.stderr


def test_serve_refuses_a_wait_or_grace_that_nothing_uses(tmp_path: Path) -> None:
    """``serve --max-client-uploads 0 --upload-wait 30`` and ``--body-min-rate 0
    --body-rate-grace 60`` started and served: with no cap no request waits its client's turn,
    with no minimum rate there is no grace to give."""
    bundle = tmp_path / "no-bundle"  # never looked at: the refusal comes first
    for args, says in [
        (["--max-client-uploads", "0", "--upload-wait", "30"],
         "--upload-wait is how long a request past --max-client-uploads waits; with "
         "--max-client-uploads 0 (no cap) none waits"),
        (["--body-min-rate", "0", "--body-rate-grace", "60"],
         "--body-rate-grace delays --body-min-rate; with --body-min-rate 0 (no minimum) it has "
         "nothing to delay"),
    ]:
        _refused(_run("serve", str(bundle), "--port", "0", *args), says)
    # with the cap and the rate they count (the missing bundle is what stops these)
    for args in (["--max-client-uploads", "2", "--upload-wait", "30"],
                 ["--body-min-rate", "10", "--body-rate-grace", "60"]):
        r = _run("serve", str(bundle), "--port", "0", *args)
        assert r.returncode != 0 and "no-bundle" in r.stderr and "--body" not in r.stderr, r.stderr


def test_rejects_with_lakes_alone_is_refused(small_kdd_test: Path, tmp_path: Path) -> None:
    """``score``/``train --lake L --rejects R`` with no input files wrote an empty R: the lake's
    records were parsed by ingest, so nothing was parsed now, whatever the lake had rejected."""
    data = tmp_path / "conn.csv"
    data.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:50])
                    + "not a record\n")
    lake = tmp_path / "lake"
    assert _run("ingest", "--format", "kdd", "--lake", str(lake), str(data)).returncode == 0
    rejects = tmp_path / "rejects.jsonl"
    says = ("--rejects keeps the input lines that do not parse; --lake records were parsed by "
            "ingest (its rejects are in LAKE/rejects)")
    bundle = tmp_path / "no-bundle"  # never looked at: the refusal comes first
    _refused(_run("score", str(bundle), "--format", "kdd", "--out", str(tmp_path / "o.jsonl"),
                  "--lake", str(lake), "--rejects", str(rejects)), says)
    _refused(_run("train", "--format", "kdd", "--model", "mlp", "--out", str(bundle),
                  "--lake", str(lake), "--rejects", str(rejects)), says)
    assert not rejects.exists() and not bundle.exists()
    # beside input files (or, for train, validation files) there are lines to parse: taken
    r = _run("score", str(bundle), "--format", "kdd", "--out", str(tmp_path / "o.jsonl"),
             "--lake", str(lake), "--rejects", str(rejects), str(data))
    assert r.returncode != 0 and "no bundle" in r.stderr, r.stderr
    r = _run("train", "--format", "kdd", "--model", "mlp", "--out", str(tmp_path / "b"),
             "--lake", str(lake), "--rejects", str(rejects), "--val", str(tmp_path / "v.csv"))
    assert r.returncode == 2 and "no such file" in r.stderr, r.stderr


def test_stream_batch_size_bounds_the_batches_of_files_too(kdd_bundle: Path,
                                                            small_kdd_test: Path,
                                                            tmp_path: Path) -> None:
    """``stream --batch-size 100 FILE`` scored a whole 4 MiB read as one batch: the bound held
    for Kafka only. Now a file's records come in batches of at most that many, every record
    once, in order, with its line (a reject included)."""
    import json

    lines = small_kdd_test.read_text().splitlines(keepends=True)[:248]
    data = tmp_path / "conn.csv"
    data.write_text("".join(lines[:120]) + "not a record\n" + "".join(lines[120:]))
    verdicts, rejects = tmp_path / "v.jsonl", tmp_path / "r.jsonl"
    r = _run("stream", str(kdd_bundle), "--format", "kdd", "--batch-size", "100",
             "--out", str(tmp_path / "a.jsonl"), "--verdicts", str(verdicts),
             "--rejects", str(rejects), str(data))
    assert r.returncode == 0, r.stderr
    stop = [json.loads(x) for x in r.stderr.splitlines() if '"event": "stop"' in x]
    assert len(stop) == 1 and "249 records" in stop[0]["message"], r.stderr
    assert "3 batches" in stop[0]["message"], stop[0]["message"]
    scored = [json.loads(x)["deepwatch"]["source"]["line"]
              for x in verdicts.read_text().splitlines()]
    assert scored == [n for n in range(1, 250) if n != 121]
    assert [json.loads(x)["deepwatch"]["source"]["line"]
            for x in rejects.read_text().splitlines()] == [121]
