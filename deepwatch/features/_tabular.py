"""The fitted featurizer: one-hot with learned vocabularies and an ``other`` slot, log1p for
heavy-tailed numbers, standardisation. Fitted state is plain JSON (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._arrow import as_arrow, decoded, plain_type, to_numpy
from ..errors import DataError, InputError, UsageError, first_line
from ._derive import deriver_reads, get_deriver

OTHER = "<other>"
CLIP = 50.0
#: The smallest spread a fitted featurizer holds is above this: fit writes 1.0 for a column
#: whose std is this or less, and a saved featurizer with one is refused at load.
MIN_STD = 1e-9


class Featurizer:
    """Vectorises Arrow tables with a fixed spec.

    spec keys: ``categorical`` (columns one-hot encoded), ``numeric`` (columns standardised),
    ``log1p`` (numeric columns log1p-transformed first), ``min_count`` (a category needs this
    many training records to get its own slot), ``max_categories`` (per column), ``derive``
    (``{"name": ..., "params": {...}}``, optional).
    """

    def __init__(self, spec: dict[str, Any]):
        try:  # (None raised AttributeError at fit; {"foo": 1} was taken, and fit 0 features)
            check_spec(spec)
        except ValueError as exc:
            raise UsageError(f"Featurizer(spec): {exc}") from None
        self.spec = spec

    def __repr__(self) -> str:
        columns = (f"{len(self.spec.get('categorical', []))} categorical + "
                   f"{len(self.spec.get('numeric', []))} numeric columns")
        derive = self.spec.get("derive")
        if derive:
            columns += f", derived by {derive.get('name')!r}"
        fitted = (f" -> {len(self.feature_names_)} features" if self.fitted
                  else ", not fitted")
        return f"Featurizer({columns}{fitted})"

    @property
    def fitted(self) -> bool:
        return "feature_names_" in self.__dict__

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise UsageError("this Featurizer is not fitted: call fit(table) first")

    def check_columns(self, table: pa.Table | pa.RecordBatch, derived: bool,
                      reader: str = "the featurizer reads", format_name: str | None = None
                      ) -> None:
        """An InputError naming the columns the spec reads that ``table`` lacks (a KeyError
        from pyarrow otherwise). ``derived``: ``table`` is after the deriver, which makes some
        of them; before it, only stateless featurizers can be checked. ``reader`` and
        ``format_name`` word the error (see :func:`missing_columns`)."""
        if not derived and self.stateful:
            return
        names = set(table.schema.names)
        missing = [c for c in self.input_columns if c not in names]
        if missing:
            raise missing_columns(missing, table.schema.names, reader, format_name)

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, table: pa.Table | pa.RecordBatch) -> Featurizer:
        """Learn the vocabularies and moments from ``table`` (a pyarrow Table or RecordBatch,
        or a pandas or polars frame)."""
        table = as_arrow(table, "Featurizer.fit")
        if table.num_rows == 0:
            raise DataError("cannot fit a featurizer on zero records")
        table = self._derived(table, state={})
        self.check_columns(table, derived=True)
        spec = self.spec
        min_count = int(spec.get("min_count", 1))
        max_cats = int(spec.get("max_categories", 256))
        vocab: dict[str, list[str]] = {}
        for name in spec.get("categorical", []):
            counts = pc.value_counts(_cast(table.column(name), pa.string(), name)).to_pylist()
            pairs = [(d["values"], d["counts"]) for d in counts if d["values"] is not None]
            pairs.sort(key=lambda p: (-p[1], p[0]))
            vocab[name] = [v for v, c in pairs if c >= min_count][:max_cats]
        log_cols = set(spec.get("log1p", []))
        mean, std = {}, {}
        for name in spec.get("numeric", []):
            x = self._numeric(table, name, name in log_cols)
            mean[name] = float(np.mean(x))
            s = float(np.std(x))
            std[name] = s if s > MIN_STD else 1.0
        self.vocab_ = vocab
        for cached in ("_value_sets", "_moment_arrays"):  # derived from an earlier fit
            self.__dict__.pop(cached, None)
        self.mean_ = mean
        self.std_ = std
        self.feature_names_ = self._names()
        return self

    def _derive(self, table: pa.Table, state: dict[str, Any]) -> pa.Table:
        d = self.spec.get("derive")
        if not d:
            return table
        return get_deriver(d["name"])(decoded(table), d.get("params", {}), state)

    @staticmethod
    def _numeric(table: pa.Table, name: str, log: bool) -> np.ndarray:
        x = to_numpy(pc.fill_null(_cast(table.column(name), pa.float64(), name), 0.0))
        if log:
            x = np.log1p(np.maximum(x, 0.0))
        return x

    def _names(self) -> list[str]:
        names: list[str] = []
        for col in self.spec.get("categorical", []):
            vocab = self.vocab_[col]
            names.extend(f"{col}={v}" for v in vocab)
            names.append(f"{col}={OTHER}")
        names.extend(self.spec.get("numeric", []))
        return names

    # -- transforming ----------------------------------------------------------------------
    @property
    def stateful(self) -> bool:
        """Whether features depend on earlier records (a deriver with windows over time)."""
        return bool(self.spec.get("derive"))

    @property
    def input_columns(self) -> list[str]:
        """The parsed columns the features are computed from (stateless featurizers)."""
        return [*self.spec.get("categorical", []), *self.spec.get("numeric", [])]

    @property
    def n_features(self) -> int:
        self._check_fitted()
        return len(self.feature_names_)

    def transform(self, table: pa.Table | pa.RecordBatch,
                  state: dict[str, Any] | None = None) -> np.ndarray:
        """Float32 matrix ``(rows, n_features)``. Unseen categories land in the ``other`` slot.
        ``table``: a pyarrow Table or RecordBatch, or a pandas or polars frame."""
        self._check_fitted()
        table = as_arrow(table, "Featurizer.transform")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = self._derived(table, state if state is not None else {})
        try:
            return self._transform(table)
        except KeyError:
            self.check_columns(table, derived=True)
            raise

    def _derived(self, table: pa.Table, state: dict[str, Any]) -> pa.Table:
        """:meth:`_derive`; where it fails with a KeyError, a column the deriver declared it
        reads (:func:`~deepwatch.features.register_deriver`) and the records lack is named in
        an InputError (the deriver's own KeyError otherwise)."""
        try:
            return self._derive(table, state)
        except KeyError:
            names = set(table.schema.names)
            reads = deriver_reads(self.spec.get("derive", {}).get("name", ""))
            missing = [c for c in reads if c not in names]
            if not missing:
                raise
            raise missing_columns(missing, table.schema.names, "the featurizer reads") from None

    def _transform(self, table: pa.Table) -> np.ndarray:
        n = table.num_rows
        out = np.zeros((n, self.n_features), dtype=np.float32)
        offset = 0
        rows = np.arange(n)
        for name in self.spec.get("categorical", []):
            vocab = self.vocab_[name]
            col = table.column(name)
            if col.type != pa.string():
                col = _cast(col, pa.string(), name)
            idx = pc.index_in(col, value_set=self._value_set(name))
            idx_np = to_numpy(pc.fill_null(idx, len(vocab)))
            out[rows, offset + idx_np] = 1.0
            offset += len(vocab) + 1
        numeric = self.spec.get("numeric", [])
        if numeric:
            # all numeric columns as one matrix: a few array operations instead of several
            # Arrow calls per column (what keeps small batches, one REST record, cheap)
            log_cols = set(self.spec.get("log1p", []))
            x = _numeric_matrix(table, numeric)
            logged = [j for j, name in enumerate(numeric) if name in log_cols]
            if logged:
                x[:, logged] = np.log1p(np.maximum(x[:, logged], 0.0))
            mean, std = self._moments(numeric)
            with np.errstate(over="ignore"):  # a huge value (1e308) saturates at the clip
                out[:, offset : offset + len(numeric)] = np.clip((x - mean) / std, -CLIP, CLIP)
        return out

    def _moments(self, numeric: list[str]) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.get("_moment_arrays")
        if cache is None:
            cache = (np.array([self.mean_[c] for c in numeric], dtype=np.float64),
                     np.array([self.std_[c] for c in numeric], dtype=np.float64))
            self.__dict__["_moment_arrays"] = cache
        return cache  # type: ignore[no-any-return]

    def _value_set(self, name: str) -> pa.Array:
        cache: dict[str, pa.Array] = self.__dict__.setdefault("_value_sets", {})
        if name not in cache:
            cache[name] = pa.array(self.vocab_[name], pa.string())
        return cache[name]

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": "tabular/v1",
            "spec": self.spec,
            "vocab": self.vocab_,
            "mean": self.mean_,
            "std": self.std_,
            "feature_names": self.feature_names_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Featurizer:
        """The fitted featurizer ``to_dict`` wrote; ValueError for anything else (checked
        here, so that a damaged one is refused at load, not at the first transform)."""
        if not isinstance(d, dict):
            raise ValueError("a featurizer is a JSON object")
        if d.get("kind") != "tabular/v1":
            raise ValueError(f"unknown featurizer kind {d.get('kind')!r}")
        spec = d.get("spec")
        if not isinstance(spec, dict):
            raise ValueError("'spec' is not an object")
        check_spec(spec)
        vocab, mean, std = d.get("vocab"), d.get("mean"), d.get("std")
        if not (isinstance(vocab, dict) and all(_str_list(v) for v in vocab.values())):
            raise ValueError("'vocab' is not an object of lists of categories")
        if not (isinstance(mean, dict) and isinstance(std, dict)):
            raise ValueError("'mean' and 'std' are not objects")
        missing = [c for c in spec.get("categorical", []) if c not in vocab] + [
            c for c in spec.get("numeric", []) if c not in mean or c not in std]
        if missing:
            raise ValueError(f"no fitted state for the column {missing[0]!r}")
        if not _str_list(d.get("feature_names")):
            raise ValueError("'feature_names' is not a list of names")
        f = cls(spec)
        f.vocab_ = {k: list(v) for k, v in vocab.items()}
        try:
            f.mean_ = {k: float(v) for k, v in mean.items()}
            f.std_ = {k: float(v) for k, v in std.items()}
        except (TypeError, ValueError):
            raise ValueError("'mean' and 'std' must hold numbers") from None
        # a NaN or infinite moment, or a spread of 0, makes every record's features NaN or
        # saturated: each verdict would be the same, whatever the record. A tiny spread
        # (1e-308) saturates them as well, and fit never writes one: at or below MIN_STD it
        # writes 1.0
        for k in f.mean_:
            if not math.isfinite(f.mean_[k]):
                raise ValueError(f"the mean of {k!r} is {f.mean_[k]}, not a finite number")
        for k in f.std_:
            if not (math.isfinite(f.std_[k]) and f.std_[k] > MIN_STD):
                raise ValueError(f"the std of {k!r} is {f.std_[k]}, not a finite number above "
                                 f"{MIN_STD:g} (fit gives a column that barely varies 1.0)")
        f.feature_names_ = list(d["feature_names"])
        return f

    def check_layout(self) -> None:
        """ValueError where the feature names are not the columns ``transform`` makes from the
        spec and vocabularies (a featurizer edited by hand)."""
        if self.feature_names_ != self._names():
            raise ValueError("its feature names do not match its spec and vocabularies")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Featurizer:
        """The featurizer :meth:`to_json` wrote; ValueError for anything else, a key given
        twice in one object included (json keeps the last silently: of two ``std`` objects,
        the one checked is whichever comes last), as a bundle's manifest is read."""
        return cls.from_dict(json.loads(text, object_pairs_hook=_no_repeated_keys))

    def schema_hash(self) -> str:
        """Identifies the input layout the models were trained on (names and order)."""
        blob = json.dumps({"names": self.feature_names_, "spec": self.spec}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


#: the keys of a featurizer's spec (see :class:`Featurizer`)
SPEC_KEYS = ("categorical", "numeric", "log1p", "min_count", "max_categories", "derive")


def check_spec(spec: Any) -> None:
    """ValueError where ``spec`` is not a featurizer spec (see :class:`Featurizer`): not a
    dict, a key it does not know, a value of the wrong kind, no column to featurize. The same
    checks :meth:`Featurizer.from_dict` makes of a saved featurizer's spec."""
    if not isinstance(spec, dict):
        raise ValueError(f"a spec is a dict (keys {', '.join(SPEC_KEYS)}), not "
                         f"{type(spec).__name__}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"spec key {unknown[0]!r} is not one of {', '.join(SPEC_KEYS)}")
    for key in ("categorical", "numeric", "log1p"):
        if not _str_list(spec.get(key, [])):
            raise ValueError(f"spec {key!r} is not a list of column names")
    if not (spec.get("categorical") or spec.get("numeric")):
        raise ValueError("the spec names no column: give 'categorical' or 'numeric' columns")
    for key in ("min_count", "max_categories"):
        value = spec.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"spec {key!r} is {value!r}, not a whole number of 1 or more")
    derive = spec.get("derive")
    if derive:
        if not (isinstance(derive, dict) and isinstance(derive.get("name"), str)
                and isinstance(derive.get("params", {}), dict)):
            raise ValueError("spec 'derive' is not {\"name\": ..., \"params\": {...}}")
        try:
            get_deriver(derive["name"])
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None


def missing_columns(missing: list[str], present: list[str], reader: str,
                    format_name: str | None = None) -> InputError:
    """The error for records that lack the columns ``missing`` that ``reader`` reads: the
    first few named, and where most are missing (a frame read from a CSV without its header,
    columns 0, 1, 2...) how to name them."""
    if len(missing) <= 4:
        return InputError(f"the records have no column {', '.join(map(repr, missing))}, "
                          f"which {reader}")
    shown = ", ".join(map(repr, missing[:4]))
    names = (f"the names in deepwatch.formats.get_format({format_name!r}).schema.names"
             if format_name else "the names the format gives them")
    return InputError(f"the records lack {len(missing)} of the columns {reader} ({shown}, ...; "
                      f"they have {', '.join(map(repr, present[:4]))}"
                      f"{', ...' if len(present) > 4 else ''}): give their columns {names}")


def _numeric_matrix(table: pa.Table, names: list[str]) -> np.ndarray:
    """Columns ``names`` as one float64 matrix, nulls as 0: one Arrow call when they are all
    null-free numbers (``to_tensor``; one REST record then costs 3 us here, not 0.4 ms), else
    column by column."""
    sub = table.select(names)
    if sub.num_rows and all((pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
                            and c.null_count == 0 for f, c in zip(sub.schema, sub.columns,
                                                                 strict=True)):
        batches = sub.combine_chunks().to_batches()
        if len(batches) == 1:
            x = np.asarray(batches[0].to_tensor(row_major=True))
            return x if x.flags.writeable else x.copy()
    x = np.empty((table.num_rows, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        x[:, j] = _as_float(table, name)
    return x


def _as_float(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, nulls as 0 (zero-copy where the column allows it)."""
    col = table.column(name)
    if col.null_count == 0 and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        return np.asarray(to_numpy(col), dtype=np.float64)
    return to_numpy(pc.fill_null(_cast(col, pa.float64(), name), 0.0))


def _cast(col: pa.ChunkedArray, to: pa.DataType, name: str) -> pa.ChunkedArray:
    """``col`` cast to ``to``; where it cannot be (text that is no number in a numeric column,
    a list where a category goes), an InputError naming the column instead of pyarrow's
    ArrowInvalid or ArrowNotImplementedError, which named neither the column nor the API."""
    # an integer past 2**53 (a byte count of 1e16 parses as int64) is a float64 rounded, as
    # transform's matrix has it: a safe cast refused it, so that one such training line
    # stopped training on the whole file, while scoring took the same line
    safe = not (pa.types.is_integer(col.type) and pa.types.is_floating(to))
    try:
        if pa.types.is_dictionary(col.type):  # (a polars Categorical's string_view values
            col = pc.cast(col, plain_type(col.type))  # have no take, which the cast does)
        return pc.cast(col, to, safe=safe)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        want = "numbers" if pa.types.is_floating(to) else "categories (text)"
        raise InputError(f"column {name!r} holds values that are not {want} ({col.type}), "
                         f"which this featurizer reads as {want}: {first_line(exc)}") from None


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; ValueError where it gives a key twice."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"it gives {key!r} twice in one object; it is not a featurizer "
                             "deepwatch wrote")
        obj[key] = value
    return obj


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
