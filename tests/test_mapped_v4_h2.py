"""An IPv4 client that a dual-stack server logs as an IPv4-mapped IPv6 address
(``::ffff:203.0.113.7``, in any spelling) is that IPv4 client. The per-client windows counted
``::ffff:8.8.8.8`` and ``8.8.8.8`` as two clients, the mapped form's country was 'private'
(where ``8.8.8.8``'s is 'US') and its ``ip_v6`` 1, and an alert's ECS ``source.ip`` was
``::ffff:8.8.8.8``. The records keep the client as written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import data_file, head_lines
from test_formats_review_k import _access_alerts
from test_web_features import _line as _site_line
from test_web_features import _table

from deepwatch.features._lookups import client_address, ip_info
from deepwatch.features._window import WINDOW_COLUMNS
from deepwatch.features.web import derive_access

PUBLIC = "8.8.8.8"
#: One IPv4 client, every way a log may write it.
MAPPED = [PUBLIC, f"::ffff:{PUBLIC}", f"::FFFF:{PUBLIC}", f"0:0:0:0:0:ffff:{PUBLIC}",
          f"0000:0000:0000:0000:0000:FFFF:{PUBLIC}", "::ffff:808:808", "::FFFF:0808:0808",
          f"[::ffff:{PUBLIC}]", f"[::ffff:{PUBLIC}]:51234", "[0:0:0:0:0:FFFF:808:808]:443"]
_ADDRESS_COLUMNS = ("country", "ip_private", "ip_v6")


def _lines(clients: list[str]) -> list[str]:
    return [_site_line(c, i, f"/p{i % 3}", 404 if i % 4 == 0 else 200)
            for i, c in enumerate(clients)]


def test_every_spelling_of_a_mapped_address_is_the_ipv4_address() -> None:
    assert client_address(pa.array(MAPPED)).to_pylist() == [PUBLIC] * len(MAPPED)
    # every other address is what it was
    others = ["2001:DB8::1", "[2001:db8::1]:443", "::1", "::", "fe80::1%eth0",
              "::ffff:8.8.8.8%eth0", "[::FFFF:8.8.8.8%eth0]:80",  # a zone: not an IPv4 client
              "::8.8.8.8", "64:ff9b::808:808", "::ffff:0:808:808", "2001:db8::1:443",
              "::ffff:8.8.8.8:80", "www.example.com:80", "203.0.113.5:1", "-", "", None]
    assert client_address(pa.array(others)).to_pylist() == [
        "2001:db8::1", "2001:db8::1", "::1", "::", "fe80::1%eth0",
        "::ffff:8.8.8.8%eth0", "::ffff:8.8.8.8%eth0",
        "::808:808", "64:ff9b::808:808", "::ffff:0:808:808", "2001:db8::1:443",
        "::ffff:8.8.8.8:80", "www.example.com", "203.0.113.5", "-", "", None]


def test_a_mapped_client_is_the_ipv4_client_in_windows_and_lookups() -> None:
    d = derive_access(_table(_lines(MAPPED)), {}, {})
    assert d.column("client_ip").to_pylist() == MAPPED  # the records keep it as written
    assert d.column("win_requests").to_pylist() == list(range(1, len(MAPPED) + 1))
    assert d.column("win_gap").to_pylist() == [3600.0] + [1.0] * (len(MAPPED) - 1)
    country = ip_info(PUBLIC)[0]
    assert country not in ("private", "unknown", "invalid")
    assert set(zip(*(d.column(c).to_pylist() for c in _ADDRESS_COLUMNS), strict=True)) == {
        (country, 0.0, 0.0)}
    plain = derive_access(_table(_lines([PUBLIC] * len(MAPPED))), {}, {})
    for col in (*WINDOW_COLUMNS, *_ADDRESS_COLUMNS):
        assert d.column(col).to_pylist() == plain.column(col).to_pylist(), col


def test_real_site_log_written_by_a_dual_stack_server_featurises_as_ipv4() -> None:
    lines = [ln.rstrip("\n")
             for ln in head_lines(data_file("weblogs/apache_access.log.gz"), 400)]
    spell = [lambda a, i: a, lambda a, i: f"::ffff:{a}", lambda a, i: f"::FFFF:{a}",
             lambda a, i: f"[0:0:0:0:0:ffff:{a}]:{40000 + i}"]
    mixed = []
    for i, ln in enumerate(lines):
        v4, rest = ln.split(" ", 1)
        mixed.append(f"{spell[i % len(spell)](v4, i)} {rest}")
    plain, written = _table(lines), _table(mixed)
    # in pieces with one state, as a stream scores it
    state: dict[str, object] = {}
    parts = pa.concat_tables([derive_access(written.slice(i, 90), {}, state)
                              for i in range(0, written.num_rows, 90)])
    whole = derive_access(plain, {}, {})
    for col in (*WINDOW_COLUMNS, *_ADDRESS_COLUMNS):
        assert np.array_equal(parts.column(col).to_numpy(zero_copy_only=False),
                              whole.column(col).to_numpy(zero_copy_only=False)), col


def test_an_alert_for_a_mapped_client_has_its_ipv4_source_ip() -> None:
    clients = [f"::ffff:{PUBLIC}", f"[::FFFF:{PUBLIC}]:51234", "0:0:0:0:0:ffff:808:808",
               PUBLIC, "2001:DB8::1", "::ffff:8.8.8.8%eth0"]
    docs = _access_alerts(clients)
    assert [(d["source"]["ip"], d["source"].get("port")) for d in docs] == [
        (PUBLIC, None), (PUBLIC, 51234), (PUBLIC, None), (PUBLIC, None), ("2001:db8::1", None),
        ("::ffff:8.8.8.8%eth0", None)]
    assert [d["deepwatch"]["record"]["client_ip"] for d in docs] == clients


# -- per-client windows in a stream: a batch works on its own clients' requests -----------------

def _requests(n: int, clients: int, start: int, seed: int) -> tuple[pa.Array, np.ndarray,
                                                                      pa.Array, np.ndarray,
                                                                      pa.Array]:
    rng = np.random.default_rng(seed)
    who = rng.integers(0, clients, n)
    return (pa.array([f"10.0.{c >> 8}.{c & 255}" for c in who], pa.string()),
            start + np.arange(n, dtype=np.float64),
            pa.array([f"/p{c}" for c in rng.integers(0, 4, n)], pa.string()),
            np.where(rng.random(n) < 0.2, 404.0, 200.0),
            pa.array(np.where(rng.random(n) < 0.3, "POST", "GET").tolist(), pa.string()))


def _expected_tail(parts: list[tuple[pa.Array, ...]], keep: int, cap: int) -> list[tuple]:
    """Each client's last ``keep`` requests, in arrival order, the last ``cap`` of them."""
    rows = [r for p in parts for r in zip(p[0].to_pylist(), p[1].tolist(), p[2].to_pylist(),
                                          p[3].astype(np.int64).tolist(),
                                          [m == "POST" for m in p[4].to_pylist()], strict=True)]
    left: dict[str, int] = {}
    kept = []
    for r in reversed(rows):
        if left.get(r[0], 0) < keep:
            left[r[0]] = left.get(r[0], 0) + 1
            kept.append(r)
    return kept[::-1][-cap:]


def test_a_batch_windows_its_own_clients_requests_not_every_clients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch of a stream sorted and windowed the requests the state kept of every client
    seen (up to 200,000 clients' last 19), to use the results of its own rows only: a stream's
    batch cost grew with the clients it had seen (here a batch of 100 requests took 0.6 s
    with 200,000 clients' 1,000,000 requests in the state, 0.03 s now). The other clients'
    requests are carried over, in arrival order, as they were; the features and the state are
    what they were."""
    import deepwatch.features._window as window

    seen: list[int] = []
    codes = window._codes
    monkeypatch.setattr(window, "_codes", lambda v: (seen.append(len(v)), codes(v))[1])
    first = _requests(3000, 1000, 0, 1)
    state: dict[str, object] = {}
    window.window_features(*first, state, size=5)
    assert state[window.STATE_KEY].num_rows > 2000  # most of 1000 clients' last 4
    seen.clear()
    batch = (pa.array(["10.0.0.7", "10.0.9.9", "10.0.0.7"]), np.array([4000.0, 4001, 4002]),
             pa.array(["/a", "/b", "/a"]), np.array([200.0, 404, 200]), pa.array(["GET"] * 3))
    out = window.window_features(*batch, state, size=5)
    own = first[0].to_pylist().count("10.0.0.7")
    assert max(seen) <= min(own, 4) + 3
    assert out["win_requests"].tolist() == [min(own, 4) + 1, 1.0, min(own, 4) + 2]
    # the whole stream's state: every client's last 4 requests, in arrival order
    tail = state[window.STATE_KEY]
    assert list(zip(*(tail.column(c).to_pylist() for c in tail.schema.names), strict=True)) == (
        _expected_tail([first, batch], 4, 10**9))
    # a stream in pieces: the whole file's windows, and the state with a cap on it too
    parts = [_requests(n, 300, 10_000 * i, i) for i, n in enumerate([400, 7, 0, 250, 1, 600])]
    whole = window.window_features(
        *(pa.concat_arrays([p[k] for p in parts]) if k in (0, 2, 4) else
          np.concatenate([p[k] for p in parts]) for k in range(5)), {})
    for cap in (0, 40):
        state = {}
        got = [window.window_features(*p, state, max_clients=cap) for p in parts]
        tail = state[window.STATE_KEY]
        assert list(zip(*(tail.column(c).to_pylist() for c in tail.schema.names),
                        strict=True)) == _expected_tail(parts, 19, cap * 19 if cap else 10**9)
        if not cap:
            for col in WINDOW_COLUMNS:
                assert np.array_equal(np.concatenate([g[col] for g in got]), whole[col]), col
