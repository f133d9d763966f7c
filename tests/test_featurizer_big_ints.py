"""An integer past 2**53 in a numeric column (KDD's ``src_bytes`` parses as int64, so a byte
count of 1e16 is a record) is read as the float64 it rounds to, in ``fit`` as in ``transform``.
``fit`` refused it: one such training line stopped ``train`` on the whole file
("Integer value 10000000000000000 not in range"), while ``score`` took the same line."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from deepwatch.errors import InputError
from deepwatch.features import Featurizer

SPEC = {"categorical": ["proto"], "numeric": ["n", "m"], "log1p": ["n"]}


def test_fit_takes_an_integer_past_2_53() -> None:
    big = 10**16 + 1  # no float64 holds it exactly
    t = pa.table({"proto": ["tcp", "udp", "tcp"], "n": pa.array([1, 2, big], pa.int64()),
                  "m": [0.5, 1.5, 2.5]})
    f = Featurizer(SPEC).fit(t)
    logged = np.log1p(np.array([1.0, 2.0, float(big)]))
    assert f.mean_["n"] == pytest.approx(float(np.mean(logged)))
    x = f.transform(t)
    assert np.isfinite(x).all() and x.shape == (3, len(f.feature_names_))


def test_text_that_is_no_number_is_still_refused() -> None:
    t = pa.table({"proto": ["tcp"], "n": ["many"], "m": [0.5]})
    with pytest.raises(InputError, match="'n' holds values that are not numbers"):
        Featurizer(SPEC).fit(t)
