"""The one check suite every model kind passes (STYLE.md, practice 5).

Kinds are discovered from ``deepwatch.models.MODEL_KINDS``, so a new model cannot skip it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import head_lines

from deepwatch.formats import get_format
from deepwatch.models import MODEL_KINDS
from deepwatch.models.detector import Detector
from deepwatch.train.api import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, kdd_train_file: Path) -> Path:
    p = tmp_path_factory.mktemp("check") / "tiny.csv"
    p.write_text("".join(head_lines(kdd_train_file, 4_000, every=120)))
    return p


@pytest.fixture(scope="module")
def probe_batch(small_kdd_test: Path) -> pa.RecordBatch:
    data = "".join(small_kdd_test.read_text().splitlines(keepends=True)[:500])
    return get_format("kdd").parse(data).batch


_TRAINED: dict[tuple[str, int], Path] = {}


def _bundle(kind: str, data: Path, root: Path, seed: int = 0, tag: str = "a") -> Path:
    key = (kind, seed, tag)
    if key not in _TRAINED:  # type: ignore[comparison-overlap]
        out = root / f"{kind}_{seed}_{tag}"
        train("kdd", kind, [str(data)], out, epochs=2, seed=seed)
        _TRAINED[key] = out  # type: ignore[index]
    return _TRAINED[key]  # type: ignore[index]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check_bundles")


@pytest.mark.parametrize("kind", MODEL_KINDS)
class TestEveryModel:
    def test_shapes_and_columns(self, kind: str, tiny: Path, root: Path,
                                probe_batch: pa.RecordBatch) -> None:
        det = Detector(_bundle(kind, tiny, root))
        out = det.score_batch(probe_batch)
        assert out.num_rows == probe_batch.num_rows
        # input columns first, in order, then the verdict columns
        assert out.schema.names[: len(probe_batch.schema)] == probe_batch.schema.names
        score = out.column("score").to_numpy()
        assert np.all(np.isfinite(score))
        assert set(out.column("verdict").to_pylist()) <= {"normal", "malicious"}
        if det.decision.supervised:
            assert np.all((score >= 0) & (score <= 1))
            assert "attack_type" in out.schema.names and "category" in out.schema.names
        if "anomaly" in det.outputs:
            assert "anomaly_score" in out.schema.names
        # a quality floor: even two epochs on 4,000 records separate attacks from normal
        from deepwatch.evaluate.metrics import roc_auc

        truth = np.array(probe_batch.column("label").to_pylist()) != "normal"
        auc = roc_auc(truth, out.column("score").to_numpy())
        assert auc is not None and auc > (0.9 if det.decision.supervised else 0.75), auc
        empty = det.score_batch(probe_batch.slice(0, 0))
        assert empty.num_rows == 0 and "verdict" in empty.schema.names

    def test_deterministic_under_seed(self, kind: str, tiny: Path, root: Path,
                                      probe_batch: pa.RecordBatch) -> None:
        a = Detector(_bundle(kind, tiny, root, tag="a")).score_batch(probe_batch)
        b = Detector(_bundle(kind, tiny, root, tag="b")).score_batch(probe_batch)
        np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(),
                                   atol=1e-6)

    def test_torch_and_onnx_agree(self, kind: str, tiny: Path, root: Path,
                                  probe_batch: pa.RecordBatch) -> None:
        path = _bundle(kind, tiny, root)
        onnx = Detector(path, engine="onnx")
        torch_ = Detector(path, engine="torch")
        X = onnx.featurizer.transform(probe_batch)
        ro, rt = onnx.backend.run(X), torch_.backend.run(X)
        assert ro.keys() == rt.keys()
        for name in ro:
            np.testing.assert_allclose(ro[name], rt[name], atol=1e-4, rtol=0)
        assert onnx.engine.startswith("onnxruntime") and torch_.engine.startswith("torch")

    def test_reload_gives_same_scores(self, kind: str, tiny: Path, root: Path,
                                      probe_batch: pa.RecordBatch) -> None:
        path = _bundle(kind, tiny, root)
        first = Detector(path).score_batch(probe_batch)
        again = Detector(path).score_batch(probe_batch)
        assert first.equals(again)

    def test_input_not_mutated_and_column_order_irrelevant(
            self, kind: str, tiny: Path, root: Path, probe_batch: pa.RecordBatch) -> None:
        det = Detector(_bundle(kind, tiny, root))
        before = probe_batch.to_pydict()
        out = det.score_batch(probe_batch)
        assert probe_batch.to_pydict() == before
        names = list(reversed(probe_batch.schema.names))
        shuffled = pa.RecordBatch.from_arrays([probe_batch.column(n) for n in names], names=names)
        out2 = det.score_batch(shuffled)
        np.testing.assert_array_equal(out.column("score").to_numpy(),
                                      out2.column("score").to_numpy())

    def test_unseen_categories(self, kind: str, tiny: Path, root: Path,
                               probe_batch: pa.RecordBatch) -> None:
        det = Detector(_bundle(kind, tiny, root))
        i = probe_batch.schema.get_field_index("service")
        odd = probe_batch.set_column(
            i, "service", pa.array(["never_seen_service"] * probe_batch.num_rows))
        out = det.score_batch(odd)
        assert out.num_rows == probe_batch.num_rows
        assert np.all(np.isfinite(out.column("score").to_numpy()))


def test_fewest_errors_threshold() -> None:
    """The binary threshold fitted on held-out records: fewest weighted errors, median tie."""
    import numpy as np

    from deepwatch.train.api import fewest_errors_threshold

    def t(score: list[float], attack: list[int], w: list[float] | None = None) -> float:
        return fewest_errors_threshold(np.array(score), np.array(attack, bool),
                                       np.ones(len(score)) if w is None else np.array(w))

    assert t([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 1, 1, 1]) == pytest.approx(0.25)
    assert t([0.1, 0.6, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.7)  # tie: 0.25 or 0.7
    # a heavy benign record at 0.2 outweighs a light attack with the same score
    assert t([0.2, 0.2, 0.7], [0, 1, 1], [5, 1, 1]) == pytest.approx(0.45)
    assert t([0.1, 0.2], [1, 1]) == pytest.approx(0.1)  # flag everything: lowest score
    assert t([0.1, 0.2], [0, 0]) > 0.2  # flag nothing
