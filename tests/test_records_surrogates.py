"""A record given as a Python object holding a lone surrogate (a byte kept by surrogateescape:
a value read from a Latin-1 file name, ``os.fsdecode``) failed ``parse_records`` with pyarrow's
``UnicodeEncodeError: ... surrogates not allowed``, a traceback, where a line holding the same
byte is read with it written ``\\xHH``."""

from __future__ import annotations

from deepwatch.formats import get_format


def test_a_text_field_holding_a_lone_surrogate_is_read_with_it_written_visibly() -> None:
    result = get_format("access").parse_records([{
        "client_ip": "192.0.2.7", "timestamp": "2024-05-14T13:55:36+02:00",
        "request": "GET /caf\udce9 HTTP/1.1", "status": 200, "bytes": 12}])
    assert result.rejects.num_rows == 0
    assert result.batch.column("request").to_pylist() == ["GET /caf\\xE9 HTTP/1.1"]
    assert result.batch.column("path").to_pylist() == ["/caf\\xE9"]


def test_a_rejected_record_holding_a_lone_surrogate_keeps_its_text() -> None:
    result = get_format("kdd").parse_records([{"duration": 0, "protocol_type": "tcp\udcff"}])
    assert result.batch.num_rows == 0
    [reject] = result.rejects.to_pylist()
    assert reject["raw"] == '{"duration": 0, "protocol_type": "tcp\\xFF"}'
    assert reject["reason"] == "missing field 'service'"
