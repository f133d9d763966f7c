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
    # kept as any reject is: its line and the line's text
    assert rej["line"] == 201 and rej["raw"] == _unlabelled(labelled[0]).rstrip("\n")
    # NSL-KDD (a difficulty after the label): the parser's rejects come along, counts reconcile
    p.write_text("".join(ln.rstrip("\n").rstrip(".") + ",3\n" for ln in labelled)
                 + _unlabelled(labelled[1]) + "garbage\n")
    table, rejects, stats = read_labelled(InputReader(get_format("nslkdd"), [str(p)]))
    assert (stats.lines, stats.parsed, stats.rejected) == (502, 500, 2)
    assert table.num_rows == 500
    assert sorted(zip(rejects.column("line").to_pylist(), rejects.column("reason").to_pylist(),
                      strict=True)) == [(501, "no label in labelled training data"),
                                        (502, "expected 43 fields separated by ',' (or 42 "
                                         "without the difficulty, 41 without the label), found 1")]


def test_unlabelled_records_keep_their_lines_across_chunks_and_inputs(
        labelled: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record without a label in a chunk of its own (whose input was labelled before), in a
    chunk with labelled records, and in an input read before any label was seen: each reject
    has its line number; its text is the line where the chunk was at hand, else the record as
    JSON."""
    import functools

    import deepwatch.io as io_module
    from deepwatch.sources.files import iter_chunks

    monkeypatch.setattr(io_module, "iter_chunks", functools.partial(iter_chunks,
                                                                     chunk_bytes=4096))
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    # more than a chunk of unlabelled records before the first label
    first.write_text("".join(_unlabelled(ln) for ln in labelled[:40]) + "".join(labelled[:100]))
    body = "".join(labelled[100:300])
    bare = "".join(_unlabelled(ln) for ln in labelled[300:340])  # > 4 KiB: a chunk of their own
    second.write_text(body + bare + "".join(labelled[340:]))
    table, rejects, stats = read_labelled(InputReader(get_format("kdd"),
                                                      [str(first), str(second)]))
    assert table.num_rows == 100 + 360 and stats.rejected == 40 + 40
    assert (stats.lines, stats.parsed) == (140 + 400, 460)
    got = {(r["source"], r["line"]): r["raw"] for r in rejects.to_pylist()}
    assert sorted(got) == [(str(first), n) for n in range(1, 41)] + \
        [(str(second), n) for n in range(201, 241)]
    for n in range(201, 241):  # its input was known to be labelled: the lines themselves
        assert got[(str(second), n)] == _unlabelled(labelled[99 + n]).rstrip("\n")
    # the first chunk held only unlabelled records, not yet known to be rejects: the record
    # as JSON; the records in the chunk that brought the first label: the lines themselves
    assert '"src_bytes": ' in got[(str(first), 1)]
    assert got[(str(first), 40)] == _unlabelled(labelled[39]).rstrip("\n")


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


def test_an_unlabelled_record_whose_text_was_cut_is_counted_and_kept(
        labelled: list[str], tmp_path: Path) -> None:
    """A record without a label whose line is over MAX_RAW (its reason goes on: "(raw text cut
    to its first 10,000 of ... characters)") was neither counted in "N records rejected: no
    label" nor written to train's --rejects: it was lost from the rejects file."""
    from deepwatch.sinks import keeping_rejects
    from deepwatch.train.api import _log_no_label, _read_keeping

    fields = _unlabelled(labelled[0]).rstrip("\n").split(",")
    fields[2] = "x" * 20_000  # a service name: parsed (as 'other'), its text over MAX_RAW
    p = tmp_path / "t.csv"
    p.write_text("".join(labelled[:100]) + _unlabelled(labelled[1]) + ",".join(fields) + "\n")
    out = tmp_path / "rejects.jsonl"
    said: list[str] = []
    with keeping_rejects(str(out)) as kept:
        _reader, table, rejects, stats = _read_keeping(get_format("kdd"), [str(p)],
                                                       "training", kept)
    _log_no_label(rejects, "training", said.append)
    assert table.num_rows == 100 and stats.rejected == 2
    assert said == ["2 records rejected: no label in labelled training data"]
    kept_lines = out.read_text().splitlines()
    assert len(kept_lines) == 2 and '"line": 102' in kept_lines[1]
    assert "(raw text cut to its first 10,000 of" in kept_lines[1]
