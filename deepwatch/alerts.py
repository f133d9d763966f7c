"""ECS alerts from scored records, built a batch at a time.

Every alert field is a column expression evaluated once per batch; polars then serialises the
rows. The stream worker (Kafka, files and stdin alike) and the demo both use this module, so
an alert looks the same wherever it is raised. (``score`` writes verdict rows and the REST
service results, not alerts.)

Risk and severity: ``event.risk_score`` (0-100) is ``100 * score``: every bundle's score is
0..1 (a probability for classifiers; for autoencoders the decision maps the reconstruction error
so that the calibrated threshold is 0.5). A score that is not bounded (``bounded_score=False``)
is mapped with ``100 * a / (a + threshold)``, so its threshold too reads as 50.
``event.severity`` is 1 (low, risk < 40), 2 (medium, < 70), 3 (high, < 90) or 4 (critical).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa

from . import __version__
from .errors import InputError
from .sinks import escape_unsafe_documents

ALERT_CATEGORY = ("network", "intrusion_detection")
#: Columns score_batch appends: alerts carry them under ``deepwatch.*``, not in the record.
SCORE_COLUMNS = ("score", "anomaly_score", "verdict", "attack_type", "category", "explanation")
SEVERITY_BOUNDS = (40.0, 70.0, 90.0)  # risk at which severity rises to 2, 3, 4
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.3fZ"
#: The most characters of one record field an alert carries. An attacker who pads a URL or a
#: user agent must not push the alert over a transport's message size limit (Kafka's is 1 MB),
#: where it would not be delivered as an alert; ``deepwatch.truncated`` names the fields cut.
MAX_FIELD_CHARS = 8192


@dataclass(frozen=True)
class AlertContext:
    """What an alert needs besides the scored record: the rule and the format's ECS fields."""

    rule_name: str
    rule_version: str
    format_name: str
    ecs_fields: Mapping[str, str] = field(default_factory=dict)
    bounded_score: bool = True
    anomaly_threshold: float | None = None
    include_record: bool = True

    @classmethod
    def from_detector(cls, detector: Any, include_record: bool = True) -> AlertContext:
        from .formats import get_format

        fmt = get_format(detector.format)
        manifest = detector.manifest
        weights = manifest.get("files", {})
        digest = next((str(v) for k, v in sorted(weights.items()) if k.endswith(".safetensors")),
                      "")
        version = digest[:12] or str(manifest.get("trained_at") or __version__)
        threshold = detector.decision.anomaly_threshold
        return cls(
            rule_name=f"deepwatch-{detector.kind}",
            rule_version=version,
            format_name=fmt.name,
            ecs_fields=dict(fmt.ecs_fields),
            # Decision.apply maps an autoencoder's error to a 0..1 score (0.5 at the threshold)
            # already: mapping it again would put alerts below risk 50.
            bounded_score=True,
            anomaly_threshold=float(threshold) if threshold is not None else None,
            include_record=include_record,
        )


def risk_scores(score: np.ndarray, ctx: AlertContext) -> np.ndarray:
    """0-100, rounded to one decimal; higher means more likely malicious."""
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0, posinf=1e30)
    s = np.maximum(s, 0.0)
    if ctx.bounded_score:
        risk = 100.0 * np.minimum(s, 1.0)
    elif ctx.anomaly_threshold and ctx.anomaly_threshold > 0:
        risk = 100.0 * s / (s + ctx.anomaly_threshold)
    else:
        risk = 100.0 * (1.0 - np.exp(-s))
    return np.round(risk, 1)


def severities(risk: np.ndarray) -> np.ndarray:
    return (1 + np.searchsorted(np.asarray(SEVERITY_BOUNDS), risk, side="right")).astype(np.int64)


def _timestamp(frame: pl.DataFrame, ctx: AlertContext, now: datetime | None) -> pl.Expr:
    column = ctx.ecs_fields.get("@timestamp")
    if column and column in frame.columns:
        dtype = frame.schema[column]
        if dtype == pl.Datetime or isinstance(dtype, pl.Datetime):
            expr = pl.col(column)
            if getattr(dtype, "time_zone", None):
                expr = expr.dt.convert_time_zone("UTC")
            return expr.dt.strftime(TIME_FORMAT)
        if dtype.is_numeric():  # epoch seconds (Zeek's ts)
            micros = (pl.col(column).cast(pl.Float64) * 1e6).cast(pl.Int64)
            return pl.from_epoch(micros, time_unit="us").dt.strftime(TIME_FORMAT)
        return pl.col(column).cast(pl.String)
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    return pl.lit(stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z")


#: An endpoint written with its port (``a.b.c.d:443``, ``host:8080``, ``[v6]:443``) or in
#: brackets (``[v6]``): the host and the port.
_BRACKETED = re.compile(r"\[([^\[\]]+)\](?::(\d{1,5}))?")
_HOST_PORT = re.compile(r"([^:\[\]]+):(\d{1,5})")


@lru_cache(maxsize=65536)
def endpoint(value: str) -> tuple[str | None, int | None, str | None]:
    """``(ip, port, domain)`` of a record's endpoint as written. ECS's ``*.ip`` fields are IP
    addresses (an index maps them as ``ip`` and refuses a document whose value is not one), so a
    client written with its port (``203.0.113.5:51234``, ``[2001:db8::1]:443``) gives its
    address and its port, and a host name (Apache's ``HostnameLookups On``) or any other text
    gives the domain, not an ip. An IPv6 address is written as the features see it
    (``canonical_v6``): ``2001:DB8::1`` is ``2001:db8::1``, and an IPv4-mapped one,
    ``::ffff:203.0.113.5``, is the IPv4 client ``203.0.113.5``."""
    host, port = value, None
    match = _BRACKETED.fullmatch(value) or _HOST_PORT.fullmatch(value)
    if match and (match.group(2) is None or int(match.group(2)) <= 65535):
        host = match.group(1)
        port = int(match.group(2)) if match.group(2) is not None else None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None, port, host
    if ip.version == 6:
        from .features._lookups import canonical_v6

        return canonical_v6(host), port, None
    return str(ip), port, None


def _endpoint_columns(frame: pl.DataFrame, column: str
                      ) -> tuple[pl.Series, pl.Series | None, pl.Series | None]:
    """The ip, port and domain of each row's ``column`` (see ``endpoint``); port and domain
    are None where no row has one, so the common alert (an address alone) keeps its shape."""
    values = frame[column]
    distinct = values.drop_nulls().unique().to_list()
    parts = {v: endpoint(v) for v in distinct}
    if all(p == (v, None, None) for v, p in parts.items()):
        return values, None, None
    ip = values.replace_strict({v: p[0] for v, p in parts.items()}, default=None,
                               return_dtype=pl.String)
    port = values.replace_strict({v: p[1] for v, p in parts.items()}, default=None,
                                 return_dtype=pl.Int64)
    domain = values.replace_strict({v: p[2] for v, p in parts.items()}, default=None,
                                   return_dtype=pl.String)
    return (ip, port if port.null_count() < len(port) else None,
            domain if domain.null_count() < len(domain) else None)


def _nest(tree: dict[str, Any], dotted: str, expr: pl.Expr) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = expr


def _to_struct(name: str, node: dict[str, Any] | pl.Expr) -> pl.Expr:
    if isinstance(node, pl.Expr):
        return node.alias(name)
    return pl.struct([_to_struct(k, v) for k, v in node.items()]).alias(name)


def _json_explanation(frame: pl.DataFrame) -> pl.Series | None:
    """The explanation column when every value is a JSON array or object (what the detector
    writes), spliced into alerts as is; None when some value is plain text."""
    if "explanation" not in frame.columns:
        return None
    col = frame["explanation"]
    text = col.drop_nulls().str.strip_chars_start()
    if not (text.str.starts_with("[") | text.str.starts_with("{")).all():
        return None
    return col.fill_null("null")


def _cut_long_fields(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series | None]:
    """``frame`` with its record's text fields cut to MAX_FIELD_CHARS, and for each row the
    names of the fields that were cut (None when none was: the common case costs one pass)."""
    text = [c for c, t in frame.schema.items() if t == pl.String and c not in SCORE_COLUMNS]
    if not text:
        return frame, None
    long = frame.select(pl.col(c).str.len_chars().fill_null(0) > MAX_FIELD_CHARS for c in text)
    hit = [c for c in text if long[c].any()]
    if not hit:
        return frame, None
    listed = pl.concat_list(pl.when(pl.col(c)).then(pl.lit(c)).otherwise(None) for c in hit
                            ).list.drop_nulls()
    names = long.select(pl.when(listed.list.len() > 0).then(listed).alias("t"))["t"]
    cut = frame.with_columns(pl.col(c).str.slice(0, MAX_FIELD_CHARS) for c in hit)
    return cut, names


def _scored_frame(scored: Any) -> pl.DataFrame:
    """Scored records (``Detector.score_batch``'s output, as Arrow, polars or pandas) as a
    polars frame; an InputError for anything else (a pandas frame failed on a bare
    ``assert``, records not scored with polars' ``ColumnNotFoundError: "score"``)."""
    from ._arrow import as_arrow

    frame = scored if isinstance(scored, pl.DataFrame) else pl.from_arrow(
        as_arrow(scored, "alerts"))
    assert isinstance(frame, pl.DataFrame)
    if "score" not in frame.columns:
        raise InputError("alerts are made of scored records (Detector.score_batch's output): "
                         "these have no 'score' column")
    return frame


def alert_frame(scored: pa.RecordBatch | pa.Table | pl.DataFrame, ctx: AlertContext,
                source: pl.DataFrame | None = None, now: datetime | None = None,
                splice_explanation: bool = False) -> pl.DataFrame:
    """One row per record of ``scored`` (callers pass the malicious ones), one column per
    top-level ECS object, ``deepwatch`` last; ``source`` (same length) becomes
    ``deepwatch.source``. With ``splice_explanation`` the explanation is left out (the caller
    splices its JSON text in)."""
    frame = _scored_frame(scored)
    if source is not None and source.height != frame.height:
        raise ValueError(f"{source.height} source rows for {frame.height} alerts")
    frame, truncated = _cut_long_fields(frame)
    risk = risk_scores(frame["score"].to_numpy(), ctx)
    extra = {"_risk": pl.Series(risk), "_severity": pl.Series(severities(risk))}
    if truncated is not None:
        extra["_truncated"] = truncated
    if source is not None:
        extra["_source"] = source.select(pl.struct(pl.all()).alias("s"))["s"]
    work = frame.with_columns(**extra)

    tree: dict[str, Any] = {
        "@timestamp": _timestamp(frame, ctx, now),
        "event": {
            "kind": pl.lit("alert"),
            "category": pl.lit(list(ALERT_CATEGORY), dtype=pl.List(pl.String)),
            "type": pl.lit(["info"], dtype=pl.List(pl.String)),
            "module": pl.lit("deepwatch"),
            "dataset": pl.lit(f"deepwatch.{ctx.format_name}"),
            "severity": pl.col("_severity"),
            "risk_score": pl.col("_risk"),
        },
        "rule": {"name": pl.lit(ctx.rule_name), "version": pl.lit(ctx.rule_version)},
        "observer": {"type": pl.lit("ids"), "vendor": pl.lit("deepwatch"),
                     "product": pl.lit("deepwatch"), "version": pl.lit(__version__)},
    }
    endpoints: dict[str, pl.Series] = {}
    for dotted, column in ctx.ecs_fields.items():
        if dotted == "@timestamp" or column not in frame.columns:
            continue
        if dotted.endswith(".ip") and frame.schema[column] == pl.String:
            ip, port, domain = _endpoint_columns(frame, column)
            prefix = dotted[: -len(".ip")]
            parts = {dotted: ip, f"{prefix}.port": port, f"{prefix}.domain": domain}
            for name, series in parts.items():
                if series is not None and (name == dotted or name not in ctx.ecs_fields):
                    endpoints[f"_ecs_{name}"] = series
                    _nest(tree, name, pl.col(f"_ecs_{name}"))
            continue
        _nest(tree, dotted, pl.col(column))
    if endpoints:
        work = work.with_columns(**endpoints)
    own: dict[str, Any] = {}
    for name in ("score", "anomaly_score", "verdict", "attack_type", "category"):
        if name in frame.columns:
            own[name] = pl.col(name)
    if "explanation" in frame.columns and not splice_explanation:
        own["explanation"] = pl.col("explanation")
    if ctx.include_record:
        record = [c for c in frame.columns if c not in SCORE_COLUMNS]
        if record:
            own["record"] = pl.struct(record)
    if source is not None:
        own["source"] = pl.col("_source")
    if truncated is not None:
        own["truncated"] = pl.col("_truncated")
    tree["deepwatch"] = own
    return work.select([_to_struct(k, v) for k, v in tree.items()])


def alert_lines(scored: pa.RecordBatch | pa.Table | pl.DataFrame, ctx: AlertContext,
                source: pl.DataFrame | None = None, now: datetime | None = None) -> list[bytes]:
    """Each alert as one JSON document (bytes, no newline): one Kafka message each, or one
    line of a file or of standard output; the characters a JSONL writer escapes are escaped
    (see ``deepwatch.sinks.escape_unsafe_text``).

    The detector's explanation is already JSON text: it is spliced in as
    ``deepwatch.explanation`` rather than decoded and encoded again.
    """
    frame = _scored_frame(scored)
    if frame.height == 0:
        return []
    explanation = _json_explanation(frame)
    alerts = alert_frame(frame, ctx, source, now, splice_explanation=explanation is not None)
    encoded = alerts.select(pl.struct(pl.all()).struct.json_encode().alias("j"))["j"]
    if explanation is not None:  # every document ends with "}}": deepwatch's and its own
        encoded = pl.select(pl.concat_str([
            encoded.str.slice(0, encoded.str.len_chars() - 2), pl.lit(',"explanation":'),
            explanation, pl.lit("}}")]))[:, 0]
    # an alert goes to terminals and line-based files too: no raw DEL, C1, line separator,
    # bidirectional control or invisible format character (sinks._UNSAFE_RANGES)
    return escape_unsafe_documents(encoded).cast(pl.Binary).to_list()


def write_alerts(fh: IO[bytes], scored: pa.RecordBatch | pa.Table | pl.DataFrame,
                 ctx: AlertContext, source: pl.DataFrame | None = None,
                 now: datetime | None = None) -> int:
    """Append alerts as JSON lines to a binary file; returns how many were written."""
    lines = alert_lines(scored, ctx, source, now)
    if lines:
        fh.write(b"\n".join(lines) + b"\n")
    return len(lines)


def malicious(scored: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
    """The rows of ``scored`` whose verdict is malicious."""
    import pyarrow.compute as pc

    return scored.filter(pc.equal(scored.column("verdict"), "malicious"))
