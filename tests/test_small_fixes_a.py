"""Small fixes: the featurizer's errors for values of the wrong kind, the rejects read from a
lake's files whatever their names, the dashboard's alert fields cut, the report's CSP."""

from __future__ import annotations

import pyarrow as pa
import pytest


def test_featurizer_names_the_column_whose_values_are_of_the_wrong_kind() -> None:
    # Text in a numeric column escaped Featurizer.transform (and fit) as pyarrow's
    # ArrowInvalid "Failed to parse string: '12x' as a scalar of type double", naming no column;
    # a list where a category goes, as ArrowNotImplementedError.
    from deepwatch.api import Featurizer, InputError

    f = Featurizer({"categorical": ["proto"], "numeric": ["bytes", "dur"], "log1p": ["bytes"]})
    f.fit(pa.table({"proto": ["tcp", "udp"], "bytes": [1, 2], "dur": [0.1, 0.2]}))
    with pytest.raises(InputError, match=r"^column 'bytes' holds values that are not numbers "
                                         r"\(string\).*'12x'"):
        f.transform(pa.table({"proto": ["tcp"], "bytes": ["12x"], "dur": [0.3]}))
    with pytest.raises(InputError, match=r"^column 'proto' holds values that are not categories"):
        f.transform(pa.table({"proto": [[1]], "bytes": [1], "dur": [0.3]}))
    with pytest.raises(InputError, match=r"^column 'dur' holds values that are not numbers"):
        Featurizer({"numeric": ["dur"]}).fit(pa.table({"dur": ["1", "zz"]}))
    # text that is a number is read as one, as before
    x = f.transform(pa.table({"proto": ["tcp"], "bytes": ["1"], "dur": ["0.1"]}))
    assert x.tolist() == f.transform(pa.table({"proto": ["tcp"], "bytes": [1],
                                               "dur": [0.1]})).tolist()
