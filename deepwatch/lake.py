"""The data lake: parsed records as Parquet, partitioned by day, with rejected lines beside them.

Layout of a lake directory::

    _lake.json                      format name and layout version
    records/day=YYYY-MM-DD/part-<ingest>-<seq>.parquet
    rejects/part-<ingest>-<seq>.parquet   (line, raw, reason, source)

A record's day comes from the format's time column (the column its ECS ``@timestamp`` maps to:
``timestamp`` for access logs, ``ts`` for Zeek), in UTC; formats without one are filed under the
day they were ingested. Part names sort in the order they were written, so reading a lake back
yields each day's records in arrival order, days in order.

Every file is written under a temporary name starting with a dot in its final directory and
renamed into place when complete, so readers (which only see ``part-*.parquet``) never see half a
part or half a manifest, even beside an ingest that is running or was killed. Ingest appends: the
same input ingested twice is there twice. ``_ingested.jsonl`` lists the inputs ingested (path,
size, sha256), so a repeat can be warned about.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError, OutputError, UsageError, first_line

LAYOUT_VERSION = 1
MANIFEST = "_lake.json"
RECORDS = "records"
REJECTS = "rejects"
INGESTED = "_ingested.jsonl"
PART_GLOB = "part-*.parquet"
#: Temporary files (a killed writer's leftovers) older than this are removed by the next writer.
STALE_TMP_S = 3600.0


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
    return str(_manifest(Path(root))["format"])


class LakeWriter:
    """Appends parsed batches and rejects to a lake, creating it on first use."""

    def __init__(self, root: str | Path, format_name: str):
        self.root = Path(root)
        self.format = format_name
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--lake {self.root} is a file; a lake is a directory")
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
        # ingest ids sort by time, so parts read back in the order they were written
        self._ingest = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        self._seq = 0
        self.stats = LakeStats(days=set())
        self._sums: dict[str, tuple[int, str]] = {}
        self._written: list[Path] = []  # this writer's parts, for rollback()

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
        """One new part in ``folder``; a failure to write (a full disk) is an OutputError."""
        final = folder / self._name()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _write_part(table, final)
        except OSError as exc:
            raise OutputError(f"cannot write the lake at {self.root}: "
                              f"{exc.strerror or first_line(exc)}") from None
        self._written.append(final)

    def rollback(self) -> int:
        """Remove every part this writer wrote (a run that failed keeps nothing, so running it
        again does not store its records twice); the number of parts removed."""
        removed = 0
        for part in self._written:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
                removed += 1
        self._written.clear()
        self.stats = LakeStats(days=set())
        return removed

    def seen_before(self, path: str | Path) -> bool:
        """Whether an input with ``path``'s size and sha256 was ingested into this lake before
        (ingest appends regardless: this is for a warning)."""
        size, digest = self._checksum(path)
        return any(e.get("size") == size and e.get("sha256") == digest
                   for e in _ingested(self.root))

    def note_ingested(self, path: str | Path) -> None:
        """Remember ``path`` (size, sha256) as ingested, in ``_ingested.jsonl``: one line
        appended in one write, so concurrent ingests do not lose each other's entries."""
        size, digest = self._checksum(path)
        line = json.dumps({"path": str(path), "size": size, "sha256": digest,
                           "ingest": self._ingest}) + "\n"
        fd = os.open(self.root / INGESTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _checksum(self, path: str | Path) -> tuple[int, str]:
        if str(path) not in self._sums:  # each input is read once to checksum it, not twice
            self._sums[str(path)] = _checksum(Path(path))
        return self._sums[str(path)]


def _checksum(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            size += len(block)
            digest.update(block)
    return size, digest.hexdigest()


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


def _write_part(table: pa.Table, final: Path) -> None:
    _write_atomic(final, lambda t: pq.write_table(table, t, compression="zstd"))


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


def _parts(root: Path, days: Sequence[str] | None) -> list[Path]:
    folder = root / RECORDS
    if not folder.exists():
        return []
    wanted = set(days) if days else None
    out = []
    for day_dir in sorted(folder.glob("day=*")):
        if wanted is not None and day_dir.name.removeprefix("day=") not in wanted:
            continue
        out.extend(sorted(day_dir.glob(PART_GLOB)))
    return out


def lake_days(root: str | Path) -> list[str]:
    """The days a lake holds records for, in order."""
    _manifest(Path(root))
    folder = Path(root) / RECORDS
    return sorted(p.name.removeprefix("day=") for p in folder.glob("day=*")) if folder.exists() \
        else []


def iter_lake(root: str | Path, days: Sequence[str] | None = None,
              digest: Any = None) -> Iterator[pa.RecordBatch]:
    """The lake's record batches: days in order, each day's records in arrival order. With
    ``digest`` (a ``hashlib`` object), the parts read are added to it as :func:`lake_sha256`
    does, from the very bytes the records come from (an ingest running meanwhile may add
    parts; the digest is of those read)."""
    root = Path(root)
    schema = _schema(str(_manifest(root)["format"]))
    for part in _parts(root, days):
        try:
            if digest is None:
                table = pq.read_table(part)
            else:
                data = part.read_bytes()
                _digest_part(digest, root, part, data)
                table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"cannot read {part}: {exc}") from None
        if schema is not None:
            table = _conform(table, schema, part)
        yield from table.combine_chunks().to_batches()


def _schema(format_name: str) -> pa.Schema | None:
    """The schema of the records a lake of ``format_name`` holds (None for a format unknown
    here: its parts are read as they are)."""
    from .formats import get_format

    try:
        return get_format(format_name).schema
    except Exception:  # noqa: BLE001 - the lake's format is checked by whoever reads it
        return None


def _conform(table: pa.Table, schema: pa.Schema, part: Path) -> pa.Table:
    """``table`` (one part) as the lake's ``schema``: columns in its order and of its types.

    Parts deepwatch writes already are; a part rewritten by another tool (compacted with
    polars, which writes ``large_string``; by Spark, which writes microsecond timestamps and
    drops the not-null marks; columns reordered) holds the same records in other types, and
    those differences made reading the lake fail with a traceback. A part that cannot be read
    as the lake's records (a column missing, a value that does not fit) is one clear error."""
    if table.schema.equals(schema):
        return table
    missing = [n for n in schema.names if n not in table.schema.names]
    try:
        if missing:
            raise ValueError(f"no column {', '.join(repr(n) for n in missing)}")
        return table.select(schema.names).cast(schema)
    except (ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError too
        raise InputError(f"{part} does not hold the lake's records: "
                         f"{first_line(exc)}") from None


def _digest_part(digest: Any, root: Path, part: Path, data: bytes) -> None:
    digest.update(f"{part.relative_to(root).as_posix()}\0{len(data)}\0".encode())
    digest.update(data)


def lake_sha256(root: str | Path, days: Sequence[str] | None = None) -> str:
    """The checksum of a lake's records as ``train --lake`` records it in a bundle's manifest:
    the sha256 of, for each record part in reading order (days in order), its path within the
    lake, a NUL, its size in bytes, a NUL, and its bytes. It changes when a part is added,
    removed, renamed or altered; rejects and the lake's own files do not count."""
    root = Path(root)
    _manifest(root)
    digest = hashlib.sha256()
    for part in _parts(root, days):
        _digest_part(digest, root, part, part.read_bytes())
    return digest.hexdigest()


def read_lake(root: str | Path, days: Sequence[str] | None = None) -> pa.Table:
    """The whole lake (or some of its days) as one table."""
    batches = list(iter_lake(root, days))
    if not batches:
        raise InputError(f"the lake at {root} holds no records"
                         + (f" for days {', '.join(days)}" if days else ""))
    return pa.Table.from_batches(batches)


def read_rejects(root: str | Path) -> pa.Table | None:
    folder = Path(root) / REJECTS
    parts = sorted(folder.glob(PART_GLOB)) if folder.exists() else []
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
