"""Commands of the web pipeline: ``ingest`` (records into the lake) and ``simulate`` (traffic).

``cli.py`` calls :func:`register` when this module is present.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import InputError, Interrupted, OutputError, sigterm_stops_cleanly
from .lake import LakeStats

if TYPE_CHECKING:
    import pyarrow as pa

    from .io import InputReader


def ingest(format_name: str, lake: str, inputs: Sequence[str], progress: bool = False,
           on_batch: Callable[[int], None] | None = None) -> tuple[LakeStats, str]:
    """Parse ``inputs`` into the lake at ``lake``; returns the lake's counts and a summary."""
    from .formats import get_format
    from .io import InputReader
    from .lake import LakeWriter

    fmt = get_format(format_name)
    # the inputs are checked (a missing file, a glob matching none) before the lake is made:
    # a new lake was created, _lake.json and all, by a run that then failed on its input
    reader = InputReader(fmt, inputs, progress=progress)
    writer = LakeWriter(lake, format_name)
    # ingest appends: a file ingested before is ingested again (warned about, not refused)
    kept = [i for i, s in enumerate(reader.specs) if s.path != "-" and os.path.isfile(s.path)]
    files = [reader.specs[i].path for i in kept]
    for path in files:
        earlier = writer.given_earlier(path)
        if earlier is not None:  # (it said "was already ingested into LAKE": it was not)
            same = "" if earlier == path else f" (same size and sha256 as {earlier})"
            print(f"warning: {path} was given twice in this run{same}; its records are "
                  "stored twice", file=sys.stderr)
        elif writer.seen_before(path):
            if (other := writer.same_text_as(path)) is not None and \
                    writer.same_text_in_run(path):
                print(f"warning: {path} holds the same lines as {other} (one of the two "
                      "compressed), given earlier in this run; its records are stored twice",
                      file=sys.stderr)
            elif other is not None:
                # one of the two compressed: a rotated log (access.log.1 is access.log.2.gz
                # today) was stored again without a word, its compressed bytes being new
                print(f"warning: {path} holds the same lines as {other} (one of the two "
                      f"compressed), ingested into {lake} before; its records are appended "
                      "again", file=sys.stderr)
            else:
                print(f"warning: {path} (same size and sha256) was already ingested into "
                      f"{lake}; its records are appended again", file=sys.stderr)
        elif (part := writer.ingested_part(path)) is not None:  # a live log ingested before
            how = ", decompressed," if writer.part_decompressed(path) else ""
            print(f"warning: {path} begins{how} with the {part:,} bytes ingested into {lake} "
                  "before (it has grown since); their records are appended again",
                  file=sys.stderr)
    # the last line stored of each input (by its place in reader.specs; None: not known): a file
    # written to while it is read (a live log) is noted as ingested up to it, not as it was
    # when the run began
    place = {id(s): i for i, s in enumerate(reader.specs)}
    last: dict[int, int | None] = {}
    try:
        for batch, rejects, spec in reader:
            writer.write(batch)
            writer.write_rejects(rejects)
            if (i := place.get(id(spec))) is not None:
                last[i] = _last_line(reader, batch, rejects, last.get(i, 0))
            if on_batch is not None:
                on_batch(batch.num_rows)
        lines = [last.get(i, 0) if reader.specs[i].compression is None else None
                 for i in kept]
        # the run's parts appear together, and only now: a run killed before leaves none
        failed = writer.commit(files, lines)
    except BaseException as exc:  # a full disk, an unreadable input, Ctrl-C: keep nothing
        removed = writer.rollback()
        if writer.committed:  # stopped once its inputs were noted: the run is in, whole
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(f"too late to roll back, the run had committed: its "
                                  f"{writer.stats.records:,} records are in {lake}, so "
                                  "running it again would store them twice",
                                  getattr(exc, "terminated", False)) from None
            raise
        parts = "1 part it had written was" if removed == 1 else \
            f"{removed} parts it had written were"
        kept_nothing = f"nothing from this run was kept ({parts} removed), so it can simply be " \
            "run again"
        if isinstance(exc, (OutputError, InputError)):
            raise type(exc)(f"{exc}; {kept_nothing}") from None
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(kept_nothing, getattr(exc, "terminated", False)) from None
        raise
    for note in writer.notes:  # an input that changed while it was read
        print(f"warning: {note}", file=sys.stderr)
    if failed is not None:  # the records are in: only the duplicate warning loses out
        print(f"warning: {failed}; ingesting them again will not be warned about",
              file=sys.stderr)
    return writer.stats, reader.stats.summary()


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _stored(lake: str, stats: LakeStats) -> str:
    """What an ingest stored: the records, the days they are filed under (as runs of days:
    ``2024-05-14, 2024-05-20``), the Parquet parts written for them, and the rejected lines.
    (It said ``41 records in 2 files (2024-05-14 .. 2024-05-20)``: the parts read as input
    files, and the span as days held that the lake then said it did not hold.)"""
    from .lake import days_text

    days = sorted(stats.days or ())
    where = f" for {_plural(len(days), 'day')} ({days_text(days)})" if days else ""
    return (f"{_plural(stats.records, 'record')} stored in {lake}{where}, as "
            f"{_plural(stats.files, 'new Parquet part')}; "
            f"{_plural(stats.rejects, 'rejected line')} kept in {lake}/rejects")


def _last_line(reader: InputReader, batch: pa.RecordBatch, rejects: pa.Table,
               before: int | None) -> int | None:
    """The number of the last line of its input that the batch just yielded (records and
    rejects) or an earlier one of the same input (``before``) came from; None where one of
    them does not say."""
    import numpy as np
    import pyarrow.compute as pc

    if before is None:
        return None
    top = before
    if batch.num_rows:
        found = reader.lines_of(np.arange(batch.num_rows), raw=False)
        if found is None:
            return None
        top = max(top, int(found[0].max()))
    if rejects.num_rows:
        top = max(top, int(pc.max(rejects.column("line")).as_py()))
    return top


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest_cmd(
        files: Annotated[list[str], typer.Argument(
            help="Input files (.gz, .bz2, .xz ok), globs, PATH=LABEL, or - for stdin")],
        fmt: Annotated[str, typer.Option("--format", "-f", help="kdd, nslkdd, access or zeek")],
        lake: Annotated[str, typer.Option("--lake", help="Lake directory (created if new)")],
    ) -> None:
        """Parse records into a Parquet lake partitioned by day; rejected lines kept beside.

        Ingest appends and is not idempotent: ingesting the same file twice stores its records
        twice (a warning says so when a file of the same size and sha256 was ingested before,
        or one it begins with: a live log that has grown since).
        A run's records appear in the lake together when it ends; one that fails (a full disk,
        an unreadable input, Ctrl-C, SIGTERM) or is killed outright keeps nothing it wrote, so
        it can be run again as it was.
        """
        from .progress import enabled

        with sigterm_stops_cleanly():  # SIGTERM rolls the run back as Ctrl-C does
            stats, summary = ingest(fmt, lake, files, progress=enabled())
        typer.echo(f"{summary}; {_stored(lake, stats)}", err=True)

    @app.command("simulate")
    def simulate_cmd(
        out: Annotated[str, typer.Option("--out", "-o", help="Directory for the logs")],
        visits: Annotated[int, typer.Option(help="Number of visits (normal sessions)")] = 2000,
        attack_share: Annotated[float | None, typer.Option(
            "--attack-share", help="Attack lines per normal line, all kinds together "
                                   "(default 0.05)")] = None,
        attacks: Annotated[str, typer.Option(
            help="Comma-separated attack kinds, or 'none'")] = ",".join(_attack_names()),
        seed: Annotated[int, typer.Option(help="Random seed")] = 0,
        hours: Annotated[float, typer.Option(help="Time span of the traffic")] = 24.0,
    ) -> None:
        """Simulate a web shop's traffic with labelled attacks: one combined log per label."""
        from .simulate import simulate

        kinds = [] if attacks.strip() in ("", "none") else [a.strip() for a in attacks.split(",")]
        if attack_share and not kinds:  # (it was ignored: no attack lines at all)
            raise typer.BadParameter("--attack-share sets how many attack lines --attacks adds; "
                                     "with --attacks none there are none")
        paths = simulate(out, visits=visits, attacks=kinds,
                         attack_share=0.05 if attack_share is None else attack_share,
                         seed=seed, hours=hours, log=lambda s: typer.echo(s, err=True))
        import shlex

        # (quoted where needed, so that the line can be pasted: an --out holding a space)
        args = " ".join(shlex.quote(f"{p}={label}") for label, p in paths.items())
        typer.echo(f"evaluate with: deepwatch evaluate BUNDLE --format access --json OUT.json "
                   f"{args}", err=True)


def _attack_names() -> tuple[str, ...]:
    from .simulate import ATTACKS

    return ATTACKS
