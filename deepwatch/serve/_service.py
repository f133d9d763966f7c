"""The scoring service behind the REST API: the model being served, swapped atomically on reload,
and the one path from a request body to the response bytes.

A request reads the current model once, at its start, and uses that model to the end, so a
reload (``POST /v1/reload`` or SIGHUP) never changes the model under a request in flight: the new
model serves the requests that start after the swap, and the old one is freed when the last
request holding it finishes.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .._surrogates import without_surrogates
from ..bundle import MANIFEST, sha256_file
from ..errors import BundleError, DeepwatchError
from ..formats import Format, get_format
from ..models.detector import Detector
from ..sinks import escape_unsafe_text
from ._metrics import Metrics
from ._request import Parsed, decode, parse
from ._stats import RecentStats

#: Columns of a result, in this order, where the model produces them.
RESULT_COLUMNS = ("score", "anomaly_score", "verdict", "attack_type", "category", "explanation")
#: Alerts kept per request for the dashboard (the newest).
DASHBOARD_ALERTS_PER_REQUEST = 10


#: The default time a request body has to arrive in whole (``serve --body-timeout``).
BODY_TIMEOUT_SECONDS = 30.0
#: Requests served at once by one process; past it the answer is 503 at once.
MAX_CONCURRENT_REQUESTS = 64


@dataclass(frozen=True)
class Limits:
    """What one request may carry, how its body must arrive, and how many requests one process
    takes at once (see ``_intake`` for how they are applied)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_records: int = 10_000
    #: from the start of its reading to its last byte: a client that sends the body slowly
    #: (a few bytes a second keep the connection from ever going quiet) is answered 408 then
    #: (``serve --body-timeout``, above 0)
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS
    #: once a body has been arriving ``body_rate_grace_seconds``, the bytes a second it must
    #: average from its start while it is incomplete, else 408 (0: any rate, up to the timeout)
    #: (``serve --body-min-rate`` and ``--body-rate-grace``, the grace above 0)
    body_min_rate: float = 1024.0
    body_rate_grace_seconds: float = 5.0
    #: requests served at once; a request with a body takes its slot once the body is in
    max_requests: int = MAX_CONCURRENT_REQUESTS
    #: request bodies arriving at once (they hold no slot meanwhile; 1 or more), and from one
    #: client address (0: no per-client cap) (``serve --max-uploads``, ``--max-client-uploads``)
    max_uploads: int = 256
    max_client_uploads: int = 16
    #: how long a request past its client's cap waits for one of that client's bodies to come
    #: in whole and hand it its place, before 429 (0: 429 at once) (``serve --upload-wait``)
    upload_wait_seconds: float = 5.0

    @property
    def max_buffered_bytes(self) -> int:
        """Bytes of request bodies held at once, arriving or being scored: as many full bodies
        as there are slots."""
        return self.max_requests * self.max_body_bytes


@dataclass(frozen=True)
class LoadedModel:
    detector: Detector
    #: the same model (shared session and featurizer) adding explanations, for requests that
    #: ask for them: explaining costs an extra inference pass per feature group and alert
    explaining: Detector
    format: str
    path: Path
    fingerprint: str  # sha256 of the manifest: tells which bundle is being served
    loaded_at: float
    generation: int

    def describe(self) -> dict[str, Any]:
        # (a byte of the path that is not UTF-8 \\xHH: JSON cannot hold it, /v1/stats and
        # POST /v1/reload were a 500)
        return {**self.detector.describe(), "bundle": without_surrogates(str(self.path)),
                "fingerprint": self.fingerprint, "generation": self.generation,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}


class ScoringService:
    def __init__(self, bundle: str | Path, engine: str = "auto",
                 limits: Limits | None = None, generation: int = 1) -> None:
        self.engine = engine
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.stats = RecentStats()
        self._reload_lock = threading.Lock()
        self._model = self._load(Path(bundle), generation=generation)
        self.metrics.reloads.labels("ok")
        self.metrics.reloads.labels("failed")

    @property
    def model(self) -> LoadedModel:
        return self._model

    def _load(self, path: Path, generation: int, announce: bool = True) -> LoadedModel:
        if "\x00" in str(path):  # (POST /v1/reload's JSON can hold one; the stat raised
            # ValueError, a 500)
            raise BundleError(f"cannot read the bundle at {str(path)!r}: a path cannot hold "
                              f"a NUL character")
        try:
            detector = Detector(path, engine=self.engine, explain=False)
            fingerprint = sha256_file(path / MANIFEST)
        except OSError as exc:  # a bundle moved away or made unreadable while it loaded (a
            # path that cannot be looked up is Detector's BundleError): refused as any bundle
            # that cannot load
            raise BundleError(f"cannot read the bundle at {path}: "
                              f"{exc.strerror or exc}") from None
        get_format(detector.format)  # a bundle of a format this build lacks is refused now
        explaining = copy.copy(detector)
        explaining.explain = True
        model = LoadedModel(detector, explaining, detector.format, path, fingerprint,
                            time.time(), generation)
        if announce:
            self.metrics.set_model(detector.kind, detector.format, detector.engine,
                                   model.loaded_at)
        return model

    def check(self, bundle: str | Path | None = None) -> LoadedModel:
        """Load ``bundle`` (default: the one being served) as :meth:`reload` would, without
        serving it: what a worker of several does before they all move to it."""
        path = Path(bundle) if bundle is not None else self._model.path
        try:
            return self._load(path, self._model.generation + 1, announce=False)
        except DeepwatchError:
            self.metrics.reloads.labels("failed").inc()
            raise

    def reload(self, bundle: str | Path | None = None, *, counted: bool = True) -> LoadedModel:
        """Load ``bundle`` (default: the bundle path being served, re-read from disk) and swap it
        in. On any error the model being served stays, and the error is raised. ``counted``:
        the outcome goes to ``deepwatch_model_reloads_total`` (False: the caller counts the
        reload once it knows the rest of it, see :meth:`count_reload`)."""
        with self._reload_lock:
            path = Path(bundle) if bundle is not None else self._model.path
            try:
                model = self._load(path, self._model.generation + 1)
            except DeepwatchError:
                if counted:
                    self.count_reload(False)
                raise
            self._model = model  # the swap: one reference assignment
            if counted:
                self.count_reload(True)
            return model

    def count_reload(self, ok: bool) -> None:
        """One reload in ``deepwatch_model_reloads_total``: ``ok`` or ``failed``."""
        self.metrics.reloads.labels("ok" if ok else "failed").inc()

    def score(self, body: bytes) -> bytes:
        """Response bytes of ``POST /v1/score``; RequestError for a request refused as a whole."""
        model = self._model
        t0 = time.perf_counter()
        request = decode(body, model.format, self.limits.max_records)
        parsed = parse(request.format, request.records, request.refused)
        detector = model.explaining if request.explain else model.detector
        scored = detector.score_batch(parsed.batch, detector.new_state())
        out = render(scored, parsed)
        seconds = time.perf_counter() - t0
        self._account(request.format, scored, parsed, len(request.records), seconds)
        return out

    def _account(self, fmt: Format, scored: pa.RecordBatch, parsed: Parsed, n: int,
                 seconds: float) -> None:
        m = self.metrics
        n_rejects = len(parsed.rejects)
        m.score_seconds.observe(seconds)
        m.batch_records.observe(n)
        m.records.labels("scored").inc(scored.num_rows)
        if n_rejects:
            m.records.labels("rejected").inc(n_rejects)
        alerts, rows = 0, None
        if scored.num_rows:
            malicious = pc.equal(scored.column("verdict"), "malicious")
            alerts = int(pc.sum(malicious).as_py() or 0)
            if alerts:
                m.alerts.inc(alerts)
                rows = _alert_rows(fmt, scored, parsed.index, malicious)
        self.stats.record(n, alerts, n_rejects, seconds, rows)


def render(scored: pa.RecordBatch, parsed: Parsed) -> bytes:
    """``{"results": [...], "rejects": [...]}``: one result per accepted record, in order, each
    with the record's ``index`` in the request."""
    names = ["index", *(c for c in RESULT_COLUMNS if c in scored.schema.names)]
    columns = [parsed.index.tolist(), *(scored.column(c).to_pylist() for c in names[1:])]
    results = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
    # (rejects quote what the client sent: no raw DEL, C1, line separator or bidirectional
    # control reaches its terminal or log; the set is sinks._UNSAFE_RANGES)
    return escape_unsafe_text(orjson.dumps({"results": results, "rejects": parsed.rejects}))


def _summary_fields(fmt: Format, names: list[str]) -> list[str]:
    """A few identifying fields of a record for the dashboard's alert list."""
    fields = [c for c in fmt.ecs_fields.values() if c in names]
    if not fields:
        fields = [f.name for f in fmt.schema
                  if pa.types.is_string(f.type) and f.name != "label"][:3]
    return fields[:6]


def _alert_rows(fmt: Format, scored: pa.RecordBatch, index: np.ndarray,
                malicious: pa.Array) -> list[dict[str, Any]]:
    where = np.flatnonzero(malicious.to_numpy(zero_copy_only=False))
    where = where[-DASHBOARD_ALERTS_PER_REQUEST:]
    fields = _summary_fields(fmt, scored.schema.names)
    keep = [c for c in ("score", "anomaly_score", "attack_type", "category")
            if c in scored.schema.names]
    rows = scored.select(keep + fields).take(pa.array(where)).to_pylist()
    for row, i in zip(rows, index[where], strict=True):
        row["index"] = int(i)
    return rows
