"""Inference backends: provider choice, thread settings, and torch vs ONNX Runtime parity over
every model kind deepwatch knows (discovered from MODEL_KINDS, so a new kind cannot skip it)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from conftest import trained_bundle

from deepwatch.bundle import ONNX
from deepwatch.errors import BundleError, UsageError
from deepwatch.formats import get_format
from deepwatch.models import MODEL_KINDS
from deepwatch.models.detector import Detector
from deepwatch.runtime import (
    CHUNK_ROWS,
    CPU_CHUNK_ROWS,
    PROVIDER_PREFERENCE,
    OnnxBackend,
    choose_providers,
    default_threads,
    usable_cores,
)

PARITY_TOLERANCE = 1e-4


def test_providers_best_first_and_cpu_always_last() -> None:
    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                  "AzureExecutionProvider"]
    assert choose_providers(everything) == list(PROVIDER_PREFERENCE)
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    assert choose_providers(everything, ["CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"], ["TensorrtExecutionProvider"]) == [
        "CPUExecutionProvider"]


def test_threads_follow_the_usable_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPWATCH_THREADS", raising=False)
    assert default_threads() == usable_cores() >= 1
    monkeypatch.setenv("DEEPWATCH_THREADS", "3")
    assert default_threads() == 3
    for bad in ("0", "many"):
        monkeypatch.setenv("DEEPWATCH_THREADS", bad)
        with pytest.raises(UsageError, match="DEEPWATCH_THREADS"):
            default_threads()


@pytest.fixture(scope="module")
def features(kdd_bundle: Path, small_kdd: Path) -> np.ndarray:
    det = Detector(kdd_bundle)
    text = "".join(small_kdd.read_text().splitlines(keepends=True)[:3000])
    return det.featurizer.transform(get_format("kdd").parse(text).batch)


def test_session_settings_and_a_wanted_provider_that_is_missing(kdd_bundle: Path,
                                                                features: np.ndarray) -> None:
    backend = OnnxBackend(kdd_bundle / ONNX, ["proba"], providers=["CUDAExecutionProvider"],
                          threads=1)
    assert backend.providers[-1] == "CPUExecutionProvider"
    assert backend.session.get_session_options().intra_op_num_threads == 1
    assert backend.describe()["threads"] == 1
    out = backend.run(features)["proba"]
    assert out.shape == (len(features), out.shape[1]) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_one_row_at_a_time_equals_the_batch(kdd_bundle: Path, features: np.ndarray) -> None:
    backend = OnnxBackend(kdd_bundle / ONNX, ["proba"])
    whole = backend.run(features)["proba"]
    chunked = backend.run(features, batch=700)["proba"]
    singles = np.concatenate([backend.run(features[i : i + 1])["proba"] for i in range(50)])
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(singles, whole[:50], atol=1e-6)


def test_cpu_calls_are_cut_to_cache_sized_chunks(kdd_bundle: Path, features: np.ndarray) -> None:
    """On the CPU provider a large input goes through the session in calls of CPU_CHUNK_ROWS
    rows (the stack's activations then stay in the caches), with the one-call result."""
    backend = OnnxBackend(kdd_bundle / ONNX, ["proba"])
    assert backend.providers[0] == "CPUExecutionProvider"
    assert backend.chunk_rows == CPU_CHUNK_ROWS < CHUNK_ROWS
    big = np.concatenate([features] * (2 * CPU_CHUNK_ROWS // len(features) + 1))
    session, calls = backend.session, []

    class Spy:
        def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            calls.append(len(next(iter(feed.values()))))
            return session.run(outputs, feed)  # type: ignore[no-any-return]

    backend.session = Spy()  # type: ignore[assignment]
    got = backend.run(big)["proba"]
    assert calls == [CPU_CHUNK_ROWS, CPU_CHUNK_ROWS, len(big) - 2 * CPU_CHUNK_ROWS]
    backend.session = session
    np.testing.assert_allclose(got, backend.run(big, batch=CHUNK_ROWS)["proba"], atol=1e-6)


def test_a_damaged_model_file_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match="cannot load"):
        OnnxBackend(bad, ["proba"])


def test_gpu_provider_when_the_machine_has_one(kdd_bundle: Path, features: np.ndarray) -> None:
    import onnxruntime as ort

    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
           if p in ort.get_available_providers()]
    if not gpu:
        pytest.skip("this onnxruntime build has no GPU provider (CPU-only machine)")
    det = Detector(kdd_bundle, engine="onnx")
    assert det.engine != "onnxruntime:CPU", det.backend.skipped
    ref = Detector(kdd_bundle, engine="torch").backend.run(features)["proba"]
    assert np.abs(det.backend.run(features)["proba"] - ref).max() <= PARITY_TOLERANCE


def _trainer_missing(kind: str) -> str | None:
    """Why ``kind`` cannot be trained in this build yet, or None when its trainer exists."""
    from deepwatch.train import api

    target = api._TRAINERS.get(kind)
    if target is None:
        return f"no trainer is registered for model kind {kind!r}"
    module, attr = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return f"the trainer of {kind!r} ({target}) is not written yet"
        raise
    if not hasattr(mod, attr):
        return f"the trainer of {kind!r} ({target}) is not written yet"
    return None


@pytest.fixture(scope="module")
def parity_train(small_kdd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 records: parity needs a trained graph of every kind, not a good model."""
    p = tmp_path_factory.mktemp("parity") / "kdd_3k.csv"
    p.write_text("".join(small_kdd.read_text().splitlines(keepends=True)[::7][:3000]))
    return p


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_torch_and_onnx_runtime_agree(kind: str, small_kdd: Path, parity_train: Path,
                                      bundle_root: Path) -> None:
    missing = _trainer_missing(kind)
    if missing:
        pytest.skip(missing)  # not implemented is not a missing dependency: a skip in CI too
    bundle = trained_bundle(kind, parity_train, bundle_root, epochs=1)
    onnx_det = Detector(bundle, engine="onnx")
    torch_det = Detector(bundle, engine="torch")
    assert onnx_det.engine.startswith("onnxruntime") and torch_det.engine.startswith("torch")
    assert onnx_det.outputs == torch_det.outputs and onnx_det.outputs
    text = "".join(small_kdd.read_text().splitlines(keepends=True)[3::7][:3000])
    X = onnx_det.featurizer.transform(get_format("kdd").parse(text).batch)
    # and inputs off the training distribution: large, negative, one-hot slots broken
    rng = np.random.default_rng(0)
    noisy = (X[:500] + rng.normal(0.0, 3.0, size=X[:500].shape)).astype(np.float32)
    for inputs in (X, noisy, X[:1]):
        a, b = onnx_det.backend.run(inputs), torch_det.backend.run(inputs)
        for name in onnx_det.outputs:
            assert a[name].shape == b[name].shape
            diff = np.abs(a[name].astype(np.float64) - b[name])
            # 1e-4 absolute for outputs up to 1 in size (probabilities, scores); beyond that
            # (reconstruction errors of wild inputs reach thousands) float32 itself cannot
            # hold 1e-4, so the same tolerance applies relative to the value's size
            scale = np.maximum(1.0, np.abs(b[name].astype(np.float64)))
            worst = float((diff / scale).max())
            assert worst <= PARITY_TOLERANCE, (
                f"{kind}/{name}: max scaled difference {worst:.2e} "
                f"(max abs difference {float(diff.max()):.2e})")
    batch = get_format("kdd").parse(text).batch
    verdict_onnx = onnx_det.score_batch(batch).column("verdict").to_pylist()
    verdict_torch = torch_det.score_batch(batch).column("verdict").to_pylist()
    agree = np.mean(np.array(verdict_onnx) == np.array(verdict_torch))
    assert agree >= 0.999, f"{kind}: verdicts agree on only {agree:.2%}"


def test_the_supervised_kinds_are_never_skipped_by_parity() -> None:
    implemented = {k for k in MODEL_KINDS if _trainer_missing(k) is None}
    assert {"mlp", "resnet", "snn", "stack"} <= implemented


def _external(name: str):  # type: ignore[no-untyped-def]
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[2])
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "elsewhere.bin"
    return t


def _with_tensor_at(where: str) -> bytes:
    """A small model whose only external tensor sits at ``where`` (or nowhere)."""
    from onnx import TensorProto, helper, numpy_helper

    inline = numpy_helper.from_array(np.ones(2, np.float32), "w")
    tensor = _external("w") if where != "none" else inline
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    inits, nodes, functions = [], [], []
    if where in ("initializer", "none"):
        inits = [tensor]
        nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    elif where == "constant":
        nodes = [helper.make_node("Constant", [], ["w"], value=tensor),
                 helper.make_node("Add", ["x", "w"], ["y"])]
    elif where == "sparse":
        values = _external("v")
        indices = numpy_helper.from_array(np.array([0], np.int64), "i")
        sparse = helper.make_sparse_tensor(values, indices, [2])
        nodes = [helper.make_node("Constant", [], ["w"], sparse_value=sparse),
                 helper.make_node("Add", ["x", "w"], ["y"])]
    elif where in ("subgraph", "function"):
        inner = helper.make_graph([helper.make_node("Constant", [], ["z"], value=tensor)],
                                  "inner", [], [helper.make_tensor_value_info(
                                      "z", TensorProto.FLOAT, [2])])
        if where == "subgraph":
            nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                         np.array(True), "c")),
                     helper.make_node("If", ["c"], ["w"], then_branch=inner, else_branch=inner),
                     helper.make_node("Add", ["x", "w"], ["y"])]
        else:
            fn = helper.make_function("local", "f", [], ["z"], list(inner.node),
                                      [helper.make_opsetid("", 17)])
            functions = [fn]
            nodes = [helper.make_node("f", [], ["w"], domain="local"),
                     helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, functions=functions,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local", 1)])
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("where", ["none", "initializer", "constant", "sparse", "subgraph",
                                   "function"])
def test_external_data_is_found_wherever_a_tensor_can_be(where: str) -> None:
    """The wire-format scan finds an external tensor in every place one can sit (the onnx
    package's own helper agrees, except on sparse tensors, which it does not look into)."""
    pytest.importorskip("onnx")
    import onnx
    from onnx.external_data_helper import _get_all_tensors
    from onnx.external_data_helper import uses_external_data as onnx_says

    from deepwatch._onnx_scan import uses_external_data

    blob = _with_tensor_at(where)
    assert uses_external_data(blob) is (where != "none")
    if where != "sparse":
        model = onnx.load_from_string(blob)
        assert any(onnx_says(t) for t in _get_all_tensors(model)) is (where != "none")


def test_a_model_with_external_data_is_refused_before_onnx_runtime(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(_with_tensor_at("initializer"))
    with pytest.raises(BundleError, match="keeps tensor data in other files"):
        OnnxBackend(path, ["y"])


@pytest.mark.parametrize("blob", [b"\x0a\xff", b"\x0a\x05ab", b"\x3a\x02\x2a\x10", b"\x0f"])
def test_malformed_model_bytes_are_a_bundle_error(blob: bytes) -> None:
    from deepwatch._onnx_scan import MalformedModel, uses_external_data

    with pytest.raises(MalformedModel):
        uses_external_data(blob)
    with pytest.raises(BundleError, match="not a valid ONNX model"):
        OnnxBackend(blob, ["y"])
