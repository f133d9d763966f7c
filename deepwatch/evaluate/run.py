"""``deepwatch evaluate``: score labelled inputs with a bundle and compute the contract JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import DataError, UsageError
from ..formats import get_format
from ..io import InputReader, no_label_reason, split_unlabelled
from ..labels import BENIGN, KDD_CATEGORIES, KDD_COST, kdd_category
from .metrics import binary_metrics, confusion, kdd_cost

#: Records of every label whose features a report keeps for its t-SNE map.
REPORT_SAMPLE = 3000


def collect(detector: Any, format_name: str, inputs: Sequence[str], progress: bool = False,
            feature_sample: int = 0, rejects: Any = None
            ) -> tuple[dict[str, np.ndarray], Any, float]:
    """Score every input; returns (columns incl. ``label``, reader stats, seconds).
    ``rejects``: a :class:`~deepwatch.sinks.RejectSink` that keeps every rejected record.

    With ``feature_sample`` > 0 the columns also hold ``_sample_rows``/``_sample_X``: up to that
    many records of every label and their feature rows (for the report's t-SNE map).
    """
    from ..viz.sample import LabelSample

    sampler = LabelSample(per_label=feature_sample) if feature_sample > 0 else None
    offset = 0
    fmt = get_format(format_name)
    if format_name != detector.format:
        raise UsageError(f"the bundle was trained on format {detector.format!r}, "
                         f"not {format_name!r}")
    reader = InputReader(fmt, inputs, progress=progress)
    parts: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    state = detector.new_state()
    labelled_inputs: set[str] = set()
    for batch, rej, spec in reader:
        if rejects is not None:
            rejects.write(rej)
        if batch.num_rows == 0:
            continue
        # An input is labelled when its first records (the first chunk, megabytes) have a
        # label: records without one further on are rejects, counted, not a stop. An input
        # without labels stops the run at once, as it always did.
        if "label" not in batch.schema.names or (
                spec.display not in labelled_inputs
                and batch.column("label").null_count == batch.num_rows):
            raise DataError("measuring detection needs labelled records: every record needs "
                            "a label (from the data, or PATH=LABEL, e.g. site.log=normal)")
        labelled_inputs.add(spec.display)
        batch, no_label = split_unlabelled(batch, spec.display, no_label_reason("evaluation"),
                                           reader)
        if no_label.num_rows:
            reader.stats.add(spec.display, 0, no_label.num_rows)  # parsed, rejected after all
            if rejects is not None:
                rejects.write(no_label)
        if batch.num_rows == 0:
            continue
        cols = detector.decide(batch, state)
        cols["label"] = np.asarray(batch.column("label").to_pylist(), dtype=object)
        for k, v in cols.items():
            if not k.startswith("_") or k == "_explain_rows":
                parts.setdefault(k, []).append(np.asarray(v))
            elif k == "_out" and "latent" in v:  # for campaign clustering
                parts.setdefault("_latent", []).append(np.asarray(v["latent"]))
        if sampler is not None and "_X" in cols:
            sampler.add(cols["label"], cols["_X"], offset)
        offset += batch.num_rows
    seconds = time.perf_counter() - t0
    if not parts:
        raise DataError("no records could be parsed from the evaluation inputs"
                        + reader.stats.format_hint(format_name))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if sampler is not None:
        out["_sample_rows"], out["_sample_X"] = sampler.result()
    return out, reader.stats, seconds


def metrics_from(cols: dict[str, np.ndarray], kdd: bool, threshold: float | None,
                 seconds: float) -> dict[str, Any]:
    labels = cols["label"]
    y = labels != BENIGN
    verdict = cols["verdict"].astype(bool)
    result: dict[str, Any] = {
        "n": int(len(labels)),
        "binary": binary_metrics(y, cols["score"], verdict, threshold),
    }
    per_label: dict[str, Any] = {}
    for lab in sorted(set(labels.tolist())):
        m = labels == lab
        right = ~verdict[m] if lab == BENIGN else verdict[m]
        per_label[lab] = {"support": int(m.sum()), "detection_rate": float(right.mean())}
    if kdd:
        true_cat = np.array([kdd_category(v) for v in labels], dtype=object)
        pred_cat = cols.get("category")
        if pred_cat is None:  # an autoencoder names no category: its alerts get the one the
            # hybrid gives novel attacks, the least worst-case cost over the true category
            from ..models.hybrid import minimax_category

            flagged = minimax_category(list(KDD_CATEGORIES), KDD_COST)
            pred_cat = np.where(verdict, flagged, BENIGN).astype(object)
        cats = list(KDD_CATEGORIES)
        result["kdd_cost"] = kdd_cost(true_cat, pred_cat)
        # labels the KDD tables do not know: in binary and per_label, not in the cost
        unknown, counts = np.unique(labels[true_cat == "unknown"].astype(str), return_counts=True)
        result["uncategorised"] = {str(k): int(v) for k, v in zip(unknown, counts, strict=True)}
        categories = {}
        for c in cats:
            m = true_cat == c
            categories[c] = {"support": int(m.sum()),
                             "detection_rate": float((pred_cat[m] == c).mean()) if m.any() else 0.0}
        result["categories"] = categories
        result["confusion"] = {"labels": cats, "matrix": confusion(true_cat, pred_cat, cats)}
    else:
        result["kdd_cost"] = None
        result["uncategorised"] = None
        result["categories"] = None
        result["confusion"] = None
    result["per_label"] = per_label
    result["rows_per_second"] = float(len(labels) / seconds) if seconds > 0 else 0.0
    return result


def evaluate(bundle: str, format_name: str, inputs: Sequence[str], engine: str = "auto",
             progress: bool = False, feature_sample: int = 0, policy: str | None = None,
             rejects: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of ``bundle`` on labelled ``inputs``; ``rejects``: a JSONL file that keeps every
    rejected record with its line, text and reason."""
    from ..models.detector import Detector
    from ..sinks import RejectSink

    det = Detector(bundle, engine=engine, explain=False, policy=policy)
    sink = RejectSink(rejects)
    try:
        cols, stats, seconds = collect(det, format_name, inputs, progress, feature_sample, sink)
    except BaseException:  # what it kept stays (it may say why); an empty file does not
        sink.abort()
        raise
    sink.close()
    fmt = get_format(format_name)
    threshold = (det.decision.threshold if det.decision.supervised
                 else det.decision.anomaly_threshold)
    result = metrics_from(cols, fmt.kdd_labels, threshold, seconds)
    if "anomaly_score" in cols:
        result["anomaly"] = binary_metrics(cols["label"] != BENIGN, cols["anomaly_score"],
                                           cols["anomaly_score"] >= (det.decision.anomaly_threshold
                                                                     or np.inf),
                                           det.decision.anomaly_threshold)
        result["anomaly"]["target_fpr"] = det.decision.config.get("target_fpr")
    if "_latent" in cols:  # extra key: campaigns (alert clusters) against the true labels
        from ..models.campaigns import cluster_alerts, cluster_report

        cols["cluster"] = cluster_alerts(cols["_latent"], cols["verdict"].astype(bool))
        result["clusters"] = cluster_report(cols["cluster"], cols["label"])
    result["records"] = {"lines": stats.lines, "parsed": stats.parsed, "rejected": stats.rejected}
    result["bundle"] = {"kind": det.kind, "engine": det.engine, "path": str(bundle)}
    return result, cols


def to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({k: v for k, v in cols.items() if v.ndim == 1 and not k.startswith("_sample")})
