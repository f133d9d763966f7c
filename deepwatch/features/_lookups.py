"""User agent -> browser, OS and device class (ua-parser); client IP -> country (iptocc, offline)
and private/public. Each distinct value is looked up once and remembered, so a batch costs one
lookup per *new* agent or address, never one per record. ``client_address`` takes the port and
brackets off a client written with them and writes an IPv6 address in its canonical form, so that
the lookups and the per-client windows see one address however it was written.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Generic marks of automated clients (not names of attack tools: those must be learned).
_BOT_WORDS = ("bot", "crawl", "spider", "slurp", "curl", "wget", "python", "java/", "go-http",
              "libwww")
_MOBILE_OS = ("iOS", "Android", "Windows Phone", "BlackBerry OS", "Symbian OS", "Firefox OS")
_DESKTOP_OS = ("Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "Debian",
               "FreeBSD", "OpenBSD", "macOS")


@lru_cache(maxsize=65536)
def agent_info(agent: str) -> tuple[str, str, str]:
    """(browser family, OS family, device class) of one user agent string."""
    if not agent or agent == "-":
        return "none", "none", "none"
    import ua_parser

    result = ua_parser.parse(agent[:2000])
    browser = result.user_agent.family if result.user_agent else "Other"
    os_family = result.os.family if result.os else "Other"
    device = result.device.family if result.device else "Other"
    low = agent.lower()
    if device == "Spider" or any(w in low for w in _BOT_WORDS):
        cls = "bot"
    elif "ipad" in low or "tablet" in low:
        cls = "tablet"
    elif os_family in _MOBILE_OS or "mobile" in low:
        cls = "mobile"
    elif os_family.startswith(_DESKTOP_OS):
        cls = "desktop"
    else:
        cls = "other"
    return browser, os_family, cls


#: A client written with its port (NGINX's ``$remote_addr:$remote_port``, Apache's
#: ``%a:%{remote}p``): an IPv4 address or a host name (one colon only: an IPv6 address written
#: bare has two or more, and its last group is never taken for a port) and the port.
_HOST_PORT = r"^([^:\[\]]+):\d{1,5}$"
#: An IPv6 address in brackets, with its port or without (``[2001:db8::1]:443``,
#: ``[2001:db8::1]``, a zone allowed): the address without its brackets, as a ``vhost`` is stored.
_BRACKETED = r"^\[([0-9A-Fa-f]*:[0-9A-Fa-f:.]*(?:%[^\[\]]+)?)\](?::\d{1,5})?$"


@lru_cache(maxsize=262144)
def canonical_v6(addr: str) -> str:
    """An IPv6 address in its canonical form (RFC 5952: lower case, zeros compressed:
    ``2001:DB8:0:0::1`` is ``2001:db8::1``), its zone (``%eth0``) kept as written; an
    IPv4-mapped one (``::ffff:192.0.2.1``, ``::FFFF:c000:201``, ``0:0:0:0:0:ffff:192.0.2.1``: a
    dual-stack server's spelling of an IPv4 client) is its IPv4 address, ``192.0.2.1``, the
    client that server logs as ``192.0.2.1`` when it listens on IPv4 (one with a zone, which no
    IPv4 address has, stays ``::ffff:192.0.2.1%eth0``); any other value as it is."""
    if ":" not in addr:
        return addr
    try:
        ip = ipaddress.IPv6Address(addr)
    except ValueError:
        return addr
    if ip.ipv4_mapped is None:
        return str(ip)
    if not ip.scope_id:
        return str(ip.ipv4_mapped)
    return f"::ffff:{ip.ipv4_mapped}%{ip.scope_id}"


def _canonical(col: pa.Array) -> pa.Array:
    """``canonical_v6`` of each distinct value that has a colon (an IPv6 address can be one of
    them), taken back to the rows; a column without one is returned as it is."""
    if not pc.any(pc.match_substring(col, ":")).as_py():
        return col
    encoded = pc.dictionary_encode(col)
    canon = pa.array([canonical_v6(v) for v in encoded.dictionary.to_pylist()],
                     encoded.dictionary.type)
    return canon.take(encoded.indices)


def client_address(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The client column as an address: the port taken off a client written with one
    (``a.b.c.d:port``, ``host:port``, ``[v6]:port``), the brackets off an IPv6 address
    (``[v6]``), and an IPv6 address in its canonical form (``canonical_v6``: ``2001:DB8:0:0::1``,
    ``[2001:db8::1]:443`` and ``2001:db8::1`` are all ``2001:db8::1``; a zone is kept, so
    ``fe80::1%eth0`` and ``fe80::1%eth1`` stay two; an IPv4-mapped one, ``::ffff:192.0.2.1`` or
    ``[::ffff:192.0.2.1]:443``, is its IPv4 address ``192.0.2.1``); any other value as written.
    The records keep their client as written: this is what the address features and the
    per-client windows look at."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    col = pc.replace_substring_regex(col, _HOST_PORT, r"\1")
    return _canonical(pc.replace_substring_regex(col, _BRACKETED, r"\1"))


@lru_cache(maxsize=262144)
def ip_info(addr: str) -> tuple[str, bool, bool]:
    """(country code or 'private'/'unknown'/'invalid', is private, is IPv6) of one address."""
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        return "invalid", False, False
    v6 = ip.version == 6
    if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
        return "private", True, v6
    import iptocc

    # the address without its zone: with one (``2a00:1450::1%eth0``) iptocc found no country
    cc = iptocc.country_code(str(ip).partition("%")[0])
    return (cc or "unknown"), False, v6


def _per_distinct(col: pa.Array | pa.ChunkedArray, fn, width: int  # type: ignore[no-untyped-def]
                  ) -> tuple[list[list[object]], np.ndarray]:
    """Apply ``fn`` to each distinct value; returns (results per distinct value, index per row)."""
    col = pc.fill_null(col, "")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    encoded = pc.dictionary_encode(col)
    values = encoded.dictionary.to_pylist()
    idx = encoded.indices.to_numpy(zero_copy_only=False)
    results = [fn(v) for v in values]
    columns = [[r[k] for r in results] for k in range(width)]
    return columns, idx


def agents(col: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
    cols, idx = _per_distinct(col, agent_info, 3)
    names = ("browser", "os", "device")
    return {n: pa.array(c, pa.string()).take(pa.array(idx)) for n, c in zip(names, cols,
                                                                            strict=True)}


def addresses(col: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array | np.ndarray]:
    cols, idx = _per_distinct(col, ip_info, 3)
    return {
        "country": pa.array(cols[0], pa.string()).take(pa.array(idx)),
        "ip_private": np.asarray(cols[1], dtype=np.float64)[idx],
        "ip_v6": np.asarray(cols[2], dtype=np.float64)[idx],
    }
