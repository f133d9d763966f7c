"""The data set registry: listing, fetching from a directory or a (loopback) server, checksums."""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import http.server
import lzma
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import data_file

from deepwatch import datasets
from deepwatch.cli import main
from deepwatch.errors import DataError, InputError, UsageError

NSL_TEST = "nslkdd/KDDTest+.txt.gz"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, and no DEEPWATCH_DATA unless a test sets one."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPWATCH_CACHE", str(cache))
    monkeypatch.delenv("DEEPWATCH_DATA", raising=False)
    return cache


@pytest.fixture(scope="module")
def nsl_test_gz() -> Path:
    return data_file(NSL_TEST)


def test_registry_knows_the_public_files() -> None:
    names = {d.text_name for d in datasets.DATASETS.values()}
    assert {"kddcup.data_10_percent", "corrected", "KDDTrain+.txt", "KDDTrain+_20Percent.txt",
            "KDDTest+.txt", "KDDTest-21.txt"} <= names
    for ds in datasets.DATASETS.values():
        assert ds.urls and all(u.startswith(("http://", "https://")) for u in ds.urls)
        assert (ds.sha256 is None) == (ds.text_bytes is None)
        assert ds.sha256 is None or len(ds.sha256) == 64
    assert datasets.get("corrected.gz").name == "kdd99-corrected"
    assert datasets.get("KDDTest+").name == "nslkdd-test"
    with pytest.raises(UsageError, match="unknown data set 'kdd2000'"):
        datasets.get("kdd2000")


@pytest.mark.parametrize("rel,name", [("kddcup99/corrected.gz", "kdd99-corrected"),
                                      ("nslkdd/KDDTrain+_20Percent.txt.gz", "nslkdd-train20"),
                                      (NSL_TEST, "nslkdd-test")])
def test_registry_checksums_match_the_shared_copies(rel: str, name: str) -> None:
    ds = datasets.get(name)
    got = datasets.verify(ds, data_file(rel))
    assert (got.sha256, got.text_bytes, got.records) == (ds.sha256, ds.text_bytes, ds.records)


def test_list_shows_every_data_set_and_where_it_is(
        nsl_test_gz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    (data / "nslkdd").mkdir(parents=True)
    shutil.copy(nsl_test_gz, data / "nslkdd")
    monkeypatch.setenv("DEEPWATCH_DATA", str(data))
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    for name in datasets.DATASETS:
        assert name in out
    assert f"at {data / NSL_TEST}" in out
    assert "sha256 6ff4e09deee2" in out
    # files the registry has no checksum for say so
    assert out.count("unknown to this registry") == 2


def test_fetch_from_directory_verifies_and_caches(
        nsl_test_gz: Path, tmp_path: Path, isolated: Path) -> None:
    src = tmp_path / "downloads"
    src.mkdir()
    shutil.copy(nsl_test_gz, src / "KDDTest+.txt.gz")
    (got,) = datasets.fetch("nslkdd-test", from_dir=str(src))
    assert got == isolated / "datasets" / "nslkdd" / "KDDTest+.txt.gz"
    assert got.read_bytes() == nsl_test_gz.read_bytes()
    # now found without DEEPWATCH_DATA, through the cache
    assert datasets.path("nslkdd-test") == got


def test_fetch_accepts_a_plain_copy(nsl_test_gz: Path, tmp_path: Path, isolated: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "plain"
    (src / "nslkdd").mkdir(parents=True)
    (src / "nslkdd" / "KDDTest+.txt").write_bytes(gzip.decompress(nsl_test_gz.read_bytes()))
    assert main(["datasets", "fetch", "nslkdd-test", "--from", str(src)]) == 0
    dest = isolated / "datasets" / "nslkdd" / "KDDTest+.txt"
    assert capsys.readouterr().out.strip() == str(dest)
    assert datasets.digest(dest).sha256 == datasets.get("nslkdd-test").sha256


@pytest.mark.parametrize("suffix,compress", [(".bz2", "bz2"), (".xz", "lzma")])
def test_fetch_accepts_bzip2_and_xz_copies(suffix: str, compress: str, nsl_test_gz: Path,
                                           tmp_path: Path, isolated: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The registry's checksums are of the text, so a copy recompressed with bzip2 or xz checks
    out as the original does; it is kept as it came, found again, and replaces an older copy."""
    import importlib

    text = gzip.decompress(nsl_test_gz.read_bytes())
    # (bzip2 with padding after its stream, which its reader skips: copied all the same)
    packed = importlib.import_module(compress).compress(text) + bytes(64 if compress == "bz2"
                                                                      else 0)
    cached = isolated / "datasets" / "nslkdd"
    cached.mkdir(parents=True)
    shutil.copy(nsl_test_gz, cached / "KDDTest+.txt.gz")  # an older copy in the cache
    src = tmp_path / "recompressed"
    src.mkdir()
    (src / f"KDDTest+.txt{suffix}").write_bytes(packed)
    assert main(["datasets", "fetch", "nslkdd-test", "--from", str(src)]) == 0
    dest = cached / f"KDDTest+.txt{suffix}"
    assert capsys.readouterr().out.strip() == str(dest)
    assert dest.read_bytes() == packed
    assert sorted(p.name for p in cached.iterdir()) == [dest.name]  # one copy per data set
    assert datasets.path("nslkdd-test") == dest
    assert datasets.digest(dest).sha256 == datasets.get("nslkdd-test").sha256
    assert datasets.get(f"KDDTest+.txt{suffix}").name == "nslkdd-test"
    # a damaged copy is refused in one line, and the good one stays
    bad = tmp_path / "damaged"
    bad.mkdir()
    (bad / f"KDDTest+.txt{suffix}").write_bytes(packed[: len(packed) // 2])
    assert main(["datasets", "fetch", "nslkdd-test", "--from", str(bad)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert dest.read_bytes() == packed


def test_tampered_copy_is_refused(nsl_test_gz: Path, tmp_path: Path, isolated: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    text = gzip.decompress(nsl_test_gz.read_bytes())
    tampered = text.replace(b",neptune,", b",apache2,", 1)  # same size, still parses
    assert tampered != text and len(tampered) == len(text)
    src = tmp_path / "bad"
    src.mkdir()
    (src / "KDDTest+.txt").write_bytes(tampered)
    assert main(["datasets", "fetch", "nslkdd-test", "--from", str(src)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "refusing it" in err and len(err.splitlines()) == 1
    assert not (isolated / "datasets" / "nslkdd").exists() or not any(
        (isolated / "datasets" / "nslkdd").iterdir())


def test_a_damaged_gzip_copy_in_the_cache_is_one_clear_line(
        nsl_test_gz: Path, isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the gzip header is intact; the deflate data is not (zlib.error, no OSError, was a traceback)
    damaged = bytearray(nsl_test_gz.read_bytes())
    damaged[2000:2100] = bytes(b ^ 0xFF for b in damaged[2000:2100])
    cached = isolated / "datasets" / "nslkdd"
    cached.mkdir(parents=True)
    (cached / "KDDTest+.txt.gz").write_bytes(bytes(damaged))
    assert main(["datasets", "fetch", "nslkdd-test"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read ") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("pack", [gzip.compress, lzma.compress])
def test_a_decompression_bomb_is_refused_once_past_the_size_a_copy_can_be(
        pack: Callable[[bytes], bytes], tmp_path: Path, isolated: Path) -> None:
    """A few kilobytes that unpack to more text than the data set holds: reading stops at its
    registered size (it went on to the end, gigabytes for a few megabytes of gzip)."""
    src = tmp_path / "src"
    src.mkdir()
    size = datasets.get("nslkdd-test").text_bytes
    assert size is not None
    (src / "KDDTest+.txt.gz").write_bytes(pack(bytes(3 * size)))
    with pytest.raises(DataError,
                       match=rf"not the expected nslkdd-test \(more than {size:,} bytes;"):
        datasets.fetch("nslkdd-test", from_dir=src)
    assert not (isolated / "datasets" / "nslkdd").exists()


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child: writing past ``limit`` bytes fails as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_copy_that_cannot_be_written_leaves_nothing_in_the_cache(
        nsl_test_gz: Path, tmp_path: Path, isolated: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(nsl_test_gz, src / "KDDTest+.txt.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "deepwatch", "datasets", "fetch", "nslkdd-test", "--from",
         str(src)], capture_output=True, text=True, timeout=120,
        preexec_fn=_file_size_limit(100_000))
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: cannot store nslkdd-test in the cache")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (isolated / "datasets" / "nslkdd").exists()  # (its folder, made for it, too)


def test_the_copy_is_made_as_it_is_checked_and_no_other_fetch_is_clobbered(
        nsl_test_gz: Path, tmp_path: Path, isolated: Path) -> None:
    """``--from DIR`` read the file whole to check it, then again to copy it (and the copy a
    third time, to make sure it was the file checked): now the copy is made by the pass that
    checks it, and moved into place only then. Every fetch writes its own ``.part``, locked
    while it runs: another fetch's, under way, is left alone."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(nsl_test_gz, src / "KDDTest+.txt.gz")
    cache = isolated / "datasets" / "nslkdd"
    cache.mkdir(parents=True)
    other = cache / ".KDDTest+.txt.ab12cd34.part"  # another fetch's copy, under way
    other.write_bytes(b"another fetch's bytes")
    opened: list[str] = []
    watched = str(src / "KDDTest+.txt.gz")
    sys.addaudithook(lambda event, args: opened.append(event) if event == "open"
                     and args and str(args[0]) == watched else None)
    with open(other, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        (got,) = datasets.fetch("nslkdd-test", from_dir=str(src))
    assert len(opened) == 1  # read once (four times before: twice for its first bytes)
    watched = ""  # (the hook stays for the session: it is made to match nothing)
    assert got.read_bytes() == nsl_test_gz.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == sorted([got.name, other.name])
    assert other.read_bytes() == b"another fetch's bytes"
    # a copy that does not check out is not moved into place, and its .part is removed
    (src / "KDDTest+.txt.gz").write_bytes(gzip.compress(b"0,tcp,http,SF,1,1\n" * 50))
    got.unlink()
    with pytest.raises(DataError, match="not the expected nslkdd-test"):
        datasets.fetch("nslkdd-test", from_dir=str(src))
    # (and the other's .part, whose lock nobody holds now, is taken for a killed fetch's)
    assert list(cache.iterdir()) == []


def test_data_dir_is_looked_in_first(nsl_test_gz: Path, tmp_path: Path, isolated: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cached = isolated / "datasets" / "nslkdd"
    cached.mkdir(parents=True)
    shutil.copy(nsl_test_gz, cached / "KDDTest+.txt.gz")
    data = tmp_path / "flat"
    data.mkdir()
    shutil.copy(nsl_test_gz, data / "KDDTest+.txt.gz")  # no group folder: also found
    monkeypatch.setenv("DEEPWATCH_DATA", str(data))
    assert datasets.path("nslkdd-test") == data / "KDDTest+.txt.gz"
    # fetch with a verified local copy at hand neither copies nor downloads
    assert list(datasets.fetch("nslkdd-test")) == [data / "KDDTest+.txt.gz"]
    monkeypatch.delenv("DEEPWATCH_DATA")
    assert datasets.path("nslkdd-test") == cached / "KDDTest+.txt.gz"


def test_missing_data_set_says_how_to_get_it() -> None:
    with pytest.raises(InputError, match="datasets fetch kdd99-corrected"):
        datasets.path("kdd99-corrected")


def test_unknown_checksum_is_recorded_on_first_fetch(
        nsl_test_gz: Path, tmp_path: Path) -> None:
    lines = gzip.decompress(nsl_test_gz.read_bytes()).splitlines(keepends=True)
    first, second = tmp_path / "a", tmp_path / "b"
    n = datasets.get("nslkdd-test21").records  # (copies of the published length: see below)
    assert n is not None
    for d, part in ((first, lines[:n]), (second, lines[-n:])):
        d.mkdir()
        (d / "KDDTest-21.txt").write_bytes(b"".join(part))
    assert datasets.expected(datasets.get("nslkdd-test21"))[0] is None
    (got,) = datasets.fetch("nslkdd-test21", from_dir=str(first))
    sha, size, origin = datasets.expected(datasets.get("nslkdd-test21"))
    assert sha == datasets.digest(got).sha256 and size == got.stat().st_size
    assert origin.startswith("recorded on first fetch")
    with pytest.raises(DataError, match="not the expected nslkdd-test21"):
        list(datasets.fetch("nslkdd-test21", from_dir=str(second)))


def test_a_record_that_cannot_be_written_is_one_line_and_stores_nothing(
        nsl_test_gz: Path, tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The first fetch of a data set the registry has no checksum for records it: where that
    record could not be written (a full disk), a traceback ended the run, and the copy stayed
    in the cache without its record, to be trusted unchecked (the next copy recorded instead)."""
    import errno
    import os

    lines = gzip.decompress(nsl_test_gz.read_bytes()).splitlines(keepends=True)
    n = datasets.get("nslkdd-test21").records
    (tmp_path / "KDDTest-21.txt").write_bytes(b"".join(lines[:n]))
    real_replace = os.replace

    def full_disk(a: str | Path, b: str | Path) -> None:
        if Path(b).name == "recorded.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(a, b)

    monkeypatch.setattr(datasets.os, "replace", full_disk)
    assert main(["datasets", "fetch", "nslkdd-test21", "--from", str(tmp_path)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: cannot record the checksum of nslkdd-test21 in "), err
    assert err.rstrip().endswith("No space left on device; nslkdd-test21 was not stored"), err
    assert len(err.splitlines()) == 1, err
    assert [p.name for p in (isolated / "datasets").rglob("*") if p.is_file()] == []


def test_a_cut_short_copy_is_not_trusted_on_first_use(
        nsl_test_gz: Path, tmp_path: Path, isolated: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without a checksum in the registry, the first copy fetched is recorded: a copy of 1,000
    lines (an interrupted download, a sample) was recorded as KDDTest-21, and the whole file
    fetched later refused as "a modified or different copy". The published record count is
    checked first."""
    lines = gzip.decompress(nsl_test_gz.read_bytes()).splitlines(keepends=True)
    n = datasets.get("nslkdd-test21").records
    assert n is not None
    short, whole = tmp_path / "short", tmp_path / "whole"
    for d, part in ((short, lines[:1000]), (whole, lines[:n])):
        d.mkdir()
        (d / "KDDTest-21.txt").write_bytes(b"".join(part))
    assert main(["datasets", "fetch", "nslkdd-test21", "--from", str(short)]) == 4
    err = capsys.readouterr().err
    assert "holds 1,000 lines; the published nslkdd-test21 has 11,850 records" in err, err
    assert len(err.splitlines()) == 1, err
    assert datasets.expected(datasets.get("nslkdd-test21"))[0] is None  # nothing recorded
    (got,) = datasets.fetch("nslkdd-test21", from_dir=str(whole))
    assert datasets.expected(datasets.get("nslkdd-test21"))[0] == datasets.digest(got).sha256


@pytest.mark.parametrize("text", ['{"nslkdd-test21": {"sha256": "abc"}}',
                                  '{"nslkdd-test21": "x"}', '{"nslkdd-test21": {"sha', "[1]"])
def test_a_damaged_record_of_first_fetches_is_refused_not_forgotten(
        text: str, tmp_path: Path, isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = isolated / "datasets" / "recorded.json"
    record.parent.mkdir(parents=True)
    record.write_text(text)
    (tmp_path / "KDDTest-21.txt").write_text("anything\\n")
    for argv in (["datasets", "list"], ["datasets", "fetch", "nslkdd-test21", "--from",
                                        str(tmp_path)]):
        assert main(argv) == 4
        err = capsys.readouterr().err
        assert err.startswith("error: the checksums recorded on first fetch") and "damaged" in err
        assert len(err.splitlines()) == 1, err
    assert record.read_text() == text  # not overwritten with the new copy's checksum


def test_unknown_checksum_still_refuses_the_wrong_kind_of_file(tmp_path: Path) -> None:
    (tmp_path / "KDDTrain+.txt").write_text("<html><body>Please register</body></html>\n" * 5)
    with pytest.raises(DataError, match="does not look like nslkdd-train"):
        list(datasets.fetch("nslkdd-train", from_dir=str(tmp_path)))
    assert datasets.expected(datasets.get("nslkdd-train"))[0] is None


# ---- downloads, from a real HTTP server on the loopback interface only ----------------------

@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _point_at(monkeypatch: pytest.MonkeyPatch, name: str, *urls: str) -> None:
    ds = dataclasses.replace(datasets.DATASETS[name], urls=urls)
    monkeypatch.setitem(datasets.DATASETS, name, ds)


def test_download_verifies_and_falls_back_to_the_next_url(
        served: tuple[str, Path], nsl_test_gz: Path, isolated: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base, root = served
    (root / "wrong.txt").write_bytes(b"0,tcp,http,SF,1,2\n")  # a different file: refused
    (root / "KDDTest+.txt").write_bytes(gzip.decompress(nsl_test_gz.read_bytes()))
    _point_at(monkeypatch, "nslkdd-test", f"{base}/missing.txt", f"{base}/wrong.txt",
              f"{base}/KDDTest+.txt")
    (got,) = datasets.fetch("nslkdd-test", progress=False)
    assert got == isolated / "datasets" / "nslkdd" / "KDDTest+.txt"
    assert datasets.digest(got).sha256 == datasets.get("nslkdd-test").sha256
    leftovers = [p.name for p in got.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_download_larger_than_the_file_can_be_is_stopped(
        served: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken mirror (or an attacker on plain http) cannot fill the disk: the download stops
    once it is larger than the registered text plus 1 MiB, and leaves nothing behind."""
    base, root = served
    ds = dataclasses.replace(datasets.DATASETS["nslkdd-test"], text_bytes=1000,
                             urls=(f"{base}/big.txt",))
    monkeypatch.setitem(datasets.DATASETS, "nslkdd-test", ds)
    assert datasets.download_limit(ds) == 1000 + (1 << 20)
    (root / "big.txt").write_bytes(b"x" * (3 << 20))
    with pytest.raises(datasets.DataError, match="more than the 1,049,576 a copy of it can be"):
        list(datasets.fetch("nslkdd-test", progress=False))
    part_dir = isolated / "datasets" / "nslkdd"
    assert [p.name for p in part_dir.iterdir()] == []
    # a server that does not say the length is stopped while reading
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "send_header",
                        _drop_length(http.server.SimpleHTTPRequestHandler.send_header))
    with pytest.raises(datasets.DataError, match="ran past 1,049,576 bytes"):
        list(datasets.fetch("nslkdd-test", progress=False))
    assert [p.name for p in part_dir.iterdir()] == []


def test_a_download_cut_short_is_neither_kept_nor_trusted(
        nsl_test_gz: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A server that announces more bytes than it sends before closing: the cut copy (whole
    records, so it parses) was kept and, for a data set the registry has no checksum for,
    recorded as the trusted one on first fetch."""
    body = b"".join(gzip.decompress(nsl_test_gz.read_bytes()).splitlines(keepends=True)[:300])
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 * len(body))
                         + body)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    with listener:
        _point_at(monkeypatch, "nslkdd-train",
                  f"http://127.0.0.1:{listener.getsockname()[1]}/KDDTrain+.txt")
        assert main(["datasets", "fetch", "nslkdd-train"]) == 4
    thread.join(10)
    err = capsys.readouterr().err
    assert f"ended after {len(body):,} of the {10 * len(body):,} bytes" in err, err
    assert len(err.splitlines()) == 1, err
    assert [p.name for p in (isolated / "datasets" / "nslkdd").iterdir()] == []
    assert datasets.expected(datasets.get("nslkdd-train"))[0] is None  # nothing recorded


def _drop_length(send):  # type: ignore[no-untyped-def]
    def without(self, keyword: str, value: str) -> None:  # type: ignore[no-untyped-def]
        if keyword.lower() != "content-length":
            send(self, keyword, value)
    return without


def test_no_internet_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _point_at(monkeypatch, "kdd99-corrected", f"http://127.0.0.1:{port}/corrected.gz")
    assert main(["datasets", "fetch", "kdd99-corrected"]) == 4
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "cannot download kdd99-corrected" in err and "--from DIR" in err


_FETCH_FROM = """
import dataclasses, sys
from deepwatch import datasets
from deepwatch.cli import main
datasets.DATASETS["nslkdd-test"] = dataclasses.replace(datasets.DATASETS["nslkdd-test"],
                                                       urls=(sys.argv[1],))
sys.exit(main(["datasets", "fetch", "nslkdd-test"]))
"""


def _stopped_mid_download(sig: int, nsl_test_gz: Path, isolated: Path) -> tuple[int, str]:
    """A real ``deepwatch datasets fetch`` process sent ``sig`` while it downloads (the server
    sends 2 MiB of the file, then nothing): its exit status and stderr."""
    body = gzip.decompress(nsl_test_gz.read_bytes())
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve_part() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                         + body[:2 << 20])
            done.wait(30)

    thread = threading.Thread(target=serve_part, daemon=True)
    thread.start()
    folder = isolated / "datasets" / "nslkdd"
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/KDDTest+.txt"
    with listener, subprocess.Popen([sys.executable, "-c", _FETCH_FROM, url],
                                    stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size >= 1 << 20 for p in folder.glob(".*.download")):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=30)
        finally:
            done.set()
            if proc.poll() is None:
                proc.kill()
    thread.join(10)
    return proc.returncode, err


def test_a_download_stopped_by_sigterm_leaves_no_part_file(
        nsl_test_gz: Path, isolated: Path) -> None:
    """SIGTERM (``kill``, ``timeout``, a scheduler) ended the process where it stood, and the
    part downloaded stayed in the cache, hidden, for good; it stops now as Ctrl-C does."""
    rc, err = _stopped_mid_download(signal.SIGTERM, nsl_test_gz, isolated)
    assert rc == 143, err
    assert err.strip().splitlines()[-1].startswith("terminated"), err
    assert list((isolated / "datasets" / "nslkdd").iterdir()) == []


def test_the_part_file_of_a_fetch_killed_outright_is_removed_by_the_next(
        nsl_test_gz: Path, tmp_path: Path, isolated: Path) -> None:
    rc, _err = _stopped_mid_download(signal.SIGKILL, nsl_test_gz, isolated)
    assert rc == -signal.SIGKILL
    folder = isolated / "datasets" / "nslkdd"
    [left] = folder.iterdir()  # nothing could remove it then
    assert left.name.startswith(".nslkdd-test.") and left.name.endswith(".download")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(nsl_test_gz, src / "KDDTest+.txt.gz")
    (got,) = datasets.fetch("nslkdd-test", from_dir=str(src))
    assert list(folder.iterdir()) == [got]  # before, each kill left one more for good
