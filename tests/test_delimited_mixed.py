"""A chunk with a few bad lines (what every stream batch with garbage is) parses exactly as its
lines would one by one: same rows, same rejects and reasons, same line numbers."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from deepwatch.formats import get_format

REPLACEMENTS = ["-1", "x", "", " 5 ", "1e3", "nan", "inf", "+3", "9" * 25]


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
