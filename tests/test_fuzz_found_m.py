"""Defects found by fuzzing the input parsers (helper m): input that crashed a parse.

``Format.parse`` takes the raw text of whole lines as str, bytes, bytearray or memoryview
(``check_text``). A str holding lone surrogates (how Python keeps bytes that are not UTF-8 when
text is read with ``errors="surrogateescape"``: ``sys.stdin`` in the C or POSIX locale,
``os.fsdecode``) raised UnicodeEncodeError, and a bytearray or memoryview TypeError or
AttributeError, from inside every format's parse: bad input must be a reject with its reason.
"""

from __future__ import annotations

import pytest

from deepwatch.formats import get_format
from deepwatch.formats._repeats import REPEAT_MIN_BYTES

KDD_LINE = (b"0,tcp,http,SF,181,5450,0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,8,8,0.00,0.00,0.00,0.00,"
            b"1.00,0.00,0.00,9,9,1.00,0.00,0.11,0.00,0.00,0.00,0.00,0.00,normal.")
ACCESS_LINE = (b'83.149.9.216 - - [17/May/2015:10:05:03 +0000] "GET /index.html HTTP/1.1" 200 '
               b'203023 "-" "Mozilla/5.0"')
# lines of each format: a good one, one with a byte that is not UTF-8 in a text field (it
# parses, the byte written \xFF), a damaged one with such a byte (a reject)
INPUTS = {
    "kdd": KDD_LINE + b"\n" + KDD_LINE.replace(b"http", b"ht\xfftp") + b"\nbad\xfe\n",
    "nslkdd": (KDD_LINE + b",21\n" + KDD_LINE.replace(b"http", b"ht\xfftp") + b",21\n"
               b"bad\xfe\n"),
    "access": ACCESS_LINE + b"\n" + ACCESS_LINE.replace(b"/index", b"/in\xffdex") + b"\nbad\xfe\n",
}


def _same(a: object, b: object) -> None:
    assert a.batch.equals(b.batch)  # type: ignore[attr-defined]
    assert a.rejects.equals(b.rejects)  # type: ignore[attr-defined]
    assert a.line_numbers.equals(b.line_numbers)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_text_read_with_surrogateescape_parses_as_its_bytes(name: str) -> None:
    fmt = get_format(name)
    data = INPUTS[name]
    text = data.decode("utf-8", "surrogateescape")  # what sys.stdin.read() gives under LC_ALL=C
    assert "\udcff" in text
    want = fmt.parse(data)
    assert (want.lines, want.batch.num_rows, want.rejects.num_rows) == (3, 2, 1)
    assert want.rejects.to_pylist() == [
        {"line": 3, "raw": "bad\\xFE", "reason": want.rejects["reason"][0].as_py()}]
    _same(fmt.parse(text), want)
    _same(fmt.parse_bulk(text), want)
    # a chunk large enough for the repeated-lines path
    big = text * (REPEAT_MIN_BYTES // len(data) + 2)
    _same(fmt.parse_bulk(big), fmt.parse(big.encode("utf-8", "surrogateescape")))
    # a lone surrogate that stands for no byte (from JSON's "\ud800") is bytes that are not
    # UTF-8 too, never an exception
    odd = fmt.parse("bad\ud800\n")
    assert odd.rejects.to_pylist()[0]["raw"] == "bad\\xED\\xA0\\x80"


@pytest.mark.parametrize("name", sorted(INPUTS))
@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytearray_and_memoryview_parse_as_bytes(name: str, kind: type) -> None:
    fmt = get_format(name)
    data = INPUTS[name]
    want = fmt.parse(data)
    _same(fmt.parse(kind(data)), want)
    _same(fmt.parse_bulk(kind(data)), want)
    big = data * (REPEAT_MIN_BYTES // len(data) + 2)
    _same(fmt.parse_bulk(kind(big)), fmt.parse(big))
