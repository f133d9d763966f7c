"""``serve --workers N --tls-cert/--tls-key``: a certificate and key that break on disk after the
parent checked them (a renewal that has written the certificate and not yet its key, for longer
than a worker's 2 s of retries) while workers start.

Before: each new worker read the files itself, failed with uvicorn's traceback
(KEY_VALUES_MISMATCH), the reload was undone and counted as failed with the renewal never taken,
and a worker that died meanwhile was restarted into the same traceback, again and again. A worker
now loads the pair the parent checked last where the files do not load (one line, no
traceback), as one process keeps the certificate it serves on a reload that finds them broken.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import time
from pathlib import Path

import httpx
import pytest
from test_serve_tls import (
    AUTH,
    _der,
    _kill,
    _put_in_place,
    _serve,
    _stop,
    _trusting,
    _wait_for_line,
    _wait_healthy,
    _worker_pids,
    tls,  # noqa: F401 (the fixture, made again for this module: 0.1 s)
)

pytest.importorskip("uvicorn")
import uvicorn  # noqa: E402

from deepwatch.serve._workers import hand_tls_pair, worker_ssl_context  # noqa: E402
from deepwatch.serve.app import _read_tls_pair  # noqa: E402


def _reloads(url: str, files: dict[str, Path]) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=AUTH, verify=_trusting(files), timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^deepwatch_model_reloads_total\{result="(\w+)"\} (\S+)$', text, re.M)}


def _presented(url: str, files: dict[str, Path]) -> set[bytes]:
    """The certificates (DER) presented on a few fresh connections (both workers, likely)."""
    found = set()
    for _ in range(6):
        with httpx.Client(base_url=url, verify=_trusting(files), timeout=10) as c:
            r = c.get("/healthz")
            assert r.status_code == 200, r.text
            found.add(r.extensions["network_stream"].get_extra_info("ssl_object")
                      .getpeercert(True))
    return found


def _replaced(log: Path, count: int) -> str:
    """The outcome line of the ``count``-th replacement of the workers."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [ln for ln in log.read_text().splitlines()
                 if "every worker replaced" in ln or "not every worker could be replaced" in ln]
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.1)
    raise AssertionError(f"replacement {count} did not end: {log.read_text()}")


@pytest.mark.slow
def test_workers_load_the_pair_checked_though_the_files_break_meanwhile(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """--workers 2, a real server: SIGHUP, the parent checks the pair (whole), then the
    certificate is renewed on disk and its key is not, until the replacement is over. Every
    worker is replaced and serves the pair checked, the reload counted ok, no traceback; a
    worker killed meanwhile comes back serving it too; a reload asked while the pair is still
    broken is refused in one line and counted as failed."""
    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["server.pem"], key=tls["server.key"])
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--workers", "2", "--tls-cert", live / "cert.pem",
                        "--tls-key", live / "key.pem", "--api-key-file", tls["api.key"])
    try:
        url = f"https://127.0.0.1:{port}"
        _wait_healthy(url, proc, log, _trusting(tls))
        # the parent checks the (whole) pair, then the renewal writes the new certificate and
        # leaves the old key: broken until the replacement is over, far past 2 s of retries
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(log, "SIGHUP: replacing the 2 workers")
        _put_in_place(live, cert=tls["renewed.pem"])
        assert "every worker replaced" in _replaced(log, 1), log.read_text()
        assert _presented(url, tls) == {_der(tls["server.pem"])}  # the pair that was checked
        assert _reloads(url, tls) == {"ok": 1.0, "failed": 0.0}
        generations = {httpx.get(url + "/healthz", verify=_trusting(tls), timeout=10
                                 ).json()["generation"] for _ in range(4)}
        assert generations == {2}

        # a worker that dies while the pair on disk is broken comes back with the pair served
        pids = _worker_pids(url, tls, 2)
        gone = min(pids)
        os.kill(gone, signal.SIGKILL)
        deadline = time.monotonic() + 30
        now = pids
        while time.monotonic() < deadline and (gone in now or len(now) != 2):
            with contextlib.suppress(AssertionError):  # only one answers, for now
                now = _worker_pids(url, tls, 2)
        assert gone not in now and len(now) == 2, (now, log.read_text())
        assert _presented(url, tls) == {_der(tls["server.pem"])}

        # a reload while it is still broken: refused in one line, counted, nothing replaced
        proc.send_signal(signal.SIGHUP)
        line = _wait_for_line(log, "reload refused because of the certificate")
        assert "is not the private key of the certificate in" in line, line
        deadline = time.monotonic() + 10
        while _reloads(url, tls)["failed"] != 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _reloads(url, tls) == {"ok": 1.0, "failed": 1.0}
        assert _worker_pids(url, tls, 2) == now
        # (the renewal once done, the next reload takes it: test_serve_tls's symlink test)
        assert _stop(proc) == 0
    finally:
        _kill(proc)
    err = log.read_text()
    assert "Traceback" not in err and "key values mismatch" not in err, err
    assert "not ready in time" not in err and "could be replaced" not in err, err
    # one line for each worker started while the files were broken (two, then the killed one)
    said = [ln for ln in err.splitlines() if "the certificate files do not load now" in ln]
    assert len(said) == 3, err
    tail = ("do not load now (KEY_VALUES_MISMATCH): it serves the certificate checked at the "
            "last reload (or at start) instead")
    assert all(" deepwatch.serve worker " in ln and ln.endswith(tail) for ln in said), said


@pytest.mark.parametrize(("key", "password", "on_disk"), [
    ("server-encrypted.key", "password.txt", "not-pem.txt"),  # renewed, its key cut short
    ("server.key", None, "renewed-encrypted.key"),  # encrypted, no password: never asked for
], ids=["key-cut-short", "key-encrypted-without-password"])
def test_a_worker_loads_the_pair_handed_to_it_where_the_files_do_not_load(
        tls: dict[str, Path], tmp_path: Path, key: str, password: str | None,  # noqa: F811
        on_disk: str) -> None:
    """In one process, as in a worker: uvicorn's Config carrying the pair the parent checked
    loads that pair where the files do not load now (a certificate renewed, its key not yet
    written, or written in part), at once; OpenSSL never asks the terminal for a password."""

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["server.pem"], key=tls[key])
    checked = _read_tls_pair(str(live / "cert.pem"), str(live / "key.pem"),
                             None if password is None else str(tls[password]))
    config = uvicorn.Config(app, ssl_certfile=str(live / "cert.pem"),
                            ssl_keyfile=str(live / "key.pem"),
                            ssl_context_factory=worker_ssl_context)
    hand_tls_pair(config, checked)
    _put_in_place(live, cert=tls["renewed.pem"], key=tls[on_disk])
    started = time.monotonic()
    config.load()
    assert time.monotonic() - started < 1.5  # no retries
    assert isinstance(config.ssl, ssl.SSLContext)
    assert config.ssl_certfile == str(live / "cert.pem")  # the paths given, kept
    assert _served_by(config.ssl, _trusting(tls)) == _der(tls["server.pem"])


def _served_by(server: ssl.SSLContext, client: ssl.SSLContext) -> bytes:
    """The certificate (DER) ``server`` presents in a handshake with ``client``, in memory."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s_side = server.wrap_bio(bios[0], bios[1], server_side=True)
    c_side = client.wrap_bio(bios[2], bios[3], server_hostname="127.0.0.1")
    for _ in range(10):
        for side, out, into in ((c_side, bios[3], bios[0]), (s_side, bios[1], bios[2])):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            into.write(out.read())
    der = c_side.getpeercert(True)
    assert der is not None
    return der
