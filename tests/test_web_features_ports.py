"""A client written with its port (NGINX's ``$remote_addr:$remote_port``): the web features look
at its address. The address features called such a client 'invalid', and the per-client windows
took every new source port for a new client (a scanner logged with ports was thousands of
one-request clients). The records keep the client as written."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from conftest import data_file, head_lines
from test_web_features import _line as _site_line
from test_web_features import _table

from deepwatch.features import Featurizer
from deepwatch.features._lookups import client_address, ip_info
from deepwatch.features._window import WINDOW_COLUMNS
from deepwatch.features.web import DERIVED_MARK, access_feature_spec, derive_access


def _line(client: str, second: int, path: str = "/", status: int = 200) -> str:
    return _site_line(client, second, path, status)


def _features(table: pa.Table) -> dict[str, list[object]]:
    d = derive_access(table, {}, {})
    return {c: d.column(c).to_pylist() for c in d.schema.names
            if c not in table.schema.names and c != DERIVED_MARK}


def test_client_address_takes_off_the_port_and_nothing_else() -> None:
    written = ["203.0.113.5:51234", "[2001:db8::1]:443", "[fe80::1%eth0]:8080",
               "[::ffff:192.0.2.1]:9", "www.example.com:80", "203.0.113.5", "2001:db8::1",
               # a bare IPv6 address whose last group reads like a port is all address
               "2001:db8::1:443", "::1", "[2001:db8::1]", "1.2.3.4:123456", "-", "", None]
    assert client_address(pa.array(written)).to_pylist() == [
        "203.0.113.5", "2001:db8::1", "fe80::1%eth0", "192.0.2.1", "www.example.com",
        "203.0.113.5", "2001:db8::1", "2001:db8::1:443", "::1", "2001:db8::1",
        "1.2.3.4:123456", "-", "", None]
    chunked = pa.chunked_array([["8.8.8.8:1"], ["8.8.8.8:2", "8.8.8.8"]])
    assert client_address(chunked).to_pylist() == ["8.8.8.8"] * 3


def test_address_features_of_a_client_with_its_port() -> None:
    clients = ["8.8.8.8:51234", "10.1.2.3:443", "[2001:db8::1]:443", "2001:db8::1:443"]
    t = _table([_line(c, i) for i, c in enumerate(clients)])
    d = derive_access(t, {}, {})
    assert d.column("client_ip").to_pylist() == clients  # the record keeps it as written
    assert d.column("country").to_pylist() == ["US", "private", "private",
                                                ip_info("2001:db8::1:443")[0]]
    assert d.column("ip_private").to_pylist() == [0.0, 1.0, 1.0, 1.0]
    assert d.column("ip_v6").to_pylist() == [0.0, 0.0, 1.0, 1.0]
    assert "invalid" not in d.column("country").to_pylist()


def test_a_client_is_one_client_whatever_port_it_came_from() -> None:
    lines = [_line(f"198.51.100.7:{50000 + i}", i, f"/p{i % 3}", 404 if i % 2 else 200)
             for i in range(6)]
    lines += [_line(f"[2001:db8::9]:{40000 + i}", 10 + i) for i in range(3)]
    lines += [_line("2001:db8::9:443", 20)]  # a bare IPv6 address: another client
    d = derive_access(_table(lines), {}, {})
    assert d.column("win_requests").to_pylist() == [1, 2, 3, 4, 5, 6, 1, 2, 3, 1]
    assert d.column("win_gap").to_pylist()[:6] == [3600.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert d.column("win_error_share").to_pylist()[5] == 0.5
    assert d.column("win_distinct_paths").to_pylist()[5] == 0.5


def test_ported_lines_give_the_features_of_the_same_lines_without_ports() -> None:
    plain = [_line("198.51.100.7", i, f"/p{i % 4}", 404 if i % 3 == 0 else 200)
             for i in range(30)]
    plain += [_line("2001:db8::9", 40 + i) for i in range(5)]
    ported = [re.sub(r"^198\.51\.100\.7 ", f"198.51.100.7:{60000 + i} ", ln)
              for i, ln in enumerate(plain)]
    ported = [ln.replace("2001:db8::9 ", f"[2001:db8::9]:{i} ", 1)
              for i, ln in enumerate(ported)]
    t_plain, t_ported = _table(plain), _table(ported)
    assert _features(t_plain) == _features(t_ported)
    # and batch by batch, through the window state
    state: dict[str, object] = {}
    parts = pa.concat_tables([derive_access(t_ported.slice(i, 7), {}, state)
                              for i in range(0, t_ported.num_rows, 7)])
    whole = derive_access(t_plain, {}, {})
    for col in WINDOW_COLUMNS:
        assert np.array_equal(parts.column(col).to_numpy(), whole.column(col).to_numpy()), col


def test_real_site_log_with_ports_featurises_as_without() -> None:
    lines = [ln.rstrip("\n")
             for ln in head_lines(data_file("weblogs/apache_access.log.gz"), 600)]
    ported = [re.sub(r"^(\S+)", lambda m, i=i: f"{m.group(1)}:{30000 + i}", ln, count=1)
              for i, ln in enumerate(lines)]
    t_plain, t_ported = _table(lines), _table(ported)
    assert pc.all(pc.match_substring_regex(t_ported.column("client_ip"), r":\d+$")).as_py()
    fz = Featurizer(access_feature_spec()).fit(t_plain)
    assert np.array_equal(fz.transform(t_plain, {}), fz.transform(t_ported, {}))
    fz_ported = Featurizer(access_feature_spec()).fit(t_ported)
    assert fz_ported.feature_names_ == fz.feature_names_
