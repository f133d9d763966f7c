"""Web server access logs: NGINX/Apache ``combined`` and ``common`` formats.

One regular expression, applied to a whole chunk at once by polars (Rust regex, no per-line Python),
splits each line into its fields. What real servers write is accepted: ``-`` for absent fields,
``\\"`` and ``\\xHH`` escapes inside quoted fields (kept as written), quotes a server did not escape
in the request line (see ``_read_raw_requests``) or the referer or user agent (see
``_read_raw_quotes``), where the line holds only one way to read them, IPv6 clients, a virtual host
before the client (Apache's ``vhost_combined`` and ``vcommon``: kept as ``vhost``), extra fields
after the user agent, and request lines that are not ``METHOD TARGET PROTOCOL`` (scanners send
garbage, TLS handshakes and bare paths): such a record is kept with its raw request and null method,
as it is evidence in its own right. A line is rejected only when its frame (client, time, quoted
request, status, size) cannot be read, or when a quoted field after it is left open (a line cut
short in its user agent would otherwise pass for one in common format), or when a raw quote leaves
more than one way to part its fields; the reason says which part failed. The client may be an
address or a host name (Apache's ``%h`` with host name lookups on, NGINX's ``unix:``), but not one
holding a control or invisible character: servers escape those (``\\xHH``), so such a client is
damage or a forgery, not a client to count. The ident and user are rejected for the same reason (the
user is the name a client sent for HTTP authentication: the attacker's text, escaped by the server).

A raw control character inside a quoted field (request, referer, user agent) is kept, written
as NGINX writes it, ``\\xHH`` for each of its UTF-8 bytes: such a line comes from a logger that
does not escape (``log_format ... escape=none``, an application's own log), and what an attacker
put there (terminal escape sequences, NUL, CR) is evidence to score and alert on, not a reason
to drop the request. A record then reads and scores as the line NGINX would have written, and no
alert, output file or terminal it reaches gets a raw control character from it. A byte that is
not UTF-8 is kept so too, ``\\xHH`` (see ``HEX_ERRORS`` in ``_base``), in any field: the line is
decoded so before it is parsed, and such an escape is visible text, not a reason to reject.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from ._base import (
    BOM_LINE_REASON,
    CR_INSIDE,
    CR_INSIDE_REASON,
    Format,
    ParseResult,
    check_text,
    empty_rejects,
    make_rejects,
    reject_rows,
    split_lines,
)
from ._records import record_text

#: A quoted field: anything but an unescaped quote; ``\\"`` and ``\\xHH`` stay as written.
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
#: What may follow the size, referer and user agent (fields some servers add): words made of
#: plain characters and whole quoted strings. A quote left open there (a line cut short inside
#: its user agent) does not match, so that such a line is not read as a common-format record.
_TAIL = r'(?:\s+(?:[^\s"]|"(?:[^"\\]|\\.)*")+)*\s*$'
#: Apache's ``vhost_combined`` opens with the virtual host and its port (``%v:%p``): a host
#: name or IPv4 address (no colon, or an IPv6 one in brackets) and a port. A plain client is
#: never written so (an IPv6 client has two colons or more and no brackets), so such a first
#: field, followed by the usual four, is the virtual host and not the client. It is kept as
#: ``vhost`` (the host alone: see ``_read_vhost``, which also reads back as plain the lines of
#: a client written with its port, ``$remote_addr:$remote_port``, that fit this too).
_VHOST_TEXT = r"(?:[^\s:\[\]\"]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}"
#: ``_VHOST_TEXT`` and its space, optional, captured (the first group of ``_FRAME``).
_VHOST = r"(?:(" + _VHOST_TEXT + r") )?"
#: Client, ident, user, [time], "request", status and size: the frame of every line.
_FRAME = (r"(?s)^\s*" + _VHOST + r"(\S+) (\S+) (\S+(?: \S+)*?) \[([^\]]+)\] " + _QUOTED
          + r" (\S+) (\S+)")
#: The referer and the agent follow the size after one space or more: a log format written in
#: pieces (NGINX's ``'... "$http_referer" '`` then ``' "$http_user_agent"'``) doubles one, and
#: read only after one space such a line was a common one with two extra fields, its referer
#: and agent dropped without a word, on every line of the log.
_LINE = _FRAME + r"(?: +" + _QUOTED + " +" + _QUOTED + r")?(" + _TAIL + ")"
_GROUPS = ("vhost", "client_ip", "ident", "user", "time", "request", "status", "bytes",
           "referer", "user_agent")
#: The groups of ``_LINE``: the fields, then what follows them (``_TAIL``).
_LINE_GROUPS = (*_GROUPS, "_tail")
#: A line whose frame does not read: all up to the request's opening quote, and the rest.
_OPENED = r'(?s)^(\s*(?:' + _VHOST_TEXT + r' )?\S+ \S+ \S+(?: \S+)*? \[[^\]]+\] ")(.*)$'
#: Where a request line may end: a quote, then a status (always three digits) and a size.
_REQUEST_END = r'" \d{3} (?:\d+|-)(?:\s|$)'
#: A status and a size as a server writes them (``_REQUEST_END`` without the quote).
_STATUS_TEXT = r"^\d{3}$"
_SIZE_TEXT = r"^(?:\d+|-)$"
#: An HTTP version, its name in any case: the name is case-sensitive (RFC 9112), but a log holds
#: the line the client sent (``GET / http/1.1``: a scanner's, a hand-written client's), and read
#: as part of the target it gave the record a path no server served, and no protocol. It is
#: kept as written, so a case no real client sends is a protocol value of its own to score.
_PROTOCOL = r"(?i:HTTP)/\d(?:\.\d)?"
#: Where a request line with a protocol ends. After the fields, it is the end of the request
#: line the server wrote, and what was read as one a frame the client wrote in its target
#: (``/a" 200 5 "-" "x" "y``, its last quote closed by the server's): no field a server adds
#: ends so. (A quote, a status and a size alone may be such a field: ``"$host" 443 512``.)
_PROTOCOL_END = _PROTOCOL + _REQUEST_END
#: An agent that ends so, and the text after it (``_tail``) that starts so, hold such an end
#: between them, at the agent's closing quote: the target ``/a" 200 5 "-" "x`` makes the
#: line ``"GET /a" 200 5 "-" "x HTTP/1.1" 404 0 ...``, read as the agent ``x HTTP/1.1``.
_AGENT_PROTOCOL = _PROTOCOL + "$"
_TAIL_STATUS = r'^' + _REQUEST_END[1:]
#: A field a server adds after the user agent as ``key="value"`` with a value only it writes:
#: numbers, ``-``, and the lists NGINX makes of them (``rt="0.003"``, ``urt="0.001, 0.002"``,
#: ``uct="-"``). No payload fits in such a value, so text a client ends its agent with that
#: reads as one (``Mozilla" rt="1``) can only make the agent read as one it could have sent.
_KEYED = r'[A-Za-z_][\w.-]*="[\d.,:\s-]*"'
#: A line whose referer or user agent holds a quote its server did not escape: after the frame,
#: everything from the first quote to the last one before what the server adds, plain words
#: and ``_KEYED`` fields (``_SPAN``). It is the referer and the agent if it holds their
#: boundary ``" "`` exactly once.
_LOOSE = _FRAME + r' "(.*?)"((?:\s+(?:' + _KEYED + r'|[^\s"]+))*\s*)$'
_SPAN = "_span"
_BOUNDARY = '" "'
#: Request line: method token, target (which may hold spaces), optional protocol.
_REQUEST = r"(?s)^([A-Za-z][A-Za-z_-]{0,31}) (\S.*?)(?: (" + _PROTOCOL + r"))?$"
_TIME_FORMAT = "%d/%b/%Y:%H:%M:%S %z"
#: The other times a server may be set to write in the brackets, tried (in this order) only on
#: the lines whose time ``_TIME_FORMAT`` does not read: Apache's with a fraction of a second
#: (``%{%d/%b/%Y:%H:%M:%S}t.%{msec_frac}t %{%z}t``: ``10/Oct/2000:13:55:36.123 -0700``, or
#: ``usec_frac``'s six digits), and ISO 8601 (NGINX's ``$time_iso8601``,
#: ``2024-05-14T13:55:36+02:00``; a fraction, ``+0200`` and ``Z`` too). A fraction is
#: kept to the millisecond, what ``timestamp`` holds (``.123456`` is ``.123``: cut, not rounded).
_OTHER_TIME_FORMATS = ("%d/%b/%Y:%H:%M:%S%.f %z", "%Y-%m-%dT%H:%M:%S%.f%#z")
#: The greatest UTC offset, in minutes either way, of a line's time (``+2359``, what polars'
#: ``%z`` reads: a time beyond is unreadable) and of a record's ``utc_offset_minutes``.
_OFFSET_LIMIT = 23 * 60 + 59
_OFFSET_REASON = (f"field 'utc_offset_minutes' is not the offset of a time zone "
                  f"(-{_OFFSET_LIMIT} to {_OFFSET_LIMIT} minutes, as -23:59 to +23:59): ")
#: The HTTP status codes a record may have, and the reason of one outside (see
#: ``_status_reason``), a line's as an object's.
_STATUS_CODES = (100, 599)
_STATUS_REASON = f"status is not a code {_STATUS_CODES[0]}-{_STATUS_CODES[1]}: "


#: The scheme and authority of an absolute-form target (RFC 9112 section 3.2.2: what a client
#: sends a proxy, and scanners send any server): ``http://example.com:8080`` of
#: ``http://example.com:8080/a/b?x=1``. Any scheme (RFC 3986's letters), in any case.
_ABSOLUTE = r"(?s)^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*"
#: An authority-form target (RFC 9112 section 3.2.3, ``CONNECT example.com:443``): a host and a
#: port, no path.
_AUTHORITY = r"^[^\s/?#]+:\d*$"


def _target_path(method: Any, url: Any) -> Any:
    """The polars expression of the path of a request target ``url`` (``method``: the request's
    method), as ECS's ``url.path`` has it: all before the query or fragment of an origin-form
    target (``/a/b`` of ``/a/b?x=1``); of an absolute-form one the same after its scheme and
    authority, ``/`` where it has none (``http://example.com``: RFC 9110 section 4.2.3, the path
    a server serves for it); none (null) for a ``CONNECT``'s authority-form target, a host and a
    port. An asterisk-form target (``OPTIONS *``) is its own path, ``*`` (Apache's ``%U``).
    ``url`` (``url.original``) stays as sent either way."""
    import polars as pl

    absolute = url.str.contains(_ABSOLUTE)
    path = url.str.replace(_ABSOLUTE, "").str.extract(r"(?s)^([^?#]*)", 1)
    authority = (method == "CONNECT") & url.str.contains(_AUTHORITY)
    return (pl.when(absolute & (path == "")).then(pl.lit("/"))
            .when(authority & ~absolute).then(pl.lit(None, pl.String))
            .otherwise(path))


def _target_query(url: Any) -> Any:
    """The polars expression of the query of a request target ``url``: between its first ``?``
    and its fragment (an absolute-form target's authority holds no ``?``)."""
    return url.str.extract(r"(?s)\?([^#]*)", 1)


def _bad_status(status: Any) -> Any:
    """Where ``status`` (a polars expression or a numpy array of integers) is no HTTP code."""
    return (status < _STATUS_CODES[0]) | (status > _STATUS_CODES[1])


def _status_reason(shown: Any) -> Any:
    """The reason a status is refused, its first 20 characters quoted: ``shown`` is the status
    as a line wrote it (a polars string expression) or as an object gave it (its JSON text)."""
    cut = shown[:20] if isinstance(shown, str) else shown.str.slice(0, 20)
    return _STATUS_REASON + "'" + cut + "'"
#: A control character (C0, DEL, C1: NUL among them) or an invisible format character (the
#: byte order mark U+FEFF, zero-width spaces and joiners): never part of an address or a host
#: name, and never written raw by NGINX or Apache, which escape them as ``\\xHH``.
_HIDDEN = r"([\p{Cc}\p{Cf}])"
#: The frame's fields that may hold no such character, and what the reason says of each.
_FRAME_TEXT = {
    "client_ip": ("client", "never part of an address or host name"),
    "ident": ("ident", "which servers escape (\\xHH), never write raw"),
    "user": ("user", "which servers escape (\\xHH), never write raw"),
}
#: The quoted fields whose raw control characters are kept escaped (see the module's docstring).
_QUOTED_FIELDS = ("request", "referer", "user_agent")
#: A control character: C0 (NUL, ESC, CR ...), DEL and C1 (U+0080-U+009F), in polars and Python.
_CONTROL = r"\p{Cc}"
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")

SCHEMA = pa.schema(
    [
        pa.field("client_ip", pa.string(), nullable=False),
        pa.field("ident", pa.string()),
        pa.field("user", pa.string()),
        pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("request", pa.string(), nullable=False),
        pa.field("method", pa.string()),
        pa.field("url", pa.string()),
        pa.field("path", pa.string()),
        pa.field("query", pa.string()),
        pa.field("protocol", pa.string()),
        pa.field("status", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("referer", pa.string()),
        pa.field("user_agent", pa.string()),
        # the virtual host of Apache's vhost_combined and vcommon lines (null for the others)
        pa.field("vhost", pa.string()),
        # the UTC offset of the line's time, in minutes east of UTC (-420 for -0700)
        pa.field("utc_offset_minutes", pa.int32()),
        pa.field("label", pa.string()),
    ]
)


def _parse_frame(lines: list[str]) -> tuple[Any, Any]:
    """(polars frame of typed fields, polars Series of reject reasons: null where parsed)."""
    import polars as pl

    raw = pl.Series("raw", lines, dtype=pl.String)
    # _TEXT is what the regular expressions read: the line, or for the few whose request line
    # holds a raw quote the line with that request set aside (see _read_raw_requests)
    df = pl.DataFrame({"raw": raw}).with_columns(pl.col("raw").alias(_TEXT))
    groups = pl.col("raw").str.extract_groups(_LINE)
    df = df.with_columns(groups.struct.rename_fields(list(_LINE_GROUPS)).alias("g")).unnest("g")
    df = _read_raw_requests(df)
    df = _read_raw_quotes(df)
    df = _read_vhost(df)
    if _REQUEST_ASIDE in df.columns:
        df = df.with_columns(pl.coalesce(_REQUEST_ASIDE, "request").alias("request"))

    def dash_null(name: str) -> pl.Expr:
        c = pl.col(name)
        return pl.when(c == "-").then(None).otherwise(c).alias(name)

    status = pl.col("status").cast(pl.Int64, strict=False)
    size = pl.when(pl.col("bytes") == "-").then(0).otherwise(
        pl.col("bytes").cast(pl.Int64, strict=False))
    df = df.with_columns(
        status.alias("_status"),
        size.alias("_bytes"),
        _offset_minutes(pl.col("time")).alias("_offset"),
        _stamps(df.get_column("time")).alias("_ts"),
    )
    df = df.with_columns(_frame_text_reasons(df).alias("_client"))
    matched = pl.col("client_ip").is_not_null()
    reason = (
        pl.when(pl.col("raw").str.strip_chars().str.len_chars() == 0).then(pl.lit("empty line"))
        # the extra fields a line may end with would take in the records after a CR as words
        .when(pl.col("raw").str.contains(CR_INSIDE)).then(pl.lit(CR_INSIDE_REASON))
        # a mark inside the text (see BOM_LINE_REASON), whether or not the rest of the line reads
        .when(pl.col("raw").str.starts_with("\ufeff")).then(pl.lit(BOM_LINE_REASON))
        .when(pl.col(_REQUEST_QUOTE) | pl.col("_tail").str.contains(_PROTOCOL_END)
              | (pl.col("user_agent").str.contains(_AGENT_PROTOCOL)
                 & pl.col("_tail").str.contains(_TAIL_STATUS)))
        .then(pl.lit(_AMBIGUOUS_REQUEST_REASON))
        .when(pl.col("_quote")).then(pl.lit(_AMBIGUOUS_REASON))
        .when(~matched & pl.col(_TEXT).str.contains(_FRAME + r"\s")).then(pl.lit(
            "unterminated quoted field after the size (the line may be cut short)"))
        .when(~matched).then(pl.lit("not in common or combined log format"))
        .when(pl.col("_client").is_not_null()).then(pl.col("_client"))
        .when(pl.col("_ts").is_null() | pl.col("_offset").is_null()
              | (pl.col("_offset").abs() > _OFFSET_LIMIT))
        .then(pl.lit("unreadable time '") + pl.col("time").str.slice(0, 60) + pl.lit("'"))
        # in UTC past 9999 (31/Dec/9999:23:30 -0100) or before year 1: no day a lake can
        # file it under (day=10000-01-01 sorted before the others, could not be named in
        # --days, and turned the lake's day column into text), nor a Python datetime
        .when(~pl.col("_ts").dt.year().is_between(1, 9999))
        .then(pl.lit("time outside the years 1-9999 in UTC '") + pl.col("time").str.slice(0, 60)
              + pl.lit("'"))
        .when(pl.col("_status").is_null() | _bad_status(pl.col("_status")))
        .then(_status_reason(pl.col("status")))
        .when(pl.col("_bytes").is_null() | (pl.col("_bytes") < 0))
        .then(pl.lit("size is not a byte count: '") + pl.col("bytes").str.slice(0, 30)
              + pl.lit("'"))
        .otherwise(None)
        .alias("reason")
    )
    df = df.with_columns(reason)
    req = pl.col("request").str.extract_groups(_REQUEST).struct.rename_fields(
        ["method", "url", "protocol"])
    good = (
        _escape_controls(df.filter(pl.col("reason").is_null()), (*_QUOTED_FIELDS, "vhost"))
        .with_columns(req.alias("r"))
        .unnest("r")
        .with_columns(
            # the method as sent: HTTP's method names are case-sensitive, and a scanner's or
            # fuzzer's 'get' is evidence (ECS keeps http.request.method's casing too)
            _target_path(pl.col("method"), pl.col("url")).alias("path"),
            _target_query(pl.col("url")).alias("query"),
            dash_null("ident"),
            dash_null("user"),
            dash_null("referer"),
            dash_null("user_agent"),
        )
    )
    return good, df.get_column("reason")


def _stamps(times: Any) -> Any:
    """The polars Series of the UTC times (``Datetime("ms", "UTC")``) of ``times``, a polars
    Series of the text in a line's brackets: null where none of the forms a server writes
    reads it. ``_TIME_FORMAT`` is tried on all; each of ``_OTHER_TIME_FORMATS`` only on those
    still unread, so that a log in the usual form costs no more than that one format."""
    def read(text: Any, form: str) -> Any:
        return (text.str.to_datetime(form, strict=False, time_unit="ms")
                .dt.convert_time_zone("UTC"))

    stamps = read(times, _TIME_FORMAT)
    for form in _OTHER_TIME_FORMATS:
        rows = (stamps.is_null() & times.is_not_null()).arg_true()
        if len(rows) == 0:
            break
        stamps = stamps.scatter(rows, read(times.gather(rows), form))
    return stamps


def _offset_minutes(time: Any) -> Any:
    """The polars expression of the UTC offset of a log time (``[10/Oct/2000:13:55:36 -0700]``)
    in minutes east of UTC (-420 there; ``+02:00`` of an ISO time reads too, and its ``Z`` is 0,
    as ``+0000`` is): null where the time has none it can read (``+02``, an offset of hours
    alone, which ISO 8601 allows but no server writes: such a time is a reject)."""
    import polars as pl

    parts = time.str.extract_groups(r"([+-])(\d{2}):?(\d{2})\s*$").struct.rename_fields(
        ["sign", "h", "m"])
    minutes = (parts.struct.field("h").cast(pl.Int32, strict=False) * 60
               + parts.struct.field("m").cast(pl.Int32, strict=False))
    # literal tests, not a pattern: this runs on every line
    utc = time.str.ends_with("Z") | time.str.ends_with("z")
    return (pl.when(utc).then(pl.lit(0, pl.Int32))
            .when(parts.struct.field("sign") == "-").then(-minutes).otherwise(minutes))


#: An IPv4 or IPv6 address, written as servers write a client.
_ADDRESS = r"^(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)$"


def _read_vhost(df: Any) -> Any:
    """``df`` (polars, the groups of a line) with ``vhost`` the host alone: the host of a
    ``vhost_combined`` line's ``%v:%p`` without its port (and an IPv6 one without its brackets,
    as ECS's ``url.domain`` has it), or the host of Apache's ``vcommon`` lines (``%v %h %l %u``:
    the virtual host with no port, then the usual four fields), whose client is put in its
    place; null for a line with none.

    Read as a plain line a ``vcommon`` line has the host for client, the address for ident and
    ``ident user`` for the user. An ident is a user name from identd, not an address, so an
    ident that is an address with more than one word after it marks the host's field; a host
    before a client written as a host name (``HostnameLookups On``) cannot be told from one.

    A client written with its port (NGINX's ``$remote_addr:$remote_port``, Apache's
    ``%a:%{remote}p``) reads as a ``%v:%p`` too, and where the user holds a space (the name a
    client sent in its Authorization header: ``203.0.113.5:51234 - john doe [...]``) the line
    reads as a ``vhost_combined`` one, its client ``-``. A ``vhost_combined`` line's client is
    an address or a host name, never ``-``, so such a line is read as a plain one: the client
    with its port as written, the ``-`` as the ident, the rest as the user (what ``_FRAME``
    reads without the host: its fields are parted by single spaces)."""
    import polars as pl

    plain = (pl.col("vhost").is_not_null() & (pl.col("client_ip") == "-")).fill_null(False)
    df = df.with_columns(
        pl.when(plain).then(None).otherwise(pl.col("vhost")).alias("vhost"),
        pl.when(plain).then(pl.col("vhost")).otherwise(pl.col("client_ip")).alias("client_ip"),
        pl.when(plain).then(pl.col("client_ip")).otherwise(pl.col("ident")).alias("ident"),
        pl.when(plain).then(pl.col("ident") + " " + pl.col("user")).otherwise(pl.col("user"))
        .alias("user"),
    )
    shifted = (pl.col("ident").str.contains(_ADDRESS)
               & pl.col("user").str.contains(" ", literal=True)).fill_null(False)
    words = pl.col("user").str.splitn(" ", 2).struct.rename_fields(["_first", "_rest"])
    df = df.with_columns(words.alias("_w")).unnest("_w")
    return df.with_columns(
        pl.coalesce(_host(pl.col("vhost")), pl.when(shifted).then(pl.col("client_ip")))
        .alias("vhost"),
        pl.when(shifted).then(pl.col("ident")).otherwise(pl.col("client_ip")).alias("client_ip"),
        pl.when(shifted).then(pl.col("_first")).otherwise(pl.col("ident")).alias("ident"),
        pl.when(shifted).then(pl.col("_rest")).otherwise(pl.col("user")).alias("user"),
    ).drop("_first", "_rest")


def _host(vhost: Any) -> Any:
    """The polars expression of the host of ``vhost``: a ``%v:%p`` (``_VHOST_TEXT``) without its
    port, and an IPv6 host without its brackets; any other text as it is (an IPv6 host written
    bare, ``2001:db8::1``, keeps all its colons)."""
    import polars as pl

    with_port = vhost.str.contains("^" + _VHOST_TEXT + "$")
    host = pl.when(with_port).then(vhost.str.replace(r":\d+$", "")).otherwise(vhost)
    return host.str.replace(r"^\[(.*)\]$", "$1")


_TEXT = "_text"
_REQUEST_ASIDE = "_request"
_REQUEST_QUOTE = "_request_quote"
_AMBIGUOUS_REQUEST_REASON = (
    "unescaped quote in the request line: more than one place where it could end (a quote, a "
    "status and a size), so which holds the status, size, referer and agent cannot be told")


def _read_raw_requests(df: Any) -> Any:
    """``df`` (polars, the groups of ``_LINE`` over ``raw``) with the lines whose request line
    holds a quote its server did not escape (``"GET /a"b HTTP/1.1"``: NGINX's ``escape=none``,
    old servers) read, and a boolean ``_REQUEST_QUOTE`` column true for those where it cannot
    be, with ``_REQUEST_ASIDE`` holding the request of each line read (null for the others).

    The request line ends where the server wrote its closing quote, then the status (three
    digits) and the size. The target is the client's to write, and so are the referer and the
    agent after the size: any of them may hold a quote, a status and a size of its own. A line
    with that pattern once holds only the server's, and is read: the request is all before it,
    and the rest is read as any line's is, with the request set aside (``-`` in ``_TEXT``).
    With two or more, any could be the server's, and the one taken would decide the record's
    status, size, referer and agent: the line is a reject with that reason. Only lines whose
    frame does not read, or reads with a status or size that is none (the client's quote
    before a space ended the request early: ``"GET /?id=1" HTTP/1.1" 200 5``), are looked at
    again: the text of every other line is the line."""
    import polars as pl

    # a line whose frame reads but that fails after the size is _read_raw_quotes's; one whose
    # frame reads with no status or size where they are read is such a line too: a quote of the
    # client's before a space (`"GET /?id=1" HTTP/1.1" 200 5`) ended the request, so that the
    # protocol and the real status were read as the status and the size
    read = pl.col("client_ip").is_not_null()
    misread = read & ~(pl.col("status").str.contains(_STATUS_TEXT)
                       & pl.col("bytes").str.contains(_SIZE_TEXT))
    df = df.with_row_index("_row")
    hits = df.filter((~read & ~pl.col("raw").str.contains(_FRAME)) | misread)
    hits = hits.drop([*_LINE_GROUPS, _TEXT])
    hits = hits.with_columns(
        pl.col("raw").str.extract_groups(_OPENED)
        .struct.rename_fields(["_head", "_rest"]).alias("h")).unnest("h")
    hits = hits.filter(pl.col("_rest").str.contains(_REQUEST_END))
    if hits.height == 0:
        return df.drop("_row").with_columns(pl.lit(False).alias(_REQUEST_QUOTE))
    ends = pl.col("_rest").str.count_matches(_REQUEST_END)
    split = pl.col("_rest").str.extract_groups(r"(?s)^(.*)(" + _REQUEST_END + r".*)$")
    hits = hits.with_columns((ends > 1).alias(_REQUEST_QUOTE),
                             split.struct.rename_fields([_REQUEST_ASIDE, "_after"]).alias("s"))
    hits = hits.unnest("s").with_columns(
        pl.when(pl.col(_REQUEST_QUOTE)).then(None).otherwise(pl.col(_REQUEST_ASIDE))
        .alias(_REQUEST_ASIDE),
        pl.when(pl.col(_REQUEST_QUOTE)).then(pl.col("_head") + pl.col("_rest"))
        .otherwise(pl.col("_head") + pl.lit("-") + pl.col("_after")).alias(_TEXT))
    groups = pl.col(_TEXT).str.extract_groups(_LINE).struct.rename_fields(list(_LINE_GROUPS))
    hits = hits.with_columns(
        pl.when(pl.col(_REQUEST_QUOTE)).then(None).otherwise(groups).alias("g")).unnest("g")
    rest = df.join(hits.select("_row"), on="_row", how="anti").with_columns(
        pl.lit(False).alias(_REQUEST_QUOTE), pl.lit(None, pl.String).alias(_REQUEST_ASIDE))
    return pl.concat([rest, hits.select(rest.columns)]).sort("_row").drop("_row")


_AMBIGUOUS_REASON = ("unescaped quote after the size: where the referer, the user agent and "
                     "any quoted field after them part cannot be told")


def _read_raw_quotes(df: Any) -> Any:
    """``df`` (polars, the groups of ``_LINE``) with the lines that did not read as combined
    but whose referer or user agent holds a raw quote (a logger that does not escape ``"``:
    NGINX's ``escape=none``, old servers) read by ``_LOOSE``, and a boolean ``_quote`` column
    true for those whose split is ambiguous. Without this such a line read as a common one
    with its referer and agent for extra fields, and lost both without a word.

    The agent is the last field a combined line has, so it runs to the last quote of the
    line before what a server adds after it: plain words and ``_KEYED`` fields (``rt="0.003"``;
    the agent took them in). Here a client cannot end its agent with text that passes for such
    a field and so hide what it sent: a ``x="y"`` of its own is followed by the server's quote
    (``x="y""``, no field), and a ``_KEYED`` value holds only numbers, so all it can drop from
    its agent (``Mozilla "a" b" rt="1``) is text it could have left out. (An agent whose only
    raw quote starts such a text, ``Mozilla" x="y``, is read by ``_LINE`` before this: as
    ``Mozilla`` and a field, the bytes a server that escapes writes for those two.) What parts
    the agent from the referer is the one ``" "`` between them. A span that holds a quote, a
    status and a size (``_REQUEST_END``) may be the rest of a request line that ended at a raw
    quote of the client's, so that the status and size read are the client's too: the line is
    a reject, as in ``_read_raw_requests``. A raw ``" "`` inside either, or a quoted field
    with no key the server adds after the agent (``"$http_x_forwarded_for"``), makes two or
    more: then any of them could be the boundary, and which one would decide what text the
    record shows as its agent (the referer is the client's to write, so a guess would let it
    forge one), so the line is a reject with that reason. Only lines that hold a ``" "`` are
    looked at again: a common line holds none."""
    import polars as pl

    frame = list(_GROUPS[:8])
    again = pl.col("referer").is_null() & pl.col(_TEXT).str.contains(_BOUNDARY, literal=True)
    df = df.with_row_index("_row").with_columns(pl.lit(False).alias("_quote"))
    hits = df.filter(again).drop([*_GROUPS, "_tail"]).with_columns(
        pl.col(_TEXT).str.extract_groups(_LOOSE)
        .struct.rename_fields([*frame, _SPAN, "_tail"]).alias("g")).unnest("g")
    hits = hits.filter(pl.col("client_ip").is_not_null())
    if hits.height == 0:
        return df.drop("_row")
    span = pl.col(_SPAN)
    # `" " "` holds two boundaries that share a quote, which a count of matches sees as one
    ambiguous = ((span.str.count_matches(_BOUNDARY, literal=True) != 1)
                 | span.str.contains('" " "', literal=True))
    # a quote, a status and a size there: the request read may have ended early, at a quote
    # of the client's in its target, and the status and size be the client's too
    early = span.str.contains(_REQUEST_END)
    parts = span.str.splitn(_BOUNDARY, 2).struct.rename_fields(["referer", "user_agent"])
    hits = hits.with_columns(ambiguous.alias("_quote"), (pl.col(_REQUEST_QUOTE) | early)
                             .alias(_REQUEST_QUOTE), parts.alias("p")).unnest("p").drop(_SPAN)
    rest = df.join(hits.select("_row"), on="_row", how="anti")
    return pl.concat([rest, hits.select(rest.columns)]).sort("_row").drop("_row")


def _hidden_reasons(values: Any, field: str = "client_ip") -> Any:
    """For a polars Series of a frame field's values (client, ident or user), the reason for
    each that holds a control or invisible character (see ``_HIDDEN``), null for the others.
    The character is named, as it cannot be seen in the text: from a table of the few distinct
    ones found, not line by line."""
    import unicodedata

    import polars as pl

    found = values.str.extract(_HIDDEN, 1)
    names = {}
    for char in found.drop_nulls().unique().to_list():
        what = ("a byte order mark" if char == "\ufeff" else "a control character"
                if unicodedata.category(char) == "Cc" else "an invisible format character")
        names[char] = f"{what} (U+{ord(char):04X})"
    if not names:
        return pl.repeat(None, len(values), dtype=pl.String, eager=True)
    what = found.replace_strict(names, default=None, return_dtype=pl.String)
    name, why = _FRAME_TEXT[field]
    return pl.select(pl.lit(f"{name} holds ") + what + pl.lit(f", {why}: '")
                     + values.str.slice(0, 60) + pl.lit("'")).to_series()


def _frame_text_reasons(frame: Any) -> Any:
    """For a polars frame with the client, ident and user columns, the reason of each row whose
    first such field holds a control or invisible character (null for the others)."""
    import polars as pl

    reasons = [_hidden_reasons(frame.get_column(f), f) for f in _FRAME_TEXT
               if f in frame.columns]
    if len(reasons) == 1:
        return reasons[0]
    return pl.select(pl.coalesce(reasons)).to_series()


def _escaped(text: str) -> str:
    """``text`` with each control character written ``\\xHH`` per UTF-8 byte, as NGINX does."""
    return _CONTROL_CHAR.sub(
        lambda m: "".join(f"\\x{b:02X}" for b in m.group().encode()), text)


def _escape_controls(frame: Any, names: tuple[str, ...] = _QUOTED_FIELDS) -> Any:
    """``frame`` (polars) with the raw control characters of its fields ``names`` escaped (see
    the module's docstring): one scan of each, Python only for the few values that hold one."""
    for name in names:
        if name not in frame.columns:
            continue
        column = frame.get_column(name)
        hit = column.str.contains(_CONTROL).fill_null(False)
        if not hit.any():
            continue
        rows = hit.arg_true()
        fixed = [_escaped(v) for v in column.gather(rows).to_list()]
        frame = frame.with_columns(column.clone().scatter(rows, fixed))
    return frame


def _offsets(records: list[dict[str, Any]], given: list[int | None]
             ) -> tuple[list[int | None], list[str | None]]:
    """The ``utc_offset_minutes`` of each of ``records`` (objects that parsed; ``given``: their
    offsets as parsed), and the reason of each that is none (null for the others).

    A given offset past ``_OFFSET_LIMIT`` is no time zone's: a reject, as a line whose time has
    one is. Left out, it is the offset of an ISO ``timestamp`` that has one other than zero, in
    whole minutes (``2024-05-14T10:00:00-07:00``: -420; the features count a record without
    one as UTC, and so read its local hour as UTC otherwise); given, it must be that offset (a
    record whose two offsets disagree has no local hour to trust). An offset of zero (``Z``,
    ``+00:00``) is how a client writes an instant in UTC, not its server's zone: it leaves
    ``utc_offset_minutes`` as given (a record written by ``score``, UTC time and the line's
    offset, reads back as it was)."""
    from datetime import datetime

    offsets = list(given)
    reasons: list[str | None] = [None] * len(records)
    for i, (record, have) in enumerate(zip(records, given, strict=True)):
        if have is not None and abs(have) > _OFFSET_LIMIT:
            reasons[i] = _OFFSET_REASON + record_text(record.get("utc_offset_minutes"))
            continue
        stamp = record.get("timestamp")
        if not isinstance(stamp, str | datetime):
            continue
        try:
            offset = (stamp if isinstance(stamp, datetime)
                      else datetime.fromisoformat(stamp)).utcoffset()
        except ValueError:  # not met: the timestamp parsed
            continue
        if not offset:
            continue
        seconds = offset.total_seconds()  # within a day either way, as Python bounds it
        minutes = int(seconds / 60)  # whole minutes (toward zero, as a line's +hhmm has)
        if have is None:
            offsets[i] = minutes
        elif have != minutes:
            reasons[i] = (f"field 'utc_offset_minutes' ({have}) disagrees with the offset of "
                          f"the timestamp ({minutes} minutes): {str(stamp)[:60]!r}")
    return offsets, reasons


def _to_batch(good: Any) -> pa.RecordBatch:
    import polars as pl

    n = good.height
    out = good.select(
        pl.col("client_ip"), pl.col("ident"), pl.col("user"), pl.col("_ts").alias("timestamp"),
        pl.col("request"), pl.col("method"), pl.col("url"), pl.col("path"), pl.col("query"),
        pl.col("protocol"), pl.col("_status").alias("status"), pl.col("_bytes").alias("bytes"),
        pl.col("referer"), pl.col("user_agent"), pl.col("vhost"),
        pl.col("_offset").alias("utc_offset_minutes"),
    ).to_arrow()
    arrays = [out.column(f.name).combine_chunks().cast(f.type) for f in SCHEMA if f.name != "label"]
    arrays.append(pa.nulls(n, pa.string()))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _split_requests(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Fill method, url, path, query and protocol from ``request`` where all five are absent."""
    import polars as pl

    if batch.num_rows == 0:
        return batch
    parts = ("method", "url", "path", "query", "protocol")
    frame = pl.from_arrow(pa.Table.from_batches([batch]))
    assert isinstance(frame, pl.DataFrame)
    req = pl.col("request").str.extract_groups(_REQUEST).struct.rename_fields(
        ["_m", "_u", "_p"])
    frame = frame.with_columns(req.alias("_r")).unnest("_r").with_columns(
        _target_path(pl.col("_m"), pl.col("_u")).alias("_path"),
        _target_query(pl.col("_u")).alias("_query"),
    )
    absent = pl.all_horizontal([pl.col(c).is_null() for c in parts])
    derived = {"method": "_m", "url": "_u", "path": "_path", "query": "_query", "protocol": "_p"}
    frame = frame.with_columns(
        [pl.when(absent).then(pl.col(src)).otherwise(pl.col(dst)).alias(dst)
         for dst, src in derived.items()]
    ).select(batch.schema.names)
    table = frame.to_arrow()
    arrays = [table.column(f.name).combine_chunks().cast(f.type) for f in batch.schema]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


class Access(Format):
    """NGINX/Apache access logs (``combined``, or ``common`` without referer and agent)."""

    name: ClassVar[str] = "access"
    schema: ClassVar[pa.Schema] = SCHEMA
    has_label: ClassVar[bool] = False
    nonnegative: ClassVar[tuple[str, ...]] = ("bytes",)  # a status is checked as a code
    ecs_fields: ClassVar[dict[str, str]] = {
        "source.ip": "client_ip",
        "@timestamp": "timestamp",
        "http.request.method": "method",
        "url.original": "url",
        "url.path": "path",
        "url.query": "query",
        "http.response.status_code": "status",
        "http.response.body.bytes": "bytes",
        "http.request.referrer": "referer",
        "user_agent.original": "user_agent",
        "user.name": "user",
        "url.domain": "vhost",
    }

    def parse(self, data: bytes | str, first_line: int = 1) -> ParseResult:
        check_text(data)
        lines = split_lines(data)
        if not lines:
            return ParseResult(pa.RecordBatch.from_pylist([], schema=SCHEMA), empty_rejects(), 0)
        good, reasons = _parse_frame(lines)
        ok = reasons.is_null().to_numpy()
        bad = np.flatnonzero(~ok)
        rejects = make_rejects(
            (bad + first_line).tolist(),
            [lines[i] for i in bad],
            reasons.filter(~reasons.is_null()).to_list(),
        ) if len(bad) else empty_rejects()
        numbers = pa.array(np.flatnonzero(ok).astype(np.int64) + first_line)
        return ParseResult(_to_batch(good), rejects, len(lines), numbers)

    def parse_records(self, records: list[dict[str, Any]] | Any) -> ParseResult:
        """Records as JSON objects (REST), checked as lines are: the method, URL, path, query
        and protocol of a record that gives only its ``request`` line are split from it; a
        client, ident or user holding a control or invisible character, a status outside
        100-599 and a ``utc_offset_minutes`` past +-23:59 are rejects (the first three with the
        reason a line gets); a ``vhost`` is stored as a line's is (the host, without a port or
        an IPv6 host's brackets); a control character in any other text is escaped as in a
        line's quoted fields. ``utc_offset_minutes`` left out is filled from the offset of an
        ISO ``timestamp`` that has one other than zero (``-07:00``: -420), and one given that
        disagrees with it is a reject (see ``_offsets``)."""
        import polars as pl

        if not isinstance(records, list):  # a table: its rows, as the base class reads them
            from .._arrow import as_arrow

            records = (list(records) if isinstance(records, tuple)
                       else as_arrow(records, "parse_records").to_pylist())
        result = super().parse_records(records)
        if result.batch.num_rows == 0:
            return result
        frame = pl.from_arrow(pa.Table.from_batches([result.batch]))
        assert isinstance(frame, pl.DataFrame)
        positions = np.asarray(result.line_numbers, dtype=np.int64)  # 1-based
        kept = [records[n - 1] for n in positions]  # each an object: it parsed
        offsets, offset_reasons = _offsets(kept, frame.get_column("utc_offset_minutes").to_list())
        # a record may give the parts of its request line too: every text but the frame's
        text = tuple(f.name for f in result.batch.schema
                     if f.type == pa.string() and f.name not in _FRAME_TEXT)
        fixed = _escape_controls(frame, text).with_columns(
            _host(pl.col("vhost")).alias("vhost"),
            pl.Series("utc_offset_minutes", offsets, dtype=pl.Int32))
        table = fixed.to_arrow()
        result.batch = _split_requests(pa.RecordBatch.from_arrays(
            [table.column(f.name).combine_chunks().cast(f.type) for f in result.batch.schema],
            schema=result.batch.schema))
        status = frame.get_column("status").to_numpy()
        status_reasons = [_status_reason(record_text(r.get("status"))) if bad else None
                          for r, bad in zip(kept, _bad_status(status), strict=True)]
        # the first reason in the order of the fields: the client, ident and user, the status,
        # the UTC offset
        reasons = [a if a is not None else b if b is not None else c for a, b, c in zip(
            _frame_text_reasons(frame).to_list(), status_reasons, offset_reasons, strict=True)]
        found = [(i, why) for i, why in enumerate(reasons) if why is not None]
        if not found:
            return result
        return reject_rows(result, np.array([i for i, _ in found], dtype=np.int64),
                           [record_text(kept[i]) for i, _ in found], [why for _, why in found])

    def feature_spec(self) -> dict[str, Any]:
        from ..features.web import access_feature_spec

        return access_feature_spec()
