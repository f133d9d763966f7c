"""A record without a label inside labelled data is a counted reject with a reason, not a stop;
an input with no label at all stays a clear error (label every input, PATH=LABEL, or none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepwatch.errors import DataError
from deepwatch.formats import get_format
from deepwatch.io import InputReader, read_labelled


@pytest.fixture(scope="module")
def labelled(small_kdd_test: Path) -> list[str]:
    return small_kdd_test.read_text().splitlines(keepends=True)[:500]


def _unlabelled(line: str) -> str:
    return line.rstrip("\n").rsplit(",", 1)[0] + "\n"


def test_a_stray_unlabelled_record_is_a_reject(labelled: list[str], tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("".join(labelled[:200]) + _unlabelled(labelled[0]) + "".join(labelled[200:]))
    table, rejects, stats = read_labelled(InputReader(get_format("kdd"), [str(p)]), "training")
    assert table.num_rows == 500 and table.column("label").null_count == 0
    assert (stats.lines, stats.parsed, stats.rejected) == (501, 500, 1)
    assert stats.by_source[str(p)] == {"lines": 501, "parsed": 500, "rejected": 1}
    [rej] = rejects.to_pylist()
    assert rej["reason"] == "no label in labelled training data" and rej["source"] == str(p)
    assert '"src_bytes": ' in rej["raw"] and '"label"' not in rej["raw"]
    # NSL-KDD (a difficulty after the label): the parser's rejects come along, counts reconcile
    p.write_text("".join(ln.rstrip("\n").rstrip(".") + ",3\n" for ln in labelled)
                 + _unlabelled(labelled[1]) + "garbage\n")
    table, rejects, stats = read_labelled(InputReader(get_format("nslkdd"), [str(p)]))
    assert (stats.lines, stats.parsed, stats.rejected) == (502, 500, 2)
    assert table.num_rows == 500 and sorted(rejects.column("reason").to_pylist())[1] == \
        "no label in labelled training data"


def test_an_input_without_labels_stays_an_error_or_unlabelled_data(
        labelled: list[str], tmp_path: Path) -> None:
    good, bare = tmp_path / "good.csv", tmp_path / "bare.csv"
    good.write_text("".join(labelled))
    bare.write_text("".join(_unlabelled(ln) for ln in labelled[:50]))
    with pytest.raises(DataError, match=r"^50 records have no label; label every input "
                                        r"\(PATH=LABEL\) or none .*bare\.csv"):
        read_labelled(InputReader(get_format("kdd"), [str(good), str(bare)]))
    # labelled by its path: fine
    table, _, stats = read_labelled(InputReader(get_format("kdd"), [str(good), f"{bare}=normal"]))
    assert table.num_rows == 550 and stats.rejected == 0
    # nothing labelled at all: unlabelled data, every record kept
    table, rejects, stats = read_labelled(InputReader(get_format("kdd"), [str(bare)]))
    assert table.num_rows == 50 and table.column("label").null_count == 50
    assert rejects.num_rows == 0 and stats.rejected == 0
