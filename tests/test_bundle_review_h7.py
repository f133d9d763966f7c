"""Review h7: model bundles and the data set registry, as a hostile or broken peer meets them."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import data_file

from deepwatch import datasets
from deepwatch.cli import main

# ---- datasets fetch: servers whose answer is not HTTP ------------------------------------------

#: What a broken (or hostile) server answers, one per connection, in turn.
_ANSWERS = {
    # no HTTP at all: a port that speaks another protocol (http.client's BadStatusLine)
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    # a header line past http.client's limit (LineTooLong)
    "long-header": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
    # a chunked body whose connection closes inside a chunk (IncompleteRead)
    "cut-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n"
                  + b"0,tcp,http,SF,181,5450\n" * 10),
}


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPWATCH_CACHE", str(cache))
    monkeypatch.delenv("DEEPWATCH_DATA", raising=False)
    return cache


@pytest.fixture
def broken_server() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback server answering each connection with the next bytes of its list (a good
    HTTP answer may be among them), then closing it: its base URL and that list."""
    listener = socket.create_server(("127.0.0.1", 0))
    answers: list[bytes] = []
    listener.settimeout(0.05)  # (to see the stop)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                conn.recv(65536)
                if answers:
                    conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", answers
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def _point_at(monkeypatch: pytest.MonkeyPatch, name: str, *urls: str) -> None:
    ds = dataclasses.replace(datasets.DATASETS[name], urls=urls)
    monkeypatch.setitem(datasets.DATASETS, name, ds)


@pytest.mark.parametrize("answer", sorted(_ANSWERS))
def test_a_server_that_does_not_answer_http_is_one_line_not_a_traceback(
        answer: str, broken_server: tuple[str, list[bytes]], isolated: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    base, answers = broken_server
    answers.append(_ANSWERS[answer])
    _point_at(monkeypatch, "nslkdd-train", f"{base}/KDDTrain+.txt")
    assert main(["datasets", "fetch", "nslkdd-train"]) == 4
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "cannot download nslkdd-train" in err and "not a whole HTTP answer" in err
    assert "--from DIR" in err
    # nothing kept, nothing trusted on first use
    group = isolated / "datasets" / "nslkdd"
    assert not group.exists() or not any(group.iterdir())
    assert not (isolated / "datasets" / "recorded.json").exists()


def test_a_broken_answer_falls_back_to_the_next_url(
        broken_server: tuple[str, list[bytes]], isolated: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    body = data_file("nslkdd/KDDTest+.txt.gz").read_bytes()
    base, answers = broken_server
    answers += [_ANSWERS["not-http"],
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body]
    _point_at(monkeypatch, "nslkdd-test", f"{base}/first/KDDTest+.txt",
              f"{base}/mirror/KDDTest+.txt.gz")
    (got,) = datasets.fetch("nslkdd-test")
    assert got == isolated / "datasets" / "nslkdd" / "KDDTest+.txt.gz"
    assert got.read_bytes() == body



@pytest.mark.parametrize("how", ["--from", "download"])
def test_a_cache_that_cannot_be_made_is_one_line_not_a_traceback(
        how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """DEEPWATCH_CACHE naming a file: making the data set's folder in it raised
    NotADirectoryError out of fetch (a traceback, exit 1), and `datasets list` called the
    record of first fetches, which cannot be there, damaged."""
    cache = tmp_path / "cache"
    cache.write_text("not a folder\n")
    monkeypatch.setenv("DEEPWATCH_CACHE", str(cache))
    monkeypatch.delenv("DEEPWATCH_DATA", raising=False)
    if how == "--from":
        copy = tmp_path / "copy"
        copy.mkdir()
        (copy / "KDDTest+.txt.gz").write_bytes(data_file("nslkdd/KDDTest+.txt.gz").read_bytes())
        argv = ["datasets", "fetch", "nslkdd-test", "--from", str(copy)]
    else:
        with socket.socket() as s:  # a loopback port nobody listens on
            s.bind(("127.0.0.1", 0))
            _point_at(monkeypatch, "nslkdd-test",
                      f"http://127.0.0.1:{s.getsockname()[1]}/KDDTest+.txt")
        argv = ["datasets", "fetch", "nslkdd-test"]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert err == (f"error: cannot store nslkdd-test in the cache at {cache}/datasets/nslkdd: "
                   "Not a directory\n"), err
    assert cache.read_text() == "not a folder\n"
    assert main(["datasets", "list"]) == 0
    assert "nslkdd-test" in capsys.readouterr().out

# ---- bundles: file names in the manifest ---------------------------------------------------------

@pytest.mark.parametrize("name", ["weights.bin\nerror: none; the bundle checks out",
                                  "weights\x1b[2K\x1b[1Gbin", "weights\u2028bin"])
def test_a_manifest_file_name_with_a_control_character_is_refused_in_one_line(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A name holding a line break or a terminal escape went out raw in 'bundle ... is
    missing NAME': the error ran on to a second line of the bundle's own words, or moved the
    cursor in the user's terminal. Nothing is read before the names are checked."""
    import hashlib
    import json

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    files = {}
    for part in ("featurizer.json", "weights.safetensors"):
        (bundle / part).write_bytes(b"{}")
        files[part] = hashlib.sha256(b"{}").hexdigest()
    files[name] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "deepwatch_version": "0.1.0", "model_kind": "mlp",
         "files": files}))
    records = tmp_path / "in.csv"
    records.write_text("0,tcp,http,SF,181,5450" + ",0" * 35 + ",normal.\n")
    assert main(["score", str(bundle), "--format", "kdd", "--out",
                 str(tmp_path / "out.jsonl"), str(records)]) == 3
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "\x1b" not in err and "\u2028" not in err
    assert err.startswith(f"error: {bundle / 'manifest.json'} names a file with a control "
                          f"character in its name ({name!r})"), err
    assert not (tmp_path / "out.jsonl").exists()
