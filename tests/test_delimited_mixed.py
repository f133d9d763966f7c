"""A chunk with a few bad lines (what every stream batch with garbage is) parses exactly as its
lines would one by one: same rows, same rejects and reasons, same line numbers."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from deepwatch.formats import get_format

REPLACEMENTS = ["-1", "x", "", " 5 ", "1e3", "nan", "inf", "+3", "9" * 25, "0x10", "0X1F"]


def _mutate(line: str, rnd: random.Random) -> str:
    kind = rnd.randrange(8)
    if kind == 0:
        return ""
    if kind == 1:
        return line + ","
    if kind == 2:
        return line.rsplit(",", 1)[0]  # no label: still a valid (unlabelled) record
    if kind == 3:
        parts = line.split(",")
        parts[rnd.randrange(len(parts))] = rnd.choice(REPLACEMENTS)
        return ",".join(parts)
    if kind == 4:
        return line[: rnd.randrange(len(line) + 1)]
    if kind == 5:
        return "\u00e9" + line
    return line


@pytest.mark.parametrize("rate", [0.005, 0.05, 0.3])
def test_chunk_parses_as_its_lines_one_by_one(small_kdd_test: Path, rate: float) -> None:
    fmt = get_format("kdd")
    rnd = random.Random(int(rate * 1000))
    base = small_kdd_test.read_text().splitlines()[:400]
    lines = [_mutate(x, rnd) if rnd.random() < rate else x for x in base]
    whole = fmt.parse("\n".join(lines) + "\n", first_line=1)
    assert whole.rejects.num_rows > 0 and whole.batch.num_rows > 0

    singles = [fmt.parse(line + "\n", first_line=i + 1) for i, line in enumerate(lines)]
    rows = pa.Table.from_batches([s.batch for s in singles if s.batch.num_rows],
                                 schema=whole.batch.schema)
    assert pa.Table.from_batches([whole.batch]).equals(rows)
    assert whole.line_numbers.to_pylist() == [
        i + 1 for i, s in enumerate(singles) if s.batch.num_rows]
    rejects = [r for s in singles for r in s.rejects.to_pylist()]
    assert whole.rejects.to_pylist() == rejects


TRICKY_FIELDS = ["5", "-5", "+5", " 5", "5 ", "1e3", "1_000", "inf", "nan", "0x10", "",
                 "12345678901234567890", "0.50", ".5", "5.", "1,5", "\u00e9", "9" * 18, "-0"]


@pytest.mark.parametrize("fmt_name", ["kdd", "nslkdd"])
def test_tiny_inputs_parse_as_the_bulk_paths_do(small_kdd_test: Path, fmt_name: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A few lines take a Python path (REST latency); it must agree with Arrow's and polars'
    paths on every value it takes, and leave the rest to them."""
    import deepwatch.formats._delimited as delimited

    fmt = get_format(fmt_name)
    rng = random.Random(3)
    base = small_kdd_test.read_text().splitlines()[:200]
    if fmt_name == "nslkdd":
        base = [ln.rstrip(".") + ",17" for ln in base]
    cases = [[ln] for ln in base[:60]] + [base[i:i + 5] for i in range(60, 120, 5)]
    for _ in range(150):  # one field of one line replaced by a tricky value
        lines = list(rng.choice(cases))
        k = rng.randrange(len(lines))
        fields = lines[k].split(",")
        fields[rng.randrange(len(fields))] = rng.choice(TRICKY_FIELDS)
        lines[k] = ",".join(fields)
        cases.append(lines)
    cases += [[base[0].rsplit(",", 1)[0]], [base[0] + "\r"], [base[0].replace(",", "\r", 1)]]
    tiny_taken = 0
    for lines in cases:
        data = ("\n".join(lines) + "\n").encode()
        got = fmt.parse(data, first_line=3)
        with monkeypatch.context() as m:
            m.setattr(delimited, "TINY_LINES", 0)
            want = fmt.parse(data, first_line=3)
        assert got.batch.equals(want.batch), lines
        assert got.rejects.equals(want.rejects), lines
        assert got.line_numbers.equals(want.line_numbers)
        tiny_taken += delimited._tiny(data, fmt._schemas(), ",", fmt.nonnegative) is not None
    assert tiny_taken > 60  # clean records really took the Python path


@pytest.mark.parametrize("fmt_name", ["kdd", "nslkdd"])
def test_a_line_opened_by_a_byte_order_mark_is_a_reject_wherever_it_falls(
        small_kdd_test: Path, fmt_name: str) -> None:
    """First of a chunk, alone (a REST record), after other lines, among repeated lines (each
    distinct one parsed once, in hash order): one verdict. Arrow's reader dropped the mark
    where it opened the text it was given, so the line parsed there and nowhere else."""
    fmt = get_format(fmt_name)
    base = small_kdd_test.read_text().splitlines()[:3]
    if fmt_name == "nslkdd":
        base = [ln.rstrip(".") + ",17" for ln in base]
    marked = "\ufeff" + base[2]
    why = ("the line starts with a UTF-8 byte order mark (U+FEFF): a file joined to the one "
           "before it?")
    for lines in ([marked, base[0]], [base[0], marked], [marked], [marked, "x", base[0]],
                  [base[0], marked, "x"]):
        result = fmt.parse("\n".join(lines) + "\n", first_line=1)
        assert result.rejects.column("reason").to_pylist()[:1] == [why], lines
        assert result.batch.num_rows == lines.count(base[0])
        repeated = "\n".join(lines * 5000) + "\n"  # over REPEAT_MIN_BYTES: parse_repeated
        bulk = fmt.parse_bulk(repeated, first_line=1)
        assert bulk.batch.num_rows == 5000 * lines.count(base[0]), lines
        assert bulk.rejects.num_rows == 5000 * (len(lines) - lines.count(base[0]))
