"""Bundles: checksums, refusal of tampered or foreign bundles, no pickle anywhere."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from deepwatch.bundle import read_manifest
from deepwatch.errors import BundleError
from deepwatch.models.detector import Detector


@pytest.fixture()
def copy(kdd_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(kdd_bundle, dst)
    return dst


def test_contract_files_and_manifest(kdd_bundle: Path) -> None:
    names = {p.name for p in kdd_bundle.iterdir()}
    assert {"manifest.json", "featurizer.json", "weights.safetensors", "model.onnx"} <= names
    m = read_manifest(kdd_bundle)
    for key in ("format_version", "deepwatch_version", "model_kind", "input_format",
                "featurizer_schema_hash", "thresholds", "training", "metrics", "data", "files"):
        assert key in m, key
    assert set(m["files"]) == names - {"manifest.json"}
    assert m["data"][0]["sha256"] and len(m["data"][0]["sha256"]) == 64
    assert not any(p.suffix in (".pkl", ".pickle", ".pt", ".pth") for p in kdd_bundle.iterdir())


@pytest.mark.parametrize("name", ["model.onnx", "weights.safetensors", "featurizer.json"])
def test_tampered_file_is_refused(copy: Path, name: str) -> None:
    with open(copy / name, "ab") as f:
        f.write(b" ")
    with pytest.raises(BundleError, match=f"{name} does not match its checksum"):
        Detector(copy)


def test_missing_file_and_not_a_bundle(copy: Path, tmp_path: Path) -> None:
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing model.onnx"):
        Detector(copy)
    with pytest.raises(BundleError, match="not a deepwatch bundle"):
        Detector(tmp_path)
    with pytest.raises(BundleError, match="no bundle at"):
        Detector(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="no bundle at"):
        Detector(tmp_path / "file" / "b")
    # a path the system cannot look up (a name past NAME_MAX) was an OSError traceback
    with pytest.raises(BundleError, match="cannot look at a bundle at .*: File name too long"):
        Detector(tmp_path / ("a" * 5000))


def test_featurizer_swapped_consistently_is_still_refused(copy: Path, kdd_bundle: Path) -> None:
    # rewrite the featurizer *and* its checksum: the schema hash still catches the mismatch
    import hashlib

    feat = json.loads((copy / "featurizer.json").read_text())
    feat["feature_names"] = list(reversed(feat["feature_names"]))
    data = json.dumps(feat).encode()
    (copy / "featurizer.json").write_bytes(data)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"]["featurizer.json"] = hashlib.sha256(data).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="featurizer does not match"):
        Detector(copy)


def test_future_format_version_is_refused(copy: Path) -> None:
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        Detector(copy)


def test_no_unpickling_code_in_package() -> None:
    root = Path(__file__).resolve().parent.parent / "deepwatch"
    for p in root.rglob("*.py"):
        text = p.read_text()
        for bad in ("pickle.load", "joblib.load", "torch.load("):
            assert bad not in text, f"{p} uses {bad}"


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_onnx_weights_in_an_external_file_are_refused(copy: Path, where: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A model.onnx whose weights point at another file (ONNX "external data") must not make
    the loader read that file, even when the manifest's checksums were rewritten to match: the
    bundle is loaded from the checked bytes, and such a model is refused with one line."""
    import hashlib

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, numpy_helper

    model = onnx.load_from_string((copy / "model.onnx").read_bytes())
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).nbytes)
    data = numpy_helper.to_array(init).tobytes()
    side = copy / "weights.bin"
    side.write_bytes(data)
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = TensorProto.EXTERNAL
    location = "weights.bin" if where == "relative" else str(side)
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    blob = model.SerializeToString()
    (copy / "model.onnx").write_bytes(blob)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"]["model.onnx"] = hashlib.sha256(blob).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(m))
    (copy / "workdir").mkdir()
    shutil.copy(side, copy / "workdir" / "weights.bin")
    monkeypatch.chdir(copy / "workdir")  # where ONNX Runtime would look for "weights.bin"
    with pytest.raises(BundleError, match="keeps tensor data in other files") as err:
        Detector(copy, engine="onnx")
    assert "\n" not in str(err.value)


def test_external_data_in_a_function_default_or_training_info_is_refused(
        copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors live in more places than the graph: a local function's attribute default
    (which ONNX Runtime inlines into the graph, then resolves its location against the working
    directory) and a model's training_info graphs. Either, pointing at another file, is refused
    by the bundle's own check, not left to ONNX Runtime."""
    import hashlib

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from deepwatch._onnx_scan import uses_external_data

    def external(name: str) -> TensorProto:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4],
                        data_location=TensorProto.EXTERNAL)
        entry = t.external_data.add()
        entry.key, entry.value = "location", "side.bin"
        return t

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])
    const = helper.make_node("Constant", [], ["k"])
    ref = onnx.AttributeProto(name="value", ref_attr_name="w", type=onnx.AttributeProto.TENSOR)
    const.attribute.append(ref)
    fn = helper.make_function("local", "F", ["x"], ["y"],
                              [const, helper.make_node("Add", ["x", "k"], ["y"])],
                              [helper.make_opsetid("", 17)])
    fn.attribute_proto.append(helper.make_attribute("w", external("w")))
    graph = helper.make_graph([helper.make_node("F", ["X"], ["Y"], domain="local")], "g",
                              [x], [y])
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    blob = model.SerializeToString()
    assert uses_external_data(blob)

    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])],
                                                "g", [x], [y]))
    assert not uses_external_data(plain.SerializeToString())
    plain.training_info.add().initialization.initializer.append(external("t"))
    assert uses_external_data(plain.SerializeToString())

    (copy / "model.onnx").write_bytes(blob)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"]["model.onnx"] = hashlib.sha256(blob).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(m))
    (copy / "workdir").mkdir()
    (copy / "workdir" / "side.bin").write_bytes(bytes(16))
    monkeypatch.chdir(copy / "workdir")  # where ONNX Runtime looks for "side.bin"
    with pytest.raises(BundleError, match="keeps tensor data in other files") as err:
        Detector(copy, engine="onnx")
    assert "\n" not in str(err.value)


def test_a_model_with_an_ep_context_node_is_refused(copy: Path) -> None:
    """An ``EPContext`` node is an execution provider's compiled engine: a file to load
    (``ep_cache_context``), which the manifest does not cover, or an opaque engine. The
    TensorRT provider would load it; the load now refuses it with one line, whatever the
    providers (the manifest's checksums rewritten to match, as a forger would)."""
    import hashlib

    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from deepwatch._onnx_scan import EP_CONTEXT, refusal

    model = onnx.load_from_string((copy / "model.onnx").read_bytes())
    assert refusal(model.SerializeToString()) is None  # deepwatch's own export
    model.graph.node.insert(0, helper.make_node(
        "EPContext", [model.graph.input[0].name], ["engine_out"], domain="com.microsoft",
        embed_mode=0, ep_cache_context="/etc/engine.trt", source="TensorrtExecutionProvider"))
    blob = model.SerializeToString()
    assert refusal(blob) == EP_CONTEXT
    (copy / "model.onnx").write_bytes(blob)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"]["model.onnx"] = hashlib.sha256(blob).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="EPContext node") as err:
        Detector(copy, engine="onnx")
    assert "\n" not in str(err.value)


def test_a_saved_bundle_is_as_readable_as_a_new_directory(tmp_path: Path) -> None:
    """Bundles were assembled in a mkdtemp directory and kept its private 0700 mode, so a
    service account could not read a bundle someone else trained. A new bundle gets the mode
    mkdir gives under the umask; a replaced bundle keeps the mode its directory had."""
    import os
    import stat

    from deepwatch.bundle import save_bundle

    old = os.umask(0o022)
    try:
        first = save_bundle(tmp_path / "b", {"model_kind": "x"}, {"a.bin": b"1"})
        assert stat.S_IMODE(first.stat().st_mode) == 0o755
        assert stat.S_IMODE((first / "a.bin").stat().st_mode) == 0o644
        os.chmod(first, 0o750)
        again = save_bundle(tmp_path / "b", {"model_kind": "x"}, {"a.bin": b"2"})
        assert stat.S_IMODE(again.stat().st_mode) == 0o750
        os.umask(0o077)
        private = save_bundle(tmp_path / "c", {"model_kind": "x"}, {"a.bin": b"1"})
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        os.umask(old)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux FIFO semantics")
@pytest.mark.parametrize("source", ["stdin", "named pipe", "process substitution"])
def test_manifest_checksums_data_read_from_stdin_or_a_pipe(small_kdd: Path, tmp_path: Path,
                                                           source: str) -> None:
    """The manifest's data checksum is of the bytes the model learnt from. It was taken by
    opening each input again once training was done: stdin got none, a process substitution
    (``<(zcat ...)``, a pipe at /dev/fd/N) the sha256 of nothing, and a named pipe left
    ``train`` waiting for ever for a writer, with no bundle written."""
    import hashlib
    import os
    import subprocess
    import threading

    data = "".join(small_kdd.read_text().splitlines(keepends=True)[:600]).encode()
    cmd = [sys.executable, "-m", "deepwatch", "train", "--format", "kdd", "--model", "mlp",
           "--epochs", "1", "--out", str(tmp_path / "b")]
    env = {**os.environ, "DEEPWATCH_PROGRESS": "0"}
    stdin: bytes | None = None
    pass_fds: tuple[int, ...] = ()
    read_end = -1
    if source == "stdin":
        cmd.append("-")
        stdin = data
        feed = None
    else:
        if source == "named pipe":
            fifo = tmp_path / "records.csv"
            os.mkfifo(fifo)
            cmd.append(str(fifo))

            def write() -> None:
                with open(fifo, "wb") as f:  # (waits for the reader's open)
                    f.write(data)
        else:
            read_end, write_end = os.pipe()
            pass_fds = (read_end,)
            cmd.append(f"/dev/fd/{read_end}")

            def write() -> None:
                with os.fdopen(write_end, "wb") as f:
                    f.write(data)
        feed = threading.Thread(target=write, daemon=True)
        feed.start()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, pass_fds=pass_fds,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if read_end >= 0:
        os.close(read_end)  # the child holds its own copy
    try:
        _, err = proc.communicate(stdin, timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"train did not finish: {err.decode()[-500:]}")
    if feed is not None:
        feed.join(10)
    assert proc.returncode == 0, err.decode()
    [entry] = read_manifest(tmp_path / "b")["data"]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["path"] == {"stdin": "<stdin>", "named pipe": str(tmp_path / "records.csv"),
                             "process substitution": f"/dev/fd/{read_end}"}[source]


def test_manifest_checksums_the_validation_files_too(small_kdd: Path, tmp_path: Path) -> None:
    """``--val`` files stop the training early and set the thresholds; the manifest listed the
    training files only."""
    import hashlib

    from deepwatch.cli import main

    lines = small_kdd.read_text().splitlines(keepends=True)
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("".join(lines[:2000]))
    val.write_text("".join(lines[2000:2600]))
    assert main(["train", "--format", "kdd", "--model", "mlp", "--epochs", "1", "--out",
                 str(tmp_path / "b"), "--val", f"{val}=normal", str(train)]) == 0
    data = read_manifest(tmp_path / "b")["data"]
    assert data == [
        {"path": str(train), "sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
         "label": None, "role": "training"},
        {"path": str(val), "sha256": hashlib.sha256(val.read_bytes()).hexdigest(),
         "label": "normal", "role": "validation"},
    ]
