"""Zeek's other logs (``dns.log``, ``http.log``...) given to the ``zeek`` format, which reads
``conn.log``: a ``dns.log`` line has every required field (ts, hosts, proto), and its lines
became connection records with null bytes, duration and state, without a word. Each line of a
log whose header (or JSON object) names none of conn.log's own fields but fields of its own is
now a reject that says so, counted and kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_zeek import FIELDS, _conn, _tsv

from deepwatch.formats import get_format
from deepwatch.lake import read_lake, read_rejects

FMT = get_format("zeek")
#: dns.log's and http.log's fields, as Zeek 6 writes them.
DNS = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "trans_id", "rtt",
       "query", "qclass", "qclass_name", "qtype", "qtype_name", "rcode", "rcode_name", "AA", "TC",
       "RD", "RA", "Z", "answers", "TTLs", "rejected"]
HTTP = ["ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "trans_depth", "method",
        "host", "uri", "referrer", "version", "user_agent", "origin", "request_body_len",
        "response_body_len", "status_code", "status_msg", "info_code", "info_msg", "tags",
        "username", "password", "proxied", "orig_fuids", "orig_filenames", "orig_mime_types",
        "resp_fuids", "resp_filenames", "resp_mime_types"]
OTHER = "is not conn.log's: it names none of conn.log's own fields"


def _dns(i: int) -> str:
    return (f"1700000000.{i}\tCd{i}\t10.0.0.5\t{40000 + i}\t10.0.0.1\t53\tudp\t{1000 + i}\t0.001"
            f"\texample{i}.com\t1\tC_INTERNET\t1\tA\t0\tNOERROR\tF\tF\tT\tT\t0\t93.184.216.34"
            "\t300.000000\tF")


def _http(i: int) -> str:
    return (f"1700000000.{i}\tCh{i}\t10.0.0.5\t{50000 + i}\t93.184.216.34\t80\t1\tGET\texample.com"
            f"\t/i{i}.html\t-\t1.1\tcurl/8.0\t-\t0\t1256\t200\tOK\t-\t-\t(empty)\t-\t-\t-\t-\t-\t-"
            f"\tFhA{i}\t-\ttext/html")


def _log(path: str, fields: list[str], rows: list[str]) -> str:
    return "\n".join([f"#path\t{path}", "#fields\t" + "\t".join(fields), *rows,
                      "#close\tx"]) + "\n"


def _reasons(result) -> list[str]:  # type: ignore[no-untyped-def]
    return result.rejects.column("reason").to_pylist()


def test_dns_and_http_log_lines_are_rejects_that_say_so() -> None:
    """A dns.log's lines were 3 records; an http.log's were rejects 'missing field proto'."""
    for fields, row in ((DNS, _dns), (HTTP, _http)):
        res = FMT.parse(_log("x", fields, [row(i) for i in range(3)]))
        assert (res.lines, res.skipped, res.batch.num_rows) == (3, 3, 0)
        assert res.rejects.column("line").to_pylist() == [3, 4, 5]
        assert res.rejects.column("raw").to_pylist() == [row(i) for i in range(3)]
        assert all(r.startswith("the #fields header of these lines " + OTHER)
                   for r in _reasons(res)), _reasons(res)
        assert fields[7] in _reasons(res)[0]  # names the log's own fields (trans_id, ...)


def test_conn_and_dns_concatenated_and_the_header_carried_to_later_chunks() -> None:
    """Each header rules the lines after it, in the chunk or carried (as Spark and the local
    reader carry it); a conn.log filtered down to the connection's identity, one field added,
    is still conn.log."""
    conn = _log("conn", list(FIELDS), [_tsv(list(FIELDS), _conn(0))])
    short = ["ts", "id.orig_h", "id.resp_h", "proto", "x"]
    text = (conn + _log("dns", DNS, [_dns(0), _dns(1)]) + "#fields\t" + "\t".join(short)
            + "\n1700000000\t10.0.0.1\t10.0.0.2\ttcp\ty\n")
    res = FMT.parse(text)
    assert res.batch.column("uid").to_pylist() == ["C0", None]
    assert res.rejects.column("line").to_pylist() == [7, 8]
    assert all(OTHER in r for r in _reasons(res))
    # a chunk after the dns.log's header, under it as its context
    head = "#fields\t" + "\t".join(DNS)
    chunk = (_dns(2) + "\n" + _dns(3) + "\n").encode()
    assert FMT.context_after(_log("dns", DNS, []).encode(), None) == head
    for parse in (FMT.parse_bulk, FMT.parse_in_context):
        carried = parse(chunk, 20, head)
        assert (carried.batch.num_rows, carried.rejects.column("line").to_pylist()) == (0, [20, 21])
        assert _reasons(carried) == _reasons(res)
    # the same under a LogAscii::tsv=T log's field-name line
    tsv = FMT.parse("\t".join(DNS) + "\n" + _dns(4) + "\n")
    assert tsv.batch.num_rows == 0 and _reasons(tsv)[0].startswith(
        "the field-name header line (LogAscii::tsv=T) of these lines " + OTHER)


def test_json_lines_of_other_logs_are_rejects_and_conn_objects_are_not() -> None:
    dns = dict(zip(DNS, [1700000000.5, "Cd", "10.0.0.5", 40000, "10.0.0.1", 53, "udp", 7, 0.001,
                         "a.example", 1, "C_INTERNET", 1, "A", 0, "NOERROR", False, False, True,
                         True, 0, ["93.184.216.34"], [300.0], False], strict=True))
    http = {"ts": 1700000000.5, "uid": "Ch", "id.orig_h": "10.0.0.5", "id.orig_p": 50000,
            "id.resp_h": "93.184.216.34", "id.resp_p": 80, "method": "GET",
            "host": "example.com", "uri": "/", "status_code": 200}
    minimal = {k: dns[k] for k in DNS[:7]}  # a conn.log's identity only: a record, as before
    res = FMT.parse("\n".join(json.dumps(o) for o in (dns, http, minimal, {**minimal,
                                                                             "query": "x"})))
    assert res.batch.column("uid").to_pylist() == ["Cd", "Cd"]
    assert res.rejects.column("line").to_pylist() == [1, 2]
    assert all(r.startswith("this JSON object " + OTHER) for r in _reasons(res)), _reasons(res)
    assert "query" in _reasons(res)[0] and "method" in _reasons(res)[1]


def test_ingest_of_conn_and_dns_logs_keeps_the_dns_lines_as_rejects(tmp_path: Path) -> None:
    """``deepwatch ingest --format zeek zeek/*.log`` as a user runs it."""
    (tmp_path / "conn.log").write_text(
        _log("conn", list(FIELDS), [_tsv(list(FIELDS), _conn(i)) for i in range(3)]))
    (tmp_path / "dns.log").write_text(_log("dns", DNS, [_dns(i) for i in range(4)]))
    lake = tmp_path / "lake"
    done = subprocess.run([sys.executable, "-m", "deepwatch", "ingest", "--format", "zeek",
                           "--lake", str(lake), str(tmp_path / "*.log")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DEEPWATCH_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr
    assert "7 lines read: 3 parsed, 4 rejected" in done.stderr, done.stderr
    assert sorted(read_lake(lake).column("uid").to_pylist()) == ["C0", "C1", "C2"]
    rejects = read_rejects(lake).to_pylist()
    assert [(Path(r["source"]).name, r["line"]) for r in rejects] == [
        ("dns.log", n) for n in (3, 4, 5, 6)]
    assert all(OTHER in r["reason"] for r in rejects)


#: files.log's fields as Zeek 6 writes them (``uid`` and ``id.*`` since Zeek 5.1), and before
#: (``tx_hosts``, ``rx_hosts``, ``conn_uids``): ``duration`` and ``local_orig`` are conn.log's
#: too, and there is no ``proto`` (nor, before, ``id.orig_h``/``id.resp_h``).
FILES = ["ts", "fuid", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "source", "depth",
         "analyzers", "mime_type", "filename", "duration", "local_orig", "is_orig", "seen_bytes",
         "total_bytes", "missing_bytes", "overflow_bytes", "timedout", "parent_fuid", "md5",
         "sha1", "sha256", "extracted", "extracted_cutoff", "extracted_size"]
FILES_OLD = ["ts", "fuid", "tx_hosts", "rx_hosts", "conn_uids", *FILES[7:]]
NO_IDENTITY = "is not conn.log's: it has no "


def _files(i: int, old: bool = False) -> str:
    hosts = (f"93.184.216.34\t10.0.0.5\tCf{i}" if old
             else f"Cf{i}\t10.0.0.5\t{50000 + i}\t93.184.216.34\t80")
    return (f"1700000000.{i}\tFa{i}\t{hosts}\tHTTP\t0\t(empty)\ttext/html\t-\t0.000012\t-\tF"
            "\t1256\t1256\t0\t0\tF\t-\t-\t-\t-\t-\t-\t-")


def _files_object(i: int) -> dict:
    return {"ts": 1700000000.5, "fuid": f"Fa{i}", "uid": f"Cf{i}", "id.orig_h": "10.0.0.5",
            "id.orig_p": 50000 + i, "id.resp_h": "93.184.216.34", "id.resp_p": 80,
            "source": "HTTP", "depth": 0, "analyzers": [], "mime_type": "text/html",
            "duration": 1.2e-05, "is_orig": False, "seen_bytes": 1256, "total_bytes": 1256,
            "missing_bytes": 0, "overflow_bytes": 0, "timedout": False}


def test_files_log_lines_are_rejects_that_say_so() -> None:
    """A files.log has conn.log's ``duration``, so the rule for logs naming none of conn.log's
    own fields let it by: each line was a reject 'missing field proto' (or 'missing field
    orig_h', before Zeek 5.1), as for a damaged conn.log."""
    for fields, old, missing, foreign in (
            (FILES, False, "proto", "19 fields conn.log does not have (fuid, source, depth, "
             "analyzers, mime_type, filename, ...)"),
            (FILES_OLD, True, "id.orig_h, id.resp_h, proto", "22 fields conn.log does not have "
             "(fuid, tx_hosts, rx_hosts, conn_uids, source, depth, ...)")):
        rows = [_files(i, old) for i in range(3)]
        assert all(len(r.split("\t")) == len(fields) for r in rows)
        res = FMT.parse(_log("files", fields, rows))
        assert (res.lines, res.skipped, res.batch.num_rows) == (3, 3, 0)
        assert res.rejects.column("line").to_pylist() == [3, 4, 5]
        assert res.rejects.column("raw").to_pylist() == rows
        assert _reasons(res) == 3 * [
            f"the #fields header of these lines {NO_IDENTITY}{missing}, which every connection "
            f"record has, and {foreign}: a line of another Zeek log (files.log...)?"]
    # as JSON lines, Zeek leaving out unset fields
    res = FMT.parse("\n".join(json.dumps(_files_object(i)) for i in range(2)))
    assert res.batch.num_rows == 0 and len(_reasons(res)) == 2
    assert all(r.startswith(f"this JSON object {NO_IDENTITY}proto, which every connection "
                            "record has") and "fuid" in r for r in _reasons(res)), _reasons(res)


def test_a_conn_log_missing_proto_keeps_its_reason() -> None:
    """A conn.log's header without ``proto`` (one field added at most) is a damaged conn.log,
    not another log: its lines stay rejects 'missing field proto'."""
    fields = [f for f in FIELDS if f != "proto"]
    line = "\t".join(v for f, v in zip(FIELDS, _tsv(list(FIELDS), _conn(0)).split("\t"),
                                       strict=True) if f != "proto")
    for extra in ([], ["community_id"], ["x"]):
        res = FMT.parse(_log("conn", fields + extra, [line + "\t1" * len(extra)]))
        assert _reasons(res) == ["missing field proto"], (extra, _reasons(res))
    obj = {"ts": 1700000000.5, "id.orig_h": "10.0.0.5", "id.resp_h": "10.0.0.1", "x": 1}
    assert _reasons(FMT.parse(json.dumps(obj))) == ["missing field proto"]
    assert _reasons(FMT.parse_records([obj])) == ["missing field 'proto'"]


def test_other_logs_given_as_objects_are_rejects_as_their_lines_are() -> None:
    """``POST /v1/score`` with objects hands them to ``parse_records``: a dns.log object was
    scored as a connection, a files.log object a reject 'missing field proto'; each now gets
    the reason its JSON line gets. A conn record, by Zeek's names or the columns', is read."""
    dns = dict(zip(DNS[:10], [1700000000.5, "Cd", "10.0.0.5", 40000, "10.0.0.1", 53, "udp", 7,
                              0.001, "a.example"], strict=True))
    files = _files_object(0)
    identity = {"ts": 1700000000.5, "orig_h": "10.0.0.5", "orig_p": 1, "resp_h": "10.0.0.1",
                "resp_p": 53, "proto": "udp", "label": "normal"}
    objects = [identity, dns, files, {**identity, "uid": "C2"}, {**files, "orig_h": "10.0.0.7"},
               "not an object"]
    res = FMT.parse_records(objects)
    assert res.batch.column("uid").to_pylist() == [None, "C2"]
    assert res.line_numbers.to_pylist() == [1, 4]
    assert res.rejects.column("line").to_pylist() == [2, 3, 5, 6]
    assert res.rejects.column("raw").to_pylist()[:3] == [json.dumps(o)
                                                         for o in (dns, files, objects[4])]
    lines = FMT.parse("\n".join(json.dumps(o) for o in (dns, files)))
    assert _reasons(res)[:2] == _reasons(lines)
    assert _reasons(res)[0].startswith("this JSON object " + OTHER)
    assert _reasons(res)[2].startswith(f"this JSON object {NO_IDENTITY}proto, which")
    assert _reasons(res)[3] == "record is not a JSON object"


def test_an_object_lacking_the_hosts_gets_its_lines_reason() -> None:
    """An object with ``proto`` and conn.log's ``duration`` but neither host (``tx_hosts``
    and ``rx_hosts`` instead, as files.log had before Zeek 5.1) gets the reason its JSON line
    gets, not 'missing field 'orig_h''."""
    obj = {"ts": 1700000000.5, "proto": "tcp", "duration": 0.5, "fuid": "Fa",
           "tx_hosts": ["93.184.216.34"], "rx_hosts": ["10.0.0.5"]}
    [line] = _reasons(FMT.parse(json.dumps(obj)))
    assert line.startswith(f"this JSON object {NO_IDENTITY}id.orig_h, id.resp_h, which every")
    assert _reasons(FMT.parse_records([obj])) == [line]
    hosts = {"orig_h": "10.0.0.5", "resp_h": "10.0.0.1"}  # conn.log's, with fields added
    assert FMT.parse_records([{**obj, **hosts}]).batch.num_rows == 1
