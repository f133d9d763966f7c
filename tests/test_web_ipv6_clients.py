"""One IPv6 client however its address is written: in brackets with a port or without one,
bare, in upper case or not in its canonical form (``2001:DB8:0:0::1``). The per-client windows
counted ``[2001:db8::1]``, ``2001:db8::1`` and ``2001:DB8:0:0::1`` as three clients; a zone
(``%eth0``) made a public address's country 'unknown'. The records keep the client as written."""

from __future__ import annotations

import ipaddress

import numpy as np
import pyarrow as pa
from conftest import data_file, head_lines
from test_web_features import _line as _site_line
from test_web_features import _table

from deepwatch.features import Featurizer
from deepwatch.features._lookups import client_address, ip_info
from deepwatch.features._window import WINDOW_COLUMNS
from deepwatch.features.web import access_feature_spec, derive_access

#: One address, every way a log may write it.
FORMS = ["[2001:db8::1]", "[2001:db8::1]:443", "2001:db8::1", "2001:DB8:0:0::1",
         "[2001:DB8:0000::0001]:51234", "2001:0db8:0000:0000:0000:0000:0000:0001"]
_ADDRESS_COLUMNS = ("country", "ip_private", "ip_v6")


def _line(client: str, second: int, path: str = "/", status: int = 200) -> str:
    return _site_line(client, second, path, status)


def _columns(d: pa.Table, names: tuple[str, ...]) -> list[tuple[object, ...]]:
    return list(zip(*(d.column(c).to_pylist() for c in names), strict=True))


def test_client_address_of_every_form_is_the_canonical_address() -> None:
    assert client_address(pa.array(FORMS)).to_pylist() == ["2001:db8::1"] * len(FORMS)
    written = ["fe80::1%eth0", "[FE80::1%eth0]:80", "[fe80:0::1%eth0]", "fe80::1%eth1",
               "2001:db8::1:443", "2001:DB8::1:443", "203.0.113.5", "www.example.com:80",
               "not:an:address", "[not:an]", "::FFFF:192.0.2.1", "[::ffff:c000:201]:9",
               "-", "", None]
    assert client_address(pa.array(written)).to_pylist() == [
        "fe80::1%eth0", "fe80::1%eth0", "fe80::1%eth0", "fe80::1%eth1",
        # a bare IPv6 address whose last group reads like a port is all address
        "2001:db8::1:443", "2001:db8::1:443", "203.0.113.5", "www.example.com",
        "not:an:address", "[not:an]", "192.0.2.1", "192.0.2.1", "-", "", None]


def test_every_form_of_one_address_is_one_client_with_one_lookup() -> None:
    lines = [_line(c, i, f"/p{i % 2}", 404 if i % 3 == 0 else 200)
             for i, c in enumerate(FORMS)]
    lines.append(_line("2001:db8::1:443", 30))  # a bare address: another client
    t = _table(lines)
    d = derive_access(t, {}, {})
    assert d.column("client_ip").to_pylist() == [*FORMS, "2001:db8::1:443"]  # as written
    assert d.column("win_requests").to_pylist() == [1, 2, 3, 4, 5, 6, 1]
    assert d.column("win_gap").to_pylist() == [3600.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3600.0]
    assert d.column("win_error_share").to_pylist()[5] == 2 / 6
    assert set(_columns(d, _ADDRESS_COLUMNS)) == {("private", 1.0, 1.0)}
    # the same lines all written 2001:db8::1 give the same features, row for row
    same = derive_access(_table([_line("2001:db8::1", i, f"/p{i % 2}", 404 if i % 3 == 0
                                       else 200) for i in range(len(FORMS))]), {}, {})
    for col in (*WINDOW_COLUMNS, *_ADDRESS_COLUMNS):
        assert d.column(col).to_pylist()[:-1] == same.column(col).to_pylist(), col


def test_zones_and_a_public_address() -> None:
    public = "2a00:1450:4001:80b::200e"
    clients = ["fe80::1%eth0", "[FE80::1%eth0]:80", "[fe80::1%eth0]", "fe80::1%eth1",
               public, "[2A00:1450:4001:80B:0::200E]:8443", f"{public}%eth0"]
    d = derive_access(_table([_line(c, i) for i, c in enumerate(clients)]), {}, {})
    assert d.column("client_ip").to_pylist() == clients
    # a zone names the link: the same address on another link is another client
    assert d.column("win_requests").to_pylist() == [1, 2, 3, 1, 1, 2, 1]
    country = ip_info(public)[0]
    assert country not in ("unknown", "invalid", "private")
    assert _columns(d, _ADDRESS_COLUMNS) == [("private", 1.0, 1.0)] * 4 + [(country, 0.0, 1.0)] * 3


def test_forms_spread_over_batches_give_the_whole_file_features() -> None:
    lines = [_line(FORMS[i % len(FORMS)], i, f"/p{i % 4}", 404 if i % 5 == 0 else 200)
             for i in range(40)]
    t = _table(lines)
    whole = derive_access(_table([_line("2001:db8::1", i, f"/p{i % 4}",
                                        404 if i % 5 == 0 else 200) for i in range(40)]), {}, {})
    state: dict[str, object] = {}
    parts = pa.concat_tables([derive_access(t.slice(i, 7), {}, state)
                              for i in range(0, t.num_rows, 7)])
    assert parts.column("win_requests").to_pylist() == [min(i + 1, 20) for i in range(40)]
    for col in WINDOW_COLUMNS:
        assert np.array_equal(parts.column(col).to_numpy(), whole.column(col).to_numpy()), col


def _v6(v4: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"2001:db8::{v4}")


def test_real_site_log_as_ipv6_in_any_spelling_featurises_as_canonical() -> None:
    lines = [ln.rstrip("\n")
             for ln in head_lines(data_file("weblogs/apache_access.log.gz"), 600)]
    spell = [lambda a, i: a.compressed, lambda a, i: f"[{a.compressed}]",
             lambda a, i: f"[{a.exploded.upper()}]:{30000 + i}", lambda a, i: a.exploded]
    canonical, mixed = [], []
    for i, ln in enumerate(lines):
        v4, rest = ln.split(" ", 1)
        a = _v6(v4)
        canonical.append(f"{a.compressed} {rest}")
        mixed.append(f"{spell[i % len(spell)](a, i)} {rest}")
    t_canonical, t_mixed = _table(canonical), _table(mixed)
    assert len(set(t_mixed.column("client_ip").to_pylist())) > len(
        set(t_canonical.column("client_ip").to_pylist()))
    fz = Featurizer(access_feature_spec()).fit(t_canonical)
    assert np.array_equal(fz.transform(t_canonical, {}), fz.transform(t_mixed, {}))
