"""Bundles that could only fail later are refused when loaded, with one clear BundleError:
files the manifest does not list (their checksum would be off), files that are not regular
files (a FIFO must not hang a reload), malformed manifests and featurizers, and a featurizer,
network and decision that do not fit each other. A failed reload keeps the model in service.
Also: explanations never leak between requests through the shared result cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deepwatch.bundle import MAX_FILE_BYTES, read_bundle_file, read_manifest
from deepwatch.errors import BundleError
from deepwatch.features import Featurizer
from deepwatch.models.detector import DEDUPE_MIN_ROWS, Detector

Mutation = Callable[[Path, dict[str, Any]], None]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def variant(src: Path, dst: Path, change: Mutation) -> Path:
    """A copy of the bundle ``src`` at ``dst``, its files and manifest changed by ``change``."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    change(dst, manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def rehash(d: Path, m: dict[str, Any], name: str) -> None:
    m["files"][name] = _sha(d / name)


def other_width_onnx(n_features: int, n_out: int) -> bytes:
    """A working classifier graph of another input width (what another bundle's model.onnx is)."""
    from deepwatch.models.export import build_export_module, to_onnx

    net = {"kind": "mlp", "d_in": n_features, "n_out": n_out, "hidden": 8, "depth": 1,
           "head": "proba"}
    return to_onnx(build_export_module(net), n_features, ["proba"])


def refused(bundle: Path, match: str, **kw: Any) -> str:
    with pytest.raises(BundleError, match=match) as info:
        Detector(bundle, **kw)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- 1. every file the loader reads is listed and checked; only regular files are read -----------

def _drop_onnx_entry_and_swap(d: Path, m: dict[str, Any]) -> None:
    (d / "model.onnx").write_bytes(other_width_onnx(m["n_features"], m["network"]["n_out"]))
    del m["files"]["model.onnx"]


def test_a_file_whose_entry_is_deleted_is_refused(kdd_bundle: Path, tmp_path: Path) -> None:
    # a swapped model.onnx of the right shape, its checksum entry deleted: it would load silently
    b = variant(kdd_bundle, tmp_path / "onnx", _drop_onnx_entry_and_swap)
    refused(b, "model.onnx is not listed in the manifest")
    with pytest.raises(BundleError, match="model.onnx is not listed"):
        read_manifest(b, verify=False)
    for name in ("featurizer.json", "weights.safetensors"):
        d = variant(kdd_bundle, tmp_path / name, lambda d, m, n=name: m["files"].pop(n))
        refused(d, f"{name} is not listed in the manifest")
        # the torch engine reads the weights, evaluate and reload use the same loader
        refused(d, f"{name} is not listed", engine="torch")
    everything = variant(kdd_bundle, tmp_path / "empty", lambda d, m: m.update(files={}))
    refused(everything, "featurizer.json, weights.safetensors, model.onnx are not listed")


def test_the_loader_reads_only_listed_files(kdd_bundle: Path) -> None:
    manifest = read_manifest(kdd_bundle)
    assert read_bundle_file(kdd_bundle, manifest, "model.onnx") == (
        kdd_bundle / "model.onnx").read_bytes()
    unlisted = {**manifest, "files": {k: v for k, v in manifest["files"].items()
                                      if k != "model.onnx"}}
    with pytest.raises(BundleError, match="not listed"):
        read_bundle_file(kdd_bundle, unlisted, "model.onnx")


def test_a_bundle_without_onnx_still_loads_with_torch(kdd_bundle: Path, tmp_path: Path) -> None:
    def drop(d: Path, m: dict[str, Any]) -> None:
        (d / "model.onnx").unlink()
        del m["files"]["model.onnx"]

    det = Detector(variant(kdd_bundle, tmp_path / "b", drop))
    assert det.engine.startswith("torch")


def _in_thread(fn: Callable[[], Any], seconds: float = 20) -> BaseException | None:
    """Run ``fn`` in a daemon thread: a FIFO that is opened would block it forever."""
    caught: list[BaseException | None] = [None]

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            caught[0] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "loading the bundle hung on a FIFO"
    return caught[0]


@pytest.mark.parametrize(("name", "listed"), [
    ("featurizer.json", True), ("featurizer.json", False), ("model.onnx", True),
    ("model.onnx", False), ("manifest.json", True)])
def test_a_fifo_in_a_bundle_is_refused_not_opened(kdd_bundle: Path, tmp_path: Path, name: str,
                                                  listed: bool) -> None:
    def fifo(d: Path, m: dict[str, Any]) -> None:
        if name != "manifest.json":
            (d / name).unlink()
            os.mkfifo(d / name)
            if not listed:
                del m["files"][name]

    b = variant(kdd_bundle, tmp_path / "b", fifo)
    if name == "manifest.json":
        (b / name).unlink()
        os.mkfifo(b / name)
    exc = _in_thread(lambda: Detector(b))
    assert isinstance(exc, BundleError), exc
    assert ("not a regular file" in str(exc)) if listed else ("not listed" in str(exc))


def test_a_symlinked_file_is_checked_like_any_other(kdd_bundle: Path, tmp_path: Path) -> None:
    """Symlinks are followed (they let copies share weights), but what they point to is checked:
    the same bytes load, changed bytes or a device behind the link are refused."""
    store = tmp_path / "store"
    store.mkdir()

    def link_to(target: Path) -> Mutation:
        def change(d: Path, m: dict[str, Any]) -> None:
            (d / "weights.safetensors").unlink()
            (d / "weights.safetensors").symlink_to(target)
        return change

    shutil.copy(kdd_bundle / "weights.safetensors", store / "same.safetensors")
    same = variant(kdd_bundle, tmp_path / "same", link_to(store / "same.safetensors"))
    assert (same / "weights.safetensors").is_symlink()
    Detector(same, engine="torch")  # loads: the bytes behind the link are the recorded ones

    changed = bytearray((kdd_bundle / "weights.safetensors").read_bytes())
    changed[-1] ^= 1
    (store / "changed.safetensors").write_bytes(bytes(changed))
    bad = variant(kdd_bundle, tmp_path / "bad", link_to(store / "changed.safetensors"))
    refused(bad, "does not match its checksum", engine="torch")

    dev = variant(kdd_bundle, tmp_path / "dev", link_to(Path("/dev/zero")))
    refused(dev, "not a regular file", engine="torch")


@pytest.mark.parametrize("name", ["weights.safetensors", "model.onnx"])
def test_a_huge_file_is_refused_before_it_is_read(kdd_bundle: Path, tmp_path: Path,
                                                  name: str) -> None:
    """A (sparse) file past any bundle's size was read whole into memory, then failed its
    checksum: gigabytes, seconds, in a service reloading it. Its size alone refuses it."""
    def grow(d: Path, m: dict[str, Any]) -> None:
        with open(d / name, "r+b") as f:
            f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used

    b = variant(kdd_bundle, tmp_path / "b", grow)
    refused(b, f"{name} is over 2,147,483,648 bytes",
            engine="torch" if name == "weights.safetensors" else "onnx")


# -- 2. featurizer, network and decision must fit each other ------------------------------------

def test_another_bundles_onnx_with_a_fixed_checksum_is_refused(kdd_bundle: Path,
                                                               tmp_path: Path) -> None:
    def swap(d: Path, m: dict[str, Any]) -> None:
        (d / "model.onnx").write_bytes(other_width_onnx(63, m["network"]["n_out"]))
        rehash(d, m, "model.onnx")

    b = variant(kdd_bundle, tmp_path / "b", swap)
    n = json.loads((kdd_bundle / "manifest.json").read_text())["n_features"]
    text = refused(b, f"model.onnx takes 63 features but the bundle's featurizer makes {n}")
    assert str(b) in text


MISMATCHES: dict[str, tuple[Mutation, str]] = {
    "outputs_not_the_graphs": (lambda d, m: m.update(outputs=["proba", "latent"]),
                               "model.onnx's outputs"),
    "outputs_unknown": (lambda d, m: m.update(outputs=["nope"]), "no 'proba' output"),
    "n_features": (lambda d, m: m.update(n_features=m["n_features"] + 1),
                   "the network takes .* features|the featurizer makes"),
    "network_d_in": (lambda d, m: m["network"].update(d_in=63), "the network takes 63"),
    "cost_matrix_shape": (lambda d, m: m["decision"].update(cost_matrix=[[0.0]]),
                          "cost_matrix is not 5 x 5"),
    "cost_matrix_values": (lambda d, m: m["decision"]["cost_matrix"][0].__setitem__(0, "x"),
                           "cost_matrix is not"),
    "policy": (lambda d, m: m["decision"].update(policy="zzz"), "policy 'zzz' is not one of"),
    "threshold": (lambda d, m: m["decision"].update(threshold="x"), "threshold 'x' is not a"),
    "threshold_null": (lambda d, m: m["decision"].update(threshold=None), "is not a number"),
    "labels_short": (lambda d, m: m["decision"].update(labels=["normal"]),
                     r"1 labels but \d+ label categories"),
    "labels_not_strings": (lambda d, m: m["decision"].update(labels=list(range(10))),
                           "'labels' is not a list of names"),
    "label_category_unknown": (lambda d, m: m["decision"]["label_category"].__setitem__(0, "x"),
                               "category 'x' is not one of"),
    # JSON reads NaN and Infinity: a NaN threshold would call every record normal
    "anomaly_threshold_nan": (lambda d, m: m["decision"].update(anomaly_threshold=float("nan")),
                              "anomaly_threshold nan is not a number"),
    "threshold_infinite": (lambda d, m: m["decision"].update(threshold=float("inf")),
                           "threshold inf is not a number"),
    "network_infinite": (lambda d, m: m["network"].update(scale=float("-inf")),
                         r"network.scale is -inf, not a finite number"),
    "network_nested": (lambda d, m: m["network"].update(x=[[[[[[[[[1]]]]]]]]]),
                       "nested too deeply"),
    "network_long_list": (lambda d, m: m["network"].update(x=list(range(65))),
                          r"network.x has 65 entries \(at most 64\)"),
    "labels_repeated": (lambda d, m: m["decision"]["labels"].__setitem__(
        1, m["decision"]["labels"][0]), "must not repeat a name"),
    "combine": (lambda d, m: m["decision"].update(combine=5), "'combine' is not"),
    "no_labels_no_anomaly": (lambda d, m: m["decision"].update(labels=[], label_category=[]),
                             "cannot reach a verdict"),
    # the network agrees with the manifest's count, the featurizer does not
    "n_features_and_d_in": (lambda d, m: (m.update(n_features=m["n_features"] + 1),
                                          m["network"].update(d_in=m["n_features"])),
                            r"the featurizer makes \d+ features but the manifest says \d+"),
    # consistent among themselves, but the network makes one probability more
    "labels_vs_proba_width": (lambda d, m: [m["decision"][k].pop() for k in
                                            ("labels", "label_category")],
                              r"'proba' output has the shape \(2, \d+\), not one column per label"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_mismatched_bundle_is_refused_at_load(kdd_bundle: Path, tmp_path: Path,
                                                case: str) -> None:
    change, match = MISMATCHES[case]
    refused(variant(kdd_bundle, tmp_path / case, change), match)


def test_torch_network_must_match_the_weights(kdd_bundle: Path, tmp_path: Path) -> None:
    def no_onnx(extra: Mutation) -> Mutation:
        def change(d: Path, m: dict[str, Any]) -> None:
            (d / "model.onnx").unlink()
            del m["files"]["model.onnx"]
            extra(d, m)
        return change

    cases: list[tuple[Mutation, str]] = [
        (lambda d, m: m["network"].update(hidden=64), "does not match the weights"),
        # a giant layer: compared with the weights' shapes before anything is allocated
        (lambda d, m: m["network"].update(hidden=10**7), "does not match the weights"),
        (lambda d, m: m["network"].update(hidden=10**30), "not 0 to"),
        (lambda d, m: m["network"].update(depth=10**7), "depth is 10000000"),
        (lambda d, m: m["network"].update(kind="zzz"), "unknown network kind 'zzz'"),
        (lambda d, m: m["network"].update(head="zzz"), "unknown model head 'zzz'"),
        (lambda d, m: m["network"].update(n_out=3), "does not match the weights"),
        (lambda d, m: m["network"].update(hidden="x"), "cannot be built"),
    ]
    for i, (change, match) in enumerate(cases):
        refused(variant(kdd_bundle, tmp_path / f"n{i}", no_onnx(change)), match)
    # the torch engine checks the same on a bundle that has model.onnx too
    refused(variant(kdd_bundle, tmp_path / "torch", lambda d, m: m["network"].update(hidden=64)),
            "does not match the weights", engine="torch")


# -- 3. malformed manifests and files: a clear reason, never a traceback -------------------------

def _write(name: str, data: bytes, rehashed: bool = True) -> Mutation:
    def change(d: Path, m: dict[str, Any]) -> None:
        (d / name).write_bytes(data)
        if rehashed:
            rehash(d, m, name)
    return change


def _no_onnx_weights(data: bytes) -> Mutation:
    def change(d: Path, m: dict[str, Any]) -> None:
        (d / "model.onnx").unlink()
        del m["files"]["model.onnx"]
        _write("weights.safetensors", data)(d, m)
    return change


def _featurizer_names_edited(d: Path, m: dict[str, Any]) -> None:
    spec = json.loads((d / "featurizer.json").read_text())
    spec["feature_names"] = list(reversed(spec["feature_names"]))
    (d / "featurizer.json").write_text(json.dumps(spec))
    rehash(d, m, "featurizer.json")
    m["featurizer_schema_hash"] = Featurizer.from_dict(spec).schema_hash()


def _featurizer_moment(key: str, value: float) -> Mutation:
    def change(d: Path, m: dict[str, Any]) -> None:
        spec = json.loads((d / "featurizer.json").read_text())
        spec[key] = dict.fromkeys(spec[key], value)
        (d / "featurizer.json").write_text(json.dumps(spec))  # NaN as JSON's NaN literal
        rehash(d, m, "featurizer.json")
    return change


def _non_finite_weight(engine: str) -> Mutation:
    """One weight made NaN/inf: in the safetensors file for torch (a batch norm's variance,
    which a record of zeros does not reveal), in the ONNX graph (a first-layer weight)."""
    def change(d: Path, m: dict[str, Any]) -> None:
        from safetensors.torch import load, save

        state = load((d / "weights.safetensors").read_bytes())
        if engine == "torch":
            key = next(k for k in sorted(state) if k.endswith("running_var"))
            state[key].view(-1)[0] = float("inf")
            _no_onnx_weights(save(state))(d, m)
            return
        from deepwatch.models.export import build_export_module, to_onnx

        state[next(k for k in sorted(state) if k.endswith("weight"))].view(-1)[0] = float("nan")
        net = build_export_module(m["network"])
        net.load_state_dict(state)
        _write("model.onnx", to_onnx(net, m["n_features"], m["outputs"]))(d, m)
    return change


MALFORMED: dict[str, tuple[Mutation, str]] = {
    "files_list": (lambda d, m: m.update(files=["x"]), '"files" must map'),
    "files_null": (lambda d, m: m.update(files=None), '"files" must map'),
    "checksum_not_sha256": (lambda d, m: m["files"].update({"model.onnx": 5}), "not a sha256"),
    "name_outside": (lambda d, m: m["files"].update({"../x": "0" * 64}), "outside the bundle"),
    "format_version_string": (lambda d, m: m.update(format_version="1"), "not supported"),
    "no_decision": (lambda d, m: m.pop("decision"), "'decision' is missing"),
    "decision_string": (lambda d, m: m.update(decision="x"), "'decision' is 'x'"),
    "no_outputs": (lambda d, m: m.pop("outputs"), "'outputs' is missing"),
    "no_input_format": (lambda d, m: m.pop("input_format"), "'input_format' is missing"),
    "input_format_int": (lambda d, m: m.update(input_format=3), "'input_format' is 3"),
    "no_network": (lambda d, m: m.pop("network"), "'network' is missing"),
    "no_n_features": (lambda d, m: m.pop("n_features"), "'n_features' is missing"),
    "featurizer_list": (_write("featurizer.json", b"[1]"), "not a valid featurizer"),
    "featurizer_empty_object": (_write("featurizer.json", b"{}"), "not a valid featurizer"),
    "featurizer_not_json": (_write("featurizer.json", b"nope"), "not a valid featurizer"),
    "featurizer_not_utf8": (_write("featurizer.json", b"\xff"), "not a valid featurizer"),
    "featurizer_deep": (_write("featurizer.json", b"[" * 100_000 + b"]" * 100_000),
                        "not a valid featurizer"),
    "weights_garbage": (_no_onnx_weights(b"garbage"), "not a valid safetensors file"),
    "onnx_garbage": (_write("model.onnx", b"garbage"), "cannot load the ONNX model: not a valid "
                     "ONNX model"),
    # moments that make every record's features NaN: each verdict was "normal", silently
    "featurizer_std_nan": (_featurizer_moment("std", float("nan")), "std of .* is nan"),
    # NaN scores are never over a threshold: such a bundle said "normal" to every record
    "weights_inf": (_non_finite_weight("torch"), "weights hold NaN or infinite values"),
    "onnx_nan": (_non_finite_weight("onnx"), "'proba' output is not a finite number"),
    # names that do not match the vocabularies, the schema hash made to agree with them
    "featurizer_names_edited": (_featurizer_names_edited, "its feature names do not match"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_bundle_is_one_clear_error(kdd_bundle: Path, tmp_path: Path,
                                               case: str) -> None:
    change, match = MALFORMED[case]
    refused(variant(kdd_bundle, tmp_path / case, change), match)


@pytest.mark.parametrize(("text", "match"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"files": {}, "format_version": 1, "x": ' + "9" * 5000 + "}", "number too long"),
    ("[]", "not a deepwatch manifest"),
    ("{nope", "not valid JSON"),
])
def test_an_unreadable_manifest_is_one_clear_error(kdd_bundle: Path, tmp_path: Path, text: str,
                                                   match: str) -> None:
    b = variant(kdd_bundle, tmp_path / "b", lambda d, m: None)
    (b / "manifest.json").write_text(text)
    refused(b, match)


def test_a_file_listed_twice_in_the_manifest_is_refused(kdd_bundle: Path,
                                                        tmp_path: Path) -> None:
    """JSON keeps the last of two equal keys: a manifest giving model.onnx a second checksum
    loaded, checked against whichever came last, whatever a reader of the first believed."""
    b = variant(kdd_bundle, tmp_path / "b", lambda d, m: None)
    text = (b / "manifest.json").read_text()
    assert text.count('"files": {') == 1
    (b / "manifest.json").write_text(
        text.replace('"files": {', '"files": {"model.onnx": "' + "0" * 64 + '", '))
    refused(b, "gives 'model.onnx' twice")


def test_featurizer_from_dict_refuses_what_it_cannot_transform(kdd_bundle: Path) -> None:
    good = json.loads((kdd_bundle / "featurizer.json").read_text())
    assert Featurizer.from_dict(good).n_features == len(good["feature_names"])
    broken = [
        [1],
        {**good, "spec": []},
        {**good, "vocab": {}},
        {**good, "mean": {"x": 1}},
        {**good, "std": {k: "x" for k in good["std"]}},
        {**good, "feature_names": "x"},
        {**good, "mean": dict.fromkeys(good["mean"], float("inf"))},
        {**good, "std": dict.fromkeys(good["std"], 0)},
        {**good, "std": dict.fromkeys(good["std"], float("-inf"))},
        {**good, "spec": {**good["spec"], "derive": {"name": "nope"}}},
    ]
    for d in broken:
        with pytest.raises(ValueError):
            Featurizer.from_dict(d)  # type: ignore[arg-type]
    extra = Featurizer.from_dict({**good, "feature_names": [*good["feature_names"], "x"]})
    with pytest.raises(ValueError, match="feature names do not match"):
        extra.check_layout()


def _expand_fails() -> bytes:
    """A valid graph that fails when run: Expand to a shape the input cannot take."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1 << 40, 1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["X", "shape"], ["proba"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("proba", TensorProto.FLOAT, [None, None])],
        initializer=[shape])
    return bytes(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def test_the_cli_refuses_with_one_line_and_exit_code_3(kdd_bundle: Path, tmp_path: Path,
                                                       small_kdd_test: Path,
                                                       capfd: pytest.CaptureFixture[str]
                                                       ) -> None:
    """(capfd: what ONNX Runtime logs itself, to the process's stderr, counts too)"""
    from deepwatch.cli import main

    data = tmp_path / "in.csv"
    data.write_text("".join(small_kdd_test.read_text().splitlines(keepends=True)[:20]))
    for name, (change, _match) in {"swapped": (_drop_onnx_entry_and_swap, ""),
                                   "outputs": MISMATCHES["outputs_unknown"],
                                   "files": MALFORMED["files_null"],
                                   # fails in the load's trial run: ONNX Runtime logged a
                                   # coloured error line of its own before deepwatch's
                                   "fails_to_run": (_write("model.onnx", _expand_fails()),
                                                    "")}.items():
        b = variant(kdd_bundle, tmp_path / name, change)
        capfd.readouterr()
        code = main(["score", str(b), "--format", "kdd", "--out",
                     str(tmp_path / f"{name}.jsonl"), str(data)])
        err = capfd.readouterr().err.strip()
        assert code == 3, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


# -- reload over HTTP: a refused bundle answers 422 and the model in service stays ---------------

@pytest.fixture(scope="module")
def served(kdd_bundle: Path) -> Iterator[str]:
    from conftest import ThreadServer

    from deepwatch.serve.app import create_app

    with ThreadServer(create_app(kdd_bundle)) as srv:
        yield srv.url


def test_a_refused_reload_keeps_the_model_and_answers_422(served: str, kdd_bundle: Path,
                                                          tmp_path: Path,
                                                          small_kdd_test: Path) -> None:
    def fifo_featurizer(d: Path, m: dict[str, Any]) -> None:
        (d / "featurizer.json").unlink()
        os.mkfifo(d / "featurizer.json")
        del m["files"]["featurizer.json"]

    def listed_fifo(d: Path, m: dict[str, Any]) -> None:
        (d / "model.onnx").unlink()
        os.mkfifo(d / "model.onnx")

    def other_onnx(d: Path, m: dict[str, Any]) -> None:
        (d / "model.onnx").write_bytes(other_width_onnx(63, m["network"]["n_out"]))
        rehash(d, m, "model.onnx")

    bad: dict[str, Mutation] = {
        "onnx_unlisted": _drop_onnx_entry_and_swap,
        "fifo_unlisted": fifo_featurizer,
        "fifo_listed": listed_fifo,
        "onnx_width": other_onnx,
        "outputs": MISMATCHES["outputs_unknown"][0],
        "cost_matrix": MISMATCHES["cost_matrix_shape"][0],
        "files_null": MALFORMED["files_null"][0],
        "no_decision": MALFORMED["no_decision"][0],
        "hidden_no_onnx": lambda d, m: (_no_onnx_weights((d / "weights.safetensors")
                                                         .read_bytes())(d, m),
                                        m["network"].update(hidden=10**7)),
    }
    records = small_kdd_test.read_text().splitlines()[:50]
    with httpx.Client(base_url=served, timeout=30) as c:
        before = c.post("/v1/score", json={"records": records}).json()["results"]
        generation = c.get("/healthz").json()["generation"]
        for name, change in bad.items():
            b = variant(kdd_bundle, tmp_path / name, change)
            r = c.post("/v1/reload", json={"bundle": str(b)})
            assert r.status_code == 422, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert "still serving" in detail and "\n" not in detail, (name, detail)
        deep = variant(kdd_bundle, tmp_path / "deep", lambda d, m: None)
        (deep / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        r = c.post("/v1/reload", json={"bundle": str(deep)})
        assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]
        assert c.get("/healthz").json()["generation"] == generation
        after = c.post("/v1/score", json={"records": records})
        assert after.status_code == 200 and after.json()["results"] == before


# -- 4. the explain setting never crosses requests through the result cache ----------------------

def test_explanations_do_not_leak_between_requests(served: str, small_kdd_test: Path) -> None:
    records = small_kdd_test.read_text().splitlines()
    assert len(records) >= DEDUPE_MIN_ROWS  # batches this large go through the result cache
    records = records[:5000]

    def post(explain: bool) -> list[dict[str, Any]]:
        with httpx.Client(base_url=served, timeout=120) as c:
            r = c.post("/v1/score", json={"records": records, "explain": explain})
        assert r.status_code == 200, r.text
        results: list[dict[str, Any]] = r.json()["results"]
        return results

    plain_first = post(False)
    explained = post(True)
    plain = post(False)
    assert not any("explanation" in r for r in plain_first)
    assert any(r.get("explanation") for r in explained), "the sample has alerts to explain"
    assert not any("explanation" in r for r in plain), "explanations leaked from the cache"
    strip = [{k: v for k, v in r.items() if k != "explanation"} for r in explained]
    assert strip == plain == plain_first
