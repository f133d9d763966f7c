"""Shared fixtures: the real data sets (through DEEPWATCH_DATA) and small trained bundles.

Under CI=true a missing data file or optional dependency is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DEEPWATCH_DATA", ROOT.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The Ctrl-C tests send SIGINT to deepwatch processes. A process that starts with SIGINT
# ignored keeps ignoring it, as POSIX programs do (Python installs no handler then, nor does
# deepwatch), and a child inherits that: a test run started as a background job of a script
# (`.ci/run &`, where the shell ignores SIGINT for it) would have every such test hang. A
# handler set here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """For an in-process test that sends itself Ctrl-C: SIGINT has Python's own handler for
    its length (PySpark's driver, started by an earlier test, replaces it with its own)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def need(condition: bool, what: str) -> None:
    """Skip locally, fail in CI, when something a test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing in CI: {what}")
    pytest.skip(f"missing: {what}")


def chromium_dom(url: str, budget_ms: int = 3000) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on the page at ``url`` (own profile, no background traffic), given
    ``budget_ms`` of page time: the rendered DOM on its stdout (skipped without Chromium,
    failed under CI)."""
    import shutil
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    need(browser is not None, "chromium (apt-get install -y chromium)")
    assert browser is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom",
             url], capture_output=True, text=True, timeout=120, check=False)


def data_file(rel: str) -> Path:
    p = DATA / rel
    need(p.exists(), f"data file {p} (set DEEPWATCH_DATA)")
    return p


@pytest.fixture(scope="session")
def kdd_train_file() -> Path:
    return data_file("kddcup99/kddcup.data_10_percent.gz")


@pytest.fixture(scope="session")
def kdd_test_file() -> Path:
    return data_file("kddcup99/corrected.gz")


def head_lines(src: Path, n: int, every: int = 1) -> list[str]:
    out = []
    with gzip.open(src, "rt") as f:
        for i, line in enumerate(f):
            if i % every == 0:
                out.append(line)
                if len(out) >= n:
                    break
    return out


@pytest.fixture(scope="session")
def small_kdd(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    """About 20k records spread over the whole 10% file (every 24th line), plain text."""
    p = tmp_path_factory.mktemp("data") / "kdd_small.csv"
    p.write_text("".join(head_lines(kdd_train_file, 20_000, every=24)))
    return p


@pytest.fixture(scope="session")
def small_kdd_test(tmp_path_factory: pytest.TempPathFactory, kdd_test_file: Path) -> Path:
    """About 10k records spread over `corrected` (every 31st line)."""
    p = tmp_path_factory.mktemp("data") / "kdd_test_small.csv"
    p.write_text("".join(head_lines(kdd_test_file, 10_000, every=31)))
    return p


_BUNDLES: dict[str, Path] = {}


def trained_bundle(kind: str, train_file: Path, tmp_root: Path, epochs: int = 3,
                   fmt: str = "kdd") -> Path:
    """A small bundle of ``kind``, trained once per session and shared by the tests."""
    key = f"{fmt}:{kind}:{train_file}:{epochs}"
    if key not in _BUNDLES:
        from deepwatch.train.api import train

        # one directory per key: bundles of the same kind on other data must not overwrite it
        out = tmp_root / f"bundle_{fmt}_{kind}_{len(_BUNDLES)}"
        train(fmt, kind, [str(train_file)], out, epochs=epochs, seed=0)
        _BUNDLES[key] = out
    return _BUNDLES[key]


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def kdd_bundle(small_kdd: Path, bundle_root: Path) -> Path:
    """A small `mlp` bundle on KDD data: the bundle most service tests score with."""
    return trained_bundle("mlp", small_kdd, bundle_root)


def wait_healthy(url: str, proc: Any, timeout: float = 60) -> None:
    """Wait until the server process ``proc`` answers 200 on ``url``/healthz; fail if it exits
    (with its stderr, when piped) or is not healthy within ``timeout`` seconds."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"server exited: {err}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


def stop_server(proc: Any) -> None:
    """Stop a server subprocess: SIGTERM, then SIGKILL if it has not exited in 30 s; close its
    stderr pipe."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


@contextlib.contextmanager
def serving(bundle: Path, *args: str) -> Iterator[tuple[Any, str]]:
    """A real ``deepwatch serve BUNDLE`` on a free loopback port (extra ``args`` appended),
    healthy: yields the process (stderr piped) and its base URL; stopped on the way out."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwatch.cli", "serve", str(bundle), "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield proc, url
    finally:
        stop_server(proc)


def output_begun(out: Path) -> bool:
    """Whether a run has begun to write ``out``: the file there, or (Parquet, written under a
    hidden name beside it until it is closed: see ``RecordSink``) its temporary file."""
    return out.exists() or any(out.parent.glob(f".{out.name}.*.tmp"))


def signal_when(proc: Any, ready: Any, sig: int, within: float = 120) -> None:
    """Send ``sig`` to ``proc`` once ``ready()`` holds (``proc`` still running, within
    ``within`` seconds), then wait for it to end."""
    import time

    deadline = time.monotonic() + within
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(sig)
    proc.wait(timeout=60)


def signal_until_it_ends(proc: Any, ready: Any, sig: int, within: float = 120) -> int:
    """Once ``ready()`` holds, send ``sig`` to ``proc`` every 2 ms until it has ended (a user
    pressing Ctrl-C again and again, a supervisor repeating SIGTERM); how many were sent."""
    import time

    deadline = time.monotonic() + within
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    sent = 0
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(sig)
        sent += 1
        time.sleep(0.002)
    assert proc.poll() is not None, "still running"
    return sent


def run_cli(*args: str, timeout: float = 300) -> Any:
    """``deepwatch ARGS`` as a user runs it, in a process of its own: the CompletedProcess,
    stdout and stderr as text."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "deepwatch", *args], capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    """A port for a server a test starts: outside the kernel's ephemeral range, so that no
    outgoing connection takes it before the server binds (a CI failure at 9e27e9b)."""
    from deepwatch.serve.tansu import free_port as outside_ephemeral

    return outside_ephemeral()


class ThreadServer:
    """A real uvicorn server in a thread of the test process (``options``: uvicorn's)."""

    def __init__(self, app: Any, **options: Any) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options = {"log_level": "warning", "access_log": False, **options}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


# ---- the Kafka worker's JSON log (test_stream*.py)

def _need_kafka() -> None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        need(False, "confluent-kafka")
        raise


@pytest.fixture
def json_stderr() -> Iterator[None]:
    """The worker's JSON log on stderr, as ``deepwatch stream`` sets it up; put back after."""
    from deepwatch.serve._jsonlog import setup

    logger = logging.getLogger("deepwatch")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    setup("info")
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _json_lines(err: str) -> list[dict]:
    """Every line of ``err`` as JSON; one that is not fails the test, naming it."""
    docs = []
    for line in err.splitlines():
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line on stderr is not the worker's JSON log: {line[:300]!r}")
    return docs
