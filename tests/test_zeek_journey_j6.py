"""Zeek conn.log journey review (j6): lines a Zeek log's reader meets that were misread.

Each test fails on the code before its fix (checked by reverting the fix by hand).
"""

from __future__ import annotations

import json

import pytest

from deepwatch.formats._base import BOM_LINE_REASON
from deepwatch.formats.zeek import Zeek

#: A conn.log JSON line as Zeek's JSON writer logs it (LogAscii::use_json=T).
LINE = {"ts": 1715644800.123456, "uid": "CJ1", "id.orig_h": "fe80::1", "id.orig_p": 5353,
        "id.resp_h": "ff02::fb", "id.resp_p": 5353, "proto": "udp", "service": "dns",
        "duration": 0.25, "orig_bytes": 10, "resp_bytes": 0, "conn_state": "S0",
        "local_orig": True, "local_resp": False, "missed_bytes": 0, "history": "D",
        "orig_pkts": 1, "orig_ip_bytes": 58, "resp_pkts": 0, "resp_ip_bytes": 0,
        "tunnel_parents": []}
TSV_HEADER = (
    "#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n#path\tconn\n"
    "#open\t2024-05-14-00-00-00\n#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p"
    "\tproto\tservice\tduration\torig_bytes\tresp_bytes\tconn_state\tlocal_orig\tlocal_resp"
    "\tmissed_bytes\thistory\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\ttunnel_parents\n"
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring"
    "\tbool\tbool\tcount\tstring\tcount\tcount\tcount\tcount\tset[string]\n")
TSV_LINE = ("1715644800.123456\tCJ1\tfe80::1\t5353\tff02::fb\t5353\tudp\tdns\t0.250000\t10\t0\tS0"
            "\tT\tF\t0\tD\t1\t58\t0\t0\t(empty)\n")


def _rows(data: bytes) -> tuple[list[dict[str, object]], list[str]]:
    result = Zeek().parse(data)
    return result.batch.to_pylist(), result.rejects.column("reason").to_pylist()


@pytest.mark.parametrize("indent", [" ", "  ", "\t"])
def test_json_line_opened_by_blanks_is_read_as_json(indent: str) -> None:
    """JSON allows blanks before an object; such a line (a shipper's or an editor's indent) was
    taken for a TSV line and refused as 'expected 20 tab-separated fields, found 1'."""
    line = json.dumps(LINE)
    rows, reasons = _rows(f"{indent}{line}\n{line}\n".encode())
    assert reasons == []
    assert len(rows) == 2 and rows[0] == rows[1]
    assert rows[0]["orig_h"] == "fe80::1" and rows[0]["local_orig"] == "T"


def test_byte_order_mark_inside_an_input_says_so() -> None:
    """Two logs joined (``cat a.log b.json``), the second saved with a byte order mark: its
    first line, a Zeek header or a JSON record, was refused as 'expected 21 tab-separated
    fields, found 1' (or 2), not for the mark, as a KDD or access log line is."""
    bom = "\ufeff"
    data = (TSV_HEADER + TSV_LINE + bom + "#separator \\x09\n" + TSV_LINE
            + bom + json.dumps(LINE) + "\n" + json.dumps(LINE) + "\n").encode()
    result = Zeek().parse(data)
    assert result.rejects.column("line").to_pylist() == [10, 12]
    assert result.rejects.column("reason").to_pylist() == [BOM_LINE_REASON] * 2
    assert result.batch.num_rows == 3


def _nested(record: dict[str, object]) -> dict[str, object]:
    """``record`` with the connection's endpoints in one ``id`` object, as tools that reshape
    Zeek logs (Zed's ``zq -j``) write them: ``"id": {"orig_h": ..., "orig_p": ...}``."""
    ids = {k.removeprefix("id."): v for k, v in record.items() if k.startswith("id.")}
    rest = {k: v for k, v in record.items() if not k.startswith("id.") and k not in ("ts", "uid")}
    return {"ts": record["ts"], "uid": record["uid"], "id": ids, **rest}


def test_json_line_with_nested_id_object_is_read() -> None:
    """A conn.log JSON line whose endpoints are one nested ``id`` object was refused as
    'missing field orig_h', a field the line has. It reads as Zeek's own flat line does."""
    flat, nested = json.dumps(LINE), json.dumps(_nested(LINE))
    rows, reasons = _rows(f"{flat}\n{nested}\n".encode())
    assert reasons == []
    assert len(rows) == 2 and rows[0] == rows[1]
    assert (rows[1]["orig_h"], rows[1]["orig_p"], rows[1]["resp_h"], rows[1]["resp_p"]) == (
        "fe80::1", 5353, "ff02::fb", 5353)
    # an address given as an array inside it is refused as at the top (see _JSON_CONTAINER)
    bad = _nested(LINE)
    bad["id"] = {**bad["id"], "orig_h": ["fe80::1"]}  # type: ignore[dict-item]
    _rows_bad, why = _rows(json.dumps(bad).encode())
    assert why == ["field orig_h is a JSON array or object, not one value (a string, as Zeek "
                   "writes it)"]


def test_record_object_with_nested_id_is_read() -> None:
    """The same record posted as an object (REST, ``parse_records``) was refused as
    "missing field 'orig_h'"; it reads as the flat one does."""
    result = Zeek().parse_records([dict(LINE), _nested(LINE)])
    assert result.rejects.num_rows == 0
    rows = result.batch.to_pylist()
    assert len(rows) == 2 and rows[0] == rows[1] and rows[1]["resp_p"] == 5353


def _scoped(text: str) -> str:
    """``text`` as Zeek writes it with ``redef Log::default_scope_sep = "_"``: the endpoints'
    names are ``id_orig_h``... where the default writes ``id.orig_h``..."""
    for name in ("orig_h", "orig_p", "resp_h", "resp_p"):
        text = text.replace(f"id.{name}", f"id_{name}")
    return text


def test_log_written_with_underscore_scope_separator_is_read() -> None:
    """A conn.log written with ``Log::default_scope_sep = "_"`` (``id_orig_h``...): each of
    its lines, TSV under its #fields header or JSON, was refused as another Zeek log's ('it
    has no id.orig_h, id.resp_h, which every connection record has ... (files.log...)?'). They
    read as the log written with the default separator, and so does such a posted object."""
    tsv, line = TSV_HEADER + TSV_LINE, json.dumps(LINE) + "\n"
    assert "id_orig_h" in _scoped(tsv) and "id_orig_h" in _scoped(line)
    expected, no_rejects = _rows((tsv + line).encode())
    assert no_rejects == [] and len(expected) == 2
    rows, reasons = _rows(_scoped(tsv + line).encode())
    assert reasons == []
    assert rows == expected
    records = Zeek().parse_records([json.loads(_scoped(line))])
    assert records.rejects.num_rows == 0 and records.batch.to_pylist() == expected[1:]


def test_other_log_with_underscore_scope_separator_names_its_own_fields() -> None:
    """A dns.log written so is still refused, its reason naming the dns.log's own fields, not
    the endpoints' (which conn.log has too) as fields conn.log does not have."""
    dns = _scoped(json.dumps({"ts": 1715644800.1, "uid": "CD1", "id.orig_h": "10.0.0.1",
                              "id.orig_p": 5353, "id.resp_h": "10.0.0.2", "id.resp_p": 53,
                              "proto": "udp", "trans_id": 7, "query": "example.com",
                              "rcode": 0}))
    _rows_dns, reasons = _rows(dns.encode())
    assert len(reasons) == 1 and "is not conn.log's" in reasons[0]
    assert "3 fields conn.log does not have (trans_id, query, rcode)" in reasons[0]
