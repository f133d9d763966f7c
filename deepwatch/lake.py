"""The data lake: parsed records as Parquet, partitioned by day, with rejected lines beside them.

Layout of a lake directory::

    _lake.json                      format name and layout version
    records/day=YYYY-MM-DD/part-<ingest>-<seq>.parquet
    rejects/part-<ingest>-<seq>.parquet   (line, raw, reason, source)

A record's day comes from the format's time column (the column its ECS ``@timestamp`` maps to:
``timestamp`` for access logs, ``ts`` for Zeek), in UTC; formats without one are filed under the
day they were ingested. Part names sort in the order they were written, so reading a lake back
yields each day's records in arrival order, days in order. Any other Parquet file in a day folder
(another tool's rewrite of the day) is read too, in name order; hidden ones (``.``, ``_``) are not.

An ingest writes its parts into a staging directory of its own, ``.ingest-*/`` (hidden, so
outside readers skip it too), and moves them into ``records/`` and ``rejects/`` only when it
commits, at its end: readers never see a running ingest's records, nor any of one that failed or
was killed, even outright (SIGKILL), so running it again stores nothing twice. The staging
directory is locked for as long as its ingest lives; the next writer removes those nobody holds,
or finishes the moves of one killed while committing (``commit.json`` lists them). The manifest
is written under a hidden temporary name and renamed into place. Ingest appends: the same input
ingested twice is there twice. ``_ingested.jsonl`` lists the inputs ingested (path, size,
sha256 of the bytes read), so a repeat can be warned about, and a file that has grown since it was
ingested (a live log) too, by its beginning; a compressed input is noted with the size and
sha256 of its text too (decompressed), so the same lines are recognised compressed or not (a
rotated log that ``logrotate`` compressed since it was ingested); a running ingest claims its
inputs in its staging directory (``claims.jsonl``), so of two ingests of one file at the same
time the second is warned too (the check and the claim are made under an exclusive ``flock`` of
``_lake.json``, held for just that; readers take no lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import secrets
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError, OutputError, UsageError, first_line
from .sinks import STALE_TMP_S

LAYOUT_VERSION = 1
MANIFEST = "_lake.json"
RECORDS = "records"
REJECTS = "rejects"
INGESTED = "_ingested.jsonl"
#: Each ingest's parts are written under ``<lake>/.ingest-*/`` until it commits.
STAGING_PREFIX = ".ingest-"
#: In a staging directory: the moves of a commit under way (finished by the next writer).
COMMIT = "commit.json"
#: In a staging directory: the inputs its ingest claimed (size, sha256), for :meth:`seen_before`.
CLAIMS = "claims.jsonl"


def _part_files(folder: Path) -> list[Path]:
    """The Parquet files of ``folder``, in name order: deepwatch's parts (``part-*``, which sort
    in write order) and those another tool wrote in their place (polars' ``partition_by`` writes
    ``00000000.parquet``), which were skipped, so a day compacted by polars read as no records
    at all. Hidden names (``.``, ``_``: temporaries, checksums, markers) are not parts, as for
    pyarrow and Spark."""
    return sorted(p for p in folder.glob("*.parquet")
                  if not p.name.startswith((".", "_")) and p.is_file())


def _tmp_name(final: Path) -> Path:
    """A name in ``final``'s directory that no reader globs (a leading dot), unique per call."""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_atomic(final: Path, write: Callable[[Path], object], *,
                  exclusive: bool = False) -> bool:
    """Write ``final`` through a temporary file in its directory, then rename it into place.

    ``write`` is called with the temporary path. With ``exclusive``, an existing ``final`` is
    left alone and False is returned (the file is linked into place, which fails if it exists).
    """
    tmp = _tmp_name(final)
    try:
        write(tmp)
        if exclusive:
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: the first replace wins anyway
                if final.exists():
                    return False
                os.replace(tmp, final)
                return True
            return True
        os.replace(tmp, final)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _clean_stale_tmp(folder: Path) -> None:
    """Remove temporary files a killed writer left in ``folder`` (only old ones: a running
    writer's are young)."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()


@dataclass
class LakeStats:
    records: int = 0
    rejects: int = 0
    files: int = 0
    days: set[str] | None = None


def _local_root(root: str | Path) -> Path:
    """``root`` as the local directory it names; a UsageError for a URL (``s3://bucket/lake``,
    ``file:///data/lake``): a lake is written with local renames and locks, and a URL was taken
    for a relative path (``s3:/bucket/lake`` under the current directory), so ingest made a
    stray lake there and then failed with a traceback, and ``train --lake`` read that stray
    lake's 0 records."""
    text = os.fspath(root)
    scheme, sep, _ = text.partition("://")
    if sep and scheme and scheme[0].isalpha() \
            and all(c.isalnum() or c in "+.-" for c in scheme):
        raise UsageError(f"the lake {text} is a URL; a lake is a local directory (give its "
                         "path; for object storage, mount it or sync a local lake to it)")
    return Path(text)


def _manifest(root: Path) -> dict[str, object]:
    path = root / MANIFEST
    if not path.exists():
        raise InputError(f"{root} is not a deepwatch lake (no {MANIFEST}); create one with "
                         "`deepwatch ingest --lake DIR`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is unreadable: {exc!s:.200}") from None
    if not (isinstance(data, dict) and isinstance(data.get("format"), str)):
        raise InputError(f"{path} is not a deepwatch lake manifest (an object naming the "
                         "lake's format)")
    if data.get("version") != LAYOUT_VERSION:
        raise InputError(f"{root}: lake layout version {data.get('version')!r} is not supported")
    return data


def lake_format(root: str | Path) -> str:
    """The format name the lake at ``root`` holds."""
    return str(_manifest(_local_root(root))["format"])


class LakeWriter:
    """Appends parsed batches and rejects to a lake, creating it on first use."""

    def __init__(self, root: str | Path, format_name: str):
        self.root = _local_root(root)
        self.format = format_name
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"lake {self.root} is a file; a lake is a directory")
        if not (self.root / MANIFEST).exists():
            # hidden files are other writers' temporaries (a concurrent creator's manifest)
            # (a manifest that appeared meanwhile is a concurrent creator's: a lake after all)
            if self.root.exists() and any(not p.name.startswith(".")
                                          for p in self.root.iterdir()) \
                    and not (self.root / MANIFEST).exists():
                raise UsageError(f"{self.root} exists and is not a deepwatch lake")
            text = json.dumps({"format": format_name, "version": LAYOUT_VERSION}, indent=1) + "\n"
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                # created whole or not at all; a concurrent creator that got there first wins,
                # and its format is checked below like any existing lake's
                _write_atomic(self.root / MANIFEST, lambda t: t.write_text(text), exclusive=True)
            except OSError as exc:  # a file where a parent directory should be, no permission
                raise OutputError(f"cannot create the lake at {self.root}: "
                                  f"{exc.strerror or exc}") from None
        found = lake_format(self.root)
        if found != format_name:
            raise UsageError(f"the lake at {self.root} holds {found!r} records, "
                             f"not {format_name!r}")
        self._time_column = _time_column(format_name)
        for folder in (self.root, self.root / REJECTS,
                       *(self.root / RECORDS).glob("day=*")):
            if folder.is_dir():
                _clean_stale_tmp(folder)
        _recover(self.root)
        # ingest ids sort by time, so parts read back in the order they were written
        self._ingest = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        self._seq = 0
        self.stats = LakeStats(days=set())
        self._sums: dict[str, _Sum] = {}
        #: per input, the size of the longest beginning of it ingested before (see
        #: :meth:`ingested_part`)
        self._parts_before: dict[str, int] = {}
        #: the inputs whose ingested part is of their text, decompressed
        self._decompressed: set[str] = set()
        #: per input found by its text alone, the path noted of the one ingested before
        self._same_text: dict[str, str] = {}
        #: what :meth:`commit` has to say about its inputs (one changed while it was read)
        self.notes: list[str] = []
        #: the inputs seen_before was asked about (by size and sha256), each with its path
        self._asked: dict[tuple[int, str], str] = {}
        #: the same by their text's size and sha256 (decompressed, for a compressed input): the
        #: first input of this run with each text
        self._asked_text: dict[tuple[int, str], str] = {}
        #: the inputs whose :meth:`same_text_as` is an input of this run, not one ingested before
        self._same_text_in_run: set[str] = set()
        self._staged: list[Path] = []  # this run's parts (their final paths), not yet in place
        self._written: list[Path] = []  # those moved into place by a commit under way
        self._staging: Path | None = None
        self._lock: int | None = None
        #: whether this run's commit is past its point of no return (its inputs noted in
        #: ``_ingested.jsonl``): its records stay, whatever stops it after (see :meth:`rollback`)
        self.committed = False

    def _name(self) -> str:
        self._seq += 1
        return f"part-{self._ingest}-{self._seq:06d}.parquet"

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        for day, part in _by_day(table, self._time_column):
            self._put(part, self.root / RECORDS / f"day={day}")
            self.stats.records += part.num_rows
            self.stats.files += 1
            assert self.stats.days is not None
            self.stats.days.add(day)

    def write_rejects(self, rejects: pa.Table) -> None:
        if rejects.num_rows == 0:
            return
        self._put(rejects, self.root / REJECTS)
        self.stats.rejects += rejects.num_rows

    def _put(self, table: pa.Table, folder: Path) -> None:
        """One new part for ``folder``, written into this run's staging directory (readers see
        it once :meth:`commit` moves it into place); a failure to write (a full disk) is an
        OutputError."""
        final = folder / self._name()
        try:
            if self._staging is None:
                self._staging, self._lock = _make_staging(self.root)
            staged = self._staging / final.relative_to(self.root)
            staged.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, staged, compression="zstd")
        except OSError as exc:
            raise OutputError(f"cannot write the lake at {self.root}: "
                              f"{exc.strerror or first_line(exc)}") from None
        self._staged.append(final)

    def commit(self, inputs: Sequence[str | Path] = (),
               lines_read: Sequence[int | None] | None = None) -> str | None:
        """Move every part this run wrote into place, all together, and note ``inputs`` (the
        files read, for :meth:`seen_before`) in ``_ingested.jsonl``.

        Each input is noted with the size and sha256 of the bytes read from it. They are those
        :meth:`seen_before` checksummed before the reading, unless the file changed since (a
        live log written to meanwhile was read past that size): then, given ``lines_read`` (for
        each input, the number of the last line of it stored, as a record or a reject; None for
        a compressed one), it is noted up to that line, where its beginning is as it was (it
        grew by appending); otherwise it is not noted at all. Either is said in :attr:`notes`.

        Until now no reader saw any of this run's records, so a run killed outright (SIGKILL,
        the OOM killer, a power cut) leaves none behind to be stored twice when it is run
        again. The moves are quick, but a run can be killed among them too: the list of moves
        is written first (``commit.json``), and the next writer finishes them. A part that
        cannot be moved is an OutputError (:meth:`rollback` then removes those moved); an
        input that cannot be noted is not (the records are in): its message is returned.

        Noting the inputs is the point of no return: a stop (Ctrl-C, SIGTERM) before it rolls
        the run back whole, one after it keeps the run whole. A rollback after the parts were
        moved looks for this run's entries in ``_ingested.jsonl`` to tell which, so a stop
        landing between the append and the line after it does not remove records the lake
        says were ingested (a later ingest of the same file then warned of a repeat that was
        not there)."""
        counts = list(lines_read) if lines_read is not None else [None] * len(inputs)
        noted = [(path, read) for path, n in zip(inputs, counts, strict=True)
                 if (read := self._as_read(path, n)) is not None]
        lines = [json.dumps({"path": str(path), "size": size, "sha256": digest,
                             **self._text_of(path, size, digest),
                             "ingest": self._ingest}) + "\n"
                 for path, (size, digest) in noted]
        if self._staging is None:  # no records: only the inputs to note
            failed = _append_ingested(self.root, lines)
            self.committed = True
            return failed
        plan = {"parts": [f.relative_to(self.root).as_posix() for f in self._staged],
                "ingested": lines}
        try:
            _write_atomic(self._staging / COMMIT, lambda t: t.write_text(json.dumps(plan)))
            for final in self._staged:
                final.parent.mkdir(parents=True, exist_ok=True)
                # listed before it is moved: a stop landing just after the move (when Python
                # next looks for signals) has rollback() remove it too; the name is this
                # run's own, so removing it where the move did not happen removes nothing
                self._written.append(final)
                os.replace(self._staging / final.relative_to(self.root), final)
        except OSError as exc:
            with contextlib.suppress(OSError):  # not to be finished by the next writer
                (self._staging / COMMIT).unlink()
            raise OutputError(f"cannot write the lake at {self.root}: "
                              f"{exc.strerror or first_line(exc)}") from None
        failed = _append_ingested(self.root, lines)
        self.committed = True
        self._drop_staging()
        self._staged.clear()
        self._written.clear()
        return failed

    def rollback(self) -> int:
        """Remove every part this writer wrote (a run that failed keeps nothing, so running it
        again does not store its records twice); the number of parts removed. Not once the
        commit is past its point of no return (:attr:`committed` is then True): only its
        clean-up is finished, and 0 returned."""
        if not self.committed and self._written and self._noted():
            self.committed = True  # stopped between noting the inputs and saying so
        if self.committed:
            self._drop_staging()
            self._staged.clear()
            self._written.clear()
            return 0
        # (a part being written when the stop came is on disk, not yet listed: counted too)
        on_disk = (sum(1 for _ in self._staging.rglob("*.parquet"))
                   if self._staging is not None else 0)
        removed = max(len(self._staged), on_disk)
        for part in self._written:  # moved into place by a commit that failed part-way
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        self._staged.clear()
        self._written.clear()
        self._drop_staging()
        self.stats = LakeStats(days=set())
        return removed

    def _noted(self) -> bool:
        """Whether ``_ingested.jsonl`` holds entries of this run (a commit noted its inputs)."""
        return any(e.get("ingest") == self._ingest for e in _ingested(self.root))

    def _drop_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def seen_before(self, path: str | Path) -> bool:
        """Whether an input with ``path``'s size and sha256 was ingested into this lake before,
        or is being ingested by another ingest running now, or is an input this run asked about
        already, by its bytes or by its text (the same lines compressed and not, which
        :meth:`same_text_as` then names) (ingest appends regardless: this is for a warning).
        The same file given twice to one ingest (``'logs/*.log' logs/site.log``, or by two
        names, or once compressed) was stored twice without a word, since neither was in the
        lake yet."""
        size, digest = self._checksum(path)
        if (size, digest) in self._asked:
            return True
        self._asked[size, digest] = str(path)
        # an input of this run with the same text, one of the two compressed (access.log.1 and
        # access.log.1.gz in one run were both stored without a word: their bytes differ)
        found = self._sums[str(path)]
        text = found.text or (size, digest)
        earlier_text = self._asked_text.setdefault(text, str(path))
        # Two ingests of one file started together both found it in no list (neither had
        # committed yet) and stored it without a word. So the input is claimed in this run's
        # staging directory, and looked for among the claims of the ingests running now, under
        # an exclusive lock on the manifest held for just that: of two such runs, the second
        # is told. (Readers take no lock; the kernel lets go of it if this process dies.)
        try:
            with _locked(self.root / MANIFEST):
                if self._staging is None:
                    self._staging, self._lock = _make_staging(self.root)
                # claims first, then the list: an ingest that commits meanwhile notes its
                # inputs before it removes its claims, so one or the other shows it
                entries = _ingested(self.root)
                seen = _claimed_elsewhere(self.root, self._staging, size, digest) or any(
                    e.get("size") == size and e.get("sha256") == digest for e in entries)
                # the same lines, compressed or not (a rotated log compressed since): what is
                # compared is the text, decompressed, of the input and of each entry
                same = None if seen else next(
                    (e for e in entries if _text_id(e) == text), None)
                if same is not None:
                    self._same_text[str(path)] = str(same.get("path"))
                    seen = True
                elif not seen and earlier_text != str(path):  # given earlier in this run
                    self._same_text[str(path)] = earlier_text
                    self._same_text_in_run.add(str(path))
                    seen = True
                # a file ingested before that has grown since (a live log): its beginning is
                # one of those noted (sizes noted meanwhile were not checksummed: not looked at)
                # (a plain file's text is its bytes: it is compared with the text of the
                # compressed inputs noted too)
                prefixes = found.prefixes
                noted = _sizes(entries) if found.text else _sizes(entries) + _text_ids(entries)
                part = max((n for n, sha in noted
                            if 0 < n < size and prefixes.get(n) == sha), default=None)
                if part is None and found.text is not None and found.text_prefixes is not None:
                    # a live log ingested, rotated and compressed since: its text begins so
                    text_prefixes = found.text_prefixes
                    part = max((n for n, sha in _text_ids(entries)
                                if 0 < n < found.text[0] and text_prefixes.get(n) == sha),
                               default=None)
                    if part is not None:
                        self._decompressed.add(str(path))
                if part is not None:
                    self._parts_before[str(path)] = part
                with (self._staging / CLAIMS).open("a") as f:
                    f.write(json.dumps({"size": size, "sha256": digest}) + "\n")
        except OSError as exc:
            raise OutputError(f"cannot write the lake at {self.root}: "
                              f"{exc.strerror or first_line(exc)}") from None
        return seen

    def same_text_as(self, path: str | Path) -> str | None:
        """The path noted of the input ingested before whose text (decompressed) is that of
        ``path``, where :meth:`seen_before` found it by its text alone (one of the two is
        compressed: a rotated log compressed since), or of the input of this run it was asked
        about earlier with that text (``access.log.1 access.log.1.gz``), else None."""
        return self._same_text.get(str(path))

    def same_text_in_run(self, path: str | Path) -> bool:
        """Whether :meth:`same_text_as` names an input given earlier in this run (not one
        ingested before it)."""
        return str(path) in self._same_text_in_run

    def part_decompressed(self, path: str | Path) -> bool:
        """Whether :meth:`ingested_part` is of ``path``'s text, decompressed."""
        return str(path) in self._decompressed

    def _text_of(self, path: str | Path, size: int, digest: str) -> dict[str, object]:
        """The size and sha256 of a compressed input's text, to note beside its own (nothing
        for a file that is not compressed, or that changed since it was checksummed)."""
        found = self._sums.get(str(path))
        if found is None or found.text is None or (found.size, found.sha256) != (size, digest):
            return {}
        return {"text_size": found.text[0], "text_sha256": found.text[1]}

    def given_earlier(self, path: str | Path) -> str | None:
        """The input of this run that :meth:`seen_before` was asked about with ``path``'s size
        and sha256 (the same file given twice to one ingest), or None."""
        return self._asked.get(self._checksum(path))

    def ingested_part(self, path: str | Path) -> int | None:
        """The size of the longest beginning of ``path`` (shorter than the whole) that was
        ingested into this lake before: the file has grown since (a live log), so its records
        up to there are stored again. None where there is none, or :meth:`seen_before` was not
        asked about ``path``."""
        return self._parts_before.get(str(path))

    def _checksum(self, path: str | Path) -> tuple[int, str]:
        if str(path) not in self._sums:  # each input is read once to checksum it, not twice
            # (and the sizes ingested before are checksummed in the same reading, for
            # ingested_part)
            entries = _ingested(self.root)
            self._sums[str(path)] = _checksum(
                Path(path), [n for n, _ in _sizes(entries) + _text_ids(entries)])
        found = self._sums[str(path)]
        return found.size, found.sha256

    def _as_read(self, path: str | Path, lines: int | None) -> tuple[int, str] | None:
        """The size and sha256 of the bytes read from ``path`` (up to its line ``lines``, the
        last one stored), to note it as ingested; None (and a note) where they cannot be
        told."""
        self._checksum(path)
        before = self._sums[str(path)]
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and _ident(st) == before.ident and st.st_size == before.size:
            return before.size, before.sha256  # not changed since it was checksummed
        now = "gone" if st is None else f"{st.st_size:,} now"
        change = f"{path} changed while it was ingested ({before.size:,} bytes when the run " \
            f"began, {now})"
        read = None
        if lines is not None and st is not None:
            with contextlib.suppress(OSError):
                read = _checksum_lines(Path(path), lines, before.size)
        if read is None or read[2] != before.sha256:
            self.notes.append(f"{change}: which of its bytes were read cannot be told, so it "
                              "is not noted as ingested, and ingesting it again will not be "
                              "warned about")
            return None
        self.notes.append(f"{path} grew while it was ingested ({before.size:,} bytes when the "
                          f"run began, {now}): it is noted as ingested up to line {lines:,}, the "
                          f"last one stored ({read[0]:,} bytes): a later ingest of it warns that "
                          "those are in the lake already")
        return read[0], read[1]



def _append_ingested(root: Path, lines: Sequence[str]) -> str | None:
    """Append ``lines`` to ``_ingested.jsonl`` in one write (concurrent ingests do not lose
    each other's entries); a message where that failed, else None."""
    if not lines:
        return None
    try:
        fd = os.open(root / INGESTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = "".join(lines).encode()
        try:
            # one write, so that it is not interleaved with another ingest's: a short one (a
            # disk filling up) is said, not left as a cut line without a word
            if os.write(fd, data) < len(data):
                raise OSError(0, "the disk took only part of the entries (is it full?)")
        finally:
            os.close(fd)
    except OSError as exc:
        return f"could not note the inputs as ingested in {root}: {exc.strerror or exc}"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (waiting for it) for the ``with`` block; the kernel
    lets go of it if the process dies. Nothing is locked where there is no ``flock``."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing lets go of the lock)


def _claimed_elsewhere(root: Path, own: Path, size: int, digest: str) -> bool:
    """Whether an ingest running now (its staging directory's lock held) other than the one
    staging in ``own`` claimed an input of ``size`` and ``digest`` (see
    :meth:`LakeWriter.seen_before`); the claims of ingests that died are not counted."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): whose claims are live cannot be told
        return False
    from ._held_dirs import LOCK

    for staging in root.glob(f"{STAGING_PREFIX}*"):
        if staging == own:
            continue
        try:
            claims = (staging / CLAIMS).read_text().splitlines()
        except OSError:  # no claims, or removed meanwhile (its ingest ended)
            continue
        if not any(_claim_of(line) == (size, digest) for line in claims):
            continue
        try:
            fd = os.open(staging / LOCK, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its ingest is running
            return True
        finally:
            os.close(fd)
    return False


def _claim_of(line: str) -> tuple[object, object] | None:
    try:
        entry = json.loads(line)
        return entry["size"], entry["sha256"]
    except (ValueError, TypeError, KeyError):
        return None


def _make_staging(root: Path) -> tuple[Path, int | None]:
    """A new staging directory in the lake, locked (shared) for as long as this process lives:
    the lock is held before the lock file has its name, so :func:`_recover` never finds it
    without a holder however soon it looks."""
    from ._held_dirs import LOCK, hold_lock

    made = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    unnamed = made / f".{LOCK}.tmp"
    unnamed.touch()
    fd = hold_lock(unnamed)
    os.replace(unnamed, made / LOCK)
    return made, fd


def _recover(root: Path) -> None:
    """Deal with the staging directories of ingests killed outright (nobody holds their lock):
    one killed while committing has its moves finished (its ``commit.json`` lists them), any
    other is removed with its parts, which no reader ever saw; one killed before its lock file
    had its name, once it is older than :data:`STALE_TMP_S` (a young one may be a running
    writer's, about to be locked)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no staging directory is judged abandoned
        return
    from ._held_dirs import LOCK

    for staging in root.glob(f"{STAGING_PREFIX}*"):
        try:
            fd = os.open(staging / LOCK, os.O_RDONLY)
        except OSError:  # being made or removed by another writer right now, or left by one
            # killed while making it (before its lock had a name): that one once it is old
            with contextlib.suppress(OSError):
                if time.time() - staging.stat().st_mtime > STALE_TMP_S \
                        and not (staging / LOCK).exists():
                    shutil.rmtree(staging, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its ingest is running
            os.close(fd)
            continue
        try:
            if _finish_commit(root, staging):
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(fd)


def _finish_commit(root: Path, staging: Path) -> bool:
    """Finish the moves of the commit an abandoned ``staging`` directory was making, if it was
    making one; whether ``staging`` may now be removed (not when a move failed: the next
    writer tries again, rather than drop the rest of a run whose first parts are in)."""
    try:
        plan = json.loads((staging / COMMIT).read_text())
        parts = [str(rel) for rel in plan["parts"]]
        lines = [str(line) for line in plan["ingested"]]
        ingest = json.loads(lines[0]).get("ingest") if lines else None
    except FileNotFoundError:  # killed before committing: none of its parts was ever seen
        return True
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False  # an unreadable plan (written whole, so damaged since): left alone
    try:
        for rel in parts:
            if (staging / rel).exists():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, root / rel)
    except OSError:
        return False
    if ingest is None or all(e.get("ingest") != ingest for e in _ingested(root)):
        _append_ingested(root, lines)
    return True


@dataclass(frozen=True)
class _Sum:
    """A file's size and sha256 as it was read to its end, the file's identity once read (see
    :func:`_ident`), and the sha256 of its first bytes at each size asked for (shorter)."""

    size: int
    sha256: str
    ident: tuple[int, int, int, int]
    prefixes: dict[int, str]
    #: a compressed file's text (decompressed): its size and sha256, and the sha256 of its
    #: first bytes at each size asked for; None for a file that is not compressed (its text
    #: is its bytes) or whose decompression failed (damaged)
    text: tuple[int, str] | None = None
    text_prefixes: dict[int, str] | None = None


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file changed (written to, truncated, replaced): device, inode, size and
    modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


#: The first bytes of the compressed files read (as ``sources/files.py`` tells them), and the
#: module that decompresses each (its whole members or streams, as the reader does).
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def _hash_stream(read: Callable[[int], bytes], at: Iterable[int]
                 ) -> tuple[int, str, dict[int, str]]:
    """The size and sha256 of what ``read`` gives to its end, and the sha256 of its first ``n``
    bytes for each ``n`` in ``at`` shorter than it, in one reading."""
    digest = hashlib.sha256()
    size = 0
    marks = sorted({n for n in at if n > 0}, reverse=True)
    prefixes = {}
    while block := read(1 << 20):
        view = memoryview(block)
        done = 0  # (hashed on to each size in turn: a lake of many inputs costs no more)
        while marks and marks[-1] < size + len(block):
            n = marks.pop()
            digest.update(view[done:n - size])
            done = n - size
            prefixes[n] = digest.hexdigest()
        digest.update(view[done:])
        size += len(block)
    return size, digest.hexdigest(), prefixes


def _text_sum(path: Path, head: bytes, at: Iterable[int]
              ) -> tuple[tuple[int, str], dict[int, str]] | None:
    """The size and sha256 of a compressed file's text (and of its first bytes at each size in
    ``at``); None where ``head`` shows no compression or the file does not decompress."""
    import importlib

    module = next((name for magic, name in _COMPRESSED if head.startswith(magic)), None)
    if module is None:
        return None
    try:
        with importlib.import_module(module).open(path, "rb") as f:
            size, digest, prefixes = _hash_stream(f.read, at)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):  # damaged: not known
        return None
    return (size, digest), prefixes


def _checksum(path: Path, at: Iterable[int] = ()) -> _Sum:
    """``path``'s size and sha256, and the sha256 of its first ``n`` bytes for each ``n`` in
    ``at`` shorter than it, in one reading; for a compressed file (gzip, bzip2, xz, by its
    first bytes), the same of its text, decompressed."""
    at = list(at)
    with path.open("rb") as f:
        head = f.read(6)
        f.seek(0)
        size, digest, prefixes = _hash_stream(f.read, at)
        st = os.fstat(f.fileno())
    text = _text_sum(path, head, at)
    return _Sum(size, digest, _ident(st), prefixes, *(text or (None, None)))


def _checksum_lines(path: Path, lines: int, start: int) -> tuple[int, str, str | None] | None:
    """The size and sha256 of ``path``'s first ``lines`` lines (a last one without its line
    break counts), and the sha256 of its first ``start`` bytes (None where those lines are
    shorter); None where it has fewer lines."""
    digest = hashlib.sha256()
    head = digest.hexdigest() if start == 0 else None
    size = 0
    left = lines
    last = b"\n"
    with path.open("rb") as f:
        while left > 0 and (block := f.read(1 << 20)):
            if block.count(b"\n") >= left:
                end = -1
                for _ in range(left):
                    end = block.find(b"\n", end + 1)
                block = block[:end + 1]
                left = 0
            else:
                left -= block.count(b"\n")
            if head is None and size + len(block) >= start:
                part = digest.copy()
                part.update(block[:start - size])
                head = part.hexdigest()
            size += len(block)
            digest.update(block)
            last = block[-1:]
    if left == 1 and last != b"\n":  # the last line read had no line break (yet)
        left = 0
    if left:
        return None
    return size, digest.hexdigest(), head


def _ingested(root: Path) -> list[dict[str, object]]:
    try:
        lines = (root / INGESTED).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out


def _sizes(entries: list[dict[str, object]]) -> list[tuple[int, object]]:
    """The size and sha256 of each entry of ``_ingested.jsonl`` that has a size."""
    return [(n, e.get("sha256")) for e in entries
            if isinstance(n := e.get("size"), int) and not isinstance(n, bool)]


def _text_id(entry: dict[str, object]) -> tuple[object, object]:
    """The size and sha256 of the text of an entry of ``_ingested.jsonl``: its decompressed
    text's for a compressed input, else its bytes' (a plain file's text)."""
    if "text_sha256" in entry:
        return entry.get("text_size"), entry.get("text_sha256")
    return entry.get("size"), entry.get("sha256")


def _text_ids(entries: list[dict[str, object]]) -> list[tuple[int, object]]:
    """:func:`_text_id` of each entry whose text has a size."""
    return [(n, sha) for n, sha in map(_text_id, entries)
            if isinstance(n, int) and not isinstance(n, bool)]


def ingested_inputs(root: str | Path) -> list[dict[str, object]]:
    """The entries of the lake at ``root``'s ``_ingested.jsonl`` (the inputs ingested into it:
    ``path``, ``size``, ``sha256``, and for a compressed one ``text_size`` and ``text_sha256``);
    none where it cannot be read (it is a warning's, not the records')."""
    try:
        return _ingested(_local_root(root))
    except (OSError, UsageError):
        return []


def may_hold(entries: list[dict[str, object]], size: int, compressed: bool) -> bool:
    """Whether an input of ``size`` bytes (``compressed`` or not) can be one of ``entries``
    (:func:`ingested_inputs`) by its bytes or text, as far as sizes tell: a file of text is
    checksummed only where an entry is as long (a compressed one's text size is known only
    once it is decompressed)."""
    if compressed:
        return bool(entries)
    return any(n == size for n, _ in _sizes(entries) + _text_ids(entries))


def input_sum(path: str | Path) -> _Sum:
    """``path``'s size and sha256, and for a compressed file its text's (decompressed), in one
    reading (an OSError where it cannot be read)."""
    return _checksum(Path(path))


def unchanged(path: str | Path, found: _Sum) -> bool:
    """Whether ``path`` is as it was when ``found`` (:func:`input_sum`) was taken."""
    try:
        return _ident(os.stat(path)) == found.ident
    except OSError:
        return False


def same_text(a: _Sum, b: _Sum) -> bool:
    """Whether two inputs (:func:`input_sum`) hold the same bytes, or the same text with one or
    both compressed."""
    return (a.size, a.sha256) == (b.size, b.sha256) \
        or (a.text or (a.size, a.sha256)) == (b.text or (b.size, b.sha256))


def ingested_entry(entries: list[dict[str, object]], found: _Sum) -> dict[str, object] | None:
    """The first of ``entries`` (:func:`ingested_inputs`) noting an input with the bytes of
    ``found`` (:func:`input_sum`), or its text (the same lines, compressed or not), else None."""
    text = found.text or (found.size, found.sha256)
    return next((e for e in entries
                 if (e.get("size"), e.get("sha256")) == (found.size, found.sha256)
                 or _text_id(e) == text), None)


def _time_column(format_name: str) -> str | None:
    """The column a format's records are timed by: the one its ECS ``@timestamp`` maps to."""
    from .formats import get_format

    try:
        fmt = get_format(format_name)
    except Exception:  # noqa: BLE001 - an unknown format has no time column to file by
        return None
    col = fmt.ecs_fields.get("@timestamp")
    if col is not None and col in fmt.schema.names \
            and pa.types.is_timestamp(fmt.schema.field(col).type):
        return col
    return None


def _by_day(table: pa.Table, time_column: str | None = "timestamp"
            ) -> list[tuple[str, pa.Table]]:
    if time_column is None or time_column not in table.schema.names \
            or not pa.types.is_timestamp(table.schema.field(time_column).type):
        return [(datetime.now(UTC).strftime("%Y-%m-%d"), table)]
    days = pc.strftime(table.column(time_column), format="%Y-%m-%d")
    out = []
    for day in pc.unique(days).to_pylist():
        mask = pc.equal(days, day) if day is not None else pc.is_null(days)
        out.append((day or "unknown", table.filter(mask)))
    return sorted(out, key=lambda p: p[0])


#: The day of records without a time (a null in the time column).
UNKNOWN_DAY = "unknown"


def _day_list(days: str | Sequence[str] | None) -> list[str] | None:
    """``days`` as a list: a lone ``"2024-05-14"`` is one day (iterated, a string gave its
    characters: "no records for days 2, 0, 2, 4, -, ...")."""
    if days is None:
        return None
    return [days] if isinstance(days, str) else list(days)


def _is_day(text: str) -> bool:
    if len(text) != 10 or text[4] != "-" or text[7] != "-":  # (fromisoformat takes 20240514)
        return False
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        return False
    return True


def day_spans(days: str | Sequence[str] | None) -> list[tuple[str, str]] | None:
    """``days`` (one or a list, each a day ``YYYY-MM-DD``, a range of days ``FIRST..LAST`` with
    both ends in, or ``unknown``, the day of records without a time) as ``(first, last)``
    pairs; a UsageError for one that is none of those (``2024-5-14`` matched no day folder, and
    the lake seemed to hold nothing for it)."""
    spans = []
    for text in _day_list(days) or ():
        first, sep, last = str(text).partition("..")
        if not sep:
            last = first
        if text == UNKNOWN_DAY:
            spans.append((text, text))
            continue
        if not (_is_day(first) and _is_day(last)) or first > last:
            raise UsageError(f"days (--days) {str(text)!r} is not a day (YYYY-MM-DD), a range "
                             "of days (FIRST..LAST) or 'unknown'")
        spans.append((first, last))
    return spans if days is not None else None


def _in_spans(day: str, spans: list[tuple[str, str]]) -> bool:
    return any(first <= day <= last for first, last in spans)  # (ISO days sort as dates)


def _parts(root: Path, days: str | Sequence[str] | None) -> list[Path]:
    folder = root / RECORDS
    if not folder.exists():
        return []
    spans = day_spans(days)
    wanted = spans if spans else None  # (days=[]: every day, as before)
    out = []
    for day_dir in sorted(folder.glob("day=*")):
        if wanted is not None and not _in_spans(day_dir.name.removeprefix("day="), wanted):
            continue
        out.extend(_part_files(day_dir))
    return out


def lake_days(root: str | Path) -> list[str]:
    """The days a lake holds records for, in order: day folders without parts are not (a
    rolled-back commit leaves the folders its moves made, since a concurrent ingest may be
    moving a part into one)."""
    root = _local_root(root)
    _manifest(root)
    folder = root / RECORDS
    return sorted(p.name.removeprefix("day=") for p in folder.glob("day=*")
                  if _part_files(p)) if folder.exists() else []


def check_lake_days(roots: Sequence[str | Path], days: str | Sequence[str] | None) -> None:
    """A clear error, before any reading, for ``days`` (as :func:`day_spans` takes them) that
    are malformed, or that name a day or range none of the lakes at ``roots`` holds records for
    (a typo, a day not ingested yet): ``train --lake`` went on to train on fewer records than
    asked for, or failed only once every input was read."""
    spans = day_spans(days)
    if not spans:
        return
    if not roots:
        raise UsageError("days (--days) picks days of the lakes read: give a lake (--lake DIR)")
    held = sorted({d for root in roots for d in lake_days(root)})
    for text, span in zip(_day_list(days) or (), spans, strict=True):
        if not any(_in_spans(day, [span]) for day in held):
            where = f"the lake at {roots[0]} holds no" if len(roots) == 1 else \
                f"none of the {len(roots)} lakes holds"
            raise InputError(f"{where} records for {text} (days held: {_held_text(held)})")


def days_text(days: Sequence[str]) -> str:
    """``days`` (day folder names, in order) as runs of consecutive days, as the errors about
    ``--days`` list the days held (``2024-05-14 .. 2024-05-16, 2024-05-20``)."""
    return _held_text(days)


def _held_text(held: Sequence[str], most: int = 6) -> str:
    """``held`` (day folder names, in order) as runs of consecutive days: ``2015-05-16,
    2015-05-18``, not ``2015-05-16 .. 2015-05-18``, which said that a lake without 2015-05-17
    held it ("holds no records for 2015-05-17 (days held: 2015-05-16 .. 2015-05-18)"); only
    the first and last runs where there are more than ``most``."""
    runs: list[list[str]] = []
    for day in held:
        last = runs[-1][-1] if runs else None
        if last is not None and _is_day(day) and _is_day(last) and (
                datetime.strptime(day, "%Y-%m-%d")
                - datetime.strptime(last, "%Y-%m-%d")).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    text = [run[0] if len(run) == 1 else f"{run[0]} .. {run[-1]}" for run in runs]
    if len(text) > most:
        half = most // 2
        text = [*text[:half], f"{len(text) - 2 * half} more", *text[-half:]]
    return ", ".join(text) or "none"


def iter_lake(root: str | Path, days: str | Sequence[str] | None = None,
              digest: Any = None) -> Iterator[pa.RecordBatch]:
    """The lake's record batches: days in order, each day's records in arrival order. With
    ``digest`` (a ``hashlib`` object), the parts read are added to it as :func:`lake_sha256`
    does, from the very bytes the records come from (an ingest running meanwhile may add
    parts; the digest is of those read)."""
    root = _local_root(root)
    format_name = str(_manifest(root)["format"])
    schema = _schema(format_name)
    added = ADDED_COLUMNS.get(format_name, frozenset())
    for part in _parts(root, days):
        try:
            if digest is None:
                table = pq.read_table(part)
            else:
                # read into memory Arrow owns, not a Python bytes: when a part fails to decode,
                # the reads of its other columns still under way in Arrow's threads let go of
                # the buffer after the error has ended the run, and letting go of a Python
                # object then needs the interpreter, which is gone ("terminate called without
                # an active exception", exit 134, in about half the runs of `train --lake`)
                with pa.OSFile(str(part)) as f:
                    data = f.read_buffer()
                _digest_part(digest, root, part, data)
                table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"cannot read {part}: {exc}") from None
        if schema is not None:
            table = _conform(table, schema, part, added)
        yield from table.combine_chunks().to_batches()


def _schema(format_name: str) -> pa.Schema | None:
    """The schema of the records a lake of ``format_name`` holds (None for a format unknown
    here: its parts are read as they are)."""
    from .formats import get_format

    try:
        return get_format(format_name).schema
    except Exception:  # noqa: BLE001 - the lake's format is checked by whoever reads it
        return None


#: The columns each format gained after lakes of it were first written (all nullable): a part
#: written before lacks them, and reads with them null. Any other column a part lacks is missing,
#: not a field its records never had (see :func:`_conform`).
ADDED_COLUMNS: dict[str, frozenset[str]] = {
    "access": frozenset({"vhost", "utc_offset_minutes"}),
}


def _conform(table: pa.Table, schema: pa.Schema, part: Path,
             added: frozenset[str] = frozenset()) -> pa.Table:
    """``table`` (one part) as the lake's ``schema``: columns in its order and of its types.

    Parts deepwatch writes already are; a part rewritten by another tool (compacted with
    polars, which writes ``large_string``; by Spark, which writes microsecond timestamps and
    drops the not-null marks; columns reordered) holds the same records in other types, and
    those differences made reading the lake fail with a traceback. A part written before its
    format gained a nullable column (``added``, from :data:`ADDED_COLUMNS`: the access format's
    ``vhost`` and ``utc_offset_minutes``) lacks it: it reads with that column null, as records
    that hold no such field. A part that cannot be read as the lake's records (any other column
    missing, nullable or not: a KDD part without its ``label`` read as 2,000 unlabelled records,
    a Zeek part without ``orig_bytes`` as connections of unknown size; a value that does not
    fit) is one clear error."""
    if table.schema.equals(schema):
        return table
    names = table.schema.names
    missing = [f.name for f in schema
               if f.name not in names and not (f.nullable and f.name in added)]
    try:
        if missing:
            raise ValueError(f"no column {', '.join(repr(n) for n in missing)}")
        for f in schema:
            if f.name not in table.schema.names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table.select(schema.names).cast(schema)
    except (ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError too
        raise InputError(f"{part} does not hold the lake's records: "
                         f"{first_line(exc)}") from None


def _digest_part(digest: Any, root: Path, part: Path, data: bytes | pa.Buffer) -> None:
    digest.update(f"{part.relative_to(root).as_posix()}\0{len(data)}\0".encode())
    digest.update(data)


def lake_sha256(root: str | Path, days: str | Sequence[str] | None = None) -> str:
    """The checksum of a lake's records as ``train --lake`` records it in a bundle's manifest:
    the sha256 of, for each record part in reading order (days in order), its path within the
    lake, a NUL, its size in bytes, a NUL, and its bytes. It changes when a part is added,
    removed, renamed or altered; rejects and the lake's own files do not count."""
    root = _local_root(root)
    _manifest(root)
    digest = hashlib.sha256()
    for part in _parts(root, days):
        _digest_part(digest, root, part, part.read_bytes())
    return digest.hexdigest()


def read_lake(root: str | Path, days: str | Sequence[str] | None = None) -> pa.Table:
    """The whole lake (or some of its days: one or a list of ``YYYY-MM-DD``, ranges
    ``FIRST..LAST`` or ``unknown``, see :func:`day_spans`) as one table."""
    days = _day_list(days)
    batches = list(iter_lake(root, days))
    if not batches:
        raise InputError(f"the lake at {root} holds no records"
                         + (f" for days {', '.join(days)}" if days else ""))
    return pa.Table.from_batches(batches)


def read_rejects(root: str | Path) -> pa.Table | None:
    """The lake's rejected lines with their reasons, as one table; None when it has none. Read
    like a day's records (:func:`_part_files`): files another tool compacted them into count."""
    folder = _local_root(root) / REJECTS
    parts = _part_files(folder) if folder.is_dir() else []
    if not parts:
        return None
    return pa.concat_tables([_reject_part(p) for p in parts], promote_options="default")


def _reject_part(part: Path) -> pa.Table:
    """One rejects part, its columns of the types deepwatch writes: a part rewritten by polars
    (``large_string``) beside deepwatch's own made the reading fail with a traceback
    (``Unable to merge: Field raw has incompatible types: large_string vs string``)."""
    from .formats._base import REJECT_SCHEMA

    types = {f.name: f.type for f in REJECT_SCHEMA} | {"source": pa.string()}
    try:
        table = pq.read_table(part)
        for i, field in enumerate(table.schema):
            want = types.get(field.name)
            if want is not None and field.type != want:
                table = table.set_column(i, pa.field(field.name, want),
                                         table.column(i).cast(want))
    except (OSError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError too
        raise InputError(f"cannot read the rejects part {part}: {first_line(exc)}") from None
    return table
