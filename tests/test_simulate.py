"""The traffic simulator: parseable combined logs, one file per label, believable traffic."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from deepwatch.cli import main
from deepwatch.errors import UsageError
from deepwatch.features.web import derive_access
from deepwatch.formats import get_format
from deepwatch.io import InputReader
from deepwatch.simulate import ATTACKS, SITE, simulate


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return simulate(tmp_path_factory.mktemp("sim"), visits=150, attack_share=0.2, seed=5)


def _read(paths: dict[str, Path]) -> pa.Table:
    table, rejects, stats = InputReader(
        get_format("access"), [f"{p}={label}" for label, p in paths.items()]).read_all()
    assert stats.rejected == 0 and rejects.num_rows == 0
    return table


def test_one_parseable_file_per_label(traffic: dict[str, Path]) -> None:
    assert set(traffic) == {"normal", *ATTACKS}
    table = _read(traffic)
    counts = pl.from_arrow(table.select(["label"]))["label"].value_counts()
    per = dict(zip(counts["label"].to_list(), counts["count"].to_list(), strict=True))
    assert per["normal"] > 2000
    for attack in ATTACKS:
        assert per[attack] >= 0.2 * per["normal"] / len(ATTACKS) * 0.9


def test_sessions_follow_the_site_map(traffic: dict[str, Path]) -> None:
    df = pl.from_arrow(_read({"normal": traffic["normal"]}))
    assert isinstance(df, pl.DataFrame)
    static = df.filter(pl.col("path").str.starts_with("/static/"))
    assert 0.4 < static.height / df.height < 0.9  # pages pull their assets
    # assets are requested with the page they belong to as referer
    assert static["referer"].str.starts_with(f"https://{SITE}/").all()
    assert (df["status"] == 304).sum() > 0  # revisited assets come from the cache
    assert df["method"].is_in(["GET", "POST"]).all()
    times = df["timestamp"].to_list()
    assert times == sorted(times)


def test_browser_and_country_mix(traffic: dict[str, Path]) -> None:
    d = derive_access(_read({"normal": traffic["normal"]}), {}, {})
    browsers = set(d.column("browser").to_pylist())
    assert {"Chrome", "Mobile Safari", "Firefox"} <= browsers
    countries = pl.Series(d.column("country").to_pylist()).value_counts(sort=True)
    assert countries[0, 0] == "US" and countries.height >= 8
    devices = set(d.column("device").to_pylist())
    assert {"desktop", "mobile"} <= devices


def test_attacks_look_like_their_kind(traffic: dict[str, Path]) -> None:
    t = pl.from_arrow(_read(traffic))
    assert isinstance(t, pl.DataFrame)

    def of(label: str) -> pl.DataFrame:
        return t.filter(pl.col("label") == label)

    sqli = "(?i)(%27|'|union|select|sleep|%20or%20|convert)"
    assert of("sqli")["url"].str.contains(sqli).mean() > 0.9
    assert of("xss")["url"].str.contains("(?i)(%3C|<|javascript)").mean() > 0.9
    assert of("traversal")["url"].str.contains(r"(\.\.|%2e%2e)").mean() > 0.9
    assert (of("scanner")["status"] == 404).mean() > 0.6
    assert (of("bruteforce")["method"] == "POST").all()
    flood = of("flood")
    per_client = flood.group_by("client_ip").len()["len"]
    assert per_client.max() >= 100  # many requests from one client...
    span = (flood["timestamp"].max() - flood["timestamp"].min()).total_seconds()  # type: ignore[operator, union-attr]
    assert flood.height / max(span, 1) > 2  # ...at a rate no person clicks


def test_same_seed_same_logs(tmp_path: Path) -> None:
    a = simulate(tmp_path / "a", visits=20, seed=9)
    b = simulate(tmp_path / "b", visits=20, seed=9)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown attack"):
        simulate(tmp_path, visits=5, attacks=["ddos"])
    assert main(["simulate", "--out", str(tmp_path), "--visits", "0"]) == 2
    for hours in ("0", "-1", "nan"):
        assert main(["simulate", "--out", str(tmp_path / "h"), "--hours", hours]) == 2
    assert not (tmp_path / "h").exists()


def test_cli_writes_logs(tmp_path: Path) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--visits", "10", "--attacks", "none"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["normal.log"]


def test_an_output_that_is_not_a_directory_is_one_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a file in the way of --out, or of its parent, was a FileExistsError/NotADirectoryError
    # traceback (exit 1) after the whole simulation had run
    taken = tmp_path / "taken.log"
    taken.write_text("keep me\n")
    for out in (taken, taken / "sim"):
        assert main(["simulate", "--out", str(out), "--visits", "5"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert taken.read_text() == "keep me\n"


def test_an_attack_named_twice_gets_its_whole_share(tmp_path: Path) -> None:
    once = simulate(tmp_path / "once", visits=40, attacks=["sqli"], attack_share=0.2, seed=3)
    twice = simulate(tmp_path / "twice", visits=40, attacks=["sqli", "sqli"], attack_share=0.2,
                     seed=3)
    assert list(twice) == ["normal", "sqli"]
    assert twice["sqli"].read_bytes() == once["sqli"].read_bytes()


def test_the_evaluate_line_it_prints_can_be_pasted(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The ``evaluate with:`` line did not quote the paths: with an --out holding a space it
    could not be pasted into a shell."""
    import shlex

    out = tmp_path / "my logs"
    assert main(["simulate", "--out", str(out), "--visits", "10", "--attacks", "sqli"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines()
                if x.startswith("evaluate with: "))
    words = shlex.split(line.removeprefix("evaluate with: "))
    assert words[-2:] == [f"{out / 'normal.log'}=normal", f"{out / 'sqli.log'}=sqli"]
