"""Explanations: which features drove a record's score.

The ``explanation`` column of ``score`` output (and ``deepwatch.explanation`` in alerts) is, for
every malicious record, a JSON array of the top-k contributing features, largest first::

    [{"feature": "service=private", "share": 0.62}, {"feature": "src_bytes", "share": 0.21}]

``share`` is the feature's part of the record's total contribution (0..1; the shares of all
features sum to 1, so the top-k sum to at most 1). Records with the verdict ``normal`` get null.

Where contributions come from:

* autoencoder and hybrid bundles: the per-feature weighted reconstruction errors (the ``errors``
  output of the exported graph); feature names are the featurizer's ``feature_names_``.
* classifiers: occlusion. Each input column (all one-hot slots of a categorical column
  together, or one numeric column) is reset to its training mean (0 after standardisation; no
  category for one-hot) and the drop in the attack probability is that column's contribution.
  All occluded copies of all alerts go through the backend in one vectorised call per chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EXPLANATION_COLUMN = "explanation"
TOP_K = 3


def explain_top_k(contrib: np.ndarray, names: Sequence[str], k: int = TOP_K
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` features of every row of ``contrib`` (n, d), largest first.

    Returns ``(index, share)``, both (n, k): feature indices into ``names`` and each feature's
    share of the row's total positive contribution (rows with none have share 0).
    """
    contrib = np.maximum(np.nan_to_num(np.asarray(contrib, dtype=np.float64)), 0.0)
    n, d = contrib.shape
    k = min(k, d)
    if n == 0 or k == 0:
        return np.zeros((n, k), dtype=np.int64), np.zeros((n, k))
    part = np.argpartition(-contrib, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(contrib, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    index = np.take_along_axis(part, order, axis=1)
    total = contrib.sum(axis=1, keepdims=True)
    share = np.where(total > 0, np.take_along_axis(vals, order, axis=1) / np.where(
        total > 0, total, 1.0), 0.0)
    return index, share


def explanation_strings(contrib: np.ndarray, names: Sequence[str], rows: np.ndarray,
                        k: int = TOP_K) -> pa.Array:
    """The ``explanation`` column: a JSON array for each row where ``rows`` is true, else null.

    Built column-wise with Arrow string kernels; no per-record Python loop.
    """
    n = len(rows)
    sel = np.flatnonzero(rows)
    if len(sel) == 0:
        return pa.nulls(n, pa.string())
    index, share = explain_top_k(contrib[sel], names, k)
    quoted = pa.array([json.dumps(str(s)) for s in names], pa.string())
    pieces: list[Any] = []
    for j in range(index.shape[1]):
        name = pc.take(quoted, pa.array(index[:, j]))
        value = pc.cast(pa.array(np.round(share[:, j], 4)), pa.string())
        item = pc.binary_join_element_wise('{"feature": ', name, ', "share": ', value, "}", "")
        pieces.extend([item, ", "] if j < index.shape[1] - 1 else [item])
    text = pc.binary_join_element_wise("[", *pieces, "]", "")
    positions = np.full(n, -1, dtype=np.int64)
    positions[sel] = np.arange(len(sel))
    spread = pc.take(text, pa.array(np.maximum(positions, 0)))
    return pc.if_else(pa.array(positions < 0), pa.nulls(n, pa.string()), spread)


def column_groups(featurizer: Any) -> tuple[list[np.ndarray], list[str]]:
    """Feature indices of each input column (one-hot slots together) and the column names."""
    spec = getattr(featurizer, "spec", {})
    vocab = getattr(featurizer, "vocab_", {})
    groups: list[np.ndarray] = []
    names: list[str] = []
    offset = 0
    for col in spec.get("categorical", []):
        width = len(vocab[col]) + 1
        groups.append(np.arange(offset, offset + width))
        names.append(col)
        offset += width
    for col in featurizer.feature_names_[offset:]:
        groups.append(np.array([offset]))
        names.append(col)
        offset += 1
    return groups, names


def occlusion(score_fn: Callable[[np.ndarray], np.ndarray], X: np.ndarray,
              groups: list[np.ndarray], base: np.ndarray | None = None,
              chunk_rows: int = 65536) -> np.ndarray:
    """Contribution of each column group to ``score_fn`` on each row of ``X`` (n, groups):
    ``score(x) - score(x with the group reset to 0)``. ``base`` is score_fn(X) if known."""
    n, g = len(X), len(groups)
    if n == 0:
        return np.zeros((0, g))
    if base is None:
        base = score_fn(X)
    out = np.empty((n, g))
    per = max(1, chunk_rows // g)
    for i in range(0, n, per):
        xb = X[i : i + per]
        m = len(xb)
        tiled = np.broadcast_to(xb, (g, m, X.shape[1])).copy()
        for j, idx in enumerate(groups):  # one pass per column, not per record
            tiled[j][:, idx] = 0.0
        s = score_fn(tiled.reshape(g * m, -1)).reshape(g, m)
        out[i : i + m] = (base[i : i + m][None, :] - s).T
    return out


def explain_columns(detector: Any, X: np.ndarray, out: dict[str, np.ndarray],
                    cols: dict[str, np.ndarray], k: int = TOP_K) -> pa.Array | None:
    """The explanation column for one scored batch (null where the verdict is normal)."""
    rows = np.asarray(cols["verdict"], dtype=bool)
    names = detector.featurizer.feature_names_
    if "errors" in out:
        return explanation_strings(out["errors"], names, rows, k)
    decision = detector.decision
    benign = getattr(decision, "_benign_label", None)
    if "proba" not in out:
        return None
    if benign is None:
        # a classifier of attack types alone (no 'normal' label): every record is flagged by
        # the bundle, not by any feature; the column is there all the same (null), as it is in
        # an empty output and in every other supervised bundle's
        return pa.nulls(len(rows), pa.string())
    sel = np.flatnonzero(rows)
    groups, group_names = column_groups(detector.featurizer)

    def attack_probability(Z: np.ndarray) -> np.ndarray:
        return 1.0 - detector.backend.run(Z.astype(np.float32))["proba"][:, benign]

    contrib = np.zeros((len(rows), len(groups)))
    if len(sel):
        base = 1.0 - out["proba"][sel, benign].astype(np.float64)
        contrib[sel] = occlusion(attack_probability, X[sel], groups, base)
    return explanation_strings(contrib, group_names, rows, k)
