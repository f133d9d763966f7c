"""When a PEM certificate is valid, read from its DER (no third-party X.509 library).

``serve --tls-cert`` warns when the certificate served has expired, is not valid yet, or expires
soon, and ``/metrics`` gives its expiry, so that a renewal that stopped working is seen before
clients start refusing the service. Only the ``validity`` field of the first certificate of the
file (the server's own; any after it are the chain) is read: a short walk of the DER that
refuses (ValueError) whatever it does not expect.
"""

from __future__ import annotations

import re
import ssl
from datetime import UTC, datetime, timedelta

#: A certificate that expires in less than this is warned about. certbot renews 30 days ahead
#: (a 90-day Let's Encrypt certificate), so one with less than 14 days left is one whose
#: renewal has been failing for two weeks.
RENEW_WARNING = timedelta(days=14)

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.*?)-----END CERTIFICATE-----", re.S)
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x17, 0x18, 0xA0


def _element(der: bytes, at: int, end: int) -> tuple[int, int, int]:
    """The DER element at ``der[at]``: its tag and where its content starts and ends (the
    element must end by ``end``)."""
    if at + 2 > end:
        raise ValueError("the DER ends inside an element")
    tag, size = der[at], der[at + 1]
    at += 2
    if size & 0x80:
        count = size & 0x7F
        if not 1 <= count <= 4 or at + count > end:
            raise ValueError("a DER length that cannot be right")
        size = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + size > end:
        raise ValueError("a DER element runs past its parent")
    return tag, at, at + size


def _time(tag: int, text: bytes) -> datetime:
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("a certificate time that is not ASCII") from None
    if not value.endswith("Z"):
        raise ValueError(f"a certificate time not in UTC: {value!r}")
    if tag == _UTC_TIME and len(value) == 13:  # YYMMDDHHMMSSZ; RFC 5280: YY < 50 is 20YY
        year = int(value[:2])
        value = f"{2000 + year if year < 50 else 1900 + year}{value[2:]}"
    elif tag != _GENERALIZED_TIME or len(value) != 15:  # YYYYMMDDHHMMSSZ
        raise ValueError(f"a certificate time in an unexpected form: {value!r}")
    return datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def validity(pem: bytes) -> tuple[datetime, datetime]:
    """``(not_before, not_after)`` of the first certificate in ``pem``, in UTC."""
    found = _PEM.search(pem)
    if found is None:
        raise ValueError("no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(found.group(0).decode("ascii"))
    tag, at, end = _element(der, 0, len(der))  # Certificate
    if tag != _SEQUENCE:
        raise ValueError("not an X.509 certificate")
    tag, at, end = _element(der, at, end)  # tbsCertificate
    if tag != _SEQUENCE:
        raise ValueError("not an X.509 certificate")
    tag, _, stop = _element(der, at, end)
    if tag == _VERSION:  # [0] version, absent from v1 certificates
        at = stop
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, at = _element(der, at, end)
    tag, at, end = _element(der, at, end)  # validity
    if tag != _SEQUENCE:
        raise ValueError("no validity in the certificate")
    tag, start, at = _element(der, at, end)  # notBefore
    not_before = _time(tag, der[start:at])
    tag, start, stop = _element(der, at, end)  # notAfter
    return not_before, _time(tag, der[start:stop])


def validity_warning(option: str, path: str, not_before: datetime, not_after: datetime,
                     now: datetime | None = None) -> str | None:
    """What to warn about the certificate ``path`` (given as ``option``) valid from
    ``not_before`` to ``not_after``, at ``now``; None when it is good for a while yet."""
    now = datetime.now(UTC) if now is None else now
    reload = "reload (SIGHUP or POST /v1/reload)"
    if now >= not_after:
        return (f"{option} {path} expired on {not_after:%Y-%m-%d %H:%M} UTC: clients will "
                f"refuse the connection; put a renewed certificate in place and {reload}")
    if now < not_before:
        return (f"{option} {path} is not valid until {not_before:%Y-%m-%d %H:%M} UTC: clients "
                f"will refuse the connection until then (is this machine's clock right?)")
    left = not_after - now
    if left < RENEW_WARNING:
        days = left.total_seconds() / 86400
        return (f"{option} {path} expires on {not_after:%Y-%m-%d %H:%M} UTC, in {days:.1f} "
                f"days: renew it, then {reload}")
    return None
