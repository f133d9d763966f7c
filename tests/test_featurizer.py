"""The featurizer: learned vocabularies with an `other` slot, log1p, standardisation, JSON."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from deepwatch.features import Featurizer

SPEC = {"categorical": ["proto", "svc"], "numeric": ["bytes", "rate"], "log1p": ["bytes"]}


def _table(n: int = 50) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({
        "proto": rng.choice(["tcp", "udp", "icmp"], n),
        "svc": rng.choice(["http", "smtp"], n),
        "bytes": rng.integers(0, 10**6, n),
        "rate": rng.random(n),
    })


def test_layout_and_values() -> None:
    t = _table()
    f = Featurizer(SPEC).fit(t)
    X = f.transform(t)
    assert X.dtype == np.float32 and X.shape == (50, f.n_features)
    assert f.feature_names_[:4] == [f"proto={v}" for v in f.vocab_["proto"]] + ["proto=<other>"]
    assert f.feature_names_[-2:] == ["bytes", "rate"]
    onehot = X[:, : len(f.vocab_["proto"]) + 1]
    assert np.all(onehot.sum(axis=1) == 1.0)
    # standardised numerics: mean 0, std 1 on the training data
    np.testing.assert_allclose(X[:, -2:].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(X[:, -2:].std(axis=0), 1.0, atol=1e-4)
    z = (np.log1p(t.column("bytes").to_numpy()) - f.mean_["bytes"]) / f.std_["bytes"]
    np.testing.assert_allclose(X[:, -2], z, rtol=1e-5)


def test_unseen_category_goes_to_other_slot() -> None:
    f = Featurizer(SPEC).fit(_table())
    t = _table(3).set_column(0, "proto", pa.array(["sctp", "tcp", None]))
    X = f.transform(t)
    other = f.feature_names_.index("proto=<other>")
    assert X[0, other] == 1.0 and X[2, other] == 1.0 and X[1, other] == 0.0


def test_json_round_trip_keeps_layout() -> None:
    t = _table()
    f = Featurizer(SPEC).fit(t)
    g = Featurizer.from_json(f.to_json())
    np.testing.assert_array_equal(f.transform(t), g.transform(t))
    assert g.schema_hash() == f.schema_hash()
    assert g.feature_names_ == f.feature_names_


def test_huge_values_are_clipped_not_infinite() -> None:
    f = Featurizer(SPEC).fit(_table())
    t = _table(2).set_column(3, "rate", pa.array([1.7e308, -1.7e308]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and quietly: no numpy overflow warning on stderr
        X = f.transform(t)
    assert np.all(np.isfinite(X)) and np.abs(X).max() <= 50.0


def test_a_column_a_registered_deriver_reads_is_named_when_missing() -> None:
    """A deriver declares the columns it reads; records lacking one are refused with that
    column named, whatever error the deriver's own code raised (here a plain ``KeyError('b')``
    from a dict, which earlier surfaced as it was: only pyarrow's wording was recognised)."""
    import pytest

    from deepwatch.errors import InputError
    from deepwatch.features import register_deriver

    def summed(table: pa.Table, params: dict, state: dict) -> pa.Table:
        cols = table.to_pydict()
        return table.append_column("z", pa.array([a + b for a, b in zip(cols["a"], cols["b"],
                                                                          strict=True)]))

    register_deriver("test_summed", summed, reads=("a", "b"))
    f = Featurizer({"numeric": ["z"], "derive": {"name": "test_summed"}})
    f.fit(pa.table({"a": [1.0, 2.0, 3.0], "b": [1.0, 0.0, 2.0]}))
    assert f.transform(pa.table({"a": [1.0], "b": [1.0]})).shape == (1, 1)
    with pytest.raises(InputError, match="no column 'b', which the featurizer reads"):
        f.transform(pa.table({"a": [1.0]}))
    with pytest.raises(TypeError, match="not one string"):
        register_deriver("test_summed", summed, reads="ab")
