from __future__ import annotations

from pathlib import Path

import pytest
from conftest import head_lines


def test_a_stop_while_the_full_cache_starts_again_leaves_no_wrong_verdicts(
        kdd_bundle: Path, kdd_test_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a notebook (or any error) while ``score_batch`` scored the batch that found
    its result cache full: the cache had been emptied in place but kept the old records'
    columns, so every later batch took other records' verdicts and scores, for as long as
    the Detector lived."""
    from deepwatch.formats import get_format
    from deepwatch.models.detector import Detector, ResultCache, distinct_rows

    lines = head_lines(kdd_test_file, 10_000)
    kdd = get_format("kdd")
    first = kdd.parse("".join(lines[:5000]).encode()).batch
    then = kdd.parse("".join(lines[5000:]).encode()).batch
    want = Detector(kdd_bundle).score_distinct(then)
    det = Detector(kdd_bundle)
    columns = det.featurizer.input_columns
    n_first, n_then = (len(distinct_rows(b, columns)[0]) for b in (first, then))
    det._cache = ResultCache(max_rows=max(n_first, n_then) + 1)  # full after both
    det.score_batch(first)
    decide = det._decide

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(det, "_decide", stopped)
    with pytest.raises(KeyboardInterrupt):
        det.score_batch(then)
    monkeypatch.setattr(det, "_decide", decide)
    for _ in range(2):  # the first fills the cache again, the second is answered from it
        got = det.score_batch(then)
        assert got.column("verdict").equals(want.column("verdict"))
        assert got.column("score").equals(want.column("score"))


def test_a_frame_with_an_int_too_large_for_arrow_is_one_input_error(kdd_bundle: Path,
                                                                      kdd_test_file: Path) -> None:
    """A pandas object column holding 2**70 escaped as pyarrow's raw OverflowError."""
    from deepwatch.errors import InputError
    from deepwatch.formats import get_format
    from deepwatch.models.detector import Detector

    frame = get_format("kdd").parse("".join(head_lines(kdd_test_file, 3)).encode()).batch \
        .to_pandas()
    frame["src_bytes"] = frame["src_bytes"].astype(object)
    frame.loc[0, "src_bytes"] = 2**70
    with pytest.raises(InputError, match="does not fit a 64-bit number column"):
        Detector(kdd_bundle).score_batch(frame)
