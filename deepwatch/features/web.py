"""Features of web requests (the ``access_v1`` deriver) and the access format's featurizer spec.

From each request: method, status and its class, size, URL shape (length, depth, query length,
parameter count), character-class counts and ratios, entropy, percent-encodings, file extension,
hashed character n-grams of path and query; the user agent as browser, OS and device class; the
client address (no port or brackets, IPv6 canonical, IPv4-mapped IPv6 as its IPv4 address, see
``client_address``) as country, private/public and IPv6; the referer as present and its host; hour
of day (the server's local hour, see ``LOCAL_HOUR``). Per client (its address, whatever port it
came from), behaviour over a sliding window of recent requests (see ``_window``). The featurizer
then one-hot encodes the categorical columns with learned vocabularies and standardises the
numbers. The virtual host (``vhost``) is not a feature: a featurizer fitted before it was kept
computes what it did.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._lookups import addresses, agents, client_address
from ._text import char_classes, count_matches, entropy, hashed_ngrams
from ._window import WINDOW_COLUMNS, window_features

#: Column that marks a table as already derived (derivation is idempotent).
DERIVED_MARK = "_access_v1"
#: Chosen on validation data only (the first 80% of the real site log, its last quarter held out,
#: with simulated attacks): fewer, coarser n-gram buckets and categories leave the autoencoder
#: less benign noise to reconstruct.
DEFAULT_PARAMS: dict[str, Any] = {"path_buckets": 16, "query_buckets": 8, "agent_buckets": 8,
                                  "ngram": 3, "window": 20}
#: The parameter that makes the hour-of-day features the server's local hour (the time of the
#: line with its UTC offset, ``utc_offset_minutes``) rather than the UTC hour. A featurizer
#: saved before it existed has no such key: it is not in ``DEFAULT_PARAMS``, so such a
#: featurizer keeps computing the UTC hour and its bundle scores as it always did, while
#: ``access_feature_spec`` (what a new featurizer is fitted from) writes it, true.
LOCAL_HOUR = "local_hour"

CATEGORICAL = ("method", "status_code", "status_class", "protocol", "extension", "browser",
               "os", "device", "country", "referer_host")
_URL_NUMERIC = ("url_length", "path_length", "path_depth", "query_length", "query_params",
                "url_digits", "url_letters", "url_upper", "url_special", "url_non_ascii",
                "digit_ratio", "upper_ratio", "special_ratio", "url_entropy",
                "percent_encodings", "path_dots", "request_malformed")
_OTHER_NUMERIC = ("bytes", "has_referer", "has_user", "ip_private", "ip_v6", "hour_sin",
                  "hour_cos", "agent_length", "agent_entropy")
#: Counts and sizes: log1p before standardising.
_LOG = ("bytes", "url_length", "path_length", "path_depth", "query_length", "query_params",
        "url_digits", "url_letters", "url_upper", "url_special", "url_non_ascii",
        "percent_encodings", "path_dots", "win_requests", "win_rate", "win_gap", "agent_length")


def _gram_names(prefix: str, buckets: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(buckets)]


def access_feature_spec(params: dict[str, Any] | None = None, min_count: int = 10,
                        max_categories: int = 32) -> dict[str, Any]:
    """The featurizer spec of the ``access`` format (defaults: see ``DEFAULT_PARAMS``)."""
    p = {**DEFAULT_PARAMS, LOCAL_HOUR: True, **(params or {})}
    grams = (_gram_names("path_gram_", p["path_buckets"])
             + _gram_names("query_gram_", p["query_buckets"])
             + _gram_names("agent_gram_", p["agent_buckets"]))
    numeric = [*_URL_NUMERIC, *_OTHER_NUMERIC, *WINDOW_COLUMNS, *grams]
    return {
        "categorical": list(CATEGORICAL),
        "numeric": numeric,
        "log1p": [*_LOG, *grams],
        "min_count": min_count,
        "max_categories": max_categories,
        "derive": {"name": "access_v1", "params": p},
    }


def _num(col: pa.ChunkedArray | pa.Array, default: float = 0.0) -> np.ndarray:
    # not a safe cast: a size past 2**53 (a client can make a server log any) has no exact
    # float, and refusing it failed the whole run; the nearest float serves a feature
    return np.asarray(pc.fill_null(pc.cast(col, pa.float64(), safe=False), default)
                      .to_numpy(zero_copy_only=False), dtype=np.float64)


def _str(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    return col


def _url_features(url: pa.Array, path: pa.Array, query: pa.Array) -> dict[str, Any]:
    cc = char_classes(url)
    length = np.maximum(cc["length"], 1.0)
    q = pc.fill_null(query, "")
    params_n = np.where(pc.utf8_length(q).to_numpy(zero_copy_only=False) > 0,
                        count_matches(q, "&") + 1.0, 0.0)
    return {
        "url_length": cc["length"],
        "path_length": _num(pc.utf8_length(path)),
        "path_depth": count_matches(path, "/"),
        "query_length": _num(pc.utf8_length(query)),
        "query_params": params_n,
        "url_digits": cc["digits"],
        "url_letters": cc["letters"],
        "url_upper": cc["upper"],
        "url_special": cc["special"],
        "url_non_ascii": cc["non_ascii"],
        "digit_ratio": cc["digits"] / length,
        "upper_ratio": cc["upper"] / length,
        "special_ratio": cc["special"] / length,
        "url_entropy": entropy(url),
        "percent_encodings": count_matches(url, "%[0-9A-Fa-f]{2}"),
        "path_dots": count_matches(path, r"\.\."),
    }


def _categories(table: pa.Table) -> dict[str, Any]:
    status = _num(table.column("status"))
    path = pc.fill_null(_str(table.column("path")), "")
    ext = pc.extract_regex(pc.utf8_lower(path), r"\.(?P<e>[a-z0-9]{1,8})$")
    extension = pc.fill_null(pc.struct_field(ext, [0]), "")
    referer = _str(table.column("referer"))
    host = pc.struct_field(pc.extract_regex(pc.fill_null(referer, ""),
                                            r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<h>[^/:?#]+)"), [0])
    return {
        "method": pc.fill_null(_str(table.column("method")), "<none>"),
        "status_code": pc.cast(pa.array(status.astype(np.int64)), pa.string()),
        "status_class": pc.cast(pa.array((status // 100).astype(np.int64)), pa.string()),
        "protocol": pc.fill_null(_str(table.column("protocol")), "<none>"),
        "extension": extension,
        "referer_host": pc.fill_null(pc.utf8_lower(host), ""),
    }


def derive_access(table: pa.Table, params: dict[str, Any], state: dict[str, Any]) -> pa.Table:
    """Add the request, agent, address and window features to a table of access records."""
    if DERIVED_MARK in table.schema.names:
        return table
    p = {**DEFAULT_PARAMS, **params}
    n = table.num_rows
    url = pc.fill_null(_str(table.column("url")), "")
    raw_request = _str(table.column("request"))
    # a malformed request line has no URL: its raw text is what the URL features look at
    url = pc.if_else(pc.is_null(_str(table.column("method"))), pc.fill_null(raw_request, ""), url)
    path = pc.fill_null(_str(table.column("path")), "")
    query = pc.fill_null(_str(table.column("query")), "")
    cols: dict[str, Any] = {}
    cols.update(_url_features(url, path, query))
    cols["request_malformed"] = _num(pc.is_null(_str(table.column("method"))))
    cols.update(_categories(table))
    cols.update(agents(table.column("user_agent")))
    # a client written with its port is its address: one client whatever port it came from,
    # and an IPv6 one however it is spelt ([2001:DB8::1], 2001:db8:0:0::1, ...)
    client = client_address(table.column("client_ip"))
    cols.update(addresses(client))
    cols["bytes"] = _num(table.column("bytes"))
    cols["has_referer"] = _num(pc.is_valid(table.column("referer")))
    cols["has_user"] = _num(pc.is_valid(table.column("user")))
    ts = table.column("timestamp").cast(pa.timestamp("ms", tz="UTC"))
    seconds = _num(pc.cast(ts, pa.int64())) / 1000.0
    local = seconds
    if p.get(LOCAL_HOUR) and "utc_offset_minutes" in table.schema.names:
        # a record without an offset (a JSON object that gives none, an older lake) is UTC
        local = seconds + _num(table.column("utc_offset_minutes")) * 60.0
    hour = (local % 86400.0) / 3600.0
    cols["hour_sin"] = np.sin(2 * np.pi * hour / 24.0)
    cols["hour_cos"] = np.cos(2 * np.pi * hour / 24.0)
    grams_p = hashed_ngrams(path, p["ngram"], p["path_buckets"])
    grams_q = hashed_ngrams(query, p["ngram"], p["query_buckets"])
    for i, name in enumerate(_gram_names("path_gram_", p["path_buckets"])):
        cols[name] = grams_p[:, i]
    for i, name in enumerate(_gram_names("query_gram_", p["query_buckets"])):
        cols[name] = grams_q[:, i]
    agent = pc.fill_null(_str(table.column("user_agent")), "")
    cols["agent_length"] = _num(pc.utf8_length(agent))
    cols["agent_entropy"] = entropy(agent)
    grams_a = hashed_ngrams(agent, p["ngram"], p["agent_buckets"])
    for i, name in enumerate(_gram_names("agent_gram_", p["agent_buckets"])):
        cols[name] = grams_a[:, i]
    cols.update(window_features(
        client, seconds, path, _num(table.column("status")),
        pc.fill_null(_str(table.column("method")), ""), state, size=int(p["window"]),
    ))
    cols[DERIVED_MARK] = np.ones(n, dtype=np.bool_)
    names = [c for c in table.schema.names if c not in cols]
    arrays: list[Any] = [table.column(c) for c in names]
    for k, v in cols.items():
        names.append(k)
        arrays.append(pa.array(v) if isinstance(v, np.ndarray) else v)
    return pa.Table.from_arrays(arrays, names=names)
