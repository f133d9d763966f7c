"""``serve --workers 2`` under a burst of reloads: the parent merges the SIGHUPs that queue while
it replaces the workers (one more replacement at most, serving the newest bundle asked for),
never runs more workers than a rolling replacement needs, and a SIGTERM does not wait behind the
queued reloads.

uvicorn's supervisor queues every signal and handles them in order: before the fix 30 reloads
were 30 rolling replacements, one after the other, and a SIGTERM sent after them waited for all
(minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, wait_healthy

pytest.importorskip("uvicorn")

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BURST = 30
REPLACING = "SIGHUP: replacing"
REPLACED = "SIGHUP: every worker replaced"
FAILED = "not every worker could be replaced"


def _variant(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose decision flags every record (only the manifest changes)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["decision"]["policy"] = "threshold"
    manifest["decision"]["threshold"] = 0.0
    manifest["trained_at"] = "variant"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _fresh(url: str, path: str, method: str = "GET", **kw: Any) -> httpx.Response:
    """One request on a new connection: either worker may take it."""
    return httpx.request(method, url + path, headers=AUTH, timeout=30, **kw)


def _workers_of(parent: int) -> list[int]:
    """The parent's worker processes (its multiprocessing resource tracker left out)."""
    found = []
    for task in Path(f"/proc/{parent}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                found.append(int(pid))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts workers in /proc")
def test_a_burst_of_reloads_is_merged_and_sigterm_does_not_wait_for_it(
        kdd_bundle: Path, small_kdd: Path, tmp_path: Path) -> None:
    records = small_kdd.read_text().splitlines()[:40]
    everything = _variant(kdd_bundle, tmp_path / "all-malicious")
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    log_file = tmp_path / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_file.open("wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepwatch.cli", "serve", str(kdd_bundle), "--port", str(port),
             "--api-key-file", str(key_file), "--workers", "2"],
            stdout=subprocess.DEVNULL, stderr=log_fh, start_new_session=True)
    most_workers = 0
    watching = threading.Event()

    def count_workers() -> None:
        nonlocal most_workers
        while not watching.is_set():
            most_workers = max(most_workers, len(_workers_of(proc.pid)))
            time.sleep(0.02)

    watcher = threading.Thread(target=count_workers, daemon=True)
    try:
        wait_healthy(url, proc)
        first = _fresh(url, "/v1/score", "POST", json={"records": records}).json()["results"]
        assert {r["verdict"] for r in first} == {"normal", "malicious"}
        watcher.start()

        # a burst: the served bundle re-read BURST - 1 times, then a switch to another one,
        # asked after all of them: the workers must end up serving it
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _fresh(url, "/v1/reload", "POST").status_code,
                                    range(BURST - 1)))
        assert answers == [200] * (BURST - 1)
        r = _fresh(url, "/v1/reload", "POST", json={"bundle": str(everything)})
        assert r.status_code == 200 and r.json()["workers"] == "replacing", r.text

        deadline = time.monotonic() + 90
        while True:  # until the last replacement is over and served the bundle asked last
            log = log_file.read_text()
            started = log.count(REPLACING)
            over = log.count(REPLACED) + log.count(FAILED)
            if started and started == over and log.rsplit(REPLACING, 1)[1].startswith(
                    f" the 2 workers, serving {everything} "):
                time.sleep(1.5)  # the parent looks at its signals every 0.5 s: none is left
                if log_file.read_text() == log:
                    break
            assert time.monotonic() < deadline, "the replacements never ended"
            time.sleep(0.2)
        assert log.rsplit(REPLACING, 1)[1].count(REPLACED) == 1, "the last replacement failed"
        assert started <= 3, f"{BURST} reloads made {started} replacements"
        health = [_fresh(url, "/healthz").json() for _ in range(10)]
        assert len({h["generation"] for h in health}) == 1
        for _ in range(4):
            out = _fresh(url, "/v1/score", "POST", json={"records": records}).json()["results"]
            assert {x["verdict"] for x in out} == {"malicious"}
            assert [x["score"] for x in out] == [x["score"] for x in first]
        watching.set()
        watcher.join()
        assert 2 <= most_workers <= 3, f"{most_workers} workers at once for --workers 2"

        # another burst, and SIGTERM at once: the queued reloads are dropped, the replacement
        # under way is cut short, and the server stops in seconds
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: _fresh(url, "/v1/reload", "POST"), range(BURST)))
        time.sleep(0.7)  # a replacement has started
        workers = _workers_of(proc.pid)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - began
        assert took < 10, f"SIGTERM took {took:.1f} s behind the queued reloads"
        log = log_file.read_text()
        assert "Traceback" not in log
        deadline = time.monotonic() + 0.5
        while [pid for pid in workers if Path(f"/proc/{pid}").exists()]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    except BaseException:
        watching.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise AssertionError(f"server log:\n{log_file.read_text()[-4000:]}") from None
    finally:
        watching.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
