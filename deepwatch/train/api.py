"""Train a bundle from raw input files: parse, split, featurise, fit, calibrate, export, save."""

from __future__ import annotations

import importlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch import nn

from ..bundle import FEATURIZER, ONNX, WEIGHTS, check_bundle_target, save_bundle
from ..errors import DataError, UsageError, check_flags
from ..features import Featurizer
from ..formats import Format, get_format
from ..io import (
    InputReader,
    Stats,
    labels_of,
    no_label_reason,
    read_labelled,
    warn_validation_in_training,
)
from ..labels import BENIGN, KDD_CATEGORIES, KDD_COST
from ..models import MODEL_KINDS
from ..sources.files import Inputs, input_list
from . import distributed
from .data import dedupe, label_vocabulary, stratified_split
from .loop import TrainConfig, pick_device, torch_threads

if TYPE_CHECKING:
    from ..sinks import RejectSink
    from ..sources.files import InputSpec


@dataclass
class Split:
    """One part of the data: features, label indices (-1: label unseen in training), strings."""

    X: np.ndarray
    labels: np.ndarray | None  # label strings (object), None when unlabelled
    y: np.ndarray | None
    w: np.ndarray  # multiplicities (de-duplicated rows)

    def take(self, rows: np.ndarray) -> Split:
        """These rows (a boolean mask or indices)."""
        return Split(self.X[rows], self.labels[rows] if self.labels is not None else None,
                     self.y[rows] if self.y is not None else None, self.w[rows])

    def known(self) -> Split:
        if self.y is None or self.labels is None:
            return self
        return self.take(self.y >= 0)

    def benign(self) -> Split:
        if self.labels is None:
            return self
        return self.take(self.labels == BENIGN)


@dataclass
class TrainContext:
    """Everything a model trainer gets. ``train`` fits, ``early`` stops, ``calib`` calibrates
    thresholds and the stack's meta-learner."""

    fmt: Format
    featurizer: Featurizer
    vocab: list[str]
    train: Split
    early: Split
    calib: Split
    cfg: TrainConfig
    target_fpr: float
    #: ``--decision``: auto (the contest's cost on KDD data, where every label has a category;
    #: else threshold), cost, threshold or fpr.
    policy: str
    options: dict[str, Any] = field(default_factory=dict)
    #: Cross-fitting (``--folds K``, K > 1): each member's (train, early, calib) parts; then
    #: ``train``, ``early`` and ``calib`` above are the first member's.
    folds: list[tuple[Split, Split, Split]] = field(default_factory=list)
    #: ``--refit``: after the first pass, train the classifiers again on all labelled rows.
    refit: bool = False

    def all_labelled(self) -> Split:
        """Every labelled record with a label in the vocabulary (training, early-stopping and
        calibration parts), identical rows collapsed into one with their multiplicities."""
        tr, es, cal = self.folds[0] if self.folds else (self.train, self.early, self.calib)
        rows = concat_splits([tr.known(), es.known(), cal.known()])
        assert rows.y is not None
        X, y, w = dedupe(rows.X, rows.y, rows.w)
        assert y is not None
        return Split(X, np.array(self.vocab, dtype=object)[y], y, w)

    def decision_base(self) -> dict[str, Any]:
        if not self.vocab:
            return {"labels": [], "label_category": [], "categories": [], "policy": "threshold"}
        if self.fmt.kdd_labels:
            cats = list(KDD_CATEGORIES)
            label_cat = [self.fmt.category_of(lab) for lab in self.vocab]
            unknown = sorted({c for c in label_cat if c not in cats})
            if unknown and self.policy == "cost":  # asked for: not quietly another decision
                odd = [lab for lab, c in zip(self.vocab, label_cat, strict=True) if c in unknown]
                raise DataError(
                    "--decision cost weighs the KDD contest's cost matrix, which has no row "
                    "for the training labels no KDD category knows: "
                    + ", ".join(repr(lab) for lab in odd[:5])
                    + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
                    + " (give --decision threshold or fpr, or leave --decision out: the bundle "
                    "then decides by threshold)")
            cats += unknown
            cost = KDD_COST.tolist() if not unknown else None
        else:
            cats = [BENIGN] + [lab for lab in self.vocab if lab != BENIGN]
            label_cat = list(self.vocab)
            cost = None
        return {"labels": self.vocab, "label_category": label_cat, "categories": cats,
                "policy": ("cost" if self.policy == "auto" else self.policy)
                if cost is not None else "threshold",
                "cost_matrix": cost, "threshold": 0.5}


@dataclass
class Trained:
    """What a trainer returns: the module to export, how to rebuild it, and its decision."""

    module: nn.Module
    network: dict[str, Any]
    outputs: list[str]
    decision: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    #: Where ``module`` has learnt from ``ctx.calib`` (cross-fitting), the same model without
    #: those rows, for honest calibration metrics.
    calibration_module: nn.Module | None = None


Trainer = Callable[[str, TrainContext], Trained]

#: Training-loop settings that ``train(options=...)`` may override (see TrainConfig).
_LOOP_OPTIONS = ("batch_size", "lr", "weight_decay", "patience", "class_balance", "epoch_size")

_TRAINERS: dict[str, str] = {
    "mlp": "deepwatch.train.api:train_classifier",
    "resnet": "deepwatch.train.api:train_classifier",
    "snn": "deepwatch.train.api:train_classifier",
    "stack": "deepwatch.train.api:train_classifier",
    "autoencoder": "deepwatch.train.anomaly:train_autoencoder",
    "hybrid": "deepwatch.train.anomaly:train_hybrid",
}


def _trainer(kind: str) -> Trainer:
    module, attr = _TRAINERS[kind].split(":")
    fn: Trainer = getattr(importlib.import_module(module), attr)
    return fn


def require_two_labels(kind: str, ctx: TrainContext) -> None:
    """A classifier (alone or in a hybrid, named as the user asked for it) needs two labels."""
    if not ctx.vocab or len(ctx.vocab) < 2:
        raise DataError(f"model {kind!r} needs labelled data with at least two labels "
                        f"(found {ctx.vocab or 'none'}): give attack records too (PATH=LABEL), "
                        "or learn from benign records alone with the autoencoder model")


def require_labelled_validation(kind: str, ctx: TrainContext) -> None:
    """A classifier stops early and sets its threshold on labelled validation records (a
    labelled training set beside an unlabelled ``--val``)."""
    if ctx.early.y is None or ctx.calib.y is None:
        raise DataError(f"model {kind!r} stops early and sets its threshold on labelled "
                        "validation records, but the validation data has no labels: label it "
                        "(PATH=LABEL) or drop the validation inputs (--val)")


def train_classifier(kind: str, ctx: TrainContext) -> Trained:
    from .supervised import FoldData, proba_module, refit, train_folds, train_supervised

    require_two_labels(kind, ctx)
    require_labelled_validation(kind, ctx)
    parts = [(tr, es.known(), cal.known()) for tr, es, cal in
             (ctx.folds or [(ctx.train, ctx.early, ctx.calib)])]
    if any(len(es.X) == 0 or len(cal.X) == 0 for _tr, es, cal in parts):
        raise DataError("the validation data has no records with labels seen in training")
    if ctx.policy == "fpr" and not any(
            cal.labels is not None and (cal.labels == BENIGN).any() for _tr, _es, cal in parts):
        raise DataError(FPR_NEEDS_BENIGN)  # said before training, not after
    calibration_module = None
    decision = ctx.decision_base()
    if ctx.folds:
        data = []
        for tr, es, cal in parts:
            assert tr.y is not None and es.y is not None and cal.y is not None
            data.append(FoldData(tr.X, tr.y, tr.w, es.X, es.y, es.w, cal.X, cal.y, cal.w))
        fitted = train_folds(kind, data, len(ctx.vocab), ctx.cfg)
        net, network = fitted.net, fitted.config
        calibration_module = proba_module(fitted.first)
        held = concat_splits([cal for _tr, _es, cal in parts])
        held_proba = fitted.oof_proba
    else:
        tr, es, cal = parts[0]
        assert tr.y is not None and es.y is not None and cal.y is not None
        net, network = train_supervised(kind, tr.X, tr.y, tr.w, es.X, es.y, es.w,
                                        cal.X, cal.y, cal.w, len(ctx.vocab), ctx.cfg)
        held = ctx.calib
        held_proba = None
    network = {**network, "head": "proba"}
    module = proba_module(net)
    if held_proba is None:
        held_proba = run_module(module, held.X, ["proba"])["proba"]
    score = attack_score(held_proba, decision)
    if ctx.policy == "fpr":
        decision["policy"] = "threshold"
        decision["threshold"] = fpr_threshold(score, held, ctx.target_fpr)
    else:
        decision["threshold"] = error_threshold(score, held)
    info: dict[str, Any] = {}
    if ctx.refit:
        # the meta-learner and the thresholds stay those fitted on held-out predictions; the
        # manifest's calibration metrics describe the first pass (it never learnt those rows)
        if calibration_module is None:
            calibration_module = module
        rows = ctx.all_labelled()
        assert rows.y is not None
        net, network, epochs = refit(kind, net, rows.X, rows.y, rows.w, len(ctx.vocab),
                                     ctx.cfg)
        network = {**network, "head": "proba"}
        module = proba_module(net)
        info["refit_pass"] = {"rows": int(rows.w.sum()), "distinct_rows": int(len(rows.X)),
                         "epochs": epochs}
    return Trained(module, network, ["proba"], decision, info,
                   calibration_module=calibration_module)


def concat_splits(splits: list[Split]) -> Split:
    """Rows of several parts, in order, as one."""
    labels = (np.concatenate([s.labels for s in splits])  # type: ignore[misc]
              if all(s.labels is not None for s in splits) else None)
    y = (np.concatenate([s.y for s in splits])  # type: ignore[misc]
         if all(s.y is not None for s in splits) else None)
    return Split(np.concatenate([s.X for s in splits]), labels, y,
                 np.concatenate([s.w for s in splits]))


def attack_score(proba: np.ndarray, decision: dict[str, Any]) -> np.ndarray | None:
    """1 - P(normal) for each row, or None where the labels have no benign class."""
    if BENIGN not in decision["labels"]:
        return None
    return 1.0 - proba[:, decision["labels"].index(BENIGN)].astype(np.float64)


def error_threshold(score: np.ndarray | None, held: Split) -> float:
    """The score threshold with the fewest binary errors on the held-out calibration records
    (each counted as often as it occurs), or 0.5 where that cannot be measured.

    The networks learn from class-rebalanced batches, so their probabilities belong to a world
    where every class is equally common: 0.5 is the fewest-errors threshold only there. The
    calibration records carry the data's own mix. Where several thresholds tie, the middle one
    of them is taken (the widest margin on both sides).
    """
    if held.labels is None or len(held.X) == 0 or score is None:
        return 0.5
    attack = held.labels != BENIGN
    if attack.all() or not attack.any():
        return 0.5
    return fewest_errors_threshold(score, attack, held.w.astype(np.float64))


def fewest_errors_threshold(score: np.ndarray, attack: np.ndarray, weight: np.ndarray) -> float:
    """The threshold t (flag ``score >= t``) minimising the weighted count of false positives
    plus false negatives; ties resolved to the median tied cut."""
    order = np.argsort(score, kind="stable")
    s, a, w = score[order], attack[order], weight[order]
    # cut i flags s[i:]: false negatives are attacks below it, false positives benign at/above
    missed = np.concatenate([[0.0], np.cumsum(w * a)])
    false_pos = (w * ~a).sum() - np.concatenate([[0.0], np.cumsum(w * ~a)])
    errors = missed + false_pos
    valid = np.ones(len(s) + 1, dtype=bool)
    valid[1:-1] = s[1:] > s[:-1]  # a cut between equal scores is no threshold
    cuts = np.flatnonzero(valid & (errors <= errors[valid].min() + 1e-9))
    i = int(cuts[len(cuts) // 2])
    if i == 0:
        return float(s[0])
    if i == len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[i - 1] + s[i]) / 2.0)


FPR_NEEDS_BENIGN = "--decision fpr needs benign ('normal') records in the validation data"


def fpr_cut(scores: np.ndarray, target_fpr: float) -> float:
    """The threshold t (flag ``score >= t``): the smallest of ``scores`` (not empty) that flags
    at most a ``target_fpr`` share of them, or just above the largest (``np.nextafter``) where
    none does.

    Records tied at the boundary are flagged together or not at all: where flagging them would
    pass the share, t is the next larger score, so none of them is flagged. (The
    ``1 - target_fpr`` quantile flagged every record tied at it: on duplicated records or
    saturated probabilities, far more than the share.)
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    # the most records that may be flagged (the factor: 0.29 * 100 is 28.999999999999996)
    allowed = int(np.floor(target_fpr * n * (1.0 + 1e-12)))
    k = n - allowed  # flagging s[k:] flags `allowed` records
    if k > 0 and k < n and s[k - 1] == s[k]:  # s[k] is tied with records below the cut
        k = int(np.searchsorted(s, s[k], side="right"))
    if k >= n:
        return float(np.nextafter(s[-1], np.inf))
    return float(s[k])


def fpr_threshold(score: np.ndarray | None, held: Split, target_fpr: float) -> float:
    """The score threshold flagging at most a ``target_fpr`` share of the held-out benign
    records, the smallest that does (:func:`fpr_cut`; scores: 1 - P(normal))."""
    benign = held.labels == BENIGN if held.labels is not None else None
    if score is None or benign is None or not benign.any():
        raise DataError(FPR_NEEDS_BENIGN)
    return fpr_cut(score[benign], target_fpr)


def _fold_indices(labels: np.ndarray, folds: int, seed: int
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each cross-fitting member k: (training rows: every fold but k, early-stopping rows:
    half of fold k, calibration rows: its other half), folds stratified by label."""
    parts = stratified_split(labels, (1.0,) * folds, seed)
    out = []
    for k, held in enumerate(parts):
        es, cal = stratified_split(labels[held], (0.5, 0.5), seed + 1 + k)
        rest = np.sort(np.concatenate([p for j, p in enumerate(parts) if j != k]))
        out.append((rest, held[es], held[cal]))
    return out


def _split_labels(labels: np.ndarray | None, n: int, fractions: tuple[float, ...],
                  seed: int) -> list[np.ndarray]:
    if labels is None:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        cuts = (np.cumsum(fractions)[:-1] / sum(fractions) * n).astype(int)
        return [np.sort(p) for p in np.split(perm, cuts)]
    return stratified_split(labels, fractions, seed)


def unseen_validation_note(early: Split, calib: Split, model: str, refit: bool,
                           policy: str = "auto") -> str | None:
    """The line saying which ``--val`` records have a label no training record has (``y`` -1),
    or None where there are none. Early stopping's loss, the stack's meta-learner and
    ``--refit``'s second pass learn the training labels only, so they leave such records out;
    the calibration metrics and the score threshold (but ``--decision fpr``'s, set on benign
    records alone) take every calibration record (any label but ``normal`` as malicious), so
    they count those of the calibration half."""
    if early.y is None or calib.y is None or early.labels is None or calib.labels is None:
        return None
    es_unseen, cal_unseen = early.y < 0, calib.y < 0
    n_es, n_cal = int(early.w[es_unseen].sum()), int(calib.w[cal_unseen].sum())
    if not n_es + n_cal:
        return None
    total = int(early.w.sum() + calib.w.sum())
    counts: dict[str, int] = {}
    for lab, w in ((*zip(early.labels[es_unseen], early.w[es_unseen], strict=True),
                    *zip(calib.labels[cal_unseen], calib.w[cal_unseen], strict=True))):
        counts[lab] = counts.get(lab, 0) + int(w)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{lab!r} ({n:,})" for lab, n in ranked[:5])
    if len(ranked) > 5:
        shown += f" and {len(ranked) - 5} more label{'s' if len(ranked) > 6 else ''}"
    left_out = [f"early stopping leaves out the {n_es:,} in its half"] if n_es else []
    if model in ("stack", "hybrid") and n_cal:
        left_out.append(f"the stack's meta-learner the {n_cal:,} in the calibration half")
    if refit:
        left_out.append(f"--refit's second pass all {n_es + n_cal:,}")
    said = (f"note: {n_es + n_cal:,} of the {total:,} validation records (--val) have a label "
            f"no training record has: {shown}; ")
    if left_out:
        said += (", ".join(left_out[:-1]) + (" and " if len(left_out) > 1 else "")
                 + left_out[-1] + " (they know the training labels only); ")
    counters = ("the calibration metrics" if policy == "fpr" else
                "the score threshold and the calibration metrics")
    said += (f"{counters} count the {n_cal:,} in the calibration half, any label but "
             "'normal' as malicious" if n_cal else
             f"none is in the calibration half, for {counters}")
    return said


def _no_label(rejects: pa.Table, purpose: str) -> pa.Table:
    """The records :func:`read_labelled` rejected for having no label (the rest of
    ``rejects``, the reader's, have other reasons)."""
    if not rejects.num_rows:
        return rejects
    # (a reason may go on: "... (raw text cut to its first 4,096 of 20,131 bytes)", and such a
    # record was neither counted nor kept in --rejects)
    return rejects.filter(pc.starts_with(rejects.column("reason"), no_label_reason(purpose)))


def _log_unparsed(stats: Stats, format_name: str, log: Callable[[str], None]) -> None:
    """Warn of each input none of whose lines parsed, beside others that did (a --val or
    training file of another format was left out with no word but the count of rejects; where
    no input parsed, the error says so instead), as ``score`` does."""
    if stats.parsed:
        for warning in stats.format_warnings(format_name):
            log(warning)


def _log_no_label(rejects: pa.Table, purpose: str, log: Callable[[str], None]) -> None:
    """Say how many records :func:`read_labelled` rejected for having no label."""
    n = _no_label(rejects, purpose).num_rows
    if n:
        log(f"{n:,} record{'s' if n != 1 else ''} rejected: {no_label_reason(purpose)}")


class _RejectsKeptAsRead(InputReader):
    """An :class:`InputReader` that writes each chunk's rejects to ``kept`` as it yields them."""

    def __init__(self, fmt: Format, specs: Sequence[str], kept: RejectSink, **options: Any):
        super().__init__(fmt, specs, **options)
        self.kept = kept

    def __iter__(self) -> Iterator[tuple[pa.RecordBatch, pa.Table, InputSpec]]:
        for batch, rej, spec in super().__iter__():
            self.kept.write(rej)
            yield batch, rej, spec


def _read_keeping(fmt: Format, inputs: Sequence[str], purpose: str, kept: RejectSink,
                  progress: bool = False, lakes: Sequence[str] = (),
                  days: str | Sequence[str] | None = None, warn: bool = True
                  ) -> tuple[InputReader, pa.Table, pa.Table, Stats]:
    """:func:`read_labelled`, each rejected record written to ``kept`` as soon as it is known:
    the reader's as each chunk is read, so that a run stopped while reading (which can take
    minutes) keeps those read so far; those without a label once every input is read (whether
    a record lacking one is a reject is known only then). The reader, the records, all the
    rejects and the counts."""
    reader = _RejectsKeptAsRead(fmt, inputs, kept, progress=progress, lakes=lakes,
                                checksums=True, lake_days=days)
    reader.warn_ingested = warn  # (one voice per distributed run)
    table, rejects, stats = read_labelled(reader, purpose)
    kept.write(_no_label(rejects, purpose))
    return reader, table, rejects, stats


def _labels(table: pa.Table) -> np.ndarray | None:
    labs = labels_of(table)
    return np.array(labs, dtype=object) if labs is not None else None


def train(
    format_name: str,
    model: str,
    inputs: Inputs,
    out: str | Path,
    val_inputs: Inputs = (),
    epochs: int | None = None,
    seed: int = 0,
    target_fpr: float = 0.01,
    device: str = "auto",
    policy: str = "auto",
    progress: bool = False,
    options: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda s: None,
    lakes: Inputs = (),
    folds: int = 1,
    rejects: str | Path | None = None,
    refit: bool = False,
    days: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train a ``model`` on ``inputs`` and save the bundle at ``out``. Returns the manifest.

    ``folds`` > 1 cross-fits the classifiers over that many folds (``docs/models.md``).
    ``rejects``: a JSONL file that keeps every rejected training or validation record.
    ``refit`` trains the classifiers again on all labelled records after the first pass.
    ``days``: read only these days of ``lakes`` (as :func:`deepwatch.lake.read_lake` takes
    them: ``YYYY-MM-DD``, ``FIRST..LAST`` or ``unknown``, one or a list); each must match
    records of a lake.
    ``inputs``, ``val_inputs`` and ``lakes``: one path (``str`` or ``pathlib.Path``) or a list.
    The numbers (``seed``, ``epochs``, ``folds``, ``target_fpr``, ``options``' values) may be
    Python's or numpy's (``np.int64``, ``np.float32``).
    ``options``: the training loop's settings (``batch_size``, ``lr``, ``weight_decay``,
    ``patience``, ``class_balance``, ``epoch_size``), for every model (``class_balance`` not
    for ``autoencoder``), and the autoencoder's (:mod:`deepwatch.train.anomaly`), for
    ``autoencoder`` and ``hybrid`` (``novel_category``: ``hybrid`` only); a name or a value it
    cannot take, or one of another model's, is a UsageError before any work.
    ``progress``: show progress on stderr as ``deepwatch train`` does (bars on a terminal, a
    line per epoch elsewhere, as ``DEEPWATCH_PROGRESS`` says); by default nothing is shown.
    Calls from several threads run one at a time, each as it would alone; the global random
    generators (torch, numpy, ``random``) and torch's thread count are as they were after.
    """
    inputs, val_inputs = input_list(inputs), input_list(val_inputs, "val_inputs")
    lakes = input_list(lakes, "lakes")
    check_paths_and_device(out, rejects, device)
    rejects = os.fspath(rejects) if rejects is not None else None
    check_options(options, model)
    check_flags(progress=progress, refit=refit)
    check_numbers(seed=seed, epochs=epochs, folds=folds, target_fpr=target_fpr)
    # numpy's numbers (np.int64 seeds, np.float32 rates) as Python's: the manifest is JSON
    seed, folds, target_fpr = int(seed), int(folds), float(target_fpr)
    epochs = int(epochs) if epochs is not None else None
    options = plain_numbers(options)
    check_arguments(model, inputs, out, target_fpr=target_fpr, device=device, policy=policy,
                    lakes=lakes, folds=folds, val_inputs=val_inputs, epochs=epochs,
                    rejects=rejects, format_name=format_name, refit=refit, days=days)
    from ..errors import sigterm_stops_cleanly

    # by default SIGTERM would end the process mid-save, leaving the bundle's temporary
    # directory beside --out (or in it, where it was empty, which a later run then refuses)
    with _ONE_AT_A_TIME, _global_state_kept(), sigterm_stops_cleanly(), \
            distributed.session(device) as dist:
        if not dist.main:  # one voice per distributed run: rank 0's
            progress, log, rejects = False, _silent, None
        return _train(format_name, model, inputs, out, val_inputs, epochs, seed, target_fpr,
                      device, policy, progress, options, log, lakes, dist, folds, rejects,
                      refit, days)


#: Trainings in one process run one at a time (calls from other threads wait): torch's ONNX
#: export keeps process-wide state (two at once failed with ``AssertionError:
#: GLOBALS.in_onnx_export must be True``), and each training seeds the global generators its
#: networks' weights are drawn from, so two at once drew each other's numbers.
_ONE_AT_A_TIME = threading.RLock()


@contextmanager
def _global_state_kept() -> Iterator[None]:
    """Training seeds torch's and numpy's global random generators and sets torch's thread
    count (``loop.seed_everything``); put back after, so that a notebook's own random draws
    and torch settings are as they were before ``train`` (they were left seeded with the
    training seed, and torch on the usable cores or ``DEEPWATCH_TORCH_THREADS``)."""
    import torch

    threads = torch.get_num_threads()
    torch_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_rng = np.random.get_state()
    python_rng = random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)


def training_environment() -> dict[str, Any]:
    """Torch's thread count now (set for the training: ``loop.seed_everything``) and the
    versions of the libraries the training's numbers go through. One seed gives the same
    weights again only with the same of each: another thread count (``DEEPWATCH_TORCH_THREADS``,
    another CPU quota) or another numpy or torch gives other weights, and so other figures."""
    import importlib.metadata as md

    import torch

    versions: dict[str, str | None] = {}
    for name in ("torch", "numpy", "pyarrow", "polars", "onnx"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"torch_threads": torch.get_num_threads(), "libraries": versions}


def check_paths_and_device(out: Any, rejects: Any, device: Any) -> None:
    """A UsageError for ``out`` or ``rejects`` that is no path, or a ``device`` that is no
    string: ``out=None`` failed with pathlib's ``TypeError: expected str, bytes or
    os.PathLike object``, ``device=None`` with torch's."""
    for name, value in (("out", out), ("rejects", rejects)):
        if not isinstance(value, str | os.PathLike) and not (name == "rejects" and value is None):
            raise UsageError(f"{name} must be a path (str or pathlib.Path), not "
                             f"{type(value).__name__}")
    if not isinstance(device, str):
        raise UsageError(f"device must be auto, cpu or cuda[:N], not {device!r}")


#: The models with a batch-normalised network (the ``mlp``, alone or among the stack's):
#: a training batch of one row has no batch statistics.
BATCH_NORMED = ("mlp", "stack", "hybrid")


def check_options(options: dict[str, Any] | None, model: str | None = None) -> None:
    """A UsageError naming an option ``train(options=...)`` does not know: a misspelt one
    (``{"latnet": 8}``) was ignored without a word, and the model trained with the default.
    ``model``: the model they are for (``batch_size`` 1 is refused for those with batch
    normalisation: torch's ValueError "Expected more than 1 value per channel when training",
    after the data was read and featurised)."""
    if options is None:
        return
    from .anomaly import DEFAULTS

    if not isinstance(options, dict):
        raise UsageError(f"options must be a dict of option names to values, not "
                         f"{type(options).__name__}")
    autoencoder = {*DEFAULTS, "latent"}
    known = {*_LOOP_OPTIONS, *autoencoder, "novel_category"}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise UsageError(f"unknown training option {unknown[0]!r}; the options are "
                         f"{', '.join(sorted(known))}")
    # an option of another kind of model (the autoencoder's 'hidden' given to an mlp) was taken
    # and had no effect: the model trained with its own sizes, and said nothing
    # (the autoencoder samples its benign rows by their weight alone: class_balance is 1)
    own = {"autoencoder": {*_LOOP_OPTIONS, *autoencoder} - {"class_balance"},
           "hybrid": known}.get(
        model or "", set(_LOOP_OPTIONS))
    foreign = [k for k in options if k not in own]
    if foreign and model in _TRAINERS:  # (an unknown model is said as such, later)
        raise UsageError(f"option {foreign[0]!r} does not apply to model {model!r}; its "
                         f"options are {', '.join(sorted(own))}")
    for name, value in options.items():
        _check_option_value(name, value)
    if model in BATCH_NORMED and options.get("batch_size") == 1:
        raise UsageError(f"option batch_size must be at least 2 for model {model!r}, whose "
                         "batch normalisation needs two rows a batch, not 1")


def plain_numbers(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``options`` (checked by :func:`check_options`) with each number a Python ``int`` or
    ``float`` of the same value: a numpy one (``np.float32(0.05)``, ``np.int64(8)``) trained
    the whole model and then failed with a TypeError ('Object of type float32 is not JSON
    serializable') where the manifest records it."""
    import numbers

    if options is None:
        return None
    return {k: int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool)
            else float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
            for k, v in options.items()}


#: What each training option takes: (whole number?, lowest, lowest allowed?, highest, highest
#: allowed?, None allowed?); a bound of None is no bound.
_OPTION_VALUES: dict[str, tuple[bool, float | None, bool, float | None, bool, bool]] = {
    "batch_size": (True, 1, True, None, False, False),
    "epoch_size": (True, 1, True, None, False, True),
    "patience": (True, 0, True, None, False, False),
    "lr": (False, 0, False, None, False, False),
    "weight_decay": (False, 0, True, None, False, False),
    "class_balance": (False, None, False, None, False, False),
    "hidden": (True, 1, True, None, False, False),
    "depth": (True, 0, True, None, False, False),
    "min_latent": (True, 1, True, None, False, False),
    "max_latent": (True, 1, True, None, False, False),
    "latent": (True, 0, True, None, False, True),  # (0 or None: chosen from the data)
    "dropout": (False, 0, True, 1, False, False),
    "noise": (False, 0, True, None, False, False),
    "scale_floor": (False, 0, True, None, False, False),
    "explained": (False, 0, False, 1, True, False),
    "dup_power": (False, None, False, None, False, False),
}


def _check_option_value(name: str, value: Any) -> None:
    """A UsageError for a training option's value of the wrong type or out of its range: they
    failed once the data was read and featurised, with a ZeroDivisionError
    (``batch_size=0``), torch's TypeError or ValueError (``lr="1e-3"``, ``dropout=1.5``), or
    numpy's "Probabilities contain NaN" (``class_balance=nan``)."""
    import math
    import numbers

    if name == "novel_category":
        if not isinstance(value, str):
            raise UsageError(f"option novel_category must be a category name (str), not "
                             f"{value!r}")
        return
    whole, low, low_in, high, high_in, none_ok = _OPTION_VALUES[name]
    if value is None and none_ok:
        return
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if whole else numbers.Real) or not math.isfinite(value):
        raise UsageError(f"option {name} must be {kind}, not {value!r}")
    number = float(value)
    if ((low is not None and (number < low if low_in else number <= low))
            or (high is not None and (number > high if high_in else number >= high))):
        span = " ".join(part for part in (
            f"{'at least' if low_in else 'above'} {low:g}" if low is not None else "",
            "and" if low is not None and high is not None else "",
            f"{'at most' if high_in else 'below'} {high:g}" if high is not None else "") if part)
        raise UsageError(f"option {name} must be {kind} {span}, not {value!r}")


#: The largest seed: torch's (64 bits, unsigned) less the offsets its members add, rounded.
MAX_SEED = 2**63 - 1


def check_numbers(seed: Any, epochs: Any, folds: Any, target_fpr: Any) -> None:
    """A UsageError for a number of the wrong type (the command's parser checks them): a
    ``seed=None`` failed in torch, ``epochs=2.0`` only after the data was read and
    featurised, ``epochs="2"`` with a TypeError from a comparison."""
    import numbers

    for name, value in (("seed", seed), ("epochs", epochs), ("folds", folds)):
        if value is None and name == "epochs":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UsageError(f"{name} must be a whole number, not {value!r}")
    if not 0 <= seed <= MAX_SEED:  # (a negative or huge one failed in numpy or torch)
        raise UsageError(f"seed (--seed) must be between 0 and {MAX_SEED}, not {seed}")
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, numbers.Real):
        raise UsageError(f"target_fpr must be a number between 0 and 1, not {target_fpr!r}")


#: Models whose classifiers ``--folds`` cross-fits.
FOLD_MODELS = ("mlp", "resnet", "snn", "stack", "hybrid")
#: The most folds ``--folds`` takes.
MAX_FOLDS = 20


def check_arguments(model: str, inputs: Sequence[str], out: str | Path, *,
                    target_fpr: float = 0.01, device: str = "auto", policy: str = "auto",
                    lakes: Sequence[str] = (), folds: int = 1,
                    val_inputs: Sequence[str] = (), epochs: int | None = None,
                    rejects: str | None = None, format_name: str | None = None,
                    refit: bool = False, days: str | Sequence[str] | None = None) -> None:
    """The mistakes :func:`train` refuses before any work (``train --nproc`` checks them once,
    before starting its ranks)."""
    from ..sources.files import parse_input_spec

    if model not in MODEL_KINDS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODEL_KINDS)}")
    if not 0.0 < target_fpr < 1.0:
        raise UsageError(f"target_fpr (--target-fpr) must be between 0 and 1, not {target_fpr}")
    if policy not in ("auto", "cost", "threshold", "fpr"):
        raise UsageError(f"unknown decision policy {policy!r}; use auto, cost, threshold or fpr")
    if model == "autoencoder" and policy in ("cost", "threshold"):
        raise UsageError(f"decision {policy!r} (--decision) decides on a classifier's attack "
                         "probability; an autoencoder flags by its threshold calibrated at "
                         "target_fpr (--target-fpr): give decision fpr, or leave it out")
    if policy == "cost" and format_name is not None and not get_format(format_name).kdd_labels:
        raise UsageError("decision 'cost' (--decision) weighs the KDD contest's cost matrix: "
                         f"it applies to kdd and nslkdd data, not {format_name} (use threshold "
                         "or fpr)")
    if not inputs and not lakes:
        raise UsageError("no training input given (files or --lake DIR)")
    if epochs is not None and epochs < 1:
        raise UsageError(f"epochs (--epochs) must be at least 1, not {epochs}")
    torch_threads()  # a bad DEEPWATCH_TORCH_THREADS, said before the data is read
    if not 1 <= folds <= MAX_FOLDS:
        raise UsageError(f"folds (--folds) must be between 1 and {MAX_FOLDS}, not {folds}")
    if folds > 1 and model not in FOLD_MODELS:
        raise UsageError(f"folds (--folds) above 1 cross-fit classifiers "
                         f"({', '.join(FOLD_MODELS)}), not model {model!r}")
    if refit and model not in FOLD_MODELS:
        raise UsageError(f"refit (--refit) trains classifiers again "
                         f"({', '.join(FOLD_MODELS)}), not model {model!r}")
    if folds > 1 and val_inputs:
        raise UsageError("folds (--folds) above 1 hold out part of each fold for validation: "
                         "drop the validation inputs (--val), or use one fold")
    stdin_in: list[str] = []
    for texts, what in ((inputs, "training"), (val_inputs, "validation (--val)")):
        for text in texts:  # a missing file, found now rather than after reading
            if any(spec.path == "-" for spec in parse_input_spec(text)) and what not in stdin_in:
                stdin_in.append(what)
    if len(stdin_in) == 2:
        # (the training data read it to its end, and the validation data was then empty: "the
        # validation data has fewer than two records")
        raise UsageError("standard input (-) is read once: give it as training or as "
                         "validation (--val) input, not both")
    from ..lake import check_lake_days

    check_lake_days(lakes, days)  # a day mistyped or not ingested, before reading the rest
    pick_device(device)  # an unknown or absent device
    check_output_names(out, rejects)
    check_bundle_target(out)
    if rejects:
        from ..sinks import check_distinct_outputs, writable_file

        check_distinct_outputs([("--rejects", rejects)], [*inputs, *val_inputs],
                               [("the bundle", str(out))])
        if Path(out).resolve() == Path(rejects).resolve():
            # (where neither was there yet, the file took the bundle's place: the run trained
            # and then failed with '--out ... is a file', the model lost)
            raise UsageError(f"--rejects {rejects} is the bundle directory --out {out}: give "
                             "each its own path")
        if Path(out).resolve() in Path(rejects).resolve().parents:
            # (it was refused only after training: the file made --out a non-bundle directory)
            raise UsageError(f"--rejects {rejects} is inside the bundle directory --out {out}, "
                             "which is written whole: give a path outside it")
        writable_file(rejects, "--rejects")


def check_output_names(out: str | Path, rejects: str | None) -> None:
    """A UsageError for an ``out`` or ``rejects`` that names no path: an empty one (a shell
    variable not set: ``--out "$OUT"``), or an ``out`` of ``-``. An empty ``--out`` was the
    current directory (a bundle written into it where it was empty, else ``error:  exists and
    is not a deepwatch bundle``), an empty ``--rejects`` no rejects file at all, and ``--out -``
    made a directory named ``-`` (``--rejects -`` is refused as every such file option's)."""
    if rejects is not None and not os.fspath(rejects):
        raise UsageError("--rejects is empty: give a file path")
    if not os.fspath(out):
        raise UsageError("--out is empty: give the bundle's directory")
    if os.fspath(out) == "-":
        raise UsageError("--out takes the bundle's directory, not '-': a bundle is a directory "
                         "of files, not written to standard output")


def _silent(msg: str) -> None:
    pass


def _train(format_name: str, model: str, inputs: Sequence[str], out: str | Path,
           val_inputs: Sequence[str], epochs: int | None, seed: int, target_fpr: float,
           device: str, policy: str, progress: bool, options: dict[str, Any] | None,
           log: Callable[[str], None], lakes: Sequence[str], dist: distributed.Dist,
           folds: int = 1, rejects_path: str | None = None,
           refit: bool = False, days: str | Sequence[str] | None = None) -> dict[str, Any]:
    from ..sinks import keeping_rejects

    t0 = time.perf_counter()
    fmt = get_format(format_name)
    # every rejected record, with its reason: a run that fails keeps them (they may say why),
    # never an empty file; one stopped while reading keeps them too, said to be incomplete
    with keeping_rejects(rejects_path) as kept:
        reader, table, rejects, stats = _read_keeping(fmt, inputs, "training", kept,
                                                      progress, lakes, days, dist.main)
        kept.complete = not val_inputs  # (else once the validation records are read too)
        table = _derive_in_order(fmt, table)
        log(f"training data: {stats.summary()}")
        _log_unparsed(stats, format_name, log)
        _log_no_label(rejects, "training", log)
        if table.num_rows < 10:
            raise DataError(f"too few training records ({table.num_rows}) to train a model"
                            + stats.format_hint(format_name))
        labels = _labels(table)
        if folds > 1 and labels is None:
            raise DataError("folds (--folds) above 1 need labelled training data")
        fold_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        val_reader: InputReader | None = None
        if folds > 1:
            assert labels is not None
            fold_parts = _fold_indices(labels, folds, seed)
            if any(not len(part) for parts in fold_parts for part in parts):
                raise DataError(f"too few training records ({table.num_rows}) for --folds "
                                f"{folds}: every fold must hold out records both to stop early "
                                "on and to calibrate with; use fewer folds")
            tr_idx, es_idx, cal_idx = fold_parts[0]
            tr_table = table.take(pa.array(tr_idx))
            es_table, cal_table = table.take(pa.array(es_idx)), table.take(pa.array(cal_idx))
            tr_labels, es_labels, cal_labels = labels[tr_idx], labels[es_idx], labels[cal_idx]
        elif val_inputs:
            val_reader, vtable, vrej, vstats = _read_keeping(fmt, val_inputs, "validation",
                                                             kept, progress)
            kept.complete = True
            vtable = _derive_in_order(fmt, vtable)
            log(f"validation data: {vstats.summary()}")
            _log_unparsed(vstats, format_name, log)
            _log_no_label(vrej, "validation", log)
            if dist.main:  # (a --val file in a training lake, or given for training too)
                warn_validation_in_training(val_reader, reader)
            vlabels = _labels(vtable)
            if vtable.num_rows < 2:
                raise DataError("the validation data has fewer than two records"
                                + vstats.format_hint(format_name))
            es_idx, cal_idx = _split_labels(vlabels, vtable.num_rows, (0.5, 0.5), seed + 1)
            tr_table, tr_labels = table, labels
            es_table, cal_table = vtable.take(pa.array(es_idx)), vtable.take(pa.array(cal_idx))
            es_labels = vlabels[es_idx] if vlabels is not None else None
            cal_labels = vlabels[cal_idx] if vlabels is not None else None
        else:
            tr_idx, es_idx, cal_idx = _split_labels(labels, table.num_rows, (0.8, 0.1, 0.1), seed)
            tr_table = table.take(pa.array(tr_idx))
            es_table, cal_table = table.take(pa.array(es_idx)), table.take(pa.array(cal_idx))
            tr_labels = labels[tr_idx] if labels is not None else None
            es_labels = labels[es_idx] if labels is not None else None
            cal_labels = labels[cal_idx] if labels is not None else None
        if not (es_table.num_rows and cal_table.num_rows):
            # (a label with fewer records than parts stays in one part)
            held = ("the validation data (--val)" if val_inputs else
                    f"the training data ({table.num_rows:,} records)")
            raise DataError(f"{held} is too small to hold out records both to stop early on "
                            "and to calibrate with (only a label with at least "
                            f"{2 if val_inputs else 3} records has some in both)")
    if rejects_path:
        log(f"{kept.count:,} rejected record{'s' if kept.count != 1 else ''} kept in "
            f"{rejects_path}")
    # cross-fitted members together learn from every record: the features and labels are theirs
    featurizer = Featurizer(fmt.feature_spec()).fit(table if folds > 1 else tr_table)
    vocab_of = labels if folds > 1 else tr_labels
    vocab = label_vocabulary(vocab_of) if vocab_of is not None else []
    if model not in ("autoencoder", "hybrid") and len(vocab) > 1 and BENIGN not in vocab:
        # legitimate (an attack-type classifier), but a benign label spelt otherwise
        # ("Normal", "benign") silently made a model that flags every record
        log(f"note: no training record is labelled {BENIGN!r}, the benign label: every label "
            f"({', '.join(repr(v) for v in vocab[:5])}{', ...' if len(vocab) > 5 else ''}) "
            "counts as an attack, so every record scored will be malicious")
    uncategorised = [lab for lab in vocab if fmt.kdd_labels and fmt.category_of(lab) not in
                     KDD_CATEGORIES]
    if model != "autoencoder" and policy == "auto" and uncategorised and len(vocab) > 1:
        # (the default decision on KDD data, the contest's cost, was replaced by the threshold
        # without a word: the manifest alone said so)
        log(f"note: no KDD category knows the training label"
            f"{'s' if len(uncategorised) != 1 else ''} "
            f"{', '.join(repr(v) for v in uncategorised[:5])}"
            f"{', ...' if len(uncategorised) > 5 else ''}, for which the contest's cost matrix "
            "has no row: the bundle decides by threshold, not by least expected cost")
    index = {lab: i for i, lab in enumerate(vocab)}

    def part(t: pa.Table, labs: np.ndarray | None, collapse: bool) -> Split:
        X = featurizer.transform(t)
        y = np.array([index.get(v, -1) for v in labs], dtype=np.int64) if labs is not None else None
        if not collapse:
            return Split(X, labs, y, np.ones(len(X)))
        Xu, yu, w = dedupe(X, y if y is not None else None)
        if labs is None:
            return Split(Xu, None, None, w)
        # labels of the unique rows: y -> string (unseen labels cannot occur in training)
        return Split(Xu, np.array(vocab, dtype=object)[yu], yu, w)

    member_splits: list[tuple[Split, Split, Split]] = []
    if fold_parts:
        everything = part(table, labels, collapse=False)
        for tr_i, es_i, cal_i in fold_parts:
            Xu, yu, w = dedupe(everything.X[tr_i], everything.y[tr_i])  # type: ignore[index]
            member_splits.append((Split(Xu, np.array(vocab, dtype=object)[yu], yu, w),
                                  everything.take(es_i), everything.take(cal_i)))
        train_split, early_split, calib_split = member_splits[0]
        del everything
    else:
        train_split = part(tr_table, tr_labels, collapse=True)
        early_split = part(es_table, es_labels, collapse=False)
        calib_split = part(cal_table, cal_labels, collapse=False)
    log(f"features: {featurizer.n_features}; training rows {tr_table.num_rows:,} "
        f"({len(train_split.X):,} distinct), early-stopping rows {es_table.num_rows:,}, "
        f"calibration rows {cal_table.num_rows:,}"
        + (f"; each of {folds} cross-fitted members alike" if folds > 1 else ""))
    if val_inputs and model != "autoencoder":  # (it learns from benign records alone)
        note = unseen_validation_note(early_split, calib_split, model, refit, policy)
        if note:
            log(note)
    cfg = TrainConfig(seed=seed, device=device, progress=progress)
    if epochs is not None:
        cfg = cfg.with_(epochs=epochs, chosen=cfg.chosen | {"epochs"})
    loop_options = {k: v for k, v in (options or {}).items() if k in _LOOP_OPTIONS}
    if loop_options:
        cfg = cfg.with_(**loop_options, chosen=cfg.chosen | set(loop_options))
    ctx = TrainContext(fmt, featurizer, vocab, train_split, early_split, calib_split, cfg,
                       target_fpr, policy, options or {},
                       member_splits, refit)
    trained = _trainer(model)(model, ctx)
    t_train = time.perf_counter() - t0

    from ..models.decision import Decision
    from ..models.export import to_onnx
    module = trained.module.eval()
    # calibration metrics on rows no base network trained on (cross-fitted: the first fold's
    # members on their own held-out half); with one fold, a stack's meta-learner and the
    # threshold were fitted on these rows, so they are in-sample there (docs/models.md)
    outs = run_module((trained.calibration_module or module).eval(), calib_split.X,
                      trained.outputs)
    decision = Decision(trained.decision).apply(outs)
    calib_metrics = _calibration_metrics(decision, calib_split.labels)

    if not dist.main:  # rank 0 writes the bundle; the others' models are identical to its
        return {"training": {"rank": dist.rank, "world_size": dist.world},
                "metrics": {"calibration": calib_metrics}}
    from safetensors.torch import save as save_safetensors

    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    files = {
        FEATURIZER: featurizer.to_json().encode(),
        WEIGHTS: save_safetensors(state),
        ONNX: to_onnx(module, featurizer.n_features, trained.outputs),
    }
    thresholds: dict[str, Any] = {"score": trained.decision.get("threshold"),
                                  "policy": trained.decision.get("policy")}
    if trained.decision.get("anomaly_threshold") is not None:
        thresholds["anomaly"] = trained.decision["anomaly_threshold"]
        thresholds["target_fpr"] = target_fpr
    if policy == "fpr":  # the score threshold too was calibrated at it (--decision fpr)
        thresholds["target_fpr"] = target_fpr
    thresholds["calibration_fpr"] = calib_metrics.get("fpr")
    manifest = {
        "model_kind": model,
        "input_format": format_name,
        "featurizer_schema_hash": featurizer.schema_hash(),
        "n_features": featurizer.n_features,
        "network": trained.network,
        "outputs": trained.outputs,
        "decision": trained.decision,
        "thresholds": thresholds,
        "training": {
            "records": stats.parsed,
            "rejected": stats.rejected,
            "train_rows": tr_table.num_rows,
            "distinct_train_rows": int(len(train_split.X)),
            "early_stopping_rows": es_table.num_rows,
            "calibration_rows": cal_table.num_rows,
            "seed": seed,
            "device": str(distributed.device_for(pick_device(device), dist)),
            "world_size": dist.world,
            # what the same seed's weights depend on besides the data and the code: torch's
            # thread count (its float sums are split by thread) and the libraries' versions
            **training_environment(),
            "folds": folds,
            "refit": refit,
            "seconds": round(t_train, 2),
            "history": cfg.history,
            **trained.info,
        },
        "metrics": {"calibration": calib_metrics},
        # the validation files stopped the training and set the thresholds: as much the
        # bundle's data as the training files
        "data": [*(_checksum(r, i, role) for r, role in ((reader, "training"),
                                                         (val_reader, "validation"))
                   if r is not None for i in range(len(r.specs))),
                 *_lake_checksums(reader)],
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    from ..evaluate.metrics import finite_or_none

    # strict JSON: a loss that is not a number (a network that diverged: every epoch's loss
    # NaN) was written NaN, which JSON has not (jq, browsers and Python's strict mode refuse
    # it); the decision is left as it is: a threshold that is not a number is refused when
    # the bundle is loaded, where null would be no threshold
    for key in ("training", "metrics"):
        manifest[key] = finite_or_none(manifest[key])
    save_bundle(out, manifest, files)
    log(f"saved {model} bundle to {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _derive_in_order(fmt: Format, table: pa.Table) -> pa.Table:
    """Derived features over all records in arrival order, before any split: per-client windows
    must see every record of a client, not a random subset (derivers skip derived tables)."""
    derive = fmt.feature_spec().get("derive") if table.num_rows else None
    if not derive:
        return table
    from ..features._derive import get_deriver

    return get_deriver(derive["name"])(table, derive.get("params", {}), {})


def run_module(module: nn.Module, X: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Run an export module over ``X`` in batches; its outputs by name."""
    import torch

    parts: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(X), 16384):
            out = module(torch.as_tensor(X[i : i + 16384]))
            if not isinstance(out, tuple | list):
                out = (out,)
            parts.append([o.numpy() for o in out])
    return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)}


def _calibration_metrics(cols: dict[str, np.ndarray], labels: np.ndarray | None
                         ) -> dict[str, Any]:
    if labels is None:
        return {"flagged_share": float(np.mean(cols["verdict"]))}
    from ..evaluate.metrics import binary_metrics

    y = labels != BENIGN
    return binary_metrics(y, cols["score"], cols["verdict"])


def _lake_checksums(reader: InputReader) -> list[dict[str, Any]]:
    """The manifest's record of each ``--lake``: the checksum of the parts its records were
    read from (:func:`deepwatch.lake.lake_sha256` gives it again for the lake as it is, with
    the ``days`` read where only some were)."""
    assert reader.lake_hashes is not None
    days = {} if reader.lake_days is None else {"days": reader.lake_days}
    return [{"path": root, "sha256": reader.lake_hashes[i].hexdigest(), "label": None,
             "role": "training", "lake": True, **days} for i, root in enumerate(reader.lakes)]


def _checksum(reader: InputReader, i: int, role: str) -> dict[str, Any]:
    """The manifest's record of input ``i`` of ``reader`` (``role``: training or validation):
    stdin and pipes are checksummed as they were read, since opening one again gives nothing
    (a process substitution, ``<(zcat ...)``) or waits for a writer that never comes (a named
    pipe)."""
    spec = reader.specs[i]
    return {"path": spec.display, "sha256": reader.sha256(i), "label": spec.label,
            "role": role}
