"""Parsing many inputs into batches, with labels from ``PATH=LABEL``, progress and rejects."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError, check_flags
from .formats import REJECT_SCHEMA, Format
from .formats._base import ParseResult, cut_lost, make_rejects
from .sources.files import (
    Chunk,
    Inputs,
    InputSpec,
    input_list,
    iter_chunks,
    parse_input_spec,
)


@dataclass
class Stats:
    lines: int = 0
    parsed: int = 0
    rejected: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    #: per source, how many of its rejects stand for text that could not be read as a line (the
    #: damaged rest of an input, an over-long line): nothing about --format
    damaged: dict[str, int] = field(default_factory=dict)

    def add(self, source: str, lines: int, rejected: int, damaged: int = 0) -> None:
        """Count ``lines`` of ``source``, ``rejected`` of them rejects, ``damaged`` of those
        standing for text that could not be read as a line."""
        if damaged:
            self.damaged[source] = self.damaged.get(source, 0) + damaged
        self.lines += lines
        self.rejected += rejected
        self.parsed += lines - rejected
        s = self.by_source.setdefault(source, {"lines": 0, "parsed": 0, "rejected": 0})
        s["lines"] += lines
        s["rejected"] += rejected
        s["parsed"] += lines - rejected

    def summary(self) -> str:
        return f"{self.lines:,} lines read: {self.parsed:,} parsed, {self.rejected:,} rejected"

    def unparsed(self) -> list[str]:
        """The inputs that had lines but gave no record, some of them lines that were read but
        failed to parse: most often the wrong ``--format``. An input whose every reject is
        damage (a corrupt .gz, .bz2 or .xz file, over-long lines) is left out: its warning or
        rejects say why."""
        return [s for s, c in self.by_source.items()
                if c["lines"] and not c["parsed"] and c["rejected"] > self.damaged.get(s, 0)]

    def format_hint(self, format_name: str) -> str:
        """For an error about having no records: why, when lines were read but none parsed
        (none when every reject is damage: see :meth:`unparsed`)."""
        if not self.lines or self.parsed or not self.unparsed():
            return ""
        return (f" (none of the {self.lines:,} lines read could be parsed as {format_name} "
                "records: is --format right?)")

    def format_warnings(self, format_name: str) -> list[str]:
        """One warning line per input of which no line could be parsed as ``format_name``."""
        return [f"warning: none of the {self.by_source[s]['lines']:,} lines of {s} could be "
                f"parsed as {format_name} records; is --format right?" for s in self.unparsed()]


def _rereadable(path: str) -> bool:
    """Whether ``path`` gives the same bytes when it is opened again: a regular file (stdin, a
    pipe, a named pipe or a device does not)."""
    import stat

    try:
        return path != "-" and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def with_label(batch: pa.RecordBatch, label: str | None, fmt: Format) -> pa.RecordBatch:
    """Set every record's ground-truth label (``PATH=LABEL``, read as ``fmt`` reads its own
    labels: :meth:`Format.label_of`), adding the column if needed."""
    if label is None:
        return batch
    col = pa.array([fmt.label_of(label)] * batch.num_rows, pa.string())
    i = batch.schema.get_field_index("label")
    if i >= 0:
        return batch.set_column(i, "label", col)
    return batch.append_column("label", col)


def _warn_lakes_named_twice(lakes: Sequence[str]) -> None:
    """One warning line per lake named more than once (the same real path by any name): it is
    read as often as it is named, as a file named twice is, so its records count twice."""
    import sys

    first: dict[str, str] = {}
    for root in lakes:
        real = os.path.realpath(root)
        if real in first:
            print(f"warning: the lake {root} was named twice (also as {first[real]}); its "
                  "records are read again, as a file given twice is", file=sys.stderr)
        else:
            first[real] = root


def _days_read(days: Sequence[str] | None) -> str:
    return "" if days is None else f" (those of the days read, {', '.join(days)})"


class InputReader:
    """Iterates ``(batch, rejects, spec)`` over inputs; rejects carry their source."""

    def __init__(self, fmt: Format, specs: Inputs | Sequence[InputSpec], progress: bool = False,
                 lakes: Inputs = (),
                 parse: Callable[[bytes, int], ParseResult] | None = None,
                 checksums: bool = False,
                 lake_days: str | Sequence[str] | None = None):
        check_flags(progress=progress)
        self.fmt = fmt
        #: parses a chunk of raw text (default: the format's ``parse_bulk``); a parse that also
        #: scores (:class:`deepwatch._line_cache.ScoredLineCache`) sets ``scored`` on its batches
        self.parse = parse
        #: whether the batch just yielded came out of ``parse`` (False for records from lakes)
        self.scored = False
        self.specs: list[InputSpec] = []
        if isinstance(specs, str | os.PathLike):  # one input (a str is a sequence too)
            specs = [specs]
        elif not isinstance(specs, Sequence):  # None, a frame (a TypeError, or its columns
            specs = input_list(specs)  # read as paths): one line
        for s in specs:
            self.specs.extend([s] if isinstance(s, InputSpec) else
                              parse_input_spec(input_list(s)[0]))
        self.lakes = input_list(lakes, "lakes")
        _warn_lakes_named_twice(self.lakes)
        #: the days of the lakes read (as :func:`deepwatch.lake.day_spans` takes them); None: all
        self.lake_days = [lake_days] if isinstance(lake_days, str) else \
            None if lake_days is None else list(lake_days)
        self.progress = progress
        self.stats = Stats()
        #: the chunk the batch just yielded came from, and the line of each of its records
        #: (None for records from lakes, which keep no lines)
        self._chunk: Chunk | None = None
        self._numbers: np.ndarray | None = None
        #: with ``checksums``: for each input that cannot be read again (stdin, a pipe, a named
        #: pipe; by its place in ``specs``), the sha256 of its bytes as they were read
        self._read_hashes: dict[int, Any] | None = {} if checksums else None
        #: with ``checksums``: for each lake (by its place in ``lakes``), the digest of the
        #: parts read from it (see :func:`deepwatch.lake.lake_sha256`) and their records
        self.lake_hashes: dict[int, Any] | None = {} if checksums else None
        #: for each input checksummed to compare it with the lakes' inputs or with another
        #: reader's (by its place in ``specs``): its :func:`deepwatch.lake.input_sum`, which
        #: :meth:`sha256` uses where the file has not changed since (read once, not twice)
        self._sums: dict[int, Any] = {}
        #: whether a file given beside a lake it was ingested into is warned about (once, when
        #: reading starts): off for the ranks of a distributed run but the first, which speaks
        self.warn_ingested = True
        self._lakes_compared = False

    def sha256(self, i: int) -> str:
        """The sha256 of input ``i`` (its place in ``specs``): of the bytes read from it where
        it cannot be read again (stdin, a pipe: opened again, it would give nothing, or wait
        for a writer for ever), else of the file as it is now. Needs ``checksums``."""
        assert self._read_hashes is not None, "an InputReader made without checksums"
        read = self._read_hashes.get(i)
        if read is not None:
            return str(read.hexdigest())
        from .lake import unchanged

        found = self._sums.get(i)
        if found is not None and unchanged(self.specs[i].path, found):
            return str(found.sha256)
        from .bundle import sha256_file

        return sha256_file(self.specs[i].path)

    def input_sum(self, i: int) -> Any:
        """The :func:`deepwatch.lake.input_sum` of input ``i`` (its place in ``specs``), taken
        once; None for one that cannot be read again (stdin, a pipe) or not at all."""
        if i not in self._sums:
            spec = self.specs[i]
            if not _rereadable(spec.path):
                return None
            from .lake import input_sum

            try:
                self._sums[i] = input_sum(spec.path)
            except OSError:  # (its reading says why)
                return None
        return self._sums[i]

    def _warn_ingested(self) -> None:
        """One warning line per input ingested into one of the lakes read too (the same bytes,
        or the same lines with one of the two compressed: ``access.log.1`` ingested,
        ``access.log.1.gz`` given): its records are read twice, from the file and from the lake
        (training counted them twice, without a word). A file is checksummed only where a lake
        noted an input as long (or it is compressed), and only once: :meth:`sha256` reuses it."""
        import sys

        from .lake import ingested_entry, ingested_inputs, may_hold

        noted = [(root, ingested_inputs(root)) for root in self.lakes]
        for i, spec in enumerate(self.specs):
            try:
                size = os.stat(spec.path).st_size if _rereadable(spec.path) else None
            except OSError:
                size = None
            for root, entries in noted:
                if size is None or not may_hold(entries, size, spec.compression is not None):
                    continue
                found = self.input_sum(i)
                entry = None if found is None else ingested_entry(entries, found)
                if entry is not None:
                    bytes_of = (entry.get("size"), entry.get("sha256"))
                    how = "" if bytes_of == (found.size, found.sha256) else \
                        " (the same lines, one of the two compressed)"
                    print(f"warning: {spec.display} was ingested into the lake {root} already, "
                          f"from {entry.get('path')}{how}; its records"
                          f"{_days_read(self.lake_days)} are read twice, from the file and from "
                          "the lake", file=sys.stderr)
                    break

    def _total_bytes(self) -> int | None:
        """The size of the inputs, as the bytes read from them (compressed, for a compressed
        file) add up; None when one is stdin, a pipe or a device, whose size is not known."""
        import stat

        total = 0
        for s in self.specs:
            if s.path == "-":
                return None
            st = os.stat(s.path)
            if not stat.S_ISREG(st.st_mode):
                return None
            total += st.st_size
        return total

    def __iter__(self) -> Iterator[tuple[pa.RecordBatch, pa.Table, InputSpec]]:
        from contextlib import nullcontext

        from .progress import byte_progress

        if self.lakes and self.warn_ingested and not self._lakes_compared:
            self._lakes_compared = True
            self._warn_ingested()
        ctx = byte_progress("reading", self._total_bytes()) if self.progress else nullcontext()
        with ctx as advance:  # by the bytes read from each file, compressed or not
            for i, spec in enumerate(self.specs):
                context = None  # a Zeek #fields header reaches the chunks after it
                on_read = None
                if self._read_hashes is not None and not _rereadable(spec.path):
                    self._read_hashes[i] = hashlib.sha256()
                    on_read = self._read_hashes[i].update
                for chunk in iter_chunks(spec, on_bytes=advance, on_read=on_read):
                    if self.parse is not None:
                        result = self.parse(chunk.data, chunk.first_line)
                    else:
                        result = self.fmt.parse_bulk(chunk.data, first_line=chunk.first_line,
                                                     context=context)
                        context = self.fmt.context_after(chunk.data, context)
                    if chunk.damage is not None:  # the unreadable rest of a damaged file, or an
                        # over-long line, with the beginning of the text that was not kept
                        lost, why = cut_lost(chunk.lost, chunk.damage)
                        result = ParseResult(result.batch, make_rejects(
                            [chunk.first_line], [lost], [why]), 1)
                    self.scored = self.parse is not None
                    numbers = result.line_numbers
                    usable = len(numbers) == result.batch.num_rows
                    self._chunk = chunk if usable else None
                    self._numbers = np.asarray(numbers, dtype=np.int64) if usable else None
                    self.stats.add(spec.display, result.lines, result.rejects.num_rows,
                                   int(chunk.damage is not None))
                    rejects = result.rejects
                    if rejects.num_rows:
                        rejects = rejects.append_column(
                            "source", pa.array([spec.display] * rejects.num_rows, pa.string())
                        )
                    yield with_label(result.batch, spec.label, self.fmt), rejects, spec
        yield from self._iter_lakes()

    def _iter_lakes(self) -> Iterator[tuple[pa.RecordBatch, pa.Table, InputSpec]]:
        """Records already parsed into a lake (``--lake DIR``), labels as stored."""
        from .lake import iter_lake, lake_format

        for i, root in enumerate(self.lakes):
            held = lake_format(root)
            if held != self.fmt.name:
                raise DataError(f"the lake at {root} holds {held!r} records, not "
                                f"{self.fmt.name!r}")
            spec = InputSpec(root)
            self.scored = False
            self._chunk = self._numbers = None
            digest = None
            if self.lake_hashes is not None:
                digest = self.lake_hashes[i] = hashlib.sha256()
            for batch in iter_lake(root, days=self.lake_days, digest=digest):
                self.stats.add(f"lake:{root}", batch.num_rows, 0)
                yield batch, REJECT_SCHEMA.empty_table(), spec

    def lines_of(self, rows: np.ndarray, raw: bool = True
                 ) -> tuple[np.ndarray, list[str] | None] | None:
        """Where records ``rows`` of the batch just yielded came from: their line numbers and,
        with ``raw``, the text of those lines. None for records that keep no lines (lakes)."""
        if self._numbers is None or self._chunk is None:
            return None
        numbers = self._numbers[rows]
        if not raw:
            return numbers, None
        from .formats._base import split_lines

        lines = split_lines(self._chunk.data)
        at = numbers - self._chunk.first_line
        if at.size and (at.min() < 0 or at.max() >= len(lines)):
            return numbers, None
        return numbers, [lines[i] for i in at]

    def read_all(self) -> tuple[pa.Table, pa.Table, Stats]:
        batches, rejects = [], []
        for batch, rej, _ in self:
            if batch.num_rows:
                batches.append(batch)
            if rej.num_rows:
                rejects.append(rej)
        return (*_tables(batches, rejects, self.fmt.schema), self.stats)


def warn_validation_in_training(val: InputReader, training: InputReader) -> None:
    """One warning line per validation input (``val``) that is training data too: ingested
    into a lake the training data is read from, or the same bytes (or the same lines, one of
    the two compressed) as a training input. Its records, held out to stop early on and to
    calibrate with, were trained on, so both were judged on records the model had seen, without
    a word. Files are checksummed only where sizes allow a match, each once."""
    import sys

    from .lake import ingested_entry, ingested_inputs, may_hold, same_text

    noted = [(root, ingested_inputs(root)) for root in training.lakes]
    also = "validation records are also training records (early stopping and calibration " \
        "are judged on records the model was trained on)"
    sizes: dict[int, int | None] = {}

    def size_of(reader: InputReader, i: int) -> int | None:
        try:
            return os.stat(reader.specs[i].path).st_size \
                if _rereadable(reader.specs[i].path) else None
        except OSError:
            return None

    for i, spec in enumerate(val.specs):
        size = size_of(val, i)
        if size is None:
            continue
        compressed = spec.compression is not None
        said = None
        for root, entries in noted:
            found = val.input_sum(i) if may_hold(entries, size, compressed) else None
            entry = None if found is None else ingested_entry(entries, found)
            if entry is not None:
                said = (f"was ingested into the training lake {root}, from {entry.get('path')}; "
                        f"its records{_days_read(training.lake_days)} are read for training too")
                break
        for j, tspec in enumerate(training.specs):
            if said is not None:
                break
            if j not in sizes:
                sizes[j] = size_of(training, j)
            if sizes[j] is None or (not compressed and tspec.compression is None
                                    and sizes[j] != size):
                continue
            mine, theirs = val.input_sum(i), training.input_sum(j)
            if mine is not None and theirs is not None and same_text(mine, theirs):
                how = "the same bytes" if mine.sha256 == theirs.sha256 else \
                    "the same lines, one of the two compressed"
                said = f"holds {how} as the training input {tspec.display}"
        if said is not None:
            print(f"warning: the validation input {spec.display} (--val) {said}: {also}",
                  file=sys.stderr)


def _tables(batches: list[pa.RecordBatch], rejects: list[pa.Table], default: pa.Schema
            ) -> tuple[pa.Table, pa.Table]:
    """The records read, as one table, and the rejects (with their source), as another."""
    schema = batches[0].schema if batches else default
    table = pa.Table.from_batches(_unify(batches), schema=_unify_schema(batches, schema))
    return table, pa.concat_tables(rejects) if rejects else _no_rejects()


def _no_rejects() -> pa.Table:
    return REJECT_SCHEMA.empty_table().append_column("source", pa.array([], pa.string()))


def _unify_schema(batches: list[pa.RecordBatch], default: pa.Schema) -> pa.Schema:
    if not batches:
        return default
    return pa.unify_schemas([b.schema for b in batches])


def _unify(batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    if not batches:
        return []
    schema = _unify_schema(batches, batches[0].schema)
    out = []
    for b in batches:
        if b.schema.equals(schema):
            out.append(b)
            continue
        cols = [b.column(f.name) if f.name in b.schema.names else pa.nulls(b.num_rows, f.type)
                for f in schema]
        out.append(pa.RecordBatch.from_arrays(cols, schema=schema))
    return out


def labels_of(table: pa.Table) -> list[str] | None:
    """The ground-truth labels of a table, or None when it has none."""
    if "label" not in table.schema.names:
        return None
    col = table.column("label")
    if col.null_count == len(col):
        return None
    if col.null_count:
        raise DataError(f"{col.null_count:,} records have no label; label every input "
                        "(PATH=LABEL) or none")
    return pc.cast(col, pa.string()).to_pylist()


def no_label_reason(purpose: str) -> str:
    """Why a record without a label is rejected from labelled ``purpose`` (training ...) data."""
    return f"no label in labelled {purpose} data"


def split_unlabelled(batch: pa.RecordBatch, source: str, reason: str,
                     reader: InputReader | None = None, lines: np.ndarray | None = None
                     ) -> tuple[pa.RecordBatch, pa.Table]:
    """``batch``'s records that have a label, and those without one as rejects.

    The rejects have :data:`REJECT_SCHEMA`'s columns and ``source``. When ``batch`` is the one
    ``reader`` just yielded, each reject has its line number and the line's text; given only
    the batch's ``lines`` (numbers), it has its line and the record as JSON (its non-null
    fields); records from a lake keep no line (null) and come as JSON. Costs nothing for a batch
    whose records all have labels.
    """
    i = batch.schema.get_field_index("label")
    if i >= 0 and batch.column(i).null_count == 0:
        return batch, _no_rejects()
    has = pc.is_valid(batch.column(i)) if i >= 0 else pa.array([False] * batch.num_rows)
    rows = np.flatnonzero(~np.asarray(has))
    where = reader.lines_of(rows) if reader is not None else None
    numbers, raws = where if where is not None else (
        None if lines is None else lines[rows], None)
    if raws is None:
        raws = _as_json(batch.take(pa.array(rows)))
    n = len(rows)
    found = make_rejects([0] * n if numbers is None else numbers.tolist(), raws, [reason] * n)
    if numbers is None:
        found = found.set_column(0, "line", pa.nulls(n, pa.int64()))
    return batch.filter(has), found.append_column("source", pa.array([source] * n, pa.string()))


def _as_json(batch: pa.RecordBatch) -> list[str]:
    """Each record of ``batch`` as a JSON object of its non-null fields."""
    import json

    return [json.dumps({k: v for k, v in row.items() if v is not None}, default=str)
            for row in batch.to_pylist()]


def read_labelled(reader: InputReader, purpose: str = "training"
                  ) -> tuple[pa.Table, pa.Table, Stats]:
    """:meth:`InputReader.read_all` for data meant to be labelled (training, validation).

    A record without a label in an input whose other records have one (a KDD line of 41 fields
    in a labelled file) is a reject, ``no label in labelled <purpose> data``, counted as
    rejected, not parsed, in ``reader.stats``: one stray line no longer stops the run. An input
    none of whose records has a label, beside inputs that have labels, stays an error (label
    every input, PATH=LABEL, or none). When no record has a label at all, the data is
    unlabelled and comes back as it is.
    """
    # (batch, its source, and for a batch with records lacking a label: those records as
    # rejects, or the batch's line numbers when whether they are rejects is not known yet)
    parts: list[tuple[pa.RecordBatch, str, pa.Table | np.ndarray | None]] = []
    rejects: list[pa.Table] = []
    labelled: dict[str, int] = {}
    unlabelled: dict[str, int] = {}
    reason = no_label_reason(purpose)
    for batch, rej, spec in reader:
        # the key ``reader.stats`` counts this input under
        source = f"lake:{spec.path}" if spec.path in reader.lakes else spec.display
        labelled.setdefault(source, 0)
        unlabelled.setdefault(source, 0)
        if batch.num_rows:
            i = batch.schema.get_field_index("label")
            missing = batch.num_rows if i < 0 else batch.column(i).null_count
            found: pa.Table | np.ndarray | None = None
            if missing and i >= 0 and (missing < batch.num_rows or labelled[source]):
                # labelled data with records lacking a label: rejects, with their lines' text
                # while the chunk is at hand
                found = split_unlabelled(batch, source, reason, reader)[1]
            elif missing and i >= 0:  # perhaps unlabelled data: keep where its records were
                where = reader.lines_of(np.arange(batch.num_rows), raw=False)
                found = None if where is None else where[0]
            parts.append((batch, source, found))
            unlabelled[source] += missing
            labelled[source] += batch.num_rows - missing
        if rej.num_rows:
            rejects.append(rej)
    batches = [b for b, _, _ in parts]
    if sum(labelled.values()) and sum(unlabelled.values()):
        bare = [s for s in labelled if not labelled[s] and unlabelled[s]]
        if bare:
            raise DataError(f"{sum(unlabelled[s] for s in bare):,} records have no label; "
                            "label every input (PATH=LABEL) or none (no record of "
                            f"{', '.join(bare)} has one)")
        batches = []
        for batch, source, found in parts:
            if isinstance(found, pa.Table):  # its rejects were made while it was read
                kept, bad = batch.filter(pc.is_valid(batch.column("label"))), found
            else:
                kept, bad = split_unlabelled(batch, source, reason, lines=found)
            if bad.num_rows:
                reader.stats.add(source, 0, bad.num_rows)  # parsed, but rejected after all
                rejects.append(bad)
            if kept.num_rows:
                batches.append(kept)
    return (*_tables(batches, rejects, reader.fmt.schema), reader.stats)
