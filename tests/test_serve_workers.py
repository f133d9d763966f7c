"""``serve --workers 2`` as an operator drives it: a SIGHUP to the parent re-reads the bundle
retrained in place, a replacement that starts only some workers is undone (every worker serves
one model), and workers whose parent was killed outright stop and leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, wait_healthy
from test_workers_reload import _variant, _workers_of

pytest.importorskip("uvicorn")

#: Loaded by every Python process started with it on PYTHONPATH; only workers call the patch.
#: The first worker of generation $FAIL_GEN starts, the next one cannot.
SECOND_WORKER_FAILS = '''
import json, os
from pathlib import Path
import deepwatch.serve._workers as workers

_real = workers._worker_app


def _patched():
    state = Path(os.environ[workers.STATE_ENV])
    if workers.read_settings(state)["generation"] == int(os.environ["FAIL_GEN"]):
        try:
            os.close(os.open(os.environ["FAIL_MARK"], os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            raise RuntimeError("injected: the second worker of this generation cannot start")
    return _real()


workers._worker_app = _patched
'''


def _get(url: str, path: str, method: str = "GET", **kw: Any) -> httpx.Response:
    return httpx.request(method, url + path, timeout=30, **kw)  # a new connection: any worker


def _all_workers(url: str, n: int = 12) -> list[dict[str, Any]]:
    return [_get(url, "/healthz").json() for _ in range(n)]


def _start(bundle: Path, log: Path, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepwatch.cli", "serve", str(bundle), "--port", str(port),
             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True,
            env=env)
    return proc, f"http://127.0.0.1:{port}"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_operator_sighup_rereads_the_bundle_and_a_half_done_replacement_is_undone(
        kdd_bundle: Path, small_kdd: Path, tmp_path: Path) -> None:
    records = small_kdd.read_text().splitlines()[:40]
    served = tmp_path / "served"
    shutil.copytree(kdd_bundle, served)
    (tmp_path / "sitecustomize.py").write_text(SECOND_WORKER_FAILS)
    env = {**os.environ, "FAIL_GEN": "3", "FAIL_MARK": str(tmp_path / "gen3-started"),
           "PYTHONPATH": os.pathsep.join(
               [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = tmp_path / "serve.log"
    proc, url = _start(served, log, env)
    try:
        wait_healthy(url, proc)
        first = _get(url, "/v1/score", "POST", json={"records": records}).json()["results"]
        assert {r["verdict"] for r in first} == {"normal", "malicious"}

        # retrained in place, then `kill -HUP <parent>`: no /v1/reload asked for it
        variant = _variant(kdd_bundle, tmp_path / "next")
        shutil.rmtree(served)
        variant.rename(served)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while {h["generation"] for h in _all_workers(url)} != {2}:
            assert time.monotonic() < deadline, "SIGHUP did not replace the workers"
            time.sleep(0.2)
        for _ in range(4):
            out = _get(url, "/v1/score", "POST", json={"records": records}).json()["results"]
            assert {r["verdict"] for r in out} == {"malicious"}
        gen2 = set(_workers_of(proc.pid))

        # generation 3: one replacement starts, the other cannot; all go back to generation 2
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while "not every worker could be replaced" not in log.read_text():
            assert time.monotonic() < deadline, "the failed replacement was never reported"
            time.sleep(0.2)
        deadline = time.monotonic() + 90
        while not (len(now := set(_workers_of(proc.pid))) == 2 and not now & gen2):
            assert time.monotonic() < deadline, f"workers not restarted: {gen2} -> {now}"
            time.sleep(0.2)
        health = _all_workers(url, 20)
        assert {h["generation"] for h in health} == {2}
        assert {h["pid"] for h in health} <= now
        for _ in range(4):
            out = _get(url, "/v1/score", "POST", json={"records": records}).json()["results"]
            assert {r["verdict"] for r in out} == {"malicious"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        text = log.read_text()
        assert "injected: the second worker of this generation cannot start" in text
        assert "back to " + str(served) + " (generation 2)" in text
        assert "Traceback" not in text
    except BaseException:
        _kill(proc)
        raise AssertionError(f"server log:\n{log.read_text()[-4000:]}") from None
    finally:
        _kill(proc)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds workers in /proc")
def test_workers_of_a_killed_parent_stop_and_remove_the_shared_state(
        kdd_bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    proc, url = _start(kdd_bundle, log)
    try:
        wait_healthy(url, proc)
        state, workers = _state_of(proc, url)  # both serve: each watches for its parent by now
        proc.send_signal(signal.SIGKILL)  # the parent only: the workers are left on their own
        proc.wait()
        deadline = time.monotonic() + 30
        while [pid for pid in workers if _running(pid)]:
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.2)
        assert not state.exists()
        with pytest.raises(httpx.TransportError):  # nobody listens on the port any more
            httpx.get(url + "/healthz", timeout=2)
        assert "the serving parent process is gone" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group outlives its leader
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _state_of(proc: subprocess.Popen[bytes], url: str) -> tuple[Path, list[int]]:
    """The state directory of a healthy ``--workers 2`` server, and its workers (both serving)."""
    deadline = time.monotonic() + 60
    while len(workers := _workers_of(proc.pid)) != 2:
        assert time.monotonic() < deadline, f"workers: {workers}"
        time.sleep(0.2)
    answered: set[int] = set()
    while answered != set(workers):  # each has taken the lock by now
        assert time.monotonic() < deadline, f"answered: {answered}, workers: {workers}"
        answered.add(_get(url, "/healthz").json()["pid"])
    env = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
    state = Path(next(v for v in env if v.startswith(b"DEEPWATCH_SERVE_STATE="))
                 .split(b"=", 1)[1].decode())
    assert (state / "settings.json").exists()
    return state, workers


def _score_and_wait_for_stats(url: str, records: list[str], sent: int) -> dict[str, Any]:
    """Score ``records`` in ``sent`` requests, then wait until the workers' published stats
    (written every second) count them all; those stats."""
    for _ in range(sent):
        assert _get(url, "/v1/score", "POST", json={"records": records}).status_code == 200
    deadline = time.monotonic() + 10
    while (stats := _get(url, "/v1/stats").json())["totals"]["requests"] != sent:
        assert time.monotonic() < deadline, stats["totals"]
        time.sleep(0.2)
    return dict(stats)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds workers in /proc")
def test_the_state_of_a_server_killed_outright_is_removed_by_the_next_one(
        kdd_bundle: Path, tmp_path: Path) -> None:
    """SIGKILL to the whole group (a stop timing out ends so) leaves the state directory: no
    process is left to remove it. The next server started removes it, and not the directory of
    a server still running."""
    procs = []
    try:
        for name in ("running", "killed", "next"):
            proc, url = _start(kdd_bundle, tmp_path / f"{name}.log")
            procs.append(proc)
            wait_healthy(url, proc)
            if name == "running":
                running, running_url = _state_of(proc, url)[0], url
            elif name == "killed":
                killed, workers = _state_of(proc, url)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                deadline = time.monotonic() + 30
                while [pid for pid in workers if _running(pid)]:
                    assert time.monotonic() < deadline, "workers outlived SIGKILL"
                    time.sleep(0.1)
                assert (killed / "settings.json").exists()  # nobody removed it
        assert not killed.exists()
        assert (running / "settings.json").exists()
        assert _get(running_url, "/healthz").status_code == 200
        for proc in procs[::2]:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert not running.exists()
        assert "left by a server killed outright" in (tmp_path / "next.log").read_text()
    finally:
        for proc in procs:
            _kill(proc)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stopping_worker_answers_a_request_on_a_connection_it_already_took(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker being replaced (or stopped) takes no new connection, but one it took a moment
    before may carry a request still on its way: uvicorn alone closed such a connection at once
    ("server disconnected without sending a response"); the worker's drain answers it."""
    import socket
    import threading

    import uvicorn
    from uvicorn.server import Server

    from deepwatch.serve import _workers

    monkeypatch.setattr(Server, "shutdown", Server.shutdown)  # the patch undone after the test

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answered"})

    def answer_after_stop(drain: bool) -> bytes:
        if drain:
            _workers._drain_before_shutdown()
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            time.sleep(0.1)  # taken by the server, no request yet
            server.should_exit = True  # SIGTERM's effect
            while True:  # until the server has begun to stop: it takes no new connection
                assert time.monotonic() < deadline + 10
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except (ConnectionRefusedError, ConnectionResetError):
                    break  # refused, or reset when the listener closed mid-handshake
                time.sleep(0.01)
            # the request comes now, on the connection the server took before
            try:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:  # reset: the connection was closed with the request unread
                data = b""
        finally:
            conn.close()
            thread.join(timeout=10)
        return data

    assert b"answered" not in answer_after_stop(drain=False)  # what uvicorn alone does
    got = answer_after_stop(drain=True)
    assert got.startswith(b"HTTP/1.1 200") and b"\r\n\r\n8\r\nanswered\r\n" in got, got


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds workers in /proc")
def test_replaced_workers_stats_are_folded_into_one_file_and_keep_their_counts(
        kdd_bundle: Path, small_kdd: Path, tmp_path: Path) -> None:
    """Every reload used to leave the replaced workers' ``stats/PID.json`` for good (730 files
    after a year of daily reloads: 1.3 s per ``/v1/stats``). The parent folds them into
    ``stats/retired.json``; the dashboard's totals, latencies, alerts and uptime are as before."""
    from deepwatch.serve._stats import RECENT_ALERTS

    lines = small_kdd.read_text().splitlines()
    records = ([r for r in lines if r.endswith(",normal.")][:4]
               + [r for r in lines if not r.endswith(",normal.")][:2])
    sent = 5
    log = tmp_path / "serve.log"
    proc, url = _start(kdd_bundle, log)
    try:
        wait_healthy(url, proc)
        state, _ = _state_of(proc, url)
        before = _score_and_wait_for_stats(url, records, sent)
        assert before["totals"]["records"] == sent * len(records)
        assert 0 < before["totals"]["alerts"] <= RECENT_ALERTS  # every alert in recent_alerts
        assert len(before["recent_alerts"]) == before["totals"]["alerts"]
        since = time.monotonic()
        for n in range(1, 3):  # the second folds into the retired.json the first made
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 90
            while log.read_text().count("SIGHUP: every worker replaced") < n:
                assert time.monotonic() < deadline, "SIGHUP did not replace the workers"
                time.sleep(0.2)
        stats = state / "stats"
        deadline = time.monotonic() + 10
        while True:  # the parent folds within half a second of a replacement
            live = _workers_of(proc.pid)
            names = {f.name for f in stats.iterdir() if not f.name.startswith(".")}
            if len(live) == 2 and names == {f"{pid}.json" for pid in live} | {"retired.json"}:
                break
            assert time.monotonic() < deadline, f"live workers {live}, stats/: {sorted(names)}"
            time.sleep(0.2)
        for _ in range(6):  # whichever worker answers
            after = _get(url, "/v1/stats").json()
            assert after["totals"] == before["totals"]
            assert after["latency_ms"]["samples"] == sent
            assert sorted(after["recent_alerts"], key=repr) == sorted(before["recent_alerts"],
                                                                      key=repr)
            # the server's uptime, not the live workers'
            assert after["uptime_seconds"] >= before["uptime_seconds"] + (
                time.monotonic() - since) - 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in log.read_text()
    except BaseException as exc:
        _kill(proc)
        raise AssertionError(f"{exc!r}\nserver log:\n{log.read_text()[-4000:]}") from exc
    finally:
        _kill(proc)
