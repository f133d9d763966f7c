"""The public data sets deepwatch knows by name: where they come from, how to check a copy, where
a local copy lives.

Sizes, record counts and sha256 are of the *uncompressed text*, so a gzipped copy and a plain one
of the same file check out alike (the originals are gzipped for KDD 99 and plain for NSL-KDD).
Where a figure is not known to us (files we could not see when the registry was written) it is
``None``; the first fetch then records what it found in the cache ("trust on first use") and later
fetches are checked against that.

A file is looked for, in order, under ``$DEEPWATCH_DATA`` and in the cache
(``$DEEPWATCH_CACHE``, else ``$XDG_CACHE_HOME/deepwatch``, else ``~/.cache/deepwatch``), in
``<dir>/<group>/<file>`` or ``<dir>/<file>``, as ``<file>.gz``, plain, ``<file>.bz2`` or
``<file>.xz``.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from .errors import DataError, InputError, UsageError, check_flags

_GZIP_MAGIC = b"\x1f\x8b"
#: The compressed copies a data set may be kept as: suffix, first bytes, opener.
_COMPRESSED: tuple[tuple[str, bytes, Any], ...] = (
    (".gz", _GZIP_MAGIC, gzip.open),
    (".bz2", b"BZh", bz2.open),
    (".xz", b"\xfd7zXZ\x00", lzma.open),
)
_BLOCK = 1 << 20
_UCI = "http://kdd.ics.uci.edu/databases/kddcup99/"
#: UNB distributes NSL-KDD behind a form; this public GitHub copy is the usual direct download.
_NSL_MIRROR = "https://raw.githubusercontent.com/defcom17/NSL_KDD/master/"
_NSL_HOME = "https://www.unb.ca/cic/datasets/nsl.html"


@dataclass(frozen=True)
class Dataset:
    name: str
    #: The file's own name, without a ``.gz`` its original may carry.
    text_name: str
    group: str
    format: str
    description: str
    urls: tuple[str, ...]
    #: Records (lines) of the text; published figure where ``sha256`` is None.
    records: int | None
    #: Size in bytes and sha256 of the uncompressed text; None where not known.
    text_bytes: int | None
    sha256: str | None
    home: str = ""

    def candidates(self) -> tuple[str, ...]:
        """The names a copy may have, in the order they are looked for."""
        return (self.text_name + ".gz", self.text_name, self.text_name + ".bz2",
                self.text_name + ".xz")


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("kdd99-10percent", "kddcup.data_10_percent", "kddcup99", "kdd",
            "KDD Cup 1999: the contest's 10% training set",
            (_UCI + "kddcup.data_10_percent.gz",
             "https://ndownloader.figshare.com/files/5976042"),  # scikit-learn's mirror
            494_021, 74_889_749,
            "f8c8267ebcd9c0ed1fd7d6277fe5bfff8732e9b7db8e61b873542b2a534b6f9a",
            "https://kdd.ics.uci.edu/databases/kddcup99/kddcup99.html"),
    Dataset("kdd99-corrected", "corrected", "kddcup99", "kdd",
            "KDD Cup 1999: the labelled test set (17 attack types unseen in training)",
            (_UCI + "corrected.gz",),
            311_029, 47_251_540,
            "547dfb9c0f0dc1d9944219ec79e851191faebaeb8acbfa1cd171c418397052a4",
            "https://kdd.ics.uci.edu/databases/kddcup99/kddcup99.html"),
    Dataset("nslkdd-train", "KDDTrain+.txt", "nslkdd", "nslkdd",
            "NSL-KDD: the full training set",
            (_NSL_MIRROR + "KDDTrain+.txt",), 125_973, None, None, _NSL_HOME),
    Dataset("nslkdd-train20", "KDDTrain+_20Percent.txt", "nslkdd", "nslkdd",
            "NSL-KDD: a 20% subset of the training set",
            (_NSL_MIRROR + "KDDTrain+_20Percent.txt",), 25_192, 3_847_223,
            "5bf25df3ec1544eb3297b9a90b56736ba11e31f429df20e5aa0cfd49ca0fc896", _NSL_HOME),
    Dataset("nslkdd-test", "KDDTest+.txt", "nslkdd", "nslkdd",
            "NSL-KDD: the test set",
            (_NSL_MIRROR + "KDDTest+.txt",), 22_544, 3_464_055,
            "6ff4e09deee2c50c4877bbfe84f926dffafe3ef33d24f9dcfe0e425f4a8df5a2", _NSL_HOME),
    Dataset("nslkdd-test21", "KDDTest-21.txt", "nslkdd", "nslkdd",
            "NSL-KDD: the test records fewer than 21 of the original learners got right",
            (_NSL_MIRROR + "KDDTest-21.txt",), 11_850, None, None, _NSL_HOME),
)}

#: Names that stand for several data sets at once.
GROUPS: dict[str, tuple[str, ...]] = {
    "kdd99": ("kdd99-10percent", "kdd99-corrected"),
    "nslkdd": ("nslkdd-train", "nslkdd-train20", "nslkdd-test", "nslkdd-test21"),
}


# ---- where things are ------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("DEEPWATCH_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deepwatch"


def _data_dir() -> Path | None:
    root = os.environ.get("DEEPWATCH_DATA")
    return Path(root).expanduser() if root else None


def get(name: str) -> Dataset:
    """The data set called ``name`` (its registry name or its file's name)."""
    if name in DATASETS:
        return DATASETS[name]
    bare = name
    for suffix, _magic, _opener in _COMPRESSED:
        bare = bare.removesuffix(suffix)
    for ds in DATASETS.values():
        if bare in (ds.text_name, ds.text_name.removesuffix(".txt")):
            return ds
    known = ", ".join([*DATASETS, *GROUPS])
    raise UsageError(f"unknown data set {name!r}; known: {known}")


def _expand(name: str) -> list[Dataset]:
    if name in GROUPS:
        return [DATASETS[n] for n in GROUPS[name]]
    return [get(name)]


def _look_in(ds: Dataset, root: Path) -> Path | None:
    for folder in (root / ds.group, root):
        for cand in ds.candidates():
            p = folder / cand
            if p.is_file():
                return p
    return None


def find(name: str) -> Path | None:
    """A local copy of a data set (``$DEEPWATCH_DATA`` first, then the cache), unverified."""
    ds = get(name)
    for root in (_data_dir(), cache_dir() / "datasets"):
        if root is not None and (hit := _look_in(ds, root)) is not None:
            return hit
    return None


def path(name: str) -> Path:
    """The local path of a data set, or a clear error saying how to get it."""
    found = find(name)
    if found is None:
        ds = get(name)
        raise InputError(f"data set {ds.name!r} ({ds.text_name}) is not here; set DEEPWATCH_DATA "
                        f"to a directory holding it or run `deepwatch datasets fetch {ds.name}`")
    return found


# ---- checking a copy -------------------------------------------------------------------------

@dataclass(frozen=True)
class Digest:
    sha256: str
    text_bytes: int
    records: int


def _compression(p: Path) -> str:
    """The suffix of the compression ``p`` holds, told by its first bytes ("" for plain text)."""
    with open(p, "rb") as f:
        head = f.read(6)
    return next((suffix for suffix, magic, _ in _COMPRESSED if head.startswith(magic)), "")


def _open_text(p: Path) -> IO[bytes]:
    kind = _compression(p)
    for suffix, _magic, opener in _COMPRESSED:
        if suffix == kind:
            return cast(IO[bytes], opener(p, "rb"))
    return open(p, "rb")  # noqa: SIM115 - the caller closes it


class _PastLimit(DataError):
    pass


def digest(p: Path, limit: int | None = None) -> Digest:
    """sha256, size and line count of the text in ``p`` (plain, or gzip, bzip2 or xz).

    ``limit``: the most bytes of text to read; a DataError past it (a few megabytes of xz or
    gzip can unpack to terabytes, read for hours only to fail their checksum)."""
    try:
        with _open_text(p) as f:
            return _digest_text(f, p, limit)
    except (OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error) as exc:
        # (a gzip copy damaged inside its compressed data raises zlib.error, no OSError)
        raise DataError(f"cannot read {p}: {exc}") from None


def _digest_text(f: IO[bytes], p: Path, limit: int | None) -> Digest:
    """:func:`digest` of the text read from ``f`` (of ``p``, for the messages)."""
    h = hashlib.sha256()
    size = lines = 0
    last = b""
    for block in iter(lambda: f.read(_BLOCK), b""):
        h.update(block)
        size += len(block)
        if limit is not None and size > limit:
            raise _PastLimit(f"{p} holds more than {limit:,} bytes of text, more "
                             "than a copy of this data set can be; refusing it")
        lines += block.count(b"\n")
        last = block[-1:]
    if size and last != b"\n":
        lines += 1
    return Digest(h.hexdigest(), size, lines)


class _Tee(io.RawIOBase):
    """The bytes of ``src``, each also written to ``out`` as it is read: a copy made by the
    same pass that reads it (through a decompressor) for its checksum. ``head``: bytes already
    read from ``src``, given first."""

    def __init__(self, src: IO[bytes], out: _Writer, head: bytes):
        self._src, self._out, self._head = src, out, head

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._head:
            data, self._head = self._head[:len(view)], self._head[len(view):]
        else:
            data = self._src.read(len(view))
        self._out.write(data)
        view[:len(data)] = data
        return len(data)


def _copy_digest(src: Path, out: _Writer, limit: int | None) -> tuple[Digest, str]:
    """Copy ``src`` to ``out`` and take the :func:`digest` of its text in the same pass (the
    file is read once: the copy is the bytes checked, even where ``src`` changes meanwhile);
    with the suffix of its compression. A DataError where it cannot be read, and
    :class:`_PastLimit` past ``limit`` (the copy then stops there)."""
    try:
        with open(src, "rb") as raw:
            head = raw.read(6)
            kind = next((suffix for suffix, magic, _ in _COMPRESSED if head.startswith(magic)),
                        "")
            tee = io.BufferedReader(_Tee(raw, out, head), _BLOCK)
            text: IO[bytes] = tee
            if kind == ".gz":
                text = cast(IO[bytes], gzip.GzipFile(fileobj=tee, mode="rb"))
            elif kind == ".bz2":
                text = cast(IO[bytes], bz2.BZ2File(tee))
            elif kind == ".xz":
                text = cast(IO[bytes], lzma.LZMAFile(tee))  # noqa: SIM115 - reads tee only
            got = _digest_text(text, src, limit)
            while tee.read(_BLOCK):  # what the decompressor left unread (padding) is copied too
                pass
    except (OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"cannot read {src}: {exc}") from None
    return got, kind


def _recorded_path() -> Path:
    return cache_dir() / "datasets" / "recorded.json"


def _damaged_record(why: str) -> DataError:
    return DataError(f"the checksums recorded on first fetch ({_recorded_path()}) are damaged "
                     f"({why}); delete that file to record them again from a copy you trust")


def _recorded() -> dict[str, Any]:
    """What first fetches recorded (nothing where no file is there yet). A damaged record is
    refused, not taken as empty: that would trust the next copy of any of its data sets."""
    path = _recorded_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # (a file in place of its folder: none)
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise _damaged_record(f"cannot be read: {getattr(exc, 'strerror', None) or exc}"
                              ) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise _damaged_record("not valid JSON") from None
    if not isinstance(data, dict):
        raise _damaged_record("not a JSON object")
    for name, rec in data.items():
        if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
                and len(rec["sha256"]) == 64 and type(rec.get("text_bytes")) is int
                and isinstance(rec.get("source"), str)):
            raise _damaged_record(f"the entry for {name!r} is not a sha256, a size and a source")
    return data


def expected(ds: Dataset) -> tuple[str | None, int | None, str]:
    """(sha256, text bytes, where the figures come from) to check a copy of ``ds`` against."""
    if ds.sha256 is not None:
        return ds.sha256, ds.text_bytes, "registry"
    rec = _recorded().get(ds.name)
    if rec:
        return rec["sha256"], rec["text_bytes"], f"recorded on first fetch from {rec['source']}"
    return None, None, "unknown"


def verify(ds: Dataset, p: Path) -> Digest:
    """Check ``p`` against the registry (or what the first fetch recorded); raise if it differs."""
    return _checked(ds, p, lambda limit: digest(p, limit), p)


def _checked(ds: Dataset, p: Path, take: Callable[[int], Digest], text: Path) -> Digest:
    """:func:`verify` of the copy ``p`` whose digest ``take(limit)`` reads; ``text``: where its
    text can be read again (``p``, or the copy of it made as it was read)."""
    sha, size, origin = expected(ds)
    try:
        got = take(size if size is not None else UNKNOWN_SIZE_LIMIT)
    except _PastLimit as exc:
        if sha is None:
            raise
        # past the expected size the rest need not be read (a decompression bomb): it differs
        found = f"more than {size:,} bytes" if size is not None else str(exc)
        raise _different(ds, p, found, sha, size, origin) from None
    if sha is None:
        _check_parses(ds, text, shown=p)
        if ds.records is not None and got.records != ds.records:
            # trusted on first use, a cut-short copy (an interrupted download, a sample) was
            # recorded as the data set, and every whole copy after it refused as different
            raise DataError(f"{p} holds {got.records:,} lines; the published {ds.name} has "
                            f"{ds.records:,} records: a cut-short or different copy, not "
                            "recorded; refusing it")
        return got
    if got.sha256 != sha or (size is not None and got.text_bytes != size):
        raise _different(ds, p, f"sha256 {got.sha256[:12]}…, {got.text_bytes:,} bytes", sha,
                         size, origin)
    return got


def _different(ds: Dataset, p: Path, found: str, sha: str, size: int | None,
               origin: str) -> DataError:
    return DataError(f"{p} is not the expected {ds.name} ({found}; {origin}: {sha[:12]}…"
                     + (f", {size:,} bytes" if size is not None else "")
                     + "): a modified or different copy; refusing it")


def _check_parses(ds: Dataset, p: Path, shown: Path | None = None) -> None:
    """Without a checksum, at least make sure the file is the right kind of data (``shown``:
    the name to give ``p`` in the message)."""
    from .formats import get_format

    with _open_text(p) as f:
        head = f.read(64 << 10)
    p = shown or p
    head = head[: head.rfind(b"\n") + 1] or head
    result = get_format(ds.format).parse(head)
    if result.lines == 0 or result.rejects.num_rows > result.lines // 10:
        raise DataError(f"{p} does not look like {ds.name} ({ds.format} records): "
                        f"{result.rejects.num_rows} of its first {result.lines} lines are not "
                        f"{ds.format} records; refusing it")


def _record(ds: Dataset, got: Digest, source: str) -> None:
    """Trust on first use: remember the figures of a data set the registry has none for."""
    if ds.sha256 is not None or ds.name in _recorded():
        return
    data = _recorded()
    data[ds.name] = {"sha256": got.sha256, "text_bytes": got.text_bytes,
                     "records": got.records, "source": source,
                     "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    from .sinks import replace_file

    target = _recorded_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_file(target, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    except OSError as exc:  # a full disk, a read-only cache: the record as it was
        raise DataError(f"cannot record the checksum of {ds.name} in {target}: "
                        f"{exc.strerror or exc}") from None


# ---- getting a copy --------------------------------------------------------------------------

#: The temporary files of fetches: a copy from ``--from DIR`` (``.FILE.XXXXXXXX.part``) and a
#: download (``.NAME.XXXXXXXX.download``), in the cache folder of their data set.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.(?:part|download)")


class _Temp:
    """A new hidden temporary file in ``folder``, removed by :meth:`close` (Ctrl-C and SIGTERM
    run it: see :func:`_fetch_one`), and locked (``flock``) for as long as its fetch runs: the
    kernel lets go of the lock however the process ends, so the next fetch knows one left by
    a fetch killed outright (SIGKILL, the OOM killer) and removes it
    (:func:`_clear_abandoned`). Before, each such kill left a copy of up to the whole file in
    the cache for good."""

    def __init__(self, folder: Path, prefix: str, suffix: str):
        while True:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
            path = Path(name)
            try:
                import fcntl
            except ImportError:  # (Windows: abandoned ones are told by their age alone)
                break
            # a fetch clearing abandoned files may take the file before it is locked here
            # and remove it: locked once it has let go, the name is checked, and on removal
            # another is made
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.path.samestat(os.fstat(fd), path.stat()):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd: int | None = fd
        self.path = path

    def close(self, keep: bool = False) -> None:
        """Remove the file (``keep``: it has been moved into place) and let go of it; again
        does nothing."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if not keep:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _clear_abandoned(folder: Path) -> None:
    """Remove the temporary files of fetches killed outright from ``folder``: those whose lock
    nobody holds (where there is no ``flock``, those older than an hour)."""
    from .sinks import STALE_TMP_S

    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None  # type: ignore[assignment]
    try:
        names = [p for p in folder.iterdir() if _TEMP_NAME.fullmatch(p.name)]
    except OSError:  # (no folder yet)
        return
    for p in names:
        try:
            if fcntl is None:
                if time.time() - p.lstat().st_mtime > STALE_TMP_S:
                    p.unlink()
                continue
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # gone meanwhile (its fetch ended), or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), p.lstat()):
                p.unlink()  # (while locked: see _Temp)
        except OSError:  # its fetch is running
            pass
        finally:
            os.close(fd)


class _WriteFailed(Exception):
    """Writing the copy failed (a full disk): not the source's fault, so not an OSError, which
    reading it through a decompressor would report as the source's."""

    def __init__(self, exc: OSError):
        super().__init__(exc.strerror or str(exc))


def _store(ds: Dataset, src: Path, source: str, move: bool) -> Path:
    """Verify ``src`` and put it into the cache under its proper name; returns the new path.

    ``move``: ``src`` is a download of this process's own, in the cache folder already. Else
    ``src`` (``--from DIR``) is copied into the cache in the same pass that reads it for its
    checksum: it was read whole twice before (once to check, once to copy, and the copy once
    more to make sure it was the file checked), and the copy is the bytes checked however
    ``src`` changes meanwhile. The copy is moved into place only when it checks out."""
    dest_dir, made = _cache_folder(ds)
    tmp: _Temp | None = None
    stored = False
    try:
        if move:
            got = verify(ds, src)
            dest = dest_dir / (ds.text_name + _compression(src))
            os.replace(src, dest)
        else:
            # a name of its own: two fetches of one data set at once each write their own copy
            tmp = _Temp(dest_dir, f".{ds.text_name}.", ".part")
            kinds: list[str] = []

            def copy(limit: int) -> Digest:
                assert tmp is not None and tmp.fd is not None
                with os.fdopen(tmp.fd, "wb", closefd=False) as out:
                    got, kind = _copy_digest(src, _Writer(out), limit)
                kinds.append(kind)
                return got

            got = _checked(ds, src, copy, tmp.path)
            dest = dest_dir / (ds.text_name + kinds[0])
            os.replace(tmp.path, dest)
            tmp.close(keep=True)
        stored = True
    except _WriteFailed as exc:
        raise DataError(f"cannot store {ds.name} in the cache at {dest_dir}: {exc}") from None
    except OSError as exc:  # a full disk, a read-only cache: no partial copy is left behind
        raise _cannot_store(ds, dest_dir, exc) from None
    finally:
        if tmp is not None:
            tmp.close()
        if made and not stored:
            with contextlib.suppress(OSError):
                dest_dir.rmdir()
    for name in ds.candidates():  # one copy per data set
        if name != dest.name:
            (dest_dir / name).unlink(missing_ok=True)
    try:
        _record(ds, got, source)
    except DataError as exc:  # a copy kept without its record would be trusted unchecked
        dest.unlink(missing_ok=True)
        raise DataError(f"{exc}; {ds.name} was not stored") from None
    return dest


def _cannot_store(ds: Dataset, folder: Path, exc: OSError) -> DataError:
    return DataError(f"cannot store {ds.name} in the cache at {folder}: "
                     f"{exc.strerror or exc}")


def _cache_folder(ds: Dataset) -> tuple[Path, bool]:
    """The cache folder of ``ds``'s group, made where it is not there yet (and whether it was
    made here: a copy refused leaves no empty folder). A cache that cannot be made (a file in
    its place, a folder that cannot be written) is a DataError in one line: it ended fetch in
    a traceback, before any copy was read or download begun."""
    folder = cache_dir() / "datasets" / ds.group
    try:
        made = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_store(ds, folder, exc) from None
    return folder, made


class _Writer:
    """``out``, whose write failures are :class:`_WriteFailed`."""

    def __init__(self, out: IO[bytes]):
        self._out = out

    def write(self, data: bytes) -> None:
        try:
            self._out.write(data)
        except OSError as exc:
            raise _WriteFailed(exc) from None


#: Most bytes a download may take where the text's size is not known.
UNKNOWN_SIZE_LIMIT = 4 << 30


def download_limit(ds: Dataset) -> int:
    """The most bytes a download of ``ds`` may take: its text's size (a gzipped copy is
    smaller, but for a header of some bytes) plus 1 MiB, where that size is known."""
    _sha, size, _origin = expected(ds)
    return size + (1 << 20) if size is not None else UNKNOWN_SIZE_LIMIT


def _download(ds: Dataset, progress: bool) -> Path:
    import http.client
    import urllib.error
    import urllib.request
    from contextlib import nullcontext

    from . import __version__
    from .progress import byte_progress

    part_dir, _made = _cache_folder(ds)
    failures: list[str] = []
    limit = download_limit(ds)
    for url in ds.urls:
        try:
            temp = _Temp(part_dir, f".{ds.name}.", ".download")
        except OSError as exc:  # (a cache folder that cannot be written to)
            raise _cannot_store(ds, part_dir, exc) from None
        tmp = temp.path
        try:
            req = urllib.request.Request(url, headers={"User-Agent": f"deepwatch/{__version__}"})
            assert temp.fd is not None
            with os.fdopen(temp.fd, "wb", closefd=False) as out, \
                    urllib.request.urlopen(req, timeout=30) as resp:
                total = resp.headers.get("Content-Length")
                size = int(total) if total and total.isdigit() else None
                bar = byte_progress(ds.name, size) if progress else nullcontext()
                if size is not None and size > limit:
                    raise DataError(f"the server offers {size:,} bytes, more than the "
                                    f"{limit:,} a copy of it can be")
                got = 0
                with bar as advance:
                    for block in iter(lambda: resp.read(_BLOCK), b""):
                        got += len(block)
                        if got > limit:  # a broken mirror or an attacker: not the disk's end
                            raise DataError(f"the download ran past {limit:,} bytes, more "
                                            "than a copy of it can be; stopped")
                        out.write(block)
                        if advance is not None:
                            advance(len(block))
                if size is not None and got != size:
                    # the connection closed early: a first fetch would trust a cut copy
                    raise DataError(f"the download ended after {got:,} of the {size:,} bytes "
                                    "the server announced (cut short)")
            stored = _store(ds, tmp, url, move=True)
            temp.close(keep=True)  # (moved into place: the name is no longer its)
            return stored
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {reason}")
        except http.client.HTTPException as exc:
            # not an OSError: a server that answers with no HTTP (BadStatusLine), a header
            # line past http.client's limit (LineTooLong), a chunked body cut short
            # (IncompleteRead) ended the fetch in a traceback, the next URL untried
            failures.append(f"{url}: not a whole HTTP answer ({_http_problem(exc)})")
        except DataError as exc:
            failures.append(f"{url}: {exc}")
        finally:
            temp.close()
    raise DataError(f"cannot download {ds.name} (no internet, or its servers are unreachable: "
                    f"{'; '.join(failures)}); copy it from a local directory with "
                    f"`deepwatch datasets fetch {ds.name} --from DIR` (in Python: "
                    f"fetch({ds.name!r}, from_dir=DIR))")


def _http_problem(exc: Exception) -> str:
    """What http.client found wrong with a server's answer, in one short line (the detail
    may be the server's own bytes: shown as a Python literal, cut)."""
    from .errors import first_line

    detail = first_line(exc, limit=60, default="")
    if detail.startswith(type(exc).__name__):  # (IncompleteRead's text is its repr)
        detail = detail[len(type(exc).__name__):].strip("()")
        return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"{type(exc).__name__}: {detail!r}" if detail else type(exc).__name__


def _fetch_one(ds: Dataset, from_dir: str | None, progress: bool) -> Path:
    """Fetch ``ds``. SIGTERM stops it as Ctrl-C does, through the removal of the temporary
    file it was writing: it ended the process where it stood, and left that file behind."""
    from .errors import sigterm_stops_cleanly

    _clear_abandoned(cache_dir() / "datasets" / ds.group)
    with sigterm_stops_cleanly():
        return _fetch_from(ds, from_dir, progress)


def _fetch_from(ds: Dataset, from_dir: str | None, progress: bool) -> Path:
    if from_dir is not None:
        root = Path(from_dir).expanduser()
        if not root.is_dir():
            raise UsageError(f"from_dir (--from) {from_dir}: no such directory")
        src = _look_in(ds, root)
        if src is None:
            raise InputError(f"no copy of {ds.name} in {from_dir} (looked for "
                            f"{', '.join(ds.candidates())}, also under {ds.group}/)")
        return _store(ds, src, str(src.resolve()), move=False)
    here = find(ds.name)
    if here is not None:
        got = verify(ds, here)
        _record(ds, got, str(here.resolve()))
        return here
    return _download(ds, progress)


def fetch(name: str, from_dir: str | os.PathLike[str] | None = None,
          progress: bool = False) -> list[Path]:
    """Make a data set (or each of a group) available locally and verified; returns the paths.

    With ``from_dir`` the copy found there is verified and copied into the cache; otherwise a copy
    already under ``$DEEPWATCH_DATA`` or in the cache is verified, else the file is downloaded.
    The work is done by the call (it was a generator: ``fetch("kdd99-corrected")`` on its own
    line did nothing, and an unknown name was not even refused).
    """
    return list(iter_fetch(name, from_dir, progress))


def iter_fetch(name: str, from_dir: str | os.PathLike[str] | None = None,
               progress: bool = False) -> Iterator[Path]:
    """:func:`fetch`, yielding each data set's path as soon as it is there (a group's first
    before its second is downloaded). The name is checked before anything is yielded."""
    sets = _expand(name)
    check_flags(progress=progress)
    from_text = os.fspath(from_dir) if from_dir is not None else None
    return (_fetch_one(ds, from_text, progress) for ds in sets)


# ---- describing ------------------------------------------------------------------------------

def _status(ds: Dataset) -> str:
    here = find(ds.name)
    return f"at {here}" if here else "not here: `deepwatch datasets fetch` it"


def describe(ds: Dataset) -> list[str]:
    sha, size, origin = expected(ds)
    if sha is None:
        check = ("sha256 and size unknown to this registry (file not seen when it was written); "
                 "the first fetch records them, later copies are checked against that")
    else:
        check = f"sha256 {sha} ({origin})"
    size_txt = f"{size / 1e6:,.1f} MB text" if size else "size unknown"
    records = f"{ds.records:,} records" if ds.records else "records unknown"
    if ds.sha256 is None and ds.records:
        records += " (published)"
    return [f"{ds.name:<17} {ds.description}",
            f"{'':<17} file {ds.text_name} · format {ds.format} · {records} · {size_txt}",
            f"{'':<17} {check}",
            *(f"{'':<17} url {u}" for u in ds.urls),
            *([f"{'':<17} home {ds.home}"] if ds.home else []),
            f"{'':<17} {_status(ds)}"]


def describe_all() -> list[str]:
    """Lines for ``deepwatch datasets list``."""
    data = os.environ.get("DEEPWATCH_DATA") or "(unset)"
    lines = [f"data sets (DEEPWATCH_DATA {data}, cache {cache_dir() / 'datasets'}); "
             "sizes and sha256 are of the uncompressed text"]
    for ds in DATASETS.values():
        lines += describe(ds)
    lines.append("groups: " + "; ".join(f"{g} = {', '.join(m)}" for g, m in GROUPS.items()))
    return lines


__all__ = ["DATASETS", "GROUPS", "Dataset", "Digest", "cache_dir", "describe_all", "digest",
           "fetch", "find", "get", "iter_fetch", "path", "verify"]
