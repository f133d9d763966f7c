"""Stream worker: at-least-once under SIGKILL, and throughput against the broker's raw rate.

The "done when" run of issue 5: every record of KDD `corrected` (311,029) plus 1,000 garbage
records, spread at random, are produced to a 3-partition topic on a real Tansu broker; one
``deepwatch stream`` worker (a process of its own) scores them, is SIGKILLed once 100,000
verdicts are acknowledged, and a new worker in the same group takes over. Checked: every good
record has a verdict, every garbage record is in the dead-letter topic (duplicates are allowed:
at least once), and every malicious verdict has an alert.

Throughput is steady state: records the group committed per second, sampled from outside (the
broker's committed offsets, every 0.25 s) between the restarted worker's first and last commit,
so start-up and the group join are not counted. The peer, measured in the same run on the same
topic: a bare confluent-kafka consumer reading every message (no parsing, no scoring, nothing
produced). Target (issue 5): >= 50,000 records/s for one worker on 2 cores.

Run alone: ``python benchmarks/bench_stream.py [--quick] [--bundle DIR] [--explain]``;
``benchmarks/run.py`` calls ``run``. The bundle is ``models/kdd-stack`` where it exists, else an
``mlp`` trained here on every 5th line of the KDD 10% training file (cached in the temp dir).
The worker runs as deployed: a classifier names the features behind an alert only when asked
(``--explain``: an occlusion pass over every alert, and 75% of `corrected` are attacks).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _common import KDD_TEST as TEST_FILE  # noqa: E402
from _common import ROOT, kdd_bundle  # noqa: E402

TOPIC, GROUP, PARTITIONS = "bench-in", "bench-workers", 3
TARGET_RPS = 50_000
BATCH_SIZE = 20_000


def _bundle(explicit: str | None) -> Path:
    return kdd_bundle(explicit)


def garbage_records(n: int, rng: np.random.Generator) -> list[bytes]:
    """Records no format should accept, of several kinds."""
    good = (b"0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,"
            b"1.00,0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.")
    fields = good.split(b",")
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(bytes(rng.integers(32, 127, int(rng.integers(1, 80)), dtype=np.uint8)))
        elif kind == 1:
            out.append(b",".join(fields[: int(rng.integers(1, 40))]))
        elif kind == 2:
            bad = list(fields)
            bad[int(rng.integers(4, 40))] = b"NaN?"
            out.append(b",".join(bad))
        elif kind == 3:
            out.append(bytes(rng.integers(0, 256, 40, dtype=np.uint8)).replace(b"\n", b" "))
        elif kind == 4:
            out.append(b"")
        else:
            out.append(good.replace(b",181,", b",-181,"))
    return out


def _inputs(quick: bool) -> tuple[list[bytes], np.ndarray]:
    """Values to produce and, for each, whether it is garbage."""
    with gzip.open(TEST_FILE, "rb") as f:
        good = f.read().split(b"\n")
    good = [g for g in good if g]
    n_garbage = 1000
    if quick:
        good, n_garbage = good[:40_000], 200
    rng = np.random.default_rng(0)
    is_garbage = np.zeros(len(good) + n_garbage, dtype=bool)
    is_garbage[rng.choice(len(is_garbage), n_garbage, replace=False)] = True
    values: list[bytes] = [b""] * len(is_garbage)
    for i, v in zip(np.flatnonzero(~is_garbage), good, strict=True):
        values[i] = v
    for i, v in zip(np.flatnonzero(is_garbage), garbage_records(n_garbage, rng), strict=True):
        values[i] = v
    return values, is_garbage


def _produce(brokers: str, values: list[bytes]) -> float:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers})
    # the worker writes only to topics that exist (it never creates one): make its outputs too
    topics = [TOPIC, f"{TOPIC}.alerts", f"{TOPIC}.verdicts", f"{TOPIC}.dead"]
    for future in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 500000})
    t0 = time.perf_counter()
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(TOPIC, value, str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the input could not be produced")
    return len(values) / (time.perf_counter() - t0)


def _worker(bundle: Path, brokers: str, log: Path, explain: bool | None,
            batch_size: int = BATCH_SIZE) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "deepwatch.cli", "stream", str(bundle), "--format", "kdd",
           "--brokers", brokers, "--input-topic", TOPIC, "--output-topic", f"{TOPIC}.alerts",
           "--verdict-topic", f"{TOPIC}.verdicts", "--dead-letter-topic", f"{TOPIC}.dead",
           "--group", GROUP, "--batch-size", str(batch_size), "--batch-wait-ms", "200",
           "--kafka-option", "session.timeout.ms=6000"]
    if explain is not None:
        cmd.append("--explain" if explain else "--no-explain")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("ab"), cwd=ROOT)


class Offsets:
    """Reads, without joining any group, a topic's end offsets and a group's commits."""

    def __init__(self, brokers: str):
        from confluent_kafka import Consumer

        self.consumer = Consumer({"bootstrap.servers": brokers, "group.id": GROUP,
                                  "enable.auto.commit": False})

    def end(self, topic: str) -> int:
        """Messages in ``topic`` by its high watermarks (Tansu's lag a little behind)."""
        from confluent_kafka import TopicPartition

        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        return sum(self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in meta.partitions)

    def committed(self) -> int:
        from confluent_kafka import TopicPartition

        tps = self.consumer.committed([TopicPartition(TOPIC, p) for p in range(PARTITIONS)],
                                      timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)

    def close(self) -> None:
        self.consumer.close()


def _read_keys(brokers: str, topic: str, malicious_only: bool = False) -> list[int]:
    """Keys of every message of ``topic`` (partitions assigned directly, no group), read until
    the topic has been quiet for 3 s: Tansu's high watermark lags behind its last batch, so it
    cannot say when everything was read. With ``malicious_only``: keys of malicious verdicts."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench-reader",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 << 20})
    keys: list[int] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3.0:
            msgs = consumer.consume(10000, 0.5)
            if msgs:
                quiet_since = time.monotonic()
            for m in msgs:
                if m.error() is None and (not malicious_only
                                          or b'"verdict":"malicious"' in m.value()):
                    keys.append(int(m.key()))
        return keys
    finally:
        consumer.close()


def _raw_consume_rate(brokers: str, total: int) -> float:
    """The peer: a bare consumer reading all ``total`` input messages, touching every value."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench-raw",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 << 20})
    try:
        consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        seen, nbytes, t_first = 0, 0, 0.0
        deadline = time.monotonic() + 600
        while seen < total and time.monotonic() < deadline:
            msgs = consumer.consume(BATCH_SIZE, 1.0)
            if msgs and not t_first:
                t_first = time.perf_counter()
            for m in msgs:
                value = m.value()
                nbytes += len(value) if value else 0
            seen += len(msgs)
        if seen < total:
            raise RuntimeError(f"the bare consumer read {seen:,} of {total:,} messages")
        return seen / (time.perf_counter() - t_first)
    finally:
        consumer.close()


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Sample = tuple[float, int, float]  # (wall time, records committed, worker CPU seconds)


def _steady_rates(samples: list[Sample], start: int, end: int) -> tuple[float, float]:
    """Records per wall second and per worker CPU second, between the first commit above
    ``start`` and the first sample reaching ``end``."""
    moving = [s for s in samples if s[1] > start]
    if len(moving) < 2:
        return float("nan"), float("nan")
    t0, c0, cpu0 = moving[0]
    t1, c1, cpu1 = next((s for s in moving if s[1] >= end), moving[-1])
    if t1 <= t0 or c1 <= c0:  # one commit in the window: no rate to give
        return float("nan"), float("nan")
    return (c1 - c0) / (t1 - t0), (c1 - c0) / (cpu1 - cpu0) if cpu1 > cpu0 else float("nan")


def run(quick: bool = False, bundle: str | None = None, explain: bool | None = None
        ) -> list[str]:
    from deepwatch.models.detector import Detector
    from deepwatch.serve.tansu import TansuBroker

    path = _bundle(bundle)
    values, is_garbage = _inputs(quick)
    n, n_garbage = len(values), int(is_garbage.sum())
    kill_after = 12_000 if quick else 100_000
    # quick: small batches, so that the few records still give several commits to time
    batch_size = 2_000 if quick else BATCH_SIZE
    workdir = Path(tempfile.mkdtemp(prefix="deepwatch-bench-stream-"))
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    with TansuBroker(log=workdir / "tansu.log") as broker:
        produce_rate = _produce(broker.address, values)
        offsets = Offsets(broker.address)
        first = _worker(path, broker.address, workdir / "worker1.log", explain, batch_size)
        samples1: list[Sample] = []
        while offsets.end(f"{TOPIC}.verdicts") < kill_after:
            if first.poll() is not None:
                raise RuntimeError(f"the worker exited early; see {workdir / 'worker1.log'}")
            samples1.append((time.perf_counter(), offsets.committed(), _cpu_seconds(first.pid)))
            time.sleep(0.25)
        first.kill()
        first.wait()
        verdicts_at_kill = offsets.end(f"{TOPIC}.verdicts")
        committed_at_kill = offsets.committed()

        second = _worker(path, broker.address, workdir / "worker2.log", explain, batch_size)
        samples2: list[Sample] = []
        while True:
            done = offsets.committed()
            samples2.append((time.perf_counter(), done, _cpu_seconds(second.pid)))
            if done >= n:
                break
            if second.poll() is not None:
                raise RuntimeError(f"the worker exited early; see {workdir / 'worker2.log'}")
            time.sleep(0.25)
        second.terminate()
        exit_code = second.wait(120)
        offsets.close()

        verdict_keys = _read_keys(broker.address, f"{TOPIC}.verdicts")
        dead_keys = _read_keys(broker.address, f"{TOPIC}.dead")
        alert_keys = _read_keys(broker.address, f"{TOPIC}.alerts")
        malicious_keys = _read_keys(broker.address, f"{TOPIC}.verdicts", malicious_only=True)
        cpu0 = time.process_time()
        raw_rate = _raw_consume_rate(broker.address, n)
        raw_cpu_rate = n / max(time.process_time() - cpu0, 1e-9)
    seconds = time.perf_counter() - t_start
    load_after = os.getloadavg()[0]

    good_ids = set(np.flatnonzero(~is_garbage).tolist())
    garbage_ids = set(np.flatnonzero(is_garbage).tolist())
    missing_verdicts = len(good_ids - set(verdict_keys))
    missing_dead = len(garbage_ids - set(dead_keys))
    wrong = len(set(verdict_keys) & garbage_ids) + len(set(dead_keys) & good_ids)
    alerts_ok = set(alert_keys) == set(malicious_keys)
    rate1, _ = _steady_rates(samples1, samples1[0][1] if samples1 else 0, committed_at_kill)
    rate2, cpu_rate2 = _steady_rates(samples2, committed_at_kill, n)
    ok = missing_verdicts == 0 and missing_dead == 0 and wrong == 0 and alerts_ok
    stop_log = [json.loads(x) for x in (workdir / "worker2.log").read_bytes().splitlines()
                if x.startswith(b"{") and b'"event": "stop"' in x]

    det = Detector(path)
    mode = {None: "as deployed (explanations where free: autoencoder errors)",
            True: "with `--explain` (occlusion explanations for every alert)",
            False: "`--no-explain`"}[explain]
    out = [
        "## Stream worker through a Kafka broker (Tansu, loopback)", "",
        f"Bundle `{det.kind}` on `{det.format}` ({det.engine}); worker {mode}, batches of "
        f"{batch_size:,}, verdict, alert and dead-letter topics all written. "
        f"{n - n_garbage:,} records of `corrected`"
        + (" (the first 40,000: --quick)" if quick else "")
        + f" + {n_garbage:,} garbage records at random places, 3 partitions. Load average "
        f"{load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores shared with "
        f"other work: rates are indicative). {seconds:.0f} s in all.", "",
        "| check | result |", "| --- | --- |",
        f"| worker SIGKILLed when | the verdict topic's watermark passed {kill_after:,} (it "
        f"read {verdicts_at_kill:,}; Tansu's lags); {committed_at_kill:,} records committed |",
        f"| restarted worker | exit code {exit_code} after SIGTERM; "
        f"{stop_log[0]['records'] if stop_log else '?':,} records processed |",
        f"| good records with a verdict | {len(good_ids) - missing_verdicts:,} of "
        f"{len(good_ids):,} ({len(verdict_keys) - len(set(verdict_keys)):,} duplicates) |",
        f"| garbage records in the dead-letter topic | {len(garbage_ids) - missing_dead:,} of "
        f"{len(garbage_ids):,} ({len(dead_keys) - len(set(dead_keys)):,} duplicates) |",
        f"| records in the wrong topic | {wrong} |",
        f"| every malicious verdict has an alert | {'yes' if alerts_ok else 'NO'} "
        f"({len(set(alert_keys)):,} records alerted) |",
        "", "| rate | records/s (wall) | records per CPU second |", "| --- | --- | --- |",
        f"| worker, steady state after restart | {rate2:,.0f} | {cpu_rate2:,.0f} |",
        "| worker, steady state before the kill | "
        + (f"{rate1:,.0f}" if rate1 == rate1 else "- (fewer than two commits to time)") + " | |",
        f"| peer: bare consumer, same topic | {raw_rate:,.0f} | {raw_cpu_rate:,.0f} |",
        f"| producing the input (for scale) | {produce_rate:,.0f} | |", "",
        "Records per CPU second count the CPU time of every thread of the process (the worker's "
        "librdkafka threads included), so they depend less on what else the machine runs.", "",
        "- At least once: " + ("every good record has a verdict and every garbage record a "
                               "dead letter." if ok else "RECORDS MISSING."),
        f"- One worker: {rate2:,.0f} records/s vs target {TARGET_RPS:,} "
        f"({'met' if rate2 >= TARGET_RPS else 'NOT met'} on this machine); "
        f"{rate2 / raw_rate:.3f}x the raw consume rate ({cpu_rate2 / raw_cpu_rate:.3f}x per CPU "
        "second).", "",
        "Reproduce: `python benchmarks/bench_stream.py" + (" --quick" if quick else "")
        + {None: "", True: " --explain", False: " --no-explain"}[explain] + "`.",
    ]
    return out


if __name__ == "__main__":
    explicit = sys.argv[sys.argv.index("--bundle") + 1] if "--bundle" in sys.argv else None
    print("\n".join(run(quick="--quick" in sys.argv, bundle=explicit,
                        explain=True if "--explain" in sys.argv
                        else False if "--no-explain" in sys.argv else None)))
