"""``deepwatch serve --tls-cert/--tls-key`` in one process, on a real server: a certificate
refused at a reload is a failed reload in ``/metrics``, as it is with ``--workers``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve_tls import (  # the throwaway CA and the helpers of the TLS tests
    AUTH,
    _put_in_place,
    _serve,
    _stop,
    _trusting,
    _wait_for_line,
    _wait_healthy,
    started,
    tls,
)

pytest.importorskip("uvicorn")
__all__ = ["started", "tls"]  # fixtures, used by name


def _reloads(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {result: float(value) for result, value in re.findall(
        r'^deepwatch_model_reloads_total\{result="(\w+)"\} (\S+)$', text, re.MULTILINE)}



def _reloads_become(client: httpx.Client, expected: dict[str, float]) -> dict[str, float]:
    """The counts once they are ``expected`` (a SIGHUP's reload runs in a thread of its own and
    is counted just after its log line), or as they are 10 s on."""
    deadline = time.monotonic() + 10
    while (now := _reloads(client)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


@pytest.mark.integration
def test_a_certificate_refused_at_a_reload_is_a_failed_reload(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path,
        started: list[subprocess.Popen[bytes]]) -> None:
    """It was counted failed with --workers (the reload refused) and not at all in one process
    (SIGHUP or POST with a key that is not the certificate's: ok 1, failed 0). Each reload is
    counted once: failed where the bundle or the certificate did not load, ok where both did."""
    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["server.pem"], key=tls["server.key"])
    log = tmp_path / "serve.log"
    proc, port = _serve(kdd_bundle, log, "--tls-cert", live / "cert.pem", "--tls-key",
                        live / "key.pem", "--api-key-file", tls["api.key"])
    started.append(proc)
    url = f"https://127.0.0.1:{port}"
    _wait_healthy(url, proc, log, _trusting(tls))
    with httpx.Client(base_url=url, verify=_trusting(tls), headers=AUTH, timeout=30) as c:
        assert _reloads(c) == {"ok": 0, "failed": 0}
        _put_in_place(live, key=tls["other.key"])  # not the certificate's key
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(log, "SIGHUP: certificate not reloaded")
        assert _reloads_become(c, {"ok": 0, "failed": 1}) == {"ok": 0, "failed": 1}
        r = c.post("/v1/reload")
        assert r.status_code == 200 and r.json()["certificate"]["status"] == "kept", r.text
        assert _reloads(c) == {"ok": 0, "failed": 2}
        r = c.post("/v1/reload", json={"bundle": str(tmp_path / "no-such-bundle")})
        assert r.status_code == 422 and r.json()["certificate"]["status"] == "kept", r.text
        assert _reloads(c) == {"ok": 0, "failed": 3}  # one reload, counted once
        _put_in_place(live, key=tls["server.key"])  # whole again
        r = c.post("/v1/reload")
        assert r.json()["certificate"] == {"status": "reloaded"}, r.text
        assert _reloads(c) == {"ok": 1, "failed": 3}
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(log, "SIGHUP: certificate reloaded")
        assert _reloads_become(c, {"ok": 2, "failed": 3}) == {"ok": 2, "failed": 3}
    assert _stop(proc) == 0
    assert "Traceback" not in log.read_text()


#: ``deepwatch serve`` as ``python -m deepwatch.cli`` runs it, with the pair broken on disk
#: right after the app is made: after the start-up check of the files, before uvicorn loads
#: them (argv[1]: the file to put over the key, or ``-`` to remove the key; argv[2]: the key).
#: The tries of ``load_tls_context`` are made 0.05 s apart instead of 0.2 s, to wait less.
BREAKS_AFTER_THE_CHECK = """\
import os, shutil, sys
from deepwatch.serve import app
source, key = sys.argv.pop(1), sys.argv.pop(1)
app.TLS_LOAD_PAUSE_SECONDS = 0.05
made = app.create_app
def create_app(*args, **kwargs):
    made_app = made(*args, **kwargs)
    if source == "-":
        os.remove(key)
    else:
        shutil.copyfile(source, key)
    return made_app
app.create_app = create_app
from deepwatch.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("broken", ["other.key", "-"])
def test_a_pair_that_breaks_after_the_start_up_check_is_one_error_line(
        kdd_bundle: Path, tls: dict[str, Path], tmp_path: Path, broken: str) -> None:
    """Files that passed the check and then stayed broken past the tries as uvicorn loaded
    them (a key that is not the certificate's, a key removed) ended in uvicorn's traceback
    (exit 1); a key removed did at once. Now: one error line with the check's reason, exit 2,
    as when the check itself refuses them."""
    live = tmp_path / "live"
    live.mkdir()
    _put_in_place(live, cert=tls["server.pem"], key=tls["server.key"])
    key = live / "key.pem"
    key.chmod(0o600)  # (else a warning at start)
    run = subprocess.run(
        [sys.executable, "-c", BREAKS_AFTER_THE_CHECK,
         "-" if broken == "-" else str(tls[broken]), str(key), "serve", str(kdd_bundle),
         "--port", "0", "--tls-cert", str(live / "cert.pem"), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    reason = (f"--tls-key file {key} does not exist" if broken == "-" else
              f"--tls-key {key} is not the private key of the certificate in --tls-cert "
              f"{live / 'cert.pem'}")
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: the certificate files changed after the start-up check and did not load for "
        f"0.45 s as the server started: {reason}; put a whole certificate and key in place "
        "and start again"], run.stderr
    assert run.stderr.splitlines()[-1] == errors[0]
    assert len(run.stderr.splitlines()) <= 3, run.stderr  # serving..., trying again..., error
