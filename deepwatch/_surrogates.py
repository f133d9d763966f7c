"""Text that is safe to write anywhere: lone surrogates written visibly.

Python keeps a byte that is not UTF-8 as a lone surrogate U+DC80..U+DCFF (``surrogateescape``:
a path named in Latin-1, ``os.fsdecode``, ``sys.argv`` in the C locale). UTF-8 has no bytes for
a lone surrogate, so text holding one cannot be encoded: pyarrow, polars, a page or a file
writing it raised, and JSON writing it as an escape (``"\\udcff"``) is no strict JSON. Here such
a byte is written ``\\xHH``, as the formats write the bytes of the data that are not UTF-8, and
any other lone surrogate ``<U+XXXX>``.
"""

from __future__ import annotations

import re

SURROGATE = re.compile("[\ud800-\udfff]")


def shown(ch: str) -> str:
    """How one character is written visibly: a byte kept as a surrogate ``\\xHH``, any other
    character ``<U+XXXX>``."""
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02X}"
    return f"<U+{code:04X}>"


def without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written visibly (:func:`shown`)."""
    return SURROGATE.sub(lambda m: shown(m.group()), text)
