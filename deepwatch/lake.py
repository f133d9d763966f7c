"""The data lake: parsed records as Parquet, partitioned by day, with rejected lines beside them.

Layout of a lake directory::

    _lake.json                      format name and layout version
    records/day=YYYY-MM-DD/part-<ingest>-<seq>.parquet
    rejects/part-<ingest>-<seq>.parquet   (line, raw, reason, source)

A record's day comes from its ``timestamp`` column (UTC); formats without one are filed under
the day they were ingested. Part names sort in the order they were written, so reading a lake
back yields each day's records in arrival order, days in order.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError, UsageError

LAYOUT_VERSION = 1
MANIFEST = "_lake.json"
RECORDS = "records"
REJECTS = "rejects"


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
        data: dict[str, object] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable: {exc}") from None
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
        if (self.root / MANIFEST).exists():
            found = lake_format(self.root)
            if found != format_name:
                raise UsageError(f"the lake at {self.root} holds {found!r} records, "
                                 f"not {format_name!r}")
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise UsageError(f"{self.root} exists and is not a deepwatch lake")
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / MANIFEST).write_text(json.dumps(
                {"format": format_name, "version": LAYOUT_VERSION}, indent=1) + "\n")
        # ingest ids sort by time, so parts read back in the order they were written
        self._ingest = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        self._seq = 0
        self.stats = LakeStats(days=set())

    def _name(self) -> str:
        self._seq += 1
        return f"part-{self._ingest}-{self._seq:06d}.parquet"

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        for day, part in _by_day(table):
            folder = self.root / RECORDS / f"day={day}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, folder / self._name(), compression="zstd")
            self.stats.records += part.num_rows
            self.stats.files += 1
            assert self.stats.days is not None
            self.stats.days.add(day)

    def write_rejects(self, rejects: pa.Table) -> None:
        if rejects.num_rows == 0:
            return
        folder = self.root / REJECTS
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(rejects, folder / self._name(), compression="zstd")
        self.stats.rejects += rejects.num_rows


def _by_day(table: pa.Table) -> list[tuple[str, pa.Table]]:
    if "timestamp" not in table.schema.names:
        return [(datetime.now(UTC).strftime("%Y-%m-%d"), table)]
    days = pc.strftime(table.column("timestamp"), format="%Y-%m-%d")
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
        out.extend(sorted(day_dir.glob("part-*.parquet")))
    return out


def lake_days(root: str | Path) -> list[str]:
    """The days a lake holds records for, in order."""
    _manifest(Path(root))
    folder = Path(root) / RECORDS
    return sorted(p.name.removeprefix("day=") for p in folder.glob("day=*")) if folder.exists() \
        else []


def iter_lake(root: str | Path, days: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The lake's record batches: days in order, each day's records in arrival order."""
    root = Path(root)
    _manifest(root)
    for part in _parts(root, days):
        try:
            table = pq.read_table(part)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"cannot read {part}: {exc}") from None
        yield from table.combine_chunks().to_batches()


def read_lake(root: str | Path, days: Sequence[str] | None = None) -> pa.Table:
    """The whole lake (or some of its days) as one table."""
    batches = list(iter_lake(root, days))
    if not batches:
        raise InputError(f"the lake at {root} holds no records"
                         + (f" for days {', '.join(days)}" if days else ""))
    return pa.Table.from_batches(batches)


def read_rejects(root: str | Path) -> pa.Table | None:
    folder = Path(root) / REJECTS
    parts = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
