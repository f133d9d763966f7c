"""Access-log times other than ``[10/Oct/2000:13:55:36 -0700]``: NGINX's ``$time_iso8601``
(``2024-05-14T13:55:36+02:00``) and Apache's with a fraction of a second
(``%{%d/%b/%Y:%H:%M:%S}t.%{msec_frac}t %{%z}t``, or ``usec_frac``) were each a reject,
``unreadable time``, on every line of a server set up to write them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from deepwatch.formats import get_format
from deepwatch.lake import read_lake, read_rejects


def _line(time: str, path: str = "/a") -> str:
    return f'203.0.113.5 - - [{time}] "GET {path} HTTP/1.1" 200 5 "-" "curl/8.5"'


def _at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


#: Each time as a server writes it, the UTC instant it is and the offset it has, in minutes.
READ = [
    ("10/Oct/2000:13:55:36 -0700", _at(2000, 10, 10, 20, 55, 36), -420),
    ("2024-05-14T13:55:36+02:00", _at(2024, 5, 14, 11, 55, 36), 120),
    ("2024-05-14T13:55:36-05:30", _at(2024, 5, 14, 19, 25, 36), -330),
    ("2024-05-14T13:55:36+0200", _at(2024, 5, 14, 11, 55, 36), 120),
    ("2024-05-14T13:55:36+00:00", _at(2024, 5, 14, 13, 55, 36), 0),
    ("2024-05-14T13:55:36Z", _at(2024, 5, 14, 13, 55, 36), 0),
    ("2024-05-14T13:55:36.250-07:00", _at(2024, 5, 14, 20, 55, 36, 250000), -420),
    ("10/Oct/2000:13:55:36.123 -0700", _at(2000, 10, 10, 20, 55, 36, 123000), -420),
    ("10/Oct/2000:13:55:36.007 +0530", _at(2000, 10, 10, 8, 25, 36, 7000), 330),
    # microseconds: timestamp holds milliseconds, so the rest is cut (not rounded)
    ("10/Oct/2000:13:55:36.123999 -0700", _at(2000, 10, 10, 20, 55, 36, 123000), -420),
]


def test_each_form_reads_with_its_instant_and_offset() -> None:
    lines = [_line(time, f"/{n}") for n, (time, _, _) in enumerate(READ)]
    result = get_format("access").parse("\n".join(lines) + "\n", first_line=1)
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    rows = result.batch.to_pylist()
    # in order, each with its own line's values (the forms read in a second pass are put back
    # in their lines' places)
    assert [r["url"] for r in rows] == [f"/{n}" for n in range(len(READ))]
    assert result.line_numbers.to_pylist() == list(range(1, len(READ) + 1))
    assert [(r["timestamp"], r["utc_offset_minutes"]) for r in rows] == [
        (when, offset) for _, when, offset in READ]


def test_times_that_are_none_of_the_forms_stay_rejects() -> None:
    bad = ["yesterday", "31/Foo/2000:13:55:36 +0000",
           "2024-05-14T13:55:36",  # no zone: no instant
           "2024-05-14 13:55:36+02:00", "10/Oct/2000:13:55:36. -0700",
           "2024-05-14T13:55:36+24:00", "2024-05-14T13:55:36+02",  # hours alone: no server's
           "10/Oct/2000:13:55:36.123", "2024-13-14T13:55:36Z"]
    lines = [_line(READ[1][0])] + [_line(time) for time in bad]
    result = get_format("access").parse("\n".join(lines) + "\n")
    assert result.batch.num_rows == 1
    assert [(r["line"], r["reason"]) for r in result.rejects.to_pylist()] == [
        (n, f"unreadable time '{time}'") for n, time in enumerate(bad, start=2)]


def test_an_iso_time_past_9999_in_utc_is_a_reject_as_a_classic_one_is() -> None:
    result = get_format("access").parse(_line("9999-12-31T23:30:00-01:00") + "\n")
    assert result.batch.num_rows == 0
    assert result.rejects.column("reason").to_pylist() == [
        "time outside the years 1-9999 in UTC '9999-12-31T23:30:00-01:00'"]


def test_a_record_with_the_iso_time_reads_as_the_line_does() -> None:
    """``parse_records`` (REST) takes ISO timestamps already: a record with a line's ISO time
    gets the line's instant and offset (one in UTC excepted, which a record leaves as given:
    see docs/web.md)."""
    access = get_format("access")
    times = [time for time, _, offset in READ if "T" in time and offset]
    lines = access.parse("\n".join(_line(t) for t in times) + "\n").batch.to_pylist()
    records = access.parse_records([
        {"client_ip": "203.0.113.5", "timestamp": t, "request": "GET /a HTTP/1.1",
         "status": 200, "bytes": 5} for t in times]).batch.to_pylist()
    assert [(r["timestamp"], r["utc_offset_minutes"]) for r in records] == [
        (r["timestamp"], r["utc_offset_minutes"]) for r in lines]


def test_ingest_stores_a_log_of_mixed_time_forms(tmp_path: Path) -> None:
    """A real ``deepwatch ingest``: NGINX ISO and Apache millisecond lines were each rejected
    (``unreadable time``); they are stored, under their UTC days, and only the line whose time
    no server writes is a reject."""
    times = ["10/Oct/2000:13:55:36 -0700", "2024-05-14T23:30:00-02:00",
             "10/Oct/2000:13:55:36.123 -0700", "2024-05-14T13:55:36Z", "yesterday"]
    log = tmp_path / "access.log"
    log.write_text("".join(_line(t) + "\n" for t in times))
    lake = tmp_path / "lake"
    done = subprocess.run(
        [sys.executable, "-m", "deepwatch", "ingest", "--format", "access", "--lake", str(lake),
         str(log)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    assert "5 lines read: 4 parsed, 1 rejected" in done.stderr
    stored = sorted((r["timestamp"], r["utc_offset_minutes"])
                    for r in read_lake(lake).to_pylist())
    assert stored == [(_at(2000, 10, 10, 20, 55, 36), -420),
                      (_at(2000, 10, 10, 20, 55, 36, 123000), -420),
                      (_at(2024, 5, 14, 13, 55, 36), 0),
                      (_at(2024, 5, 15, 1, 30), -120)]
    rejects = read_rejects(lake)
    assert rejects is not None
    assert rejects.column("reason").to_pylist() == ["unreadable time 'yesterday'"]
