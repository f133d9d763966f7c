"""REST latency: ``deepwatch serve`` on loopback, one record and 1,000-record batches.

Percentiles (p50/p95/p99) as a client sees them (httpx, keep-alive, one request at a time),
against two peers measured in the same run on the same payloads, the three taking turns request
by request so that each meets the same load on the shared cores:

* a bare FastAPI echo endpoint on the same uvicorn setup: the floor that HTTP, the framework and
  the client cost before any scoring;
* the in-process scoring path (``ScoringService.score``: decode, parse, ``score_batch``, encode)
  with no HTTP at all.

The targets (issue 5, 2 cores): single-record p99 <= 10 ms, 1,000-record p99 <= 60 ms.

Run alone: ``python benchmarks/bench_rest.py [--quick] [--bundle DIR]`` (latency, then
throughput with 1 and 2 ``serve --workers``; ``--throughput`` for that part alone);
``benchmarks/run.py`` calls ``run``. The bundle is ``models/kdd-stack`` where it exists, else
a small ``mlp`` trained here on a subsample of the KDD 10% training file (cached in the temp
directory).
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # module level: the echo route's annotations resolve here
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DEEPWATCH_DATA", ROOT.parent / "shared" / "data"))
TRAIN_FILE = DATA / "kddcup99" / "kddcup.data_10_percent.gz"
STACK = ROOT / "models" / "kdd-stack"
BATCH = 1000
TARGET_SINGLE_P99_MS = 10.0
TARGET_BATCH_P99_MS = 60.0


def _kdd_lines(n: int, every: int = 24) -> list[str]:
    out: list[str] = []
    with gzip.open(TRAIN_FILE, "rt") as fh:
        for i, line in enumerate(fh):
            if i % every == 0:
                out.append(line.rstrip("\n"))
                if len(out) >= n:
                    break
    return out


def _bundle(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if (STACK / "manifest.json").exists():
        return STACK
    cache = Path(tempfile.gettempdir()) / "deepwatch-bench" / "rest-mlp"
    if not (cache / "manifest.json").exists():
        from deepwatch.train.api import train

        sample = cache.parent / "kdd_sample.csv"
        sample.parent.mkdir(parents=True, exist_ok=True)
        sample.write_text("\n".join(_kdd_lines(20_000)) + "\n")
        train("kdd", "mlp", [str(sample)], cache, epochs=3, seed=0)
    return cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _process(args: list[str], port: int) -> Iterator[tuple[str, int]]:
    """A server subprocess, until it answers ``/healthz``; stopped with SIGTERM afterwards."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server exited: {err[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc; clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _interleaved(urls: dict[str, str], pids: dict[str, int], service: Any, bodies: list[bytes],
                 n: int, warmup: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Latencies (ms) of the same bodies through each path, one request of each in turn (order
    rotating), so that every path meets the same load on the shared cores; and the CPU time (ms)
    each path used per request, which waiting for a busy core does not inflate."""
    import httpx

    headers = {"content-type": "application/json"}
    clients = {k: httpx.Client(base_url=u, timeout=60) for k, u in urls.items()}

    inproc_cpu = 0.0

    def once(key: str, body: bytes) -> float:
        nonlocal inproc_cpu
        t0 = time.perf_counter()
        if key == "inproc":
            c0 = time.process_time()
            service.score(body)
            elapsed = time.perf_counter() - t0
            inproc_cpu += time.process_time() - c0
            return elapsed
        r = clients[key].post("/v1/score", content=body, headers=headers)
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{key}: HTTP {r.status_code}: {r.text[:300]}")
        return elapsed

    keys = [*urls, "inproc"]
    out = {k: np.empty(n) for k in keys}
    try:
        for i in range(warmup):
            for k in keys:
                once(k, bodies[i % len(bodies)])
        inproc_cpu = 0.0
        cpu0 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
        for i in range(n):
            body = bodies[i % len(bodies)]
            for j in range(len(keys)):
                k = keys[(i + j) % len(keys)]
                out[k][i] = once(k, body)
        cpu = {k: (_cpu_seconds(pid) - cpu0[k]) * 1000.0 / n for k, pid in pids.items()}
        cpu["inproc"] = inproc_cpu * 1000.0 / n
    finally:
        for c in clients.values():
            c.close()
    return {k: v * 1000.0 for k, v in out.items()}, cpu


def _row(what: str, path: str, ms: np.ndarray, cpu_ms: float, records: int) -> str:
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    rate = records * len(ms) / (ms.sum() / 1000.0)
    return (f"| {what} | {path} | {len(ms):,} | {p50:.2f} | {p95:.2f} | {p99:.2f} | "
            f"{cpu_ms:.2f} | {rate:,.0f} |")


def run(quick: bool = False, bundle: str | None = None) -> list[str]:
    import orjson

    n_single, n_batch = (300, 40) if quick else (2000, 200)
    path = _bundle(bundle)
    lines = _kdd_lines(4000)
    singles = [orjson.dumps({"format": "kdd", "records": [ln]}) for ln in lines[:1000]]
    batches = [orjson.dumps({"format": "kdd", "records": lines[i : i + BATCH]})
               for i in range(0, len(lines) - BATCH + 1, BATCH)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    from deepwatch.serve._service import ScoringService

    service = ScoringService(path)
    serve = ["-m", "deepwatch.cli", "serve", str(path), "--port"]
    rest_port, echo_port = _free_port(), _free_port()
    with _process([*serve, str(rest_port)], rest_port) as (rest, rest_pid), \
            _process([__file__, "--echo-server", str(echo_port)], echo_port) as (echo, echo_pid):
        urls = {"rest": rest, "echo": echo}
        pids = {"rest": rest_pid, "echo": echo_pid}
        single, single_cpu = _interleaved(urls, pids, service, singles, n_single, 100)
        batch, batch_cpu = _interleaved(urls, pids, service, batches, n_batch, 5)
    results = {k: {"single": single[k], "batch": batch[k]} for k in single}
    cpu = {k: {"single": single_cpu[k], "batch": batch_cpu[k]} for k in single}
    seconds = time.perf_counter() - t0
    load_after = os.getloadavg()[0]

    from deepwatch.models.detector import Detector

    det = Detector(path)
    names = {"rest": "`deepwatch serve` POST /v1/score",
             "echo": "peer: bare FastAPI echo, same uvicorn (HTTP floor)",
             "inproc": "peer: in-process ScoringService.score (no HTTP)"}
    out = ["## REST scoring latency (loopback)", "",
           f"Bundle: `{det.kind}` on `{det.format}` ({det.engine}); KDD training-file records; "
           "client: httpx, keep-alive, one request at a time, on the same machine as the "
           "server; the three paths take turns request by request (same load for each). "
           f"Load average {load_before:.1f} before, {load_after:.1f} after "
           f"({os.cpu_count()} cores, shared with other work: timings are indicative). "
           f"{seconds:.0f} s.", "",
           "| request | path | requests | p50 ms | p95 ms | p99 ms | CPU ms/request | "
           "records/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, label, records in (("single", "1 record", 1), ("batch", f"{BATCH:,} records",
                                                              BATCH)):
        for key in ("rest", "echo", "inproc"):
            out.append(_row(label, names[key], results[key][kind], cpu[key][kind], records))
    verdicts = []
    for kind, target in (("single", TARGET_SINGLE_P99_MS), ("batch", TARGET_BATCH_P99_MS)):
        rest = results["rest"][kind]
        p99 = float(np.percentile(rest, 99))
        overhead = float(np.median(rest) / (np.median(results["echo"][kind])
                                            + np.median(results["inproc"][kind])))
        verdicts.append(f"{'1 record' if kind == 'single' else f'{BATCH:,} records'}: REST "
                        f"p99 {p99:.2f} ms vs target {target:.0f} ms "
                        f"({'met' if p99 <= target else 'NOT met'}); REST p50 is "
                        f"{overhead:.2f}x (echo p50 + in-process p50)")
    out += ["", *[f"- {v}" for v in verdicts],
            "- CPU ms/request: CPU time the server process (or, in process, this process) used "
            "per request; waiting for a busy core inflates the latencies but not this, so it "
            "bounds what an idle machine would show (minus the client's share).", "",
            "Reproduce: `python benchmarks/bench_rest.py" + (" --quick" if quick else "") + "`.",
            ""]
    return out + throughput(quick, bundle)


def _load(url: str, bodies: list[bytes], records: int, clients: int,
          seconds: float) -> float:
    """Records per second that ``clients`` threads (one keep-alive connection each, so the
    connections spread over the server's workers) get scored in ``seconds``."""
    import threading

    import httpx

    done = [0] * clients
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60,
                          headers={"content-type": "application/json"}) as c:
            i = k
            while not stop.is_set():
                r = c.post("/v1/score", content=bodies[i % len(bodies)])
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                done[k] += records
                i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm-up: every connection made and every worker's model warm
    before, t0 = sum(done), time.perf_counter()
    time.sleep(seconds)
    rate = (sum(done) - before) / (time.perf_counter() - t0)
    stop.set()
    for t in threads:
        t.join()
    return rate


def throughput(quick: bool = False, bundle: str | None = None,
               workers: tuple[int, ...] = (1, 2)) -> list[str]:
    """`deepwatch serve --workers W`: records/s under concurrent clients, W = 1 against 2."""
    import orjson

    path = _bundle(bundle)
    lines = _kdd_lines(4000)
    loads = {"1 record": ([orjson.dumps({"format": "kdd", "records": [ln]})
                           for ln in lines[:1000]], 1),
             f"{BATCH:,} records": ([orjson.dumps({"format": "kdd", "records": lines[i:i + BATCH]})
                                     for i in range(0, len(lines) - BATCH + 1, BATCH)], BATCH)}
    seconds, clients = (3.0, 4) if quick else (10.0, 4)
    rates: dict[tuple[str, int], float] = {}
    load_before = os.getloadavg()[0]
    for w in workers:
        port = _free_port()
        with _process(["-m", "deepwatch.cli", "serve", str(path), "--port", str(port),
                       "--workers", str(w)], port) as (url, _pid):
            for name, (bodies, records) in loads.items():
                rates[(name, w)] = _load(url, bodies, records, clients, seconds)
    out = ["## REST throughput by worker processes (`serve --workers`)", "",
           f"{clients} client threads in this process, one keep-alive connection each, "
           f"{seconds:.0f} s per cell after 1 s of warm-up, on the same {os.cpu_count()}-core "
           f"machine as the server (load average {load_before:.1f} before).", "",
           "| request | " + " | ".join(f"{w} worker{'s' if w > 1 else ''} (records/s)"
                                      for w in workers) + " | ratio |",
           "| --- | " + " | ".join("---" for _ in workers) + " | --- |"]
    for name in loads:
        cells = [rates[(name, w)] for w in workers]
        out.append(f"| {name} | " + " | ".join(f"{c:,.0f}" for c in cells)
                   + f" | {cells[-1] / cells[0]:.2f}x |")
    out += ["", "Reproduce: `python benchmarks/bench_rest.py --throughput`.", ""]
    return out


def echo_app() -> Any:
    """The peer: FastAPI reading the body and answering a small JSON, nothing else."""
    import orjson
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/score")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(orjson.dumps({"bytes": len(body)}), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def _serve_echo(port: int) -> None:
    import uvicorn

    uvicorn.run(echo_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                server_header=False)


if __name__ == "__main__":
    if "--echo-server" in sys.argv:
        _serve_echo(int(sys.argv[sys.argv.index("--echo-server") + 1]))
    else:
        explicit = sys.argv[sys.argv.index("--bundle") + 1] if "--bundle" in sys.argv else None
        part = throughput if "--throughput" in sys.argv else run
        print("\n".join(part(quick="--quick" in sys.argv, bundle=explicit)))
