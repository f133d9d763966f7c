"""The port a test (or the local broker) gets for a server it starts next: never one the
kernel may hand to an outgoing connection in the meantime. At 9e27e9b CI failed once with
``cannot listen on 0.0.0.0:58097: Address already in use``: the port had come from the kernel's
ephemeral range (32768-60999 there) and was taken before the server bound it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from deepwatch.serve import tansu


def test_the_port_is_outside_the_ephemeral_range_and_free_on_every_address() -> None:
    low, high = tansu._ephemeral_range()
    if Path("/proc/sys/net/ipv4/ip_local_port_range").exists():
        assert (low, high) == tuple(map(int, Path(
            "/proc/sys/net/ipv4/ip_local_port_range").read_text().split()))
    for _ in range(20):
        port = tansu.free_port()
        assert not low <= port <= high, port
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))  # free on every address, not on loopback only


def test_a_port_held_on_any_address_is_never_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one port left outside the range and a listener holding it on 0.0.0.0, the kernel's
    pick is the answer: the held port never is."""
    with socket.create_server(("0.0.0.0", 0)) as held:
        port = held.getsockname()[1]
        monkeypatch.setattr(tansu, "_ephemeral_range", lambda: (10_000, 65_535))
        monkeypatch.setattr(tansu.random.SystemRandom, "choice", lambda self, seq: port)
        got = tansu.free_port()
        assert got != port
        with socket.socket() as s:
            s.bind(("127.0.0.1", got))
