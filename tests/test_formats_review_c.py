"""Input parsing found wanting by a review: each test parses in process (no model, no run)."""

from __future__ import annotations

from deepwatch.formats import get_format

ZEEK_FIELDS = ("#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\t"
               "duration\torig_bytes\tresp_bytes\tconn_state\tlocal_orig\tlocal_resp\t"
               "missed_bytes\thistory\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes\n")


def _zeek_line(uid: str, orig_p: str, resp_p: str) -> str:
    return (f"1600000000.1\t{uid}\t10.0.0.1\t{orig_p}\t10.0.0.2\t{resp_p}\ttcp\thttp\t1.5\t100\t"
            "200\tSF\t-\t-\t0\tShADadFf\t5\t300\t5\t400\n")


def test_zeek_port_past_65535_is_a_reject_in_lines_and_objects() -> None:
    """A port is 16 bits: 70000 or 99999 was kept as a port no traffic can have."""
    zeek = get_format("zeek")
    data = (ZEEK_FIELDS + _zeek_line("C1", "1234", "65535") + _zeek_line("C2", "70000", "80")
            + _zeek_line("C3", "1", "99999")
            + '{"ts":1600000000.3,"uid":"C4","id.orig_h":"10.0.0.1","id.orig_p":1,'
              '"id.resp_h":"10.0.0.2","id.resp_p":65536,"proto":"tcp"}\n')
    result = zeek.parse(data)
    assert result.batch.column("uid").to_pylist() == ["C1"]
    assert result.batch.column("resp_p").to_pylist() == [65535]
    assert result.rejects.to_pylist() == [
        {"line": 3, "raw": _zeek_line("C2", "70000", "80").rstrip("\n"),
         "reason": "field orig_p is not a port (0-65535): '70000'"},
        {"line": 4, "raw": _zeek_line("C3", "1", "99999").rstrip("\n"),
         "reason": "field resp_p is not a port (0-65535): '99999'"},
        {"line": 5, "raw": data.splitlines()[4],
         "reason": "field resp_p is not a port (0-65535): '65536'"},
    ]
    assert result.lines == 4 and result.skipped == 1

    base = {"ts": 1.0, "orig_h": "10.0.0.1", "resp_h": "10.0.0.2", "proto": "tcp"}
    objects = zeek.parse_records([{**base, "orig_p": 70000, "resp_p": 99999},
                                  {**base, "id.resp_p": 65536}, {**base, "resp_p": 65535}])
    assert objects.batch.column("resp_p").to_pylist() == [65535]
    assert objects.line_numbers.to_pylist() == [3]
    assert [(r["line"], r["reason"]) for r in objects.rejects.to_pylist()] == [
        (1, "field orig_p is not a port (0-65535): '70000'"),
        (2, "field resp_p is not a port (0-65535): '65536'"),
    ]
    assert '"id.resp_p": 65536' in objects.rejects.column("raw")[1].as_py()  # as given


def test_glob_that_matches_a_directory_is_refused_before_anything_is_read(tmp_path) -> None:
    """A directory a glob matched was found only when opened: the run failed after reading the
    files before it, where a directory named on its own is refused up front."""
    import pytest

    from deepwatch.errors import InputError
    from deepwatch.io import InputReader
    from deepwatch.sources.files import parse_input_spec

    (tmp_path / "a.log").write_text("x\n")
    (tmp_path / "old").mkdir()
    pattern = str(tmp_path / "*")
    with pytest.raises(InputError, match=r"old, matched by .*, is a directory, not a file"):
        parse_input_spec(pattern)
    with pytest.raises(InputError, match="is a directory"):
        InputReader(get_format("access"), [pattern])
    assert [s.path for s in parse_input_spec(str(tmp_path / "*.log"))] == [
        str(tmp_path / "a.log")]


def test_access_referer_and_agent_after_a_doubled_space_are_read() -> None:
    """A log format written in pieces doubles a space before the referer or the agent: read
    after one space only, such a line was a common one with two extra fields, and its referer
    and agent were dropped without a reject, on every line."""
    head = '1.2.3.4 - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 5'
    lines = [head + ' "http://ref/" "sqlmap/1.5"', head + ' "http://ref/"  "sqlmap/1.5"',
             head + '  "http://ref/" "sqlmap/1.5"', head + '  "-"   "Nikto" "1.2.3.5"']
    result = get_format("access").parse("\n".join(lines) + "\n")
    assert result.rejects.num_rows == 0
    assert result.batch.column("referer").to_pylist() == ["http://ref/"] * 3 + [None]
    assert result.batch.column("user_agent").to_pylist() == ["sqlmap/1.5"] * 3 + ["Nikto"]


def test_zeek_json_text_field_given_as_array_or_object_is_a_reject() -> None:
    """JSON path matching hands an array or object over as its JSON text: the address
    '["10.0.0.1","10.0.0.3"]' was kept as orig_h, where the same record as an object is a
    reject. A string that merely looks so ("[S]") is a value."""
    zeek = get_format("zeek")
    head = '{"ts":1600000000.5,"id.orig_p":1,"id.resp_h":"10.0.0.2","id.resp_p":80,"proto":"tcp"'
    lines = [head + ',"uid":"C1","id.orig_h":"10.0.0.1"}',
             head + ',"uid":"C2","id.orig_h":["10.0.0.1","10.0.0.3"]}',
             head + ',"uid":"C3","id.orig_h":"10.0.0.1","service": {"name":"http"}}',
             head + ',"uid":"C4","id.orig_h":"10.0.0.1","history":"[S]","tunnel_parents":[]}']
    result = zeek.parse("\n".join(lines) + "\n")
    assert result.batch.column("uid").to_pylist() == ["C1", "C4"]
    assert result.batch.column("history").to_pylist() == [None, "[S]"]
    assert [(r["line"], r["reason"]) for r in result.rejects.to_pylist()] == [
        (2, "field id.orig_h is a JSON array or object, not one value (a string, as Zeek "
            "writes it)"),
        (3, "field service is a JSON array or object, not one value (a string, as Zeek "
            "writes it)"),
    ]


def test_zeek_json_whole_number_in_an_integer_field_reads_as_the_object_does() -> None:
    """pandas' to_json writes an integer column holding nulls as floats ("orig_bytes": 100.0):
    such a JSON line was a reject, where the same record as an object reads as 100."""
    import json

    zeek = get_format("zeek")
    base = {"ts": 1600000000.5, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": 5000.0,
            "id.resp_h": "10.0.0.2", "id.resp_p": 80, "proto": "tcp"}
    values = [100, 100.0, 1e3, 100.5, -5.0, 1e19, None]
    records = [{**base, "orig_bytes": v} for v in values]
    lines = zeek.parse("".join(json.dumps(r) + "\n" for r in records))
    objects = zeek.parse_records(records)
    for result in (lines, objects):
        assert result.line_numbers.to_pylist() == [1, 2, 3, 7]
        assert result.batch.column("orig_bytes").to_pylist() == [100, 100, 1000, None]
        assert result.batch.column("orig_p").to_pylist() == [5000] * 4
    assert [r["reason"] for r in lines.rejects.to_pylist()] == [
        f"field orig_bytes is not a non-negative integer: '{v}'"
        for v in ("100.5", "-5.0", "1e+19")]
