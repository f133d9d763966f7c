"""``deepwatch evaluate``: score labelled inputs with a bundle and compute the contract JSON."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import DataError, UsageError
from ..formats import get_format
from ..io import InputReader, no_label_reason, split_unlabelled
from ..labels import BENIGN, KDD_CATEGORIES, KDD_COST, is_attack, kdd_category
from ..sources.files import Inputs, input_list
from .metrics import binary_metrics, confusion, kdd_cost, label_codes

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
            # named: among several inputs, which one has none was left to guess
            raise DataError(f"measuring detection needs labelled records: {spec.display} has "
                            "none; every record needs a label (from the data, or PATH=LABEL, "
                            "e.g. site.log=normal)")
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
    if not parts and not reader.stats.lines:  # (not "could be parsed", as if they held garbage)
        raise DataError("nothing to evaluate: the evaluation inputs are empty (0 lines read)")
    if not parts:
        raise DataError("no records could be parsed from the evaluation inputs"
                        + reader.stats.format_hint(format_name))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if sampler is not None:
        out["_sample_rows"], out["_sample_X"] = sampler.result()
    return out, reader.stats, seconds


def metrics_from(cols: dict[str, np.ndarray], kdd: bool, threshold: float | None,
                 seconds: float) -> dict[str, Any]:
    """The contract's metrics of per-record ``label``/``score``/``verdict`` (and ``category``).
    ``threshold``: the cut on ``score`` the verdicts were made by, or None (see
    :func:`verdict_threshold`). Every label is counted once, under its exact text."""
    names, codes = label_codes(cols["label"])
    benign = np.array([name == BENIGN for name in names], dtype=bool)
    y = ~benign[codes]
    verdict = np.asarray(cols["verdict"]).astype(bool)
    result: dict[str, Any] = {
        "n": int(len(codes)),
        "binary": binary_metrics(y, cols["score"], verdict, threshold),
    }
    right = np.where(y, verdict, ~verdict)  # an attack flagged, a benign record let through
    support = np.bincount(codes, minlength=len(names))
    hits = np.bincount(codes, weights=right, minlength=len(names))
    # every name has a record: no empty share, no NaN
    per_label = {name: {"support": int(support[i]), "detection_rate": float(hits[i] / support[i])}
                 for i, name in enumerate(names)}
    if kdd:
        cat_of = np.array([kdd_category(name) for name in names], dtype=object)
        true_cat = cat_of[codes]
        pred_cat = cols.get("category")
        if pred_cat is None:  # an autoencoder names no category: its alerts get the one the
            # hybrid gives novel attacks, the least worst-case cost over the true category
            from ..models.hybrid import minimax_category

            flagged = minimax_category(list(KDD_CATEGORIES), KDD_COST)
            pred_cat = np.where(verdict, flagged, BENIGN).astype(object)
        cats = list(KDD_CATEGORIES)
        result["kdd_cost"] = kdd_cost(true_cat, pred_cat)
        # labels the KDD tables do not know: in binary and per_label, not in the cost
        result["uncategorised"] = {name: int(support[i]) for i, name in enumerate(names)
                                   if cat_of[i] == "unknown"}
        # records of a known category given one the cost matrix has no column for (a bundle
        # trained on labels no KDD category knows predicts "unknown", its hybrid "anomaly"):
        # named too, not in the cost; n = confusion + uncategorised + these
        pred_cat = np.asarray(pred_cat, dtype=object)
        off = np.isin(true_cat, cats) & ~np.isin(pred_cat, cats)
        found = Counter(pred_cat[off].tolist())  # by exact text (numpy's strings drop NULs)
        result["uncategorised_predictions"] = {str(c): found[c] for c in sorted(found)}
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
        result["uncategorised_predictions"] = None
        result["categories"] = None
        result["confusion"] = None
    result["per_label"] = per_label
    result["rows_per_second"] = float(len(codes) / seconds) if seconds > 0 else 0.0
    return result


def verdict_threshold(decision: Any, cols: dict[str, np.ndarray]) -> float | None:
    """The cut on ``score`` the verdicts were made by: every record is malicious exactly when
    its ``score`` reaches it. None where the verdict is no cut on ``score``:

    - the ``cost`` decision (the category of least expected cost: a record can be flagged at a
      lower score than another that is not);
    - a hybrid whose classifier cut is not 0.5 (its verdict is the classifiers' cut OR the
      autoencoder's, its score the larger of the two scores, on which the autoencoder's
      threshold falls at 0.5);
    - an autoencoder without a positive threshold (its score then has no fixed point at it).

    A bundle's autoencoder threshold is on ``anomaly_score``; its score is
    ``anomaly_score / (anomaly_score + threshold)``, 0.5 at the threshold, so the cut on
    ``score`` is 0.5. The claim is checked on the records: if any verdict differs from
    ``score >= cut`` (a rounding at the very edge) there is no one cut, and the answer is None.
    """
    anomaly_cut = decision.anomaly_threshold
    has_autoencoder = "anomaly_score" in cols
    cut: float | None
    if decision.supervised:
        if decision.policy == "cost" and decision.config.get("cost_matrix") is not None:
            cut = None
        else:
            cut = float(decision.threshold)
            if has_autoencoder and (cut != 0.5 or anomaly_cut is None or anomaly_cut <= 0):
                cut = None
    else:
        cut = 0.5 if has_autoencoder and anomaly_cut is not None and anomaly_cut > 0 else None
    if cut is not None:
        score = np.asarray(cols["score"], dtype=np.float64)
        if not np.array_equal(score >= cut, np.asarray(cols["verdict"]).astype(bool)):
            cut = None
    return cut


def _check_arguments(feature_sample: Any, rejects: Any, log: Any) -> None:
    """A UsageError for an argument :func:`evaluate` cannot take, before any scoring:
    ``feature_sample="10"`` and ``rejects=3`` failed with Python's TypeError, ``1.5`` only
    after every record was scored, and ``-1`` was taken as 0."""
    import numbers

    if (isinstance(feature_sample, bool) or not isinstance(feature_sample, numbers.Integral)
            or feature_sample < 0):
        raise UsageError(f"feature_sample must be a whole number, 0 or more, not "
                         f"{feature_sample!r:.60}")
    if rejects is not None and not isinstance(rejects, str | os.PathLike):
        raise UsageError(f"rejects must be a path (str or pathlib.Path), not "
                         f"{type(rejects).__name__}")
    if log is not None and not callable(log):
        raise UsageError(f"log must be a function taking a line (str), not "
                         f"{type(log).__name__}")


def evaluate(bundle: str | Path, format_name: str, inputs: Inputs, engine: str = "auto",
             progress: bool = False, feature_sample: int = 0, policy: str | None = None,
             rejects: str | Path | None = None, log: Callable[[str], None] | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of ``bundle`` on labelled ``inputs`` (one path, ``str`` or ``pathlib.Path``, or a
    list); ``rejects``: a JSONL file that keeps every rejected record with its line, text and
    reason (what it kept stays when the run fails or is stopped, said to be incomplete when
    stopped; see :func:`~deepwatch.sinks.keeping_rejects`). ``policy``: re-score under
    ``threshold`` or ``cost`` instead of the bundle's decision. ``log``: told a warning line
    for each input none of whose lines could be parsed, beside inputs that were (most often
    one of another format; ``score`` says the same).

    Returns ``(result, columns)``: the ``evaluate --json`` object as a dict, and the scored
    records' columns as numpy arrays (``label``, ``score``, ``verdict``...; :func:`to_table`
    makes them a table)."""
    from ..models.detector import Detector
    from ..sinks import keeping_rejects

    inputs = input_list(inputs)
    _check_arguments(feature_sample, rejects, log)
    if not inputs:  # (not "no records could be parsed", as if the inputs held garbage)
        raise UsageError("nothing to evaluate on: give one or more labelled input files")
    rejects = os.fspath(rejects) if rejects is not None else None

    det = Detector(bundle, engine=engine, explain=False, policy=policy)
    with keeping_rejects(rejects) as sink:
        cols, stats, seconds = collect(det, format_name, inputs, progress, feature_sample, sink)
    if log is not None:  # (where none parsed, collect's error said so)
        for warning in stats.format_warnings(format_name):
            log(warning)
    fmt = get_format(format_name)
    result = metrics_from(cols, fmt.kdd_labels, verdict_threshold(det.decision, cols), seconds)
    if "anomaly_score" in cols:  # the autoencoder alone, on its own scale (anomaly_score)
        # flagged as Decision flags: a threshold of 0 flags every record (it was taken for none,
        # and the figures said none was flagged while every verdict was malicious)
        cut = det.decision.anomaly_threshold
        result["anomaly"] = binary_metrics(is_attack(cols["label"]), cols["anomaly_score"],
                                           cols["anomaly_score"] >= (np.inf if cut is None
                                                                     else float(cut)),
                                           cut)
        result["anomaly"]["target_fpr"] = det.decision.config.get("target_fpr")
    if "_latent" in cols:  # extra key: campaigns (alert clusters) against the true labels
        from ..models.campaigns import cluster_alerts, cluster_report

        cols["cluster"] = cluster_alerts(cols["_latent"], cols["verdict"].astype(bool))
        result["clusters"] = cluster_report(cols["cluster"], cols["label"])
    result["records"] = {"lines": stats.lines, "parsed": stats.parsed, "rejected": stats.rejected}
    result["bundle"] = {"kind": det.kind, "engine": det.engine, "path": str(bundle)}
    return result, cols


#: Why a binary rate has no value on the records measured (see :func:`undefined_rates`).
NO_ATTACKS = "no attack records"
NO_BENIGN = "no benign records"
_NOT_SHOWN = {NO_ATTACKS: "no precision, recall or F1", NO_BENIGN: "no false-positive rate"}


def undefined_rates(binary: dict[str, Any]) -> dict[str, str]:
    """The rates of ``binary`` that mean nothing on the records measured, each with why: without
    attack records precision, recall and F1 (the JSON's 0.0 read "every attack missed"), without
    benign records the false-positive rate, as ``train`` names its validation figures."""
    out: dict[str, str] = {}
    if "tp" in binary and not binary["tp"] + binary["fn"]:
        out.update(dict.fromkeys(("precision", "recall", "f1"), NO_ATTACKS))
    if "tn" in binary and not binary["tn"] + binary["fp"]:
        out["fpr"] = NO_BENIGN
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``evaluate`` and ``report`` say on stderr of a run: the headline metrics with the
    counts of lines read, parsed and rejected, then a warning naming the labels no KDD category
    knows, if any."""
    b = result["binary"]
    missing = undefined_rates(b)
    rates = [k for k in ("precision", "recall", "f1", "fpr") if k not in missing]
    line = f"n {result['n']:,}:" + "".join(f" {k} {b[k]:.4f}" for k in rates)
    if result.get("kdd_cost") is not None:
        line += f" kdd_cost {result['kdd_cost']:.4f}"
    rec = result["records"]
    lines = [line + f" ({result['rows_per_second']:,.0f} rows/s); {rec['lines']:,} lines read: "
                    f"{rec['parsed']:,} parsed, {rec['rejected']:,} rejected"
             + "".join(f"; {why}: {_NOT_SHOWN[why]}" for why in dict.fromkeys(missing.values()))]
    if result.get("uncategorised"):
        odd = result["uncategorised"]
        shown = ", ".join(f"{k!r} ({v:,})" for k, v in list(odd.items())[:5])
        lines.append(f"warning: {sum(odd.values()):,} records have labels no KDD category knows: "
                     f"{shown}{', ...' if len(odd) > 5 else ''}; they count in the binary and "
                     "per-label figures, not in kdd_cost, categories or confusion")
    if result.get("uncategorised_predictions"):
        odd = result["uncategorised_predictions"]
        shown = ", ".join(f"{k!r} ({v:,})" for k, v in list(odd.items())[:5])
        lines.append(f"warning: {sum(odd.values()):,} records were given a category the KDD cost "
                     f"matrix has no column for: {shown}{', ...' if len(odd) > 5 else ''}; they "
                     "count in the binary, per-label and categories figures, not in kdd_cost or "
                     "confusion")
    return lines


def to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({k: v for k, v in cols.items() if v.ndim == 1 and not k.startswith("_sample")})
