"""Zeek conn.log records that carry their own ground-truth label, as Stratosphere's IoT-23 data
set writes them (``conn.log.labeled``): a ``label`` field (``Benign``/``Malicious``) and a
``detailed-label`` (the attack, or ``-``). IoT-23's header joins its last three names with three
spaces in one tab-field, and each line under it its last three values alike. The labels were
dropped (every record unlabelled); they are now read, from TSV, JSON lines and objects, and
``Benign`` is deepwatch's ``normal``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from test_zeek import FIELDS

from deepwatch.features import Featurizer
from deepwatch.formats import get_format
from deepwatch.io import InputReader, read_labelled

FMT = get_format("zeek")
#: conn.log's fields before ``tunnel_parents`` (the last of ``FIELDS``).
OWN = FIELDS[:-1]
TYPES = ["time", "string", "addr", "port", "addr", "port", "enum", "string", "interval", "count",
         "count", "string", "bool", "bool", "count", "string", "count", "count", "count", "count"]
SEP = "   "  # IoT-23's three spaces


def _header(joined: bool = True, tsv_t: bool = False) -> str:
    """IoT-23's header lines (``joined``: its last three names in one tab-field, as published;
    else each in its own), or a ``LogAscii::tsv=T`` log's field-name line (``tsv_t``)."""
    last = ["tunnel_parents", "label", "detailed-label"]
    names = [*OWN, SEP.join(last)] if joined else [*OWN, *last]
    if tsv_t:
        return "\t".join(names)
    types = [*TYPES, SEP.join(["set[string]", "string", "string"])] if joined else [
        *TYPES, "set[string]", "string", "string"]
    return "\n".join(["#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)",
                      "#unset_field\t-", "#path\tconn", "#open\t2018-12-21-15-50-14",
                      "#fields\t" + "\t".join(names), "#types\t" + "\t".join(types)])


def _line(i: int, label: str, detailed: str, joined: bool = True) -> str:
    own = [f"{1545404603 + i}.520154", f"CkM5dN1hGBKC{i:05d}", "192.168.1.195", str(41040 + i),
           "185.244.25.235", "80", "tcp", "-", "3.139211", "0", "0", "S0", "-", "-", "0", "S",
           "3", "180", "0", str(i)]
    last = ["-", label, detailed]
    return "\t".join([*own, SEP.join(last)] if joined else [*own, *last])


#: (label, detailed-label) as IoT-23 writes them -> the label read.
CASES = [
    (("Benign", "-"), "normal"),
    (("Malicious", "PartOfAHorizontalPortScan"), "PartOfAHorizontalPortScan"),
    (("Malicious", "C&C-HeartBeat"), "C&C-HeartBeat"),
    (("Malicious", "-"), "malicious"),
    (("malicious", "DDoS"), "DDoS"),
    (("BENIGN", "-"), "normal"),
    (("Normal", "-"), "normal"),
    (("Suspicious", "-"), "Suspicious"),
]


def _log(joined: bool = True, tsv_t: bool = False) -> str:
    return "\n".join([_header(joined, tsv_t), *(_line(i, *given, joined=joined)
                                               for i, (given, _) in enumerate(CASES))]) + "\n"


def test_iot23_labels_are_read_from_its_tsv_with_space_joined_last_fields() -> None:
    """The reproduction: both records of IoT-23's layout parsed with label None."""
    res = FMT.parse(_log())
    assert res.rejects.num_rows == 0 and res.skipped == 8
    assert res.batch.column("label").to_pylist() == [want for _, want in CASES]
    # the fields before the joined ones are where they were
    assert res.batch.column("resp_ip_bytes").to_pylist() == list(range(len(CASES)))
    assert res.batch.column("orig_p").to_pylist()[:2] == [41040, 41041]


def test_labels_are_read_from_tab_separated_headers_and_tsv_t_field_names() -> None:
    for log in (_log(joined=False), _log(joined=False, tsv_t=True), _log(tsv_t=True)):
        res = FMT.parse(log)
        assert res.rejects.num_rows == 0
        assert res.batch.column("label").to_pylist() == [want for _, want in CASES]


def test_an_unset_label_leaves_the_record_unlabelled() -> None:
    res = FMT.parse("\n".join([_header(), _line(0, "-", "-"), _line(1, "(empty)", "DDoS"),
                               _line(2, "Benign", "-")]) + "\n")
    assert res.batch.column("label").to_pylist() == [None, None, "normal"]


def test_field_counts_stay_exact_under_the_joined_header() -> None:
    """A line with a tab-field too many or too few is a reject as before; one whose joined last
    field holds too few or too many values is a reject saying so."""
    good = _line(0, "Benign", "-")
    lines = [good, good + "\tx", good.rsplit("\t", 1)[0],
             good.rsplit(SEP, 1)[0],  # "-   Benign"
             good + SEP + "extra",
             good.replace(SEP, "\t", 1)]  # a tab where the spaces were
    res = FMT.parse("\n".join([_header(), *lines]) + "\n")
    assert res.line_numbers.to_pylist() == [9]
    joined = ("expected the last tab-separated field to hold 3 values separated by 3 spaces "
              "(tunnel_parents, label, detailed-label, as the header names them), found ")
    assert res.rejects.column("reason").to_pylist() == [
        "expected 21 tab-separated fields, found 22", "expected 21 tab-separated fields, found 20",
        joined + "2", joined + "4", "expected 21 tab-separated fields, found 22"]
    assert res.rejects.column("line").to_pylist() == [10, 11, 12, 13, 14]


def test_only_a_header_naming_a_label_is_split() -> None:
    """Names joined by spaces without a label's among them are one (unknown) field, as before."""
    header = _header().replace("label   detailed-label", "foo   bar")
    res = FMT.parse(header + "\n" + _line(0, "Benign", "-") + "\n")
    assert res.rejects.num_rows == 0 and res.batch.column("label").to_pylist() == [None]


def test_the_header_reaches_later_chunks_as_context() -> None:
    """An input read in chunks (and the Spark engine's runs of lines) carries the header: the
    lines of a later chunk are split and labelled by it."""
    head = _header() + "\n" + _line(0, "Benign", "-") + "\n"
    context = FMT.context_after(head, None)
    rest = "\n".join(_line(i, *given) for i, (given, _) in enumerate(CASES)) + "\n"
    res = FMT.parse_bulk(rest, first_line=10, context=context)
    assert res.rejects.num_rows == 0
    assert res.batch.column("label").to_pylist() == [want for _, want in CASES]


def _json(i: int, **extra: str) -> str:
    return json.dumps({"ts": 1545404603.5 + i, "uid": f"C{i}", "id.orig_h": "192.168.1.195",
                       "id.orig_p": 41040 + i, "id.resp_h": "185.244.25.235", "id.resp_p": 80,
                       "proto": "tcp", "duration": 1.5, "conn_state": "S0", "missed_bytes": 0,
                       "orig_pkts": 3, **extra})


def test_json_lines_and_objects_carry_labels() -> None:
    extras = [{"label": "Malicious", "detailed-label": "Okiru"},
              {"label": "Malicious", "detailed_label": "FileDownload"},
              {"label": "Benign", "detailed-label": "-"},
              {"label": "Malicious"}, {"label": "-"}, {}, {"label": " scanner "}]
    want = ["Okiru", "FileDownload", "normal", "malicious", None, None, "scanner"]
    res = FMT.parse("\n".join(_json(i, **e) for i, e in enumerate(extras)) + "\n")
    assert res.rejects.num_rows == 0
    assert res.batch.column("label").to_pylist() == want
    objects = [json.loads(_json(i, **e)) for i, e in enumerate(extras)]
    assert FMT.parse_records(objects).batch.column("label").to_pylist() == want
    keys = list(dict.fromkeys(k for o in objects for k in o))
    frame = pa.table({k: [o.get(k) for o in objects] for k in keys})  # every row every column
    assert FMT.parse_records(frame).batch.column("label").to_pylist() == want


def test_path_label_is_read_as_a_records_label(tmp_path: Path) -> None:
    """``file=benign`` is ``normal`` (it was an attack named 'benign'), as is ``Normal`` (an
    attack named so before); other names are kept."""
    assert [FMT.label_of(g) for g in ("benign", "Benign", "Normal", "Malicious", "scanner")] == [
        "normal", "normal", "normal", "malicious", "scanner"]
    log = tmp_path / "plain.log"
    log.write_text("\n".join([_header(joined=False), _line(0, "-", "-", joined=False)]) + "\n")
    table, _, _ = read_labelled(InputReader(FMT, [f"{log}=Benign"]))
    assert table.column("label").to_pylist() == ["normal"]


def test_read_labelled_takes_a_conn_log_labeled_and_the_label_is_no_feature(
        tmp_path: Path) -> None:
    """``train``/``evaluate`` read their data with read_labelled: an IoT-23 file is labelled
    data, its stray unlabelled line a reject; the featurizer never reads the label."""
    log = tmp_path / "conn.log.labeled"
    log.write_text(_log() + _line(99, "-", "-") + "\n")
    table, rejects, stats = read_labelled(InputReader(FMT, [str(log)]))
    assert table.column("label").to_pylist() == [want for _, want in CASES]
    assert rejects.column("reason").to_pylist() == ["no label in labelled training data"]
    assert (stats.parsed, stats.rejected) == (len(CASES), 1)
    fz = Featurizer(FMT.feature_spec()).fit(table)
    assert "label" not in fz.input_columns
    relabelled = table.set_column(table.schema.get_field_index("label"), "label",
                                  pa.array(["normal"] * table.num_rows))
    assert np.array_equal(fz.transform(table), fz.transform(relabelled))


def test_a_labelled_log_after_a_plain_one_in_one_input() -> None:
    """Two logs concatenated keep each its own header: the plain one's records unlabelled, the
    IoT-23 one's labelled, lines and rejects counted as ever."""
    plain = "\n".join(["#fields\t" + "\t".join(FIELDS),
                       _line(0, "x", "y", joined=False).rsplit("\t", 2)[0]])
    res = FMT.parse(plain + "\n" + _log() + _line(50, "Benign", "-") + "\t1\n")
    assert res.batch.column("label").to_pylist() == [None, *(want for _, want in CASES)]
    assert res.rejects.column("reason").to_pylist() == [
        "expected 21 tab-separated fields, found 22"]
    assert res.lines == len(CASES) + 2 and res.skipped == 9
