"""Thresholds set at a target false-positive rate (``calibrate``: the autoencoder's anomaly
threshold; ``fpr_threshold``: ``--decision fpr``): at most a ``target_fpr`` share of the benign
calibration scores is flagged (``score >= threshold``), also where many scores are tied (KDD's
duplicated records, classifier probabilities saturated at 0 or 1), and the threshold is the
smallest calibration score that keeps to it (just above the largest where none does)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwatch.errors import DataError
from deepwatch.train.anomaly import calibrate
from deepwatch.train.api import Split, fpr_threshold


def _held(benign_scores: np.ndarray, attack_scores: np.ndarray) -> tuple[np.ndarray, Split]:
    """Scores and a calibration split of benign records followed by attacks."""
    score = np.concatenate([benign_scores, attack_scores]).astype(np.float64)
    labels = np.array(["normal"] * len(benign_scores) + ["smurf."] * len(attack_scores),
                      dtype=object)
    n = len(score)
    return score, Split(np.zeros((n, 1), dtype=np.float32), labels, None, np.ones(n))


def _fpr_threshold(benign: np.ndarray, target: float) -> float:
    score, held = _held(benign, np.linspace(0.5, 1.0, 37))  # attacks do not move it
    return fpr_threshold(score, held, target)


BOTH = [calibrate, _fpr_threshold]


@pytest.mark.parametrize("cut", BOTH)
def test_duplicates_tied_at_the_top_are_not_all_flagged(cut) -> None:  # type: ignore[no-untyped-def]
    # 5% of the benign records are one record repeated, scoring highest: the 0.99 quantile is
    # their score, and `>=` flagged all 50 (5%, five times the target)
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.random(950), np.full(50, 2.0)])
    thr = cut(scores, 0.01)
    assert np.mean(scores >= thr) <= 0.01
    assert thr == np.nextafter(2.0, np.inf)  # just above the largest score: none flagged


@pytest.mark.parametrize("cut", BOTH)
def test_ties_inside_the_tail_give_the_next_larger_score(cut) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    top = 2.0 + rng.random(5)
    scores = np.concatenate([rng.random(975), np.full(20, 1.5), top])
    thr = cut(scores, 0.01)
    # flagging the 20 tied at 1.5 would flag 25 (2.5%): the cut is the next score up
    assert thr == top.min()
    assert int((scores >= thr).sum()) == 5


def test_saturated_probabilities_do_not_flag_every_benign_record() -> None:
    # 1 - P(normal) of float32 probabilities saturated at 1.0: exactly 0 for 995 of 1000
    proba_normal = np.concatenate([np.ones(995), [0.9, 0.8, 0.7, 0.6, 0.5]]).astype(np.float32)
    benign = 1.0 - proba_normal.astype(np.float64)
    thr = _fpr_threshold(benign, 0.01)
    assert thr == pytest.approx(0.1, rel=1e-6)  # was 0.0: every benign record flagged
    assert int((benign >= thr).sum()) == 5


@pytest.mark.parametrize("cut", BOTH)
@pytest.mark.parametrize("n,target", [(100, 0.01), (1000, 0.01), (2000, 0.005), (400, 0.05),
                                      (20_000, 0.02)])
def test_without_ties_unchanged_where_the_share_is_whole_records(cut, n: int,  # type: ignore[no-untyped-def]
                                                                 target: float) -> None:
    scores = np.random.default_rng(n).gamma(1.5, size=n)
    old = float(np.quantile(scores, 1.0 - target, method="higher"))
    assert cut(scores, target) == old
    assert int((scores >= old).sum()) == round(n * target)


@pytest.mark.parametrize("cut", BOTH)
def test_a_share_that_is_not_whole_records_rounds_down(cut) -> None:  # type: ignore[no-untyped-def]
    # 1% of 150 is 1.5 records: at most 1 flagged (the quantile flagged 2, 1.3%)
    scores = np.random.default_rng(2).random(150)
    thr = cut(scores, 0.01)
    assert thr == scores.max()
    assert int((scores >= thr).sum()) == 1


@pytest.mark.parametrize("cut", BOTH)
def test_edges(cut) -> None:  # type: ignore[no-untyped-def]
    # fewer records than one flag's worth: none flagged, the cut just above the largest
    assert cut(np.array([3.0, 1.0, 2.0]), 0.01) == np.nextafter(3.0, np.inf)
    assert cut(np.array([0.25]), 0.5) == np.nextafter(0.25, np.inf)
    # every score equal: flagging any flags all
    assert cut(np.full(1000, 0.7), 0.05) == np.nextafter(0.7, np.inf)
    # 29% of 100 in floating point is 28.999999999999996 records: still 29
    scores = np.arange(100, dtype=np.float64)
    assert cut(scores, 0.29) == 71.0
    # a share above every record but one
    assert cut(np.arange(10, dtype=np.float64), 0.95) == 1.0
    # float32 scores (the autoencoder's) give a threshold they compare with exactly
    s32 = np.array([0.1, 0.2, 0.3] * 100, dtype=np.float32)
    thr = cut(s32, 0.4)
    assert thr == float(np.float32(0.3)) and np.mean(s32.astype(np.float64) >= thr) <= 0.4


def test_empty_or_no_benign_is_refused() -> None:
    with pytest.raises(DataError, match="no benign records"):
        calibrate(np.array([], dtype=np.float32), 0.01)
    score, held = _held(np.array([]), np.array([0.2, 0.9]))
    with pytest.raises(DataError, match="needs benign"):
        fpr_threshold(score, held, 0.01)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.integers(0, 12), min_size=1, max_size=300),
       target=st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9]))
def test_property_smallest_score_keeping_to_the_share(values: list[int], target: float) -> None:
    """Tie-heavy scores (a few distinct values): the realised share never passes the target,
    and no smaller calibration score keeps to it."""
    scores = np.asarray(values, dtype=np.float64) / 4.0
    for cut in BOTH:
        thr = cut(scores, target)
        assert np.mean(scores >= thr) <= target + 1e-12
        assert thr in scores or thr == np.nextafter(scores.max(), np.inf)
        for v in np.unique(scores[scores < thr]):
            assert np.mean(scores >= v) > target
