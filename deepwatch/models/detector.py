"""The Detector: featurizer + network + decision. ``score_batch`` is the one scoring function
that the CLI, REST service, Kafka worker and Spark jobs all call."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa

from .._arrow import as_arrow, decoded, without_views
from .._dedupe import MOSTLY_DISTINCT, KeyIndex, distinct, record_keys
from ..bundle import FEATURIZER, ONNX, WEIGHTS, read_bundle_file, read_manifest, verify_files
from ..errors import (
    BundleError,
    DeepwatchError,
    FormatError,
    InputError,
    UsageError,
    check_flags,
    first_line,
)
from ..features import Featurizer
from ._checks import check_manifest, check_onnx, check_scoring
from .decision import Decision

if TYPE_CHECKING:
    import polars as pl

#: What :meth:`Detector.score_batch` takes: a RecordBatch, a Table, or what ``pa.table``
#: converts (a pandas or polars DataFrame, a dict of columns).
Records: TypeAlias = Any  # (pyarrow is untyped: the union would read as Any anyway)

#: Columns score_batch appends, in order (those a bundle cannot produce are left out).
OUTPUT_COLUMNS = ("score", "anomaly_score", "verdict", "attack_type", "category")


class Detector:
    """A trained bundle loaded for scoring: featurizer, network and decision.

    ``path``: the bundle directory (checked against its manifest as it is read; ``verify``
    False skips the files not read). ``engine``: ``auto`` (ONNX Runtime where the bundle has
    a ``model.onnx`` and it is installed, else torch), ``onnx`` or ``torch``; ``device``
    (torch only): ``cpu``, ``cuda[:N]`` or ``auto``. ``explain``: add an ``explanation``
    column to malicious records (default: where it is free, i.e. autoencoders). ``policy``:
    re-score under ``threshold`` or ``cost`` instead of the bundle's decision.

    Problems with the bundle raise :class:`~deepwatch.errors.BundleError`, with the
    arguments :class:`~deepwatch.errors.UsageError`. One detector may score from several
    threads at once.
    """

    def __init__(self, path: str | Path, engine: str = "auto", verify: bool = True,
                 device: str = "cpu", explain: bool | None = None,
                 policy: str | None = None):
        if not isinstance(path, str | os.PathLike):  # (not pathlib's TypeError from inside)
            raise UsageError(f"a Detector loads a bundle directory: give its path (str or "
                             f"pathlib.Path), not {type(path).__name__}")
        check_flags(verify=verify, **({} if explain is None else {"explain": explain}))
        self.path = Path(path)
        # the files the loader reads are checked as they are read (the bytes checked are the
        # bytes loaded); the others after, so that every file is hashed once
        self.manifest: dict[str, Any] = read_manifest(self.path, verify=False)
        self._read: set[str] = set()
        try:
            self._load(engine, device, verify, policy)
            if verify:
                verify_files(self.path, self.manifest,
                             [n for n in self.manifest["files"] if n not in self._read])
        except BundleError as exc:  # name the bundle: a reload or a service may load several
            if str(self.path) in str(exc):
                raise
            raise BundleError(f"bundle {self.path}: {exc}") from None
        except DeepwatchError:
            raise
        except Exception as exc:  # the last guard: one line, never a traceback
            reason = first_line(exc, default="")
            raise BundleError(f"{self.path}: the bundle cannot be loaded "
                              f"({type(exc).__name__}{': ' + reason if reason else ''})"
                              ) from None
        #: add the ``explanation`` column (top features) for malicious records
        # explain=None: name the features behind alerts where it is free (an autoencoder's
        # per-feature errors come out of the network); a classifier's occlusion attribution runs
        # the network ~40 more times per distinct alert, so it is asked for with explain=True.
        self.explain = explain if explain is not None else "errors" in self.manifest["outputs"]
        #: shared by copies (the service's explaining detector); keyed by the explain setting
        self._cache = ResultCache()

    def _load(self, engine: str, device: str, verify: bool, policy: str | None) -> None:
        """Featurizer, decision and backend, each checked against the manifest and the others
        (see ``_checks``): a bundle that loads can score."""
        check_manifest(self.manifest)
        text = self._file(FEATURIZER, verify)
        try:
            self.featurizer = Featurizer.from_json(text.decode("utf-8"))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            reason = ("it is nested too deeply" if isinstance(exc, RecursionError)
                      else first_line(exc))
            raise BundleError(
                f"{self.path / FEATURIZER} is not a valid featurizer: {reason}") from None
        if self.featurizer.schema_hash() != self.manifest.get("featurizer_schema_hash"):
            raise BundleError(f"{self.path}: featurizer does not match the model it was saved with")
        try:
            self.featurizer.check_layout()
        except ValueError as exc:
            raise BundleError(f"{self.path / FEATURIZER} is not a valid featurizer: {exc}"
                              ) from None
        if self.featurizer.n_features != self.manifest["n_features"]:
            raise BundleError(f"{self.path}: the featurizer makes {self.featurizer.n_features} "
                              f"features but the manifest says {self.manifest['n_features']}")
        decision = dict(self.manifest["decision"])
        if policy is not None:  # evaluate a bundle under another decision (cost or threshold)
            if policy not in ("cost", "threshold"):
                # fpr (and auto) are ways of choosing the threshold, which happens in training
                raise UsageError(f"decision policy {policy!r} cannot be chosen when scoring: "
                                 f"use threshold (the bundle's calibrated threshold) or cost "
                                 f"(KDD bundles); fpr is chosen at training")
            if policy == "cost" and decision.get("cost_matrix") is None:
                raise UsageError(f"decision policy 'cost' needs the KDD contest's cost matrix, "
                                 f"which this {self.manifest.get('model_kind')} bundle on "
                                 f"{self.manifest.get('input_format')} data does not have "
                                 f"(use threshold)")
            decision["policy"] = policy
        self.decision = Decision(decision)
        self.outputs: list[str] = list(self.manifest["outputs"])
        self.format: str = self.manifest["input_format"]
        from ..formats import Format, get_format

        self._format: Format | None
        try:  # (a format this build lacks is no reason to refuse a bundle that scores tables)
            self._format = get_format(self.format)
        except FormatError:
            self._format = None
        self.kind: str = self.manifest["model_kind"]
        self.backend = self._backend(engine, device, verify)
        check_scoring(self)

    def _file(self, name: str, verify: bool) -> bytes:
        """A bundle file's bytes, checked against the manifest as they are read."""
        self._read.add(name)
        return read_bundle_file(self.path, self.manifest, name, verify)

    def _backend(self, engine: str, device: str, verify: bool):  # type: ignore[no-untyped-def]
        from ..runtime import OnnxBackend, TorchBackend

        if engine not in ("auto", "onnx", "torch"):
            raise UsageError(f"unknown engine {engine!r}; use auto, onnx or torch")
        # read_manifest refused a bundle holding a model.onnx it does not list
        if engine in ("auto", "onnx") and ONNX in self.manifest["files"]:
            model = self._file(ONNX, verify)
            try:
                backend = OnnxBackend(model, self.outputs)
            except ImportError:
                if engine == "onnx":
                    raise UsageError("onnxruntime is not installed") from None
            else:
                check_onnx(backend.session, self.featurizer.n_features, self.outputs)
                return backend
        if engine == "onnx":
            raise BundleError(f"{self.path} has no {ONNX}")
        weights = self._file(WEIGHTS, verify)
        return TorchBackend(self.manifest["network"], weights, self.outputs, device)

    def __repr__(self) -> str:
        return (f"Detector({str(self.path)!r}, kind={self.kind!r}, format={self.format!r}, "
                f"engine={self.engine!r}, policy={self.decision.config.get('policy')!r})")

    @property
    def engine(self) -> str:
        return str(self.backend.name)

    def as_batch(self, records: Records) -> pa.RecordBatch:
        """``records`` as one RecordBatch holding every column the featurizer reads: a Table,
        pandas or polars frame is converted; anything else, or a column missing, is one
        :class:`~deepwatch.errors.InputError` (a Table of 4,096 rows or more failed inside
        pyarrow, a DataFrame with ``AttributeError: num_rows``, a missing column with a
        ``KeyError`` from the featurizer), and so is a column read as numbers that holds
        text that is none (pyarrow's ``ArrowInvalid`` from the featurizer). A column may come
        under the format's other name for it (``Format.column_aliases``: a frame read from a
        Zeek JSON log has ``id.resp_p``, not ``resp_p``): it is then added under its own name,
        as ``parse_records`` reads it."""
        records = as_arrow(records, "score_batch")
        if isinstance(records, pa.Table):
            records = _one_batch(without_views(records))
        elif records.num_rows >= DEDUPE_MIN_ROWS:  # (where a look at the types costs nothing)
            records = without_views(records)  # repeated records are taken: no view kernels
        if self._format is not None and self._format.column_aliases:
            records = self._format.with_column_names(records)
        # (derived features: the deriver checks the columns it reads when it runs)
        self.featurizer.check_columns(records, derived=False,
                                      reader=f"this {self.format} model reads",
                                      format_name=self.format)
        if not self.featurizer.stateful:
            _check_numbers(records, self.featurizer.spec.get("numeric", []), self.format)
        return records

    def new_state(self) -> dict[str, Any]:
        """State carried across batches of one stream (per-client windows of derived features)."""
        return {}

    def raw_outputs(self, batch: pa.RecordBatch | pa.Table, state: dict[str, Any] | None = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        X = self.featurizer.transform(batch, state)
        return X, self.backend.run(X)

    def decide(self, batch: pa.RecordBatch | pa.Table, state: dict[str, Any] | None = None
               ) -> dict[str, np.ndarray]:
        """Every per-record result of scoring ``batch`` (verdict columns, features, outputs)."""
        n = batch.num_rows
        if n >= DEDUPE_MIN_ROWS and not self.featurizer.stateful:
            # Floods and scans repeat records: decide (and explain) each distinct record once.
            first, inverse = distinct_rows(batch, self.featurizer.input_columns)
            if len(first) < MOSTLY_DISTINCT * n:
                cols = self._decide(batch.take(pa.array(first)), None)
                return {k: _expand(v, inverse) for k, v in cols.items()}
        return self._decide(batch, state)

    def _decide(self, batch: pa.RecordBatch | pa.Table, state: dict[str, Any] | None
                ) -> dict[str, np.ndarray]:
        X, out = self.raw_outputs(batch, state)
        cols = self.decision.apply(out)
        if self.explain and "verdict" in cols:
            from .explain import explain_columns

            explained = explain_columns(self, X, out, cols)
            if explained is not None:
                cols["explain"] = explained
        cols["_X"] = X
        cols["_out"] = out  # type: ignore[assignment]
        return cols

    def score_batch(self, batch: Records, state: dict[str, Any] | None = None
                    ) -> pa.RecordBatch:
        """The input batch with ``score``, ``anomaly_score`` (autoencoders), ``verdict``
        (``normal``/``malicious``), ``attack_type`` and ``category`` (classifiers) appended.

        ``batch``: parsed records (a format's ``parse(...).batch``, a lake's table), as a
        pyarrow RecordBatch or Table, or any frame pyarrow converts (pandas, polars); the
        result is a RecordBatch (``.to_pandas()`` makes it a frame).

        ``state``: a stateful detector (access logs: per-client windows of requests, see
        ``featurizer.stateful``) scores each batch from the windows it is given. To score a log
        in pieces as it would be scored whole, make one ``state = det.new_state()`` and pass it
        with every piece, in order; without it each piece starts with empty windows, and its
        verdicts differ from the whole log's. Stateless detectors (KDD, Zeek) ignore it.

        Records not parsed by deepwatch (built by hand, read from a CSV or a frame) should come
        through ``get_format(NAME).parse_records(records)`` (dicts or a frame) or
        ``.parse(text)`` (lines) first, and their ``.batch`` be scored: ``score_batch`` does not
        check every value the parsers refuse (negative counts or sizes, KDD rates outside 0..1,
        as rejects with a reason), and gives such records verdicts all the same, which mean
        nothing. A NaN or infinity in a column of floats (a polars frame keeps a NaN; pandas'
        becomes null) is an :class:`~deepwatch.errors.InputError` naming it: its record scored
        NaN, which no threshold reaches (verdict ``normal``)."""
        batch = self.as_batch(batch)
        if batch.num_rows >= DEDUPE_MIN_ROWS and not self.featurizer.stateful:
            # A record's verdict depends on nothing but its own fields: records seen before
            # (floods and scans repeat them across batches as well as within one) are not
            # featurised or run through the network again.
            return _append(batch, self._cache.columns(batch, self))
        return self.score_with_outputs(batch, state)[0]

    def score_distinct(self, batch: Records) -> pa.RecordBatch:
        """``score_batch`` for records known to be distinct (the new lines of
        :class:`deepwatch._line_cache.ScoredLineCache`): not looked for among the records
        scored before, nor for repeats among themselves, which found next to nothing there
        and cost hashing every record. Stateless detectors only (no per-client state)."""
        batch = self.as_batch(batch)
        if batch.num_rows == 0:
            return _append(batch, self._empty_columns())
        return _append(batch, self._columns(self._decide(batch, None)))

    def score_with_outputs(self, batch: Records, state: dict[str, Any] | None = None
                           ) -> tuple[pa.RecordBatch, dict[str, np.ndarray]]:
        """``score_batch`` plus the network's named outputs (e.g. ``latent`` for campaigns)."""
        batch = self.as_batch(batch)
        if batch.num_rows == 0:
            return _append(batch, self._empty_columns()), {}
        cols = self.decide(batch, state)
        return _append(batch, self._columns(cols)), cols["_out"]  # type: ignore[return-value]

    def _columns(self, cols: dict[str, Any]) -> dict[str, pa.Array]:
        out: dict[str, pa.Array] = {}
        for name in OUTPUT_COLUMNS:
            if name not in cols:
                continue
            v = cols[name]
            if name == "verdict":
                out[name] = pa.array(np.where(v, "malicious", "normal"), pa.string())
            elif name in ("score", "anomaly_score"):
                out[name] = pa.array(np.asarray(v, dtype=np.float64))
            else:
                out[name] = pa.array(np.asarray(v, dtype=object), pa.string())
        if "explain" in cols:
            out["explanation"] = pa.array(cols["explain"], pa.string())
        return out

    def _empty_columns(self) -> dict[str, pa.Array]:
        types = {"score": pa.float64(), "anomaly_score": pa.float64()}
        names = ["score"]
        if "anomaly" in self.outputs:
            names.append("anomaly_score")
        names.append("verdict")
        if self.decision.supervised:
            names += ["attack_type", "category"]
        if self.explain and ("errors" in self.outputs or self.decision.supervised):
            names.append("explanation")
        return {n: pa.array([], types.get(n, pa.string())) for n in names}

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"kind": self.kind, "format": self.format, "engine": self.engine,
                "thresholds": m.get("thresholds"), "trained_at": m.get("trained_at"),
                "deepwatch_version": m.get("deepwatch_version")}


#: Below this many rows, looking for repeated records costs more than it saves.
DEDUPE_MIN_ROWS = 4096


def distinct_rows(table: pa.Table | pa.RecordBatch, columns: list[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: the first row of each distinct record and, for every row, the index
    of its distinct record, so that ``rows == first[inverse]`` in content."""
    return distinct(_record_keys(table, columns))


def _record_keys(table: pa.Table | pa.RecordBatch, columns: list[str]) -> pl.DataFrame:
    """:func:`~deepwatch._dedupe.record_keys` of ``columns``, dictionary columns by their values:
    polars hashes an Enum by its place in the Enum's categories, so that a record of a frame
    whose Enum listed them in another order took the cached results of another record (a
    ``private`` connection those of an ``http`` one of the frame before)."""
    return record_keys(decoded(table.select(columns)), columns)


def _expand(value: Any, inverse: np.ndarray) -> Any:
    """Broadcast a per-distinct-record result back to every record."""
    if isinstance(value, dict):
        return {k: _expand(v, inverse) for k, v in value.items()}
    if isinstance(value, pa.Array | pa.ChunkedArray):
        return value.take(pa.array(inverse))
    return np.asarray(value)[inverse]


def _check_numbers(records: pa.RecordBatch, names: list[str], format_name: str) -> None:
    """An InputError naming a column the model reads as numbers that holds something else (a
    frame's ``"abc"`` or dates): it failed in the featurizer with pyarrow's ``ArrowInvalid:
    Failed to parse string``. Columns of other types than numbers are looked at, and columns of
    floats for NaN and infinities: a polars frame keeps a NaN (pandas' becomes null), and its
    record scored NaN, which no threshold reaches: the verdict ``normal``, without a word (the
    parsers reject such a record with its reason; records parsed by deepwatch never hold one)."""
    import pyarrow.compute as pc

    for name in names:
        column = records.column(name)
        typ = column.type
        if pa.types.is_floating(typ):
            finite = pc.is_finite(column)
            if finite.null_count < len(column) and not pc.all(finite).as_py():
                row = int(pc.index(finite, False).as_py())
                raise InputError(
                    f"column {name!r} holds a value that is not a finite number "
                    f"({column[row].as_py()} at row {row}), which this {format_name} model "
                    f"cannot score: parse the records first (get_format({format_name!r})"
                    ".parse_records(frame)), which rejects such records with their reason, and "
                    "score the result's .batch")
            continue
        if (pa.types.is_integer(typ) or pa.types.is_null(typ)
                or pa.types.is_boolean(typ) or pa.types.is_decimal(typ)):
            continue
        try:
            pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise InputError(f"column {name!r} holds values that are not numbers ({typ}), "
                             f"which this {format_name} model reads as numbers: "
                             f"{first_line(exc)}") from None


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A Table's rows as one RecordBatch (its chunks joined)."""
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


def _append(batch: pa.RecordBatch, cols: dict[str, pa.Array]) -> pa.RecordBatch:
    names = [n for n in batch.schema.names if n not in cols]
    arrays = [batch.column(n) for n in names]
    out = pa.RecordBatch.from_arrays(arrays + list(cols.values()), names=names + list(cols))
    # a pandas frame's index travels as a column and the schema's metadata: kept, the
    # result's to_pandas() has the frame's index again (a filtered frame's rows line up with
    # it) rather than a RangeIndex and an __index_level_0__ column
    meta = batch.schema.metadata
    return out if meta is None else out.replace_schema_metadata(meta)


class ResultCache:
    """The output columns of records already scored, keyed by their 128-bit record hash.

    Bounded: when it would hold more than ``max_rows`` records it starts again empty. Only for
    detectors whose verdicts depend on nothing but the record itself (no per-client state).
    Thread-safe: one batch at a time goes through it.

    Results with explanations and without are kept apart (one store per ``explain`` setting of
    the detector asking), so detectors sharing a cache (the service's plain and explaining
    copies of one model) never answer with each other's columns.
    """

    def __init__(self, max_rows: int = 1 << 18):
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._stores: dict[bool, tuple[KeyIndex, dict[str, pa.Array]]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return sum(len(keys) for keys, _cols in self._stores.values())

    def columns(self, batch: pa.RecordBatch, det: Detector) -> dict[str, pa.Array]:
        keys = _record_keys(batch, det.featurizer.input_columns)
        first, inverse = distinct(keys)
        a = keys["a"].to_numpy()[first]
        b = keys["b"].to_numpy()[first]
        explain = bool(det.explain)
        with self._lock:
            index, cols = self._stores.setdefault(explain, (KeyIndex(), {}))
            slot = index.lookup(a, b)
            miss = np.flatnonzero(slot < 0)
            if len(miss) and len(index) + len(miss) > self.max_rows:
                # full: start again, in a new index; the store keeps the old index and its
                # columns together until the new ones are made (cleared in place, a stop in
                # _decide below left an empty index beside the old columns, and every later
                # record took another's verdict)
                index, cols = KeyIndex(), {}
                slot[:] = -1
                miss = np.arange(len(first))
            self.hits += len(first) - len(miss)
            self.misses += len(miss)
            result = None
            if len(miss) >= MOSTLY_DISTINCT * batch.num_rows:
                # mostly new records (or a cold cache): score the batch as it is
                result = det._columns(det._decide(batch, None))
                new_rows = {k: v.take(pa.array(first[miss])) for k, v in result.items()}
            elif len(miss):
                new_rows = det._columns(det._decide(batch.take(pa.array(first[miss])), None))
            if len(miss):
                cols = ({k: pa.concat_arrays([v, new_rows[k]]) for k, v in cols.items()}
                        if cols else new_rows)
                try:
                    slot[miss] = index.add(a[miss], b[miss])
                    self._stores[explain] = (index, cols)
                except BaseException:  # (keys without their columns: drop the store)
                    self._stores.pop(explain, None)
                    raise
            if result is not None:
                return result
            idx = pa.array(slot[inverse])
            return {k: v.take(idx) for k, v in cols.items()}
