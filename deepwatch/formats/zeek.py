"""Zeek ``conn.log``: tab-separated with ``#fields``/``#types`` headers, or JSON lines.

Both layouts may come in one input; each line is recognised on its own. A ``#fields`` header sets
the field order of the TSV lines after it in the same input, up to the next ``#fields`` header
(two logs concatenated keep each its own order); it is carried from chunk to chunk of an input
(the format's *context*, see ``Format.context_prefixes``). TSV lines before any header are read in
the standard ``conn.log`` order. A log written with ``LogAscii::tsv=T`` has no ``#`` lines but
one line of field names (``ts\tuid\tid.orig_h...``): it is read as a ``#fields`` header is. A
conn.log's first field is ``ts``, and a record's ``ts`` is a time, never the text ``ts``: so a
line whose first field is ``ts`` is that header.

A record's ground-truth label is read where its log has one: a field ``label`` (a TSV header naming
it, a JSON line's or an object's key) and ``detailed-label`` (or ``detailed_label``), as
Stratosphere's IoT-23 data set writes its ``conn.log.labeled`` files. ``Benign`` or ``Normal`` (any
case) is ``normal``, ``Malicious`` the detailed label where one is set, else ``malicious``; any
other value is kept, and an unset one (``-``) leaves the record unlabelled (see ``label_value``).
IoT-23's headers join their last three names with three spaces in one tab-field, and each line
under them its last three values alike: such a header's last field, where it names a label, is read
as those names, and the last field of each TSV line under it as that many values (see ``_joined``).
The label is no feature (see ``feature_spec``).

Zeek's other logs are refused: a ``dns.log`` line has every field a record needs (ts, hosts,
proto) and became a connection with no bytes, duration or state. A header naming fields of its
own (see ``OTHER_LOG_MIN``) and none of conn.log's own fields, or not every field a record needs
(``files.log``: ``duration``, but no ``proto``), is another log's: each TSV line under it,
carried or not, is a reject saying so; a JSON line, and a record given as an object
(``parse_records``, the REST API's), is judged by its keys alike.

Zeek's header lines (``#separator``, ``#fields``, ``#types``, ``#path``, ``#open``, ``#close``...,
and the field-name line of a ``LogAscii::tsv=T`` log) are not records: they are neither parsed
nor rejected, and are counted as ``skipped``. Any other line starting with ``#`` is rejected
with its reason. ``-`` (unset) and ``(empty)`` fields are
null. Everything is vectorised with polars: TSV lines are split in bulk, JSON fields are read with
JSON-path matching, which yields null (never an error) for malformed JSON, so a bad line becomes
a reject with a reason.

A byte that is not UTF-8 (Zeek writes such bytes ``\\xhh``, so a raw one comes from another
writer or from damage) is kept as ``\\xHH`` (see ``HEX_ERRORS`` in ``_base``), in a TSV field
and in a JSON line's string alike: a JSON parser takes UTF-8 only, so a JSON line holding such
bytes is read as if they were written ``\\\\xHH`` (an escaped backslash), and the value read holds
``\\xHH`` as the TSV field would. Outside a string such a byte leaves the line no JSON: a reject.
The raw text of a reject shows the bytes ``\\xHH`` in either layout.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from ..labels import BENIGN
from ._base import (
    BOM_LINE_REASON,
    CR_INSIDE,
    CR_INSIDE_REASON,
    Format,
    ParseResult,
    check_text,
    empty_rejects,
    make_rejects,
    register_hex_errors,
    reject_rows,
    split_lines,
)
from ._records import record_text

#: The standard conn.log fields, in Zeek's order (name in the log -> column, Arrow type).
CONN_FIELDS: tuple[tuple[str, str, pa.DataType], ...] = (
    ("ts", "ts", pa.float64()),
    ("uid", "uid", pa.string()),
    ("id.orig_h", "orig_h", pa.string()),
    ("id.orig_p", "orig_p", pa.int64()),
    ("id.resp_h", "resp_h", pa.string()),
    ("id.resp_p", "resp_p", pa.int64()),
    ("proto", "proto", pa.string()),
    ("service", "service", pa.string()),
    ("duration", "duration", pa.float64()),
    ("orig_bytes", "orig_bytes", pa.int64()),
    ("resp_bytes", "resp_bytes", pa.int64()),
    ("conn_state", "conn_state", pa.string()),
    ("local_orig", "local_orig", pa.string()),
    ("local_resp", "local_resp", pa.string()),
    ("missed_bytes", "missed_bytes", pa.int64()),
    ("history", "history", pa.string()),
    ("orig_pkts", "orig_pkts", pa.int64()),
    ("orig_ip_bytes", "orig_ip_bytes", pa.int64()),
    ("resp_pkts", "resp_pkts", pa.int64()),
    ("resp_ip_bytes", "resp_ip_bytes", pa.int64()),
)
#: Zeek's names of the connection's endpoints (``id.orig_h``...) and their columns.
_DOTTED = tuple((name, col) for name, col, _t in CONN_FIELDS if name != col)
#: The endpoints' names in a log written with ``redef Log::default_scope_sep = "_"``
#: (``id_orig_h``...) -> Zeek's default names (``id.orig_h``...): read as those are.
_SCOPED = {name.replace(".", "_"): name for name, _col in _DOTTED}
_REQUIRED = ("ts", "orig_h", "resp_h", "proto")
#: The connection's ports: a TCP or UDP port (an ICMP type or code) is 16 bits, so a value past
#: 65535 is damage, not a port (it was kept, a port no traffic can have, as a category to score).
_PORTS = ("orig_p", "resp_p")
_PORT_MAX = 65535
_COUNTS = ("orig_p", "resp_p", "orig_bytes", "resp_bytes", "missed_bytes", "orig_pkts",
           "orig_ip_bytes", "resp_pkts", "resp_ip_bytes")
#: Zeek's booleans, written T/F in TSV logs and true/false in JSON logs: kept as T/F either way.
_FLAGS = ("local_orig", "local_resp")
_JSON_FLAGS = {"true": "T", "false": "F"}
#: Latest accepted time (seconds since 1970; the year 5138): beyond it a ts is garbage. An integer
#: ts of a JSON line from there on is in milliseconds (``JSON::TS_MILLIS``; 1e11 ms is in 1973).
MAX_TS = 1e11
#: The timestamps of Zeek's JSON logs written with ``JSON::TS_ISO8601``: always UTC, ``Z``.
ISO_TS = "%Y-%m-%dT%H:%M:%S%.fZ"
#: A JSON line's text field whose value is an array or an object (``"id.orig_h": ["10.0.0.1"]``,
#: ``"service": {"name": "http"}``), the field's name its first group: Zeek writes one value
#: there, and JSON path matching hands such a value over as its JSON text, which was kept as
#: the field (an address ``["10.0.0.1"]``); an object giving it is refused so too. (A number
#: field holding one is no number: refused already.) The key is one of the object's own: a
#: ``{`` or ``,`` then a quote cannot occur inside a JSON string, whose quotes are escaped.
_JSON_CONTAINER = (r'[{,]\s*"(' + "|".join(
    name.replace(".", r"\.") for name, _c, typ in CONN_FIELDS if pa.types.is_string(typ))
    # and the endpoints' own names, inside a nested "id" object (see _NESTED_ID)
    + "".join(f"|{col}|{name.replace('.', '_')}" for name, col, typ in CONN_FIELDS
              if pa.types.is_string(typ) and name != col)  # and as _SCOPED names them
    + r')"\s*:\s*[\[{]')

SCHEMA = pa.schema(
    [pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False)]
    + [pa.field(col, typ, nullable=col not in _REQUIRED)
       for _name, col, typ in CONN_FIELDS[1:]]
    + [pa.field("label", pa.string())]
)


#: The codecs error handler for a JSON line's bytes that are not UTF-8: each written ``\\xHH``
#: with its backslash escaped for JSON, so that the string JSON reads holds ``\xHH``.
JSON_HEX_ERRORS = register_hex_errors("deepwatch-json-hex", "\\\\")
#: A JSON line: an object, maybe after blanks (JSON allows them; a TSV line starts with its ts).
_JSON_START = r"^[ \t]*\{"
#: A JSON line giving the connection's endpoints as one object, ``"id": {"orig_h": ...,
#: "orig_p": ...}``, as tools that reshape Zeek logs write them (Zed's ``zq -j``; Zeek's own JSON
#: writer names them ``id.orig_h``...): read as Zeek's names are, which win where a line has both.
_NESTED_ID = r'"id"\s*:\s*\{'
#: A JSON line naming an endpoint as a log written with ``Log::default_scope_sep = "_"`` does.
_SCOPED_KEY = r'"id_(?:orig|resp)_[hp]"\s*:'
#: The column of the text a JSON line's fields are read from (see ``_json_texts``).
_JSON_TEXT = "_json_text"


def _json_texts(data: bytes | str, every: Any) -> Any:
    """``every`` (a polars Series of the lines of ``data``, as ``split_lines`` cut them) with
    each JSON line that held bytes that are not UTF-8 decoded again for its JSON to read (see
    JSON_HEX_ERRORS); None where no line did. Only the lines that start with ``{`` and show a
    ``\\x`` are looked at again: valid input costs one search.

    Text (not bytes) holds such bytes already escaped, ``\\xHH`` as ``decode_text`` writes them:
    Spark's lines reach the parser so. JSON has no ``\\x`` escape, so in a JSON line each one
    whose backslash is not itself escaped is that escape, and is read as ``\\\\xHH`` (the value
    holds ``\\xHH``, as when the bytes are parsed): ``--engine spark`` reads what ``score``
    reads."""
    suspect = every.str.contains(_JSON_START) & every.str.contains("\\x", literal=True)
    if not suspect.any():
        return None
    rows = suspect.arg_true()
    if not isinstance(data, bytes):
        import re

        unescaped = re.compile(r"(?<!\\)((?:\\\\)*)\\x([0-9A-F]{2})")
        texts = [unescaped.sub(r"\1\\\\x\2", t) for t in every.gather(rows).to_list()]
        return every.clone().scatter(rows, texts)
    pieces = data.split(b"\n")  # "\n" is never part of a byte sequence the handler escapes
    texts = [pieces[i].removesuffix(b"\r").decode("utf-8", JSON_HEX_ERRORS)
             for i in rows.to_list()]
    return every.clone().scatter(rows, texts)


DEFAULT_ORDER = [name for name, _c, _t in CONN_FIELDS]
FIELDS_PREFIX = "#fields\t"
#: The start of the one header line of a log written with ``LogAscii::tsv=T``: the field names.
TSV_PREFIX = "ts\t"
#: Zeek's log header lines: metadata, not records.
HEADER = (r"^(?:#(?:separator|set_separator|empty_field|unset_field|path|open|close|fields|types)"
          r"(?:[\t ]|$)|ts\t)")


#: conn.log's own fields: the ones Zeek's other logs (``dns.log``, ``http.log``, ``ssl.log``...)
#: do not have, beside the connection's identity (``ts``, ``uid``, ``id.*``, ``proto``) they share.
CONN_OWN = ("duration", "orig_bytes", "resp_bytes", "conn_state", "missed_bytes", "history",
            "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes")
#: Fields a conn.log has beyond ``CONN_FIELDS``, from Zeek's options and common packages.
_CONN_EXTRA = frozenset(("tunnel_parents", "community_id", "ip_proto", "orig_l2_addr",
                         "resp_l2_addr", "vlan", "inner_vlan", "speculative_service"))
#: The ground-truth label's fields (IoT-23's ``conn.log.labeled``): ``label`` (``Benign``,
#: ``Malicious``) and the attack's name (``PartOfAHorizontalPortScan``, ``C&C``... or ``-``).
LABEL_FIELD = "label"
DETAILED_FIELDS = ("detailed-label", "detailed_label")
_LABEL_NAMES = frozenset((LABEL_FIELD, *DETAILED_FIELDS))
#: The label's values read as deepwatch's (any case): the benign one, and an attack whose name
#: the detailed label gives where it is set.
_BENIGN_VALUES = ("benign", BENIGN)
_MALICIOUS_VALUE = "malicious"
#: Zeek's marks of an unset or empty field: no value.
_UNSET = ("-", "(empty)", "")
_CONN_NAMES = (frozenset(name for name, _c, _t in CONN_FIELDS) | _CONN_EXTRA | frozenset(_SCOPED)
               | _LABEL_NAMES)
#: How many fields conn.log does not have make a header (or a JSON object) naming none of
#: conn.log's own another log's: a conn.log filtered down to the connection's identity, maybe
#: with one field of a package's added, is still read; another Zeek log has several of its own
#: (``dns.log``: ``trans_id``, ``rtt``, ``query``...; ``syslog.log``: ``facility``,
#: ``severity``, ``message``; ``dpd.log``: ``analyzer``, ``failure_reason``).
OTHER_LOG_MIN = 2


#: The fields every connection record has (Zeek's name, the column): a log naming some of
#: conn.log's own fields but not these is another log too (``files.log`` has ``duration`` but no
#: ``proto``, and before Zeek 5.1 no ``id.orig_h``/``id.resp_h`` either: ``tx_hosts``...).
_IDENTITY = tuple((name, col) for name, col, _t in CONN_FIELDS if col in _REQUIRED)
#: The names a record given as an object (``parse_records``) may have beside a log's: the
#: columns' own (``orig_h``...). (The label's are a log's: ``_LABEL_NAMES``.)
_RECORD_NAMES = _CONN_NAMES | frozenset(col for _name, col in _DOTTED)


def label_value(label: Any, detailed: Any = None) -> str | None:
    """A record's ground-truth label as deepwatch names it, from a log's ``label`` and
    ``detailed-label`` values (IoT-23's): ``Benign`` or ``Normal`` (any case) is ``normal``
    (``BENIGN``), ``Malicious`` (any case) the detailed label where it is set (not ``-`` or
    empty), else ``malicious``; any other value is kept, stripped; an unset one (``-``, empty,
    None) is None (no label). ``_label_expr`` reads a log's lines alike, in bulk."""
    if label is None:
        return None
    text = str(label).strip()
    if text in _UNSET:
        return None
    kind = text.lower()
    if kind in _BENIGN_VALUES:
        return BENIGN
    if kind == _MALICIOUS_VALUE:
        attack = None if detailed is None else str(detailed).strip()
        return attack if attack not in (None, *_UNSET) else _MALICIOUS_VALUE
    return text


def _label_expr(label: Any, detailed: Any) -> Any:
    """``label_value`` as a polars expression over the text columns ``label`` and
    ``detailed`` (null where unset)."""
    import polars as pl

    text = label.str.strip_chars()  # (Zeek's unset marks are read as unset after it)
    kind = text.str.to_lowercase()
    attack = detailed.str.strip_chars()
    attack = pl.when(attack.is_in(list(_UNSET))).then(None).otherwise(attack)
    return (pl.when(text.is_null() | text.is_in(list(_UNSET))).then(None)
            .when(kind.is_in(list(_BENIGN_VALUES))).then(pl.lit(BENIGN))
            .when(kind == _MALICIOUS_VALUE).then(pl.coalesce(attack, pl.lit(_MALICIOUS_VALUE)))
            .otherwise(text).alias(LABEL_FIELD))


def _other_log(names: Any, what: str, known: frozenset[str] = _CONN_NAMES,
               records: bool = False) -> str | None:
    """The reason a line is refused when its fields (``names``: a header's, or a JSON object's
    keys) are another Zeek log's, not conn.log's, else None: two or more fields conn.log does
    not have (see ``OTHER_LOG_MIN``; ``known``: the names it has), and either none of
    conn.log's own fields (``dns.log``, ``http.log``) or not every field a connection record
    needs (``files.log``: ``duration``, but no ``proto``; lines that lack one are rejects
    anyway, this says why). ``records``: ``names`` are an object's of ``parse_records``, where
    a column's name (``orig_h``) gives the field as well as Zeek's (``id.orig_h``). ``what``:
    what names them, for the reason."""
    has = {_SCOPED.get(name, name) for name in names}  # (id_orig_h is id.orig_h)
    own = not has.isdisjoint(CONN_OWN)
    missing = [name for name, col in _IDENTITY
               if name not in has and not (records and col in has)]
    if own and not missing:
        return None
    foreign = [name for name in names if name not in known]
    if len(foreign) < OTHER_LOG_MIN:
        return None
    shown = ", ".join(foreign[:6]) + (", ..." if len(foreign) > 6 else "")
    if not own:
        return (f"{what} is not conn.log's: it names none of conn.log's own fields "
                f"({', '.join(CONN_OWN)}) and {len(foreign)} fields conn.log does not have "
                f"({shown}): a line of another Zeek log (dns.log, http.log...)?")
    return (f"{what} is not conn.log's: it has no {', '.join(missing)}, which every "
            f"connection record has, and {len(foreign)} fields conn.log does not have "
            f"({shown}): a line of another Zeek log (files.log...)?")


def _header_other_log(header: str | None, order: list[str]) -> str | None:
    """The reason each TSV line under ``header`` (its field ``order``) is refused where the
    header is another Zeek log's (see ``_other_log``), else None. Decided once per header."""
    if not header or order is DEFAULT_ORDER:
        return None
    what = ("the #fields header of these lines" if header.startswith(FIELDS_PREFIX)
            else "the field-name header line (LogAscii::tsv=T) of these lines")
    return _other_log(order, what)


def _json_other_log(frame: Any, reason: Any) -> Any:
    """``reason`` with each JSON line whose keys are another log's (see ``_other_log``) a
    reject saying so. A conn.log's JSON line always has some of conn.log's own fields
    (``missed_bytes``, ``orig_pkts``... are always set) and every field a record needs: only
    the lines with none of the former, or missing one of the latter (a reject already), are
    looked at again, in Python."""
    import json

    import polars as pl

    if not frame.get_column("_json").any():
        return reason
    suspect = frame.select(pl.col("_json") & (
        pl.all_horizontal([pl.col(c).is_null() for c in CONN_OWN])
        | pl.any_horizontal([pl.col(c).is_null() for c in _REQUIRED]))).to_series().arg_true()
    if suspect.len() == 0:
        return reason
    found = {}
    for row, raw in zip(suspect.to_list(), frame.get_column(
            _JSON_TEXT if _JSON_TEXT in frame.columns else "raw").gather(suspect).to_list(),
            strict=True):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue  # not JSON: its reason says so already
        if type(obj) is dict:
            why = _other_log(list(obj), "this JSON object")
            if why is not None:
                found[row] = why
    if not found:
        return reason
    return reason.scatter(list(found), list(found.values()))


#: IoT-23's header's last tab-field: names joined by one run of spaces (three, as written).
_JOINED_NAMES = re.compile(r"\S+( +)\S+(?:\1\S+)*")


def _order(header: str | None) -> tuple[list[str], tuple[int, str] | None]:
    """The field order a ``#fields`` header line, or a ``LogAscii::tsv=T`` log's field-name
    line, declares (the standard one without either), and how its last names share one
    tab-field (see ``_joined``)."""
    if not header:
        return DEFAULT_ORDER, None
    if header.startswith(FIELDS_PREFIX):
        names = header.rstrip("\r").split("\t")[1:]
    elif header.startswith(TSV_PREFIX):
        names = header.rstrip("\r").split("\t")
    else:
        return DEFAULT_ORDER, None
    if not any(names):
        return DEFAULT_ORDER, None
    joined = _joined(names[-1])
    if joined is not None:
        names = names[:-1] + names[-1].split(joined[1])
    # a log written with Log::default_scope_sep = "_" names the endpoints id_orig_h...
    return [_SCOPED.get(name, name) for name in names], joined


def _joined(last: str) -> tuple[int, str] | None:
    """(how many names, the spaces between them) where a header's last tab-field ``last`` is
    several names joined by spaces, one of them the label's, as IoT-23 writes its headers
    (``tunnel_parents   label   detailed-label``): the last tab-field of each TSV line under
    it then holds that many values, joined alike (``-   Malicious   C&C``). None otherwise:
    Zeek's names hold no spaces, and only this layout is read so."""
    found = _JOINED_NAMES.fullmatch(last)
    if found is None:
        return None
    names = last.split(found.group(1))
    return (len(names), found.group(1)) if _LABEL_NAMES.intersection(names) else None


def _text_columns(raw: Any, order: list[str], json_text: Any = None,
                  joined: tuple[int, str] | None = None) -> Any:
    """A polars frame of every record line's fields as text (null where absent or unset), and
    its ``label`` (see ``label_value``; null where none is read). ``json_text``: the text JSON
    lines are read from, where it is not ``raw`` (``_json_texts``). ``joined``: the last names
    of ``order`` that share the last tab-field (see ``_joined``): ``_n`` counts the tab-fields,
    ``_k`` the values in the last one."""
    import polars as pl

    df = pl.DataFrame({"raw": raw} if json_text is None
                      else {"raw": raw, _JSON_TEXT: json_text})
    source = pl.col("raw" if json_text is None else _JSON_TEXT)
    is_json = pl.col("raw").str.contains(_JSON_START)
    parts = pl.col("raw").str.split("\t")
    exprs = [is_json.alias("_json"), parts.list.len().alias("_n")]
    tabbed = len(order) - (joined[0] - 1 if joined else 0)  # the tab-fields of a line
    if joined:
        tail = parts.list.last().str.split(joined[1])
        exprs.append(tail.list.len().alias("_k"))

    def tsv(name: str) -> Any:
        at = order.index(name)
        if joined and at >= tabbed - 1:
            return tail.list.get(at - tabbed + 1, null_on_oob=True)
        return parts.list.get(at, null_on_oob=True)

    def unset(text: Any) -> Any:
        return pl.when(text.is_in(list(_UNSET))).then(None).otherwise(text)
    # the endpoints in one object (see _NESTED_ID), or named id_orig_h... (see _SCOPED):
    # looked for only where a line has such names
    nested = bool(raw.str.contains(_NESTED_ID).any())
    scoped = bool(raw.str.contains(_SCOPED_KEY).any())
    for name, col, _typ in CONN_FIELDS:
        from_json = source.str.json_path_match(f"$['{name}']")
        if name.startswith("id.") and (nested or scoped):  # Zeek's default name wins
            from_json = pl.coalesce(
                from_json,
                *([source.str.json_path_match(f"$['{name.replace('.', '_')}']")]
                  if scoped else []),
                *([source.str.json_path_match(f"$['id']['{name.removeprefix('id.')}']")]
                  if nested else []))
        from_tsv = tsv(name) if name in order else pl.lit(None, dtype=pl.String)
        if col in _FLAGS:  # JSON logs write true/false where TSV logs write T/F
            from_json = from_json.replace_strict(_JSON_FLAGS, default=from_json)
        text = pl.when(is_json).then(from_json).otherwise(from_tsv)
        exprs.append(unset(text).alias(col))
    # the label: from a header naming it, or JSON lines having the key (looked for only then)
    tsv_label = LABEL_FIELD in order
    json_label = bool(raw.str.contains(f'"{LABEL_FIELD}"', literal=True).any())
    if not (tsv_label or json_label):
        exprs.append(pl.lit(None, dtype=pl.String).alias(LABEL_FIELD))
        return df.with_columns(exprs)
    none = pl.lit(None, dtype=pl.String)
    texts = []
    for names in ((LABEL_FIELD,), DETAILED_FIELDS):
        from_tsv = pl.coalesce([tsv(n) for n in names if n in order] or [none])
        from_json = (pl.coalesce([source.str.json_path_match(f"$['{n}']") for n in names])
                     if json_label else none)
        texts.append(pl.when(pl.col("_json")).then(from_json).otherwise(from_tsv)
                     .alias(names[0]))
    # the fields first, then the texts, then the label read from them: each of _label_expr's
    # several uses of a text split the lines again (the parse took twice its time)
    return (df.with_columns(exprs).with_columns(texts)
            .with_columns(_label_expr(pl.col(LABEL_FIELD), pl.col(DETAILED_FIELDS[0])))
            .drop(DETAILED_FIELDS[0]))


def _json_whole_numbers(df: Any) -> Any:
    """``df`` (``_text_columns``) with each integer field of a JSON line that is a number with
    a fraction of zero, not negative (``100.0``, as pandas' ``to_json`` writes an integer column
    holding nulls; ``1e3``), written as that integer: a record given as an object takes it so,
    and the line was a reject. Only the values that hold ``.``, ``e`` or ``E`` are looked at
    again."""
    import polars as pl

    if not df.get_column("_json").any():
        return df
    fixed = []
    for _name, col, typ in CONN_FIELDS:
        if not pa.types.is_integer(typ):
            continue
        text = df.get_column(col)
        rows = (df.get_column("_json") & text.str.contains_any([".", "e", "E"])
                .fill_null(False)).arg_true()
        if rows.len() == 0:
            continue
        number = text.gather(rows).cast(pl.Float64, strict=False)
        whole = (number == number.floor()) & (number >= 0) & (number < 2.0**63)
        values = [str(int(x)) if ok else t for x, ok, t in zip(
            number.to_list(), whole.fill_null(False).to_list(), text.gather(rows).to_list(),
            strict=True)]
        fixed.append(text.clone().scatter(rows, values))
    return df.with_columns(fixed) if fixed else df


def _typed(df: Any, n_fields: int, exact: bool = False,
           joined: tuple[list[str], str] | None = None) -> tuple[Any, Any]:
    """(typed record frame, reason per line: null where the line is a record). ``exact``: the
    field order comes from a header (``#fields``, or a ``LogAscii::tsv=T`` field-name line), so
    a TSV line has exactly ``n_fields`` fields (Zeek writes a tab inside a field as ``\\x09``);
    more are records run together (a lost line break), whose first would pass and the others
    vanish. Without a header the standard order names the first fields only, and a log may have
    more (``tunnel_parents`` ...). ``joined``: the names the header's last tab-field joins, and
    the spaces between them (see ``_joined``): a TSV line's last field holds exactly as many
    values (``_k``)."""
    import polars as pl

    df = _json_whole_numbers(df)
    typed = []
    reasons: list[pl.Expr] = []
    for _name, col, typ in CONN_FIELDS:
        text = pl.col(col)
        if pa.types.is_integer(typ):
            val = text.cast(pl.Int64, strict=False)
            bad = text.is_not_null() & (val.is_null() | (val < 0))
            what = "a non-negative integer"
            if col in _PORTS:
                reasons.append(pl.when(val > _PORT_MAX).then(
                    pl.lit(f"field {col} is not a port (0-{_PORT_MAX}): '")
                    + text.str.slice(0, 60) + pl.lit("'")))
            # Zeek's counts are unsigned 64-bit: one past 2^63 - 1 is a count, too large to keep
            huge = val.is_null() & text.str.contains(r"^[0-9]{19,}$")
            reasons.append(pl.when(huge).then(pl.lit(f"field {col} is over {2**63 - 1}: '")
                                              + text.str.slice(0, 60) + pl.lit("'")))
        elif col == "ts":
            # seconds since 1970, or the UTC ISO 8601 text Zeek writes with JSON::TS_ISO8601
            iso = text.str.strptime(pl.Datetime("us", "UTC"), ISO_TS, strict=False)
            number = text.cast(pl.Float64, strict=False)
            # or, in a JSON line, the integer milliseconds Zeek writes with JSON::TS_MILLIS
            millis = pl.col("_json") & text.str.contains(r"^[0-9]+$") & (number >= MAX_TS)
            val = pl.coalesce(pl.when(millis).then(number / 1000).otherwise(number),
                              iso.dt.epoch("us").cast(pl.Float64) / 1e6)
            bad = text.is_not_null() & ~val.is_between(0.0, MAX_TS).fill_null(False)
            what = ("a time in seconds since 1970, in milliseconds (JSON lines) or in ISO 8601 "
                    "UTC (2026-11-24T10:00:00.5Z)")
        elif pa.types.is_floating(typ):
            val = text.cast(pl.Float64, strict=False)
            # a duration is an interval: Zeek never writes a negative one
            bad = text.is_not_null() & (val.is_null() | ~val.is_finite().fill_null(False)
                                        | (val < 0).fill_null(False))
            what = "a finite non-negative number"
        else:
            val, bad, what = text, pl.lit(False), ""
        if col in _REQUIRED:
            reasons.append(pl.when(text.is_null()).then(pl.lit(f"missing field {col}")))
        if what:
            reasons.append(pl.when(bad).then(pl.lit(f"field {col} is not {what}: '")
                                            + text.str.slice(0, 60) + pl.lit("'")))
        typed.append(val.alias(f"_v_{col}"))
    frame = df.with_columns(typed)
    # a JSON line that held bytes that are not UTF-8 (read from _JSON_TEXT, see _json_texts)
    not_utf8 = (pl.col(_JSON_TEXT) != pl.col("raw")) if _JSON_TEXT in df.columns else pl.lit(False)
    shape = (
        pl.when(pl.col("raw").str.strip_chars().str.len_chars() == 0).then(pl.lit("empty line"))
        # a mark inside the input (one opening it is dropped): a file joined to the one before
        .when(pl.col("raw").str.starts_with("\ufeff")).then(pl.lit(BOM_LINE_REASON))
        .when(pl.col("raw").str.contains(CR_INSIDE)).then(pl.lit(CR_INSIDE_REASON))
        .when(pl.col("raw").str.starts_with("#"))
        .then(pl.lit("a line starting with '#' that is not a Zeek header (#fields, #types...)"))
        .when(pl.col("_json") & pl.col("_v_ts").is_null() & pl.col("ts").is_null() & not_utf8)
        .then(pl.lit("not valid JSON (it holds bytes that are not UTF-8, shown \\xHH: they are "
                     "read inside a JSON string only)"))
        .when(pl.col("_json") & pl.col("_v_ts").is_null() & pl.col("ts").is_null()
              & pl.col("raw").str.contains(r'"ts"\s*:\s*[-0-9]'))
        .then(pl.lit("not valid JSON, or a number in it is out of range (such as a ts of 1e400)"))
        .when(pl.col("_json") & pl.col("_v_ts").is_null() & pl.col("ts").is_null())
        .then(pl.lit("not a JSON object with a ts field"))
        .when(~pl.col("_json") & ((pl.col("_n") != n_fields) if exact
                                  else (pl.col("_n") < n_fields)))
        .then(pl.lit(f"expected {n_fields} tab-separated fields, found ")
              + pl.col("_n").cast(pl.String))
    )
    if joined is not None:
        names, spaces = joined
        shape = shape.when(~pl.col("_json") & (pl.col("_k") != len(names))).then(
            pl.lit(f"expected the last tab-separated field to hold {len(names)} values "
                   f"separated by {len(spaces)} spaces ({', '.join(names)}, as the header "
                   "names them), found ") + pl.col("_k").cast(pl.String))
    reason = frame.select(pl.coalesce([shape, *reasons]).alias("r"))["r"]
    if joined is not None:  # (the frames of a chunk's segments are concatenated: same columns)
        frame = frame.drop("_k")
    return frame, _json_other_log(frame, _json_containers(frame, reason))


def _json_containers(frame: Any, reason: Any) -> Any:
    """``reason`` with the JSON lines that give a text field as an array or an object (see
    ``_JSON_CONTAINER``) rejects. Only the lines where such a field's text starts with ``[``
    or ``{`` are looked at again, in Python: a scan of every line cost a third of the parse."""
    import re

    import polars as pl

    texts = [col for name, col, typ in CONN_FIELDS if pa.types.is_string(typ)]
    suspect = frame.select(pl.col("_json") & reason.is_null() & pl.any_horizontal(
        [pl.col(c).str.contains(r"^[\[{]").fill_null(False) for c in texts]))
    rows = suspect.to_series().arg_true()
    if rows.len() == 0:
        return reason
    pattern = re.compile(_JSON_CONTAINER)
    found = {}
    for row, raw in zip(rows.to_list(), frame.get_column("raw").gather(rows).to_list(),
                        strict=True):
        hit = pattern.search(raw)
        if hit is not None:
            found[row] = (f"field {hit.group(1)} is a JSON array or object, not one value (a "
                          "string, as Zeek writes it)")
    if not found:
        return reason
    return reason.scatter(list(found), list(found.values()))


def _to_batch(frame: Any) -> pa.RecordBatch:
    import polars as pl

    cols = [(pl.col("_v_ts") * 1000).round(0).cast(pl.Int64).alias("ts")]
    cols += [pl.col(f"_v_{col}").alias(col) for _n, col, _t in CONN_FIELDS[1:]]
    cols.append(pl.col(LABEL_FIELD))
    table = frame.select(cols).to_arrow()
    arrays = [table.column("ts").combine_chunks().cast(pa.int64()).cast(SCHEMA.field("ts").type)]
    arrays += [table.column(col).combine_chunks().cast(typ) for _n, col, typ in CONN_FIELDS[1:]]
    arrays.append(table.column(LABEL_FIELD).combine_chunks().cast(pa.string()))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _ports_checked(result: ParseResult, records: list[Any]) -> ParseResult:
    """``result`` (records parsed from objects) with each record whose port is past
    ``_PORT_MAX`` a reject, with the reason a line gets (see ``_PORTS``)."""
    if result.batch.num_rows == 0:
        return result
    found: list[tuple[int, str]] = []
    for col in _PORTS:
        values = result.batch.column(col).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            past = np.flatnonzero(np.nan_to_num(values.astype(np.float64)) > _PORT_MAX)
        found.extend((int(i), f"field {col} is not a port (0-{_PORT_MAX}): '{int(values[i])}'")
                     for i in past)
    if not found:
        return result
    first: dict[int, str] = {}
    for row, why in found:  # a record with both ports past it: orig_p's reason, as a line's
        first.setdefault(row, why)
    rows = np.array(sorted(first), dtype=np.int64)
    positions = np.asarray(result.line_numbers, dtype=np.int64)[rows]  # 1-based
    return reject_rows(result, rows, [record_text(records[n - 1]) for n in positions],
                       [first[int(r)] for r in rows])


def _other_logs_rejected(result: ParseResult, records: list[Any],
                         other: dict[int, str]) -> ParseResult:
    """``result`` (records parsed from objects) with each record of ``other`` (by 0-based
    position: the reason it is another log's) a reject with that reason: a record that parsed
    is turned into one, a reject (``missing field 'proto'``) is given it instead."""
    if result.rejects.num_rows:
        lines = result.rejects.column("line").to_pylist()
        if any(n - 1 in other for n in lines):
            reasons = result.rejects.column("reason").to_pylist()
            result.rejects = result.rejects.set_column(
                2, result.rejects.schema.field("reason"),
                pa.array([other.get(n - 1, why) for n, why in zip(lines, reasons, strict=True)],
                         pa.string()))
    positions = np.asarray(result.line_numbers, dtype=np.int64) - 1
    rows = np.flatnonzero(np.isin(positions, np.fromiter(other, dtype=np.int64)))
    if rows.size == 0:
        return result
    return reject_rows(result, rows, [record_text(records[p]) for p in positions[rows]],
                       [other[int(p)] for p in positions[rows]])


def _table_labels(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` (a table given to ``Detector.score_batch``) with each text ``label`` that is
    ``Benign``, ``Normal`` or ``Malicious`` (any case, stripped) read as ``label_value`` reads
    it: ``normal``, or the ``detailed-label`` (``detailed_label``) where set, else
    ``malicious``. A frame read from an IoT-23 log (``pd.read_json``) kept ``Benign`` and
    ``Malicious``: its benign records were attacks to deepwatch's metrics, and its attacks had
    lost their names, where the same records given as objects, lines or files were read so.
    Other labels stay as they are: a batch deepwatch parsed is unchanged."""
    import pyarrow.compute as pc

    at = batch.schema.get_field_index(LABEL_FIELD)
    if at < 0 or not (pa.types.is_string(batch.schema.field(at).type)
                      or pa.types.is_large_string(batch.schema.field(at).type)):
        return batch
    given = batch.column(at)
    kind = pc.utf8_lower(pc.utf8_trim_whitespace(given))
    benign = pc.is_in(kind, pa.array(_BENIGN_VALUES, given.type))
    malicious = pc.equal(kind, _MALICIOUS_VALUE)
    if not (pc.any(benign).as_py() or pc.any(malicious).as_py()):
        return batch
    attack = pa.nulls(len(given), given.type)
    for name in DETAILED_FIELDS:  # the first one set, record by record, as parse_records
        i = batch.schema.get_field_index(name)
        if i < 0 or not (pa.types.is_string(batch.schema.field(i).type)
                         or pa.types.is_large_string(batch.schema.field(i).type)):
            continue
        text = pc.utf8_trim_whitespace(batch.column(i).cast(given.type))
        text = pc.if_else(pc.is_in(text, pa.array(_UNSET, given.type)),
                          pa.scalar(None, given.type), text)
        attack = pc.coalesce(attack, text)
    label = pc.if_else(benign.fill_null(False), pa.scalar(BENIGN, given.type),
                       pc.if_else(malicious.fill_null(False),
                                  pc.coalesce(attack, pa.scalar(_MALICIOUS_VALUE, given.type)),
                                  given))
    return batch.set_column(at, batch.schema.field(at), label)


class Zeek(Format):
    """Zeek connection records (``conn.log``), TSV or JSON lines."""

    name: ClassVar[str] = "zeek"
    schema: ClassVar[pa.Schema] = SCHEMA
    nonnegative: ClassVar[tuple[str, ...]] = (*_COUNTS, "duration")
    ecs_fields: ClassVar[dict[str, str]] = {
        "@timestamp": "ts",
        "source.ip": "orig_h",
        "source.port": "orig_p",
        "destination.ip": "resp_h",
        "destination.port": "resp_p",
        "network.transport": "proto",
        "network.protocol": "service",
        "event.id": "uid",
    }

    context_prefixes: ClassVar[tuple[str, ...]] = (FIELDS_PREFIX, TSV_PREFIX)
    column_aliases: ClassVar[dict[str, str]] = dict(_DOTTED)

    def parse(self, data: bytes | str, first_line: int = 1) -> ParseResult:
        check_text(data)
        return self.parse_in_context(data, first_line, None)

    def parse_in_context(self, data: bytes | str, first_line: int,
                         context: str | None) -> ParseResult:
        import polars as pl

        every = pl.Series("raw", split_lines(data), dtype=pl.String)
        json_every = _json_texts(data, every)
        # a header with text after a CR in it (a log with CR line ends, read as one line) is no
        # header: skipped, it would take every record run into it along
        run_together = every.str.contains(CR_INSIDE).to_numpy()
        header = every.str.contains(HEADER).to_numpy() & ~run_together
        record = ~header
        numbers = np.flatnonzero(record) + first_line
        raw = every.filter(pl.Series(record))
        json_raw = None if json_every is None else json_every.filter(pl.Series(record))
        skipped = int(header.sum())
        if raw.len() == 0:
            return ParseResult(pa.RecordBatch.from_pylist([], schema=SCHEMA), empty_rejects(), 0,
                               skipped=skipped)
        # each record is read in the order of the last #fields (or tsv=T field-name) header
        # before it
        starts = [every.str.starts_with(p) for p in self.context_prefixes]
        is_fields = np.logical_or.reduce([s.to_numpy() for s in starts]) & ~run_together
        headers = [context] + [every[int(i)] for i in np.flatnonzero(is_fields)]
        layouts = [_order(h) for h in headers]
        segment = np.cumsum(is_fields)[record]
        frames, reasons = [], []
        for seg in np.unique(segment):  # segments are runs: records stay in order
            part = raw.filter(pl.Series(segment == seg))
            json_part = None if json_raw is None else json_raw.filter(pl.Series(segment == seg))
            # DEFAULT_ORDER itself where no #fields header declares one
            order, joined = layouts[seg]
            frame, reason = _typed(
                _text_columns(part, order, json_part, joined),
                len(order) - (joined[0] - 1 if joined else 0), exact=order is not DEFAULT_ORDER,
                joined=None if joined is None else (order[-joined[0]:], joined[1]))
            other = _header_other_log(headers[seg], order)
            if other is not None:  # each TSV line under another log's header: refused so
                tsv = frame.select(~pl.col("_json") & pl.col("raw").str.contains(r"\S")
                                   & ~pl.col("raw").str.starts_with("#")
                                   & ~pl.col("raw").str.contains(CR_INSIDE)).to_series()
                reason = pl.select(pl.when(pl.lit(tsv)).then(pl.lit(other))
                                   .otherwise(pl.lit(reason))).to_series()
            frames.append(frame)
            reasons.append(reason)
        frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
        reason = reasons[0] if len(reasons) == 1 else pl.concat(reasons)
        ok = reason.is_null()
        bad = ~ok
        rejects = make_rejects(
            numbers[bad.to_numpy()].tolist(), raw.filter(bad).to_list(),
            reason.filter(bad).to_list(),
        ) if bad.any() else empty_rejects()
        batch = _to_batch(frame.filter(ok))
        return ParseResult(batch, rejects, raw.len(), pa.array(numbers[ok.to_numpy()], pa.int64()),
                           skipped=skipped)

    def parse_records(self, records: list[dict[str, Any]] | Any) -> ParseResult:
        """Records as JSON objects (REST), or the rows of a table: taken as Zeek's JSON writer
        logs them as well as by column name, so a record posted exactly as Zeek wrote it is
        read as its line is. ``id.orig_h``, ``id.orig_p``, ``id.resp_h`` and ``id.resp_p`` fill
        the columns ``orig_h``... (a record giving both names keeps the column name's value);
        an integer ``ts`` from ``MAX_TS`` on is in milliseconds, as in a JSON line;
        ``local_orig``/``local_resp`` may be JSON booleans and are kept as ``T``/``F``, as from
        a log line. An object of another Zeek log (``dns.log``, ``files.log``) is a reject with
        the reason its JSON line gets (see ``_other_log``). A ``label`` (with ``detailed-label``
        or ``detailed_label``) is read as a log's is (``Benign`` is ``normal``: see
        ``label_value``)."""
        if not isinstance(records, list):
            # a table: its rows as dicts first (iterated, a frame gives its column names)
            from .._arrow import as_arrow

            records = (list(records) if isinstance(records, tuple)
                       else as_arrow(records, "parse_records").to_pylist())
        flags = {True: "T", False: "F", "true": "T", "false": "F"}
        fixed: list[Any] = []
        other: dict[int, str] = {}  # another log's record (see _other_log), by position
        for i, r in enumerate(records):
            if type(r) is dict:
                scoped = {name: r[key] for key, name in _SCOPED.items()
                          if key in r and r.get(name) is None}
                if scoped:  # id_orig_h... (see _SCOPED)
                    r = {**r, **scoped}
                ids = r.get("id")
                if type(ids) is dict:  # the endpoints in one object (see _NESTED_ID)
                    r = {**r, **{name: ids[col] for name, col in _DOTTED
                                 if col in ids and r.get(name) is None}}
                if (any(r.get(name) is None and r.get(col) is None for name, col in _IDENTITY)
                        or all(r.get(k) is None for k in CONN_OWN)):
                    # (a conn record has ts, hosts, proto and some of conn.log's own fields:
                    # not looked at again)
                    why = _other_log(list(r), "this JSON object", _RECORD_NAMES, records=True)
                    if why is not None:
                        other[i] = why
                dotted = {col: r[name] for name, col in _DOTTED
                          if name in r and r.get(col) is None}
                if dotted:
                    r = {**r, **dotted}
                ts = r.get("ts")
                if type(ts) is int and MAX_TS <= ts < MAX_TS * 1000:  # JSON::TS_MILLIS
                    r = {**r, "ts": ts / 1000}
                if r.get(LABEL_FIELD) is not None:  # read as a log's label (see label_value)
                    given = r[LABEL_FIELD]
                    detailed = next((r[k] for k in DETAILED_FIELDS if r.get(k) is not None), None)
                    label = label_value(given, detailed) if type(given) is str else given
                    if label != given:
                        r = {**r, LABEL_FIELD: label}
                if any(type(r.get(k)) is bool or r.get(k) in ("true", "false") for k in _FLAGS):
                    r = {**r, **{k: flags[r[k]] for k in _FLAGS
                                 if type(r.get(k)) is bool or r.get(k) in ("true", "false")}}
            fixed.append(r)
        result = _ports_checked(super().parse_records(fixed), fixed)
        if result.rejects.num_rows and any(f is not r for f, r in zip(fixed, records,
                                                                     strict=True)):
            # a reject's raw text is the record as given, not as read (``id.orig_h``, ``true``)
            lines = result.rejects.column("line").to_pylist()
            result.rejects = result.rejects.set_column(
                1, result.rejects.schema.field("raw"),
                pa.array([record_text(records[n - 1]) for n in lines], pa.string()))
        return _other_logs_rejected(result, records, other) if other else result

    def with_column_names(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """:meth:`Format.with_column_names`, and a ``label`` column written as a log writes it
        read as ``parse_records`` reads an object's (see ``_table_labels``)."""
        return _table_labels(super().with_column_names(batch))

    def label_of(self, given: str) -> str:
        """A label given for a whole log (``PATH=LABEL``) read as a record's own (see
        ``label_value``): ``benign`` (any case) is ``normal``, ``malicious`` (any case)
        ``malicious``; any other label is kept (stripped), an unset one (``-``) as given."""
        return label_value(given) or given

    def feature_spec(self) -> dict[str, Any]:
        numeric = ["duration", "orig_bytes", "resp_bytes", "missed_bytes", "orig_pkts",
                   "orig_ip_bytes", "resp_pkts", "resp_ip_bytes"]
        return {
            "categorical": ["proto", "service", "conn_state", "resp_p", "history"],
            "numeric": numeric,
            "log1p": numeric,
            "min_count": 5,
            "max_categories": 64,
        }
