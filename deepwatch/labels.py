"""Ground-truth labels: the benign label, KDD attack categories and the contest's cost matrix."""

from __future__ import annotations

import numpy as np

BENIGN = "normal"

#: The five categories in the contest's order (rows and columns of the cost matrix).
KDD_CATEGORIES: tuple[str, ...] = ("normal", "probe", "dos", "u2r", "r2l")

_KDD_GROUPS = {
    "dos": "back land neptune pod smurf teardrop apache2 mailbomb processtable udpstorm",
    "probe": "ipsweep nmap portsweep satan mscan saint",
    "r2l": (
        "ftp_write guess_passwd imap multihop phf spy warezclient warezmaster named sendmail "
        "snmpgetattack snmpguess xlock xsnoop worm"
    ),
    "u2r": "buffer_overflow loadmodule perl rootkit ps sqlattack xterm httptunnel",
}

#: attack name -> KDD category, for every attack of KDD 99 and NSL-KDD (train and test sets).
KDD_CATEGORY_OF: dict[str, str] = {"normal": "normal"}
for _cat, _names in _KDD_GROUPS.items():
    for _name in _names.split():
        KDD_CATEGORY_OF[_name] = _cat

#: The KDD Cup 99 cost matrix: rows = true category, columns = predicted, order KDD_CATEGORIES.
KDD_COST = np.array(
    [
        [0, 1, 2, 2, 2],
        [1, 0, 2, 2, 2],
        [2, 1, 0, 2, 2],
        [3, 2, 2, 0, 2],
        [4, 2, 2, 2, 0],
    ],
    dtype=np.float64,
)


def kdd_category(label: str) -> str:
    """The KDD category of an attack label; unknown attack names count as ``"unknown"``."""
    return KDD_CATEGORY_OF.get(label, "unknown")


def is_attack(labels: np.ndarray) -> np.ndarray:
    """Boolean mask: which ground-truth labels are attacks (anything but ``normal``)."""
    return np.asarray(labels, dtype=object) != BENIGN
