"""KDD / NSL-KDD parsing: bulk paths agree, every bad line is a counted reject with a reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwatch.errors import FormatError
from deepwatch.formats import get_format
from deepwatch.formats.kdd import KDD_FEATURES
from deepwatch.lake import read_rejects

GOOD = ("0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,1.00,"
        "0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.")


def test_clean_lines_parse_with_labels_stripped() -> None:
    r = get_format("kdd").parse((GOOD + "\n") * 3)
    assert r.lines == 3 and r.batch.num_rows == 3 and r.rejects.num_rows == 0
    assert r.batch.column("label").to_pylist() == ["normal"] * 3
    assert r.batch.column("src_bytes").to_pylist() == [181] * 3
    assert r.batch.schema.field("serror_rate").type == pa.float64()
    assert r.line_numbers.to_pylist() == [1, 2, 3]


def test_bad_lines_are_rejected_with_reasons_and_line_numbers() -> None:
    lines = [
        GOOD,
        "garbage",
        "",
        GOOD.replace(",181,", ",abc,"),
        GOOD.replace(",181,", ",-5,"),
        GOOD.replace(",0.11,", ",nan,"),
        GOOD,
    ]
    r = get_format("kdd").parse("\n".join(lines) + "\n", first_line=10)
    assert r.batch.num_rows == 2 and r.rejects.num_rows == 5
    rej = r.rejects.to_pylist()
    assert [x["line"] for x in rej] == [11, 12, 13, 14, 15]
    assert "expected 42 fields" in rej[0]["reason"]
    assert rej[1]["reason"] == "empty line"
    assert "src_bytes" in rej[2]["reason"] and "'abc'" in rej[2]["reason"]
    assert "non-negative" in rej[3]["reason"]
    assert "dst_host_same_src_port_rate" in rej[4]["reason"]
    assert r.line_numbers.to_pylist() == [10, 16]


@pytest.mark.parametrize("fmt", ["kdd", "nslkdd"])
def test_labels_lose_spaces_and_dots_and_an_empty_label_is_a_reject(fmt: str) -> None:
    """``normal. `` is ``normal`` (not an attack called "normal. "); a label of dots and spaces
    is no label: its line is a reject with its text, on the bulk and the one-line paths."""
    tail = ",5" if fmt == "nslkdd" else ""
    base = GOOD.removesuffix("normal.")
    lines = [base + "normal. " + tail, base + "." + tail, base + " smurf." + tail,
             base + " . " + tail, "garbage", base + "normal." + tail]
    data = "\n".join(lines) + "\n"
    f = get_format(fmt)
    for r in (f.parse(data, first_line=3), f.parse_bulk(data, first_line=3)):
        assert r.batch.column("label").to_pylist() == ["normal", "smurf", "normal"]
        assert r.line_numbers.to_pylist() == [3, 5, 8]
        rej = r.rejects.to_pylist()
        assert [(x["line"], x["raw"]) for x in rej] == [(4, lines[1]), (6, lines[3]),
                                                        (7, "garbage")]
        assert rej[0]["reason"] == "field 42 (label) is empty once its trailing dot is " \
            "removed: '.'"
    one = f.parse(lines[1] + "\n")
    assert one.batch.num_rows == 0 and one.rejects.num_rows == 1 and one.lines == 1
    blank = f.parse(base + "   " + tail + "\n").rejects.to_pylist()
    assert [x["reason"] for x in blank] == ["field 42 (label) is empty: '   '"]


def test_fast_and_robust_paths_agree(kdd_test_file: Path) -> None:
    import gzip

    with gzip.open(kdd_test_file) as f:
        data = f.read(400_000)
    data = data[: data.rfind(b"\n") + 1]
    fmt = get_format("kdd")
    clean = fmt.parse(data)
    dirty = fmt.parse(data + b"not,a,record\n")  # forces the robust path for the chunk
    assert dirty.rejects.num_rows == 1
    assert dirty.batch.equals(clean.batch)


def test_unlabelled_records_and_crlf() -> None:
    unlabelled = GOOD.rsplit(",", 1)[0]
    r = get_format("kdd").parse(unlabelled + "\r\n" + GOOD + "\r\n")
    assert r.rejects.num_rows == 0
    assert r.batch.column("label").to_pylist() == [None, "normal"]


def test_nslkdd_with_difficulty(tmp_path: Path) -> None:
    line = GOOD.removesuffix("normal.") + "neptune,21"
    r = get_format("nslkdd").parse(line + "\r\n" + line)  # no final newline, CRLF
    assert r.batch.num_rows == 2 and r.rejects.num_rows == 0
    assert r.batch.column("label").to_pylist() == ["neptune"] * 2
    assert r.batch.column("difficulty").to_pylist() == [21, 21]
    assert len(r.batch.schema) == len(KDD_FEATURES) + 2


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(FormatError, match="unknown format 'nope'; known formats: .*kdd"):
        get_format("nope")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.just(GOOD), st.text(max_size=120),
                          st.binary(max_size=80).map(lambda b: b.decode("latin-1"))),
                max_size=30))
def test_no_input_crashes_and_counts_reconcile(lines: list[str]) -> None:
    text = "\n".join(lines)
    r = get_format("kdd").parse(text)
    assert r.batch.num_rows + r.rejects.num_rows == r.lines
    expected_lines = 0 if text == "" else text.count("\n") + (0 if text.endswith("\n") else 1)
    assert r.lines == expected_lines
    assert all(reason for reason in r.rejects.column("reason").to_pylist())


def _verdict(r: object, line: int) -> tuple[str, object]:
    """What became of ``line`` in a ParseResult: ("row", its values) or ("reject", reason)."""
    from deepwatch.formats import ParseResult

    assert isinstance(r, ParseResult)
    numbers = r.line_numbers.to_pylist()
    if line in numbers:
        return "row", r.batch.slice(numbers.index(line), 1).to_pylist()[0]
    reasons = [x["reason"] for x in r.rejects.to_pylist() if x["line"] == line]
    assert len(reasons) == 1, f"line {line} is neither parsed nor rejected"
    return "reject", reasons[0]


def test_a_hexadecimal_integer_is_rejected_whatever_its_neighbours(kdd_test_file: Path) -> None:
    """Arrow's reader took ``0x10`` as 16 in a clean chunk; polars (used once a chunk holds a
    bad line) refused it: the same line was kept or dropped depending on the lines around it."""
    from conftest import head_lines

    lines = [ln.rstrip("\n") for ln in head_lines(kdd_test_file, 300)]
    assert lines[0].startswith("0,")
    fmt = get_format("kdd")
    for spelling in ("0x10", "0X1F", " 0x10", "0xFFFFFFFFFFFFFFFF"):
        odd = [spelling + lines[0][1:], *lines[1:]]
        for chunk in (odd, [*odd, "junk"], odd[:1]):
            r = fmt.parse_bulk(("\n".join(chunk) + "\n").encode())
            assert r.batch.num_rows + r.rejects.num_rows == r.lines == len(chunk)
            assert _verdict(r, 1) == (
                "reject", f"field 1 (duration) is not a non-negative integer: '{spelling}'")
    # a label that merely holds "0x" is still a string, and still parsed on the fast path
    r = fmt.parse(lines[0].replace("normal.", "0xnormal.") + "\n" + lines[1] + "\n")
    assert r.rejects.num_rows == 0 and r.batch.column("label").to_pylist()[0] == "0xnormal"


#: Spellings of numbers the bulk paths (Arrow's reader, polars, the Python tiny path) might
#: read differently.
ODD_NUMBERS = ["0x10", "0X1F", "+5", "-0", " 5", "5 ", "\t5", "\u00a05", "1e3", "1E+3", ".5",
               "5.", "-.5", "inf", "-inf", "Infinity", "nan", "NaN", "1_000", "\uff15",
               "\u0665", "\u00b2", "05", "9" * 19, "0b1", "1.5e300", "1e400", "0x1p3", "", "1d",
               # spellings of a rate (from 0 to 1: serror_rate, field 24), and just past 1
               "+.5", " .5", "5e-1", "1.", "1.0000001", "0.99999999999999999999", "-0.0"]


@pytest.mark.parametrize("fmt_name,field", [("kdd", 0), ("kdd", 24), ("kdd", 41),
                                            ("nslkdd", 42)])
def test_odd_numbers_get_one_verdict_alone_in_a_clean_chunk_and_beside_a_bad_line(
        small_kdd_test: Path, fmt_name: str, field: int) -> None:
    """Each odd value alone (the tiny path), among clean lines (Arrow's reader) and among lines
    with a bad one (polars for the odd line): the same row or the same reject every time.
    Fields: duration (integer), serror_rate (float), the label (text), NSL's difficulty."""
    fmt = get_format(fmt_name)
    base = small_kdd_test.read_text().splitlines()[:40]
    if fmt_name == "nslkdd":
        base = [ln.rstrip(".") + ",17" for ln in base]
    accepted = 0
    for value in ODD_NUMBERS:
        fields = base[0].split(",")
        fields[field] = value
        odd = ",".join(fields)
        alone = _verdict(fmt.parse(odd + "\n"), 1)
        clean = _verdict(fmt.parse("\n".join([*base[1:], odd]) + "\n"), len(base))
        dirty = _verdict(fmt.parse("\n".join([*base[1:], "junk", odd]) + "\n"), len(base) + 1)
        assert alone == clean == dirty, (field, value, alone, clean, dirty)
        accepted += alone[0] == "row"
        if value.lower().startswith("0x") and field != 41:
            assert alone[0] == "reject", value  # numeric fields are decimal
    assert accepted >= 4  # the comparison really covered rows, not only rejects


#: How some CSV exporters space their fields, one style a line.
SPACED = [", ", " , ", ",\t", " ,", ",  "]


def _spaced(lines: list[str]) -> list[str]:
    return [SPACED[i % len(SPACED)].join(ln.split(",")) for i, ln in enumerate(lines)]


def test_spaces_around_fields_score_exactly_as_the_clean_lines(
        kdd_bundle: Path, small_kdd_test: Path, tmp_path: Path) -> None:
    """``0, tcp, http, SF, ...``: the text fields kept their leading space (`` udp``), which the
    featurizer knows as no protocol: the records fell into its ``other`` slot and their
    verdicts changed without a reject."""
    import pyarrow.parquet as pq

    from deepwatch.cli import main

    clean = small_kdd_test.read_text().splitlines()[:600]
    tables = []
    for name, lines in (("clean", clean), ("spaced", _spaced(clean))):
        src, out = tmp_path / f"{name}.csv", tmp_path / f"{name}.parquet"
        src.write_text("\n".join(lines) + "\n")
        assert main(["score", str(kdd_bundle), "--format", "kdd", "--out", str(out),
                     str(src)]) == 0
        tables.append(pq.read_table(out))
    assert tables[0].num_rows == 600
    assert tables[1].equals(tables[0])


@pytest.mark.parametrize("fmt", ["kdd", "nslkdd"])
def test_spaces_around_fields_are_dropped_on_every_parse_path(fmt: str) -> None:
    """Alone (a one-line request), in a clean chunk and beside a bad line: the record a spaced
    line gives is the clean line's; a text field of spaces only is no value, a reject."""
    tail = ",21" if fmt == "nslkdd" else ""
    base = GOOD.removesuffix("normal.")
    clean = [GOOD + tail, base.replace("tcp,http", "udp,private") + "smurf." + tail] * 10
    spaced = _spaced(clean)
    blank = base.replace(",http,", ",  ,") + "normal." + tail
    f = get_format(fmt)
    want = f.parse("\n".join(clean) + "\n").batch
    assert want.column("protocol_type").to_pylist()[:2] == ["tcp", "udp"]
    assert f.parse(spaced[1] + "\n").batch.equals(want.slice(1, 1))
    assert f.parse("\n".join(spaced) + "\n").batch.equals(want)
    r = f.parse("\n".join([*spaced[:5], "junk", blank, *spaced[5:]]) + "\n", first_line=7)
    assert r.batch.equals(want)
    assert [(x["line"], x["raw"], x["reason"]) for x in r.rejects.to_pylist()] == [
        (12, "junk", r.rejects.column("reason")[0].as_py()),
        (13, blank, "field 3 (service) is empty once the spaces around it are removed: '  '")]
    # a blank label as well: the first empty field is named
    both = base.replace(",SF,", ", ,") + " . " + tail
    [reason] = f.parse(both + "\n").rejects.column("reason").to_pylist()
    assert reason == "field 4 (flag) is empty once the spaces around it are removed: ' '"


def test_a_bad_field_count_names_every_count_the_format_takes() -> None:
    """``--format nslkdd`` takes 43 fields, 42 (KDD 99 lines: no difficulty) and 41 (no label);
    the reason for any other count said "expected 43 fields" alone."""
    nsl = get_format("nslkdd")
    unlabelled = GOOD.removesuffix(",normal.")
    r = nsl.parse("\n".join([GOOD + ",21", GOOD, unlabelled, "1,2,3"]) + "\n")
    assert r.batch.column("label").to_pylist() == ["normal", "normal", None]
    assert r.batch.column("difficulty").to_pylist() == [21, None, None]
    assert r.rejects.column("reason").to_pylist() == [
        "expected 43 fields separated by ',' (or 42 without the difficulty, 41 without the "
        "label), found 3"]
    r = get_format("kdd").parse("\n".join([GOOD, GOOD + ",21", unlabelled]) + "\n")
    assert r.batch.num_rows == 2
    assert r.rejects.column("reason").to_pylist() == [
        "expected 42 fields separated by ',' (or 41 without the label), found 43"]


@pytest.mark.parametrize("fmt", ["kdd", "nslkdd", "access", "zeek"])
def test_a_line_of_spaces_and_tabs_is_an_empty_line_in_every_format(
        fmt: str, tmp_path: Path) -> None:
    """``deepwatch ingest`` gives a line of spaces and tabs the reason an empty line gets, in
    every format. KDD and NSL-KDD said "expected 42 fields ..., found 1" for it, access and
    Zeek "empty line": one blank line, two reasons, depending on the format."""
    from test_access import COMBINED
    from test_zeek import HEADER, ROW

    record = {"kdd": GOOD, "nslkdd": GOOD, "access": COMBINED, "zeek": ROW}[fmt]
    blanks = ["", "   ", "\t", " \t \t", "  \r"]
    head = HEADER + "\n" if fmt == "zeek" else ""
    path = tmp_path / "in.log"
    path.write_text(head + "\n".join([record, *blanks, record]) + "\n")
    lake = tmp_path / "lake"
    done = subprocess.run([sys.executable, "-m", "deepwatch", "ingest", "--format", fmt,
                           "--lake", str(lake), str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    assert "7 lines read: 2 parsed, 5 rejected" in done.stderr
    rejects = read_rejects(lake)
    assert rejects is not None
    first = head.count("\n") + 2
    assert [(r["line"], r["reason"]) for r in rejects.to_pylist()] == [
        (n, "empty line") for n in range(first, first + len(blanks))]


@pytest.mark.parametrize("given", ["normal.", " normal. ", "normal"])
def test_a_label_given_on_the_command_line_is_read_as_the_files_name_it(
        tmp_path: Path, given: str) -> None:
    """``PATH=normal.`` (the label as the KDD files write it) labels records ``normal``, as
    the files' own ``normal.`` is read: it was kept as ``normal.``, an attack type."""
    from deepwatch.io import InputReader

    path = tmp_path / "in.csv"
    path.write_text((GOOD.rsplit(",", 1)[0] + "\n") * 2)
    labels = [lab for batch, _, _ in InputReader(get_format("kdd"), [f"{path}={given}"])
              for lab in batch.column("label").to_pylist()]
    assert labels == ["normal", "normal"]


RATES = [name for name in KDD_FEATURES if name.endswith("_rate")]


def _with(line: str, name: str, value: str) -> str:
    fields = line.split(",")
    fields[KDD_FEATURES.index(name)] = value
    return ",".join(fields)


@pytest.mark.parametrize("fmt", ["kdd", "nslkdd"])
def test_a_rate_past_1_is_a_reject_on_every_parse_path(fmt: str) -> None:
    """The 15 rates (``serror_rate``... ``dst_host_srv_rerror_rate``) are shares of
    connections, from 0 to 1: ``7.5`` was read as a rate to score, where a negative one is a
    reject. The real files hold none past 1 (0 of the 852,786 records of KDD 99's 10% set and
    corrected, NSL-KDD's KDDTrain+_20Percent and KDDTest+). Alone (the tiny path), among
    clean lines (Arrow's reader) and beside a bad line (polars): the same reject."""
    tail = ",21" if fmt == "nslkdd" else ""
    f = get_format(fmt)
    edges = [_with(GOOD, RATES[0], "1"), _with(GOOD, RATES[-1], "0.0"),
             _with(GOOD, "same_srv_rate", "1.000")]
    bad = [_with(GOOD, name, ("7.5", "1.01", "2", "1e1", "100.00")[i % 5])
           for i, name in enumerate(RATES)]
    want = [f"field {KDD_FEATURES.index(name) + 1} ({name}) is not a number from 0 to 1 "
            f"(a rate): '{line.split(',')[KDD_FEATURES.index(name)]}'"
            for name, line in zip(RATES, bad, strict=True)]
    for line, reason in zip(bad, want, strict=True):
        alone = f.parse(line + tail + "\n")
        assert (alone.batch.num_rows, alone.rejects.column("reason").to_pylist()) == (0, [reason])
    for chunk in ([*edges, *bad], [*edges, "junk", *bad]):
        r = f.parse("\n".join(ln + tail for ln in chunk) + "\n")
        assert r.batch.num_rows == len(edges) and r.line_numbers.to_pylist() == [1, 2, 3]
        assert r.batch.column(RATES[0]).to_pylist() == [1.0, 0.0, 0.0]
        got = r.rejects.column("reason").to_pylist()
        assert got[-len(bad):] == want and len(got) == len(bad) + ("junk" in chunk)
        assert r.rejects.column("raw").to_pylist()[-len(bad):] == [ln + tail for ln in bad]
    # a clean chunk of thousands (the fast path, then the clean subset) with one line past 1
    many = [GOOD + tail] * 3000
    many[1234] = bad[0] + tail
    r = f.parse_bulk(("\n".join(many) + "\n").encode())
    assert r.batch.num_rows == 2999 and r.rejects.to_pylist() == [
        {"line": 1235, "raw": bad[0] + tail, "reason": want[0]}]


def test_a_rate_past_1_given_as_an_object_is_a_reject() -> None:
    """Records as objects (``POST /v1/score``) as lines are: a rate past 1 is a reject."""
    f = get_format("kdd")
    record = dict(zip(KDD_FEATURES, f.parse(GOOD + "\n").batch.to_pylist()[0].values(),
                      strict=False))
    r = f.parse_records([record, {**record, "serror_rate": 7.5}, {**record, "rerror_rate": 1},
                         {**record, "dst_host_srv_rerror_rate": 1.5, "diff_srv_rate": 3}])
    assert r.line_numbers.to_pylist() == [1, 3]
    assert r.rejects.column("reason").to_pylist() == [
        "field 'serror_rate' is not a number from 0 to 1 (a rate): 7.5",
        "field 'diff_srv_rate' is not a number from 0 to 1 (a rate): 3"]
