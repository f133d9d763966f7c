"""What a bundle must agree on before it serves: the manifest's fields, its network config, its
decision, the featurizer and the network itself. Each check raises one clear BundleError, so a
bundle that could only fail at its first record (a 500 for every request, a traceback in
``score``) is refused when it is loaded instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import BundleError, DeepwatchError, first_line

#: Decision policies a bundle may carry.
POLICIES = ("threshold", "cost")
#: Bounds on a network config, checked before anything is built from it: any width, count or
#: size, the depth of a stack of layers, members of an ensemble, and nesting of the config.
MAX_INT = 1 << 24
MAX_DEPTH = 64
MAX_MEMBERS = 64
MAX_NESTING = 8
#: Rows of zeros each loaded network scores once, to prove it fits its featurizer and decision.
SMOKE_ROWS = 2


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_manifest(manifest: dict[str, Any]) -> None:
    """The fields the loader uses have the types it needs (read_manifest checked ``files``)."""
    for key, what in (("model_kind", "a string"), ("input_format", "a format name"),
                      ("featurizer_schema_hash", "a string")):
        if not isinstance(manifest.get(key), str):
            raise BundleError(f"the manifest's {key!r} is {_got(manifest, key)}, not {what}")
    outputs = manifest.get("outputs")
    if not (_str_list(outputs) and outputs and len(set(outputs)) == len(outputs)):
        raise BundleError(f"the manifest's 'outputs' is {_got(manifest, 'outputs')}, not a "
                          "list of distinct output names")
    n = manifest.get("n_features")
    if not (type(n) is int and 0 < n <= MAX_INT):
        raise BundleError(f"the manifest's 'n_features' is {_got(manifest, 'n_features')}, not "
                          "a count of features")
    if not isinstance(manifest.get("network"), dict):
        raise BundleError(f"the manifest's 'network' is {_got(manifest, 'network')}, not a "
                          "network config")
    check_network(manifest["network"], n)
    if not isinstance(manifest.get("decision"), dict):
        raise BundleError(f"the manifest's 'decision' is {_got(manifest, 'decision')}, not an "
                          "object")
    check_decision(manifest["decision"], outputs)


def _got(manifest: dict[str, Any], key: str) -> str:
    if key not in manifest:
        return "missing"
    text = repr(manifest[key])
    return text if len(text) <= 40 else f"a {type(manifest[key]).__name__}"


def check_network(network: dict[str, Any], n_features: int) -> None:
    """Sizes bounded, nesting shallow, every ``d_in`` the featurizer's width: what makes
    building the network from it cheap and safe (the weights' shapes are compared later)."""

    def walk(node: Any, where: str, level: int) -> None:
        if level > MAX_NESTING:
            raise BundleError(f"the manifest's network is nested too deeply (at {where})")
        if isinstance(node, dict):
            for key in node:
                if not key.isprintable():
                    # a line break or a terminal escape in a key went out raw in the messages
                    # that name it (network.KEY is ...): a second line of the bundle's own
                    # words after the error, or colours and cursor moves in the terminal
                    raise BundleError(f"the manifest's network has a key with a control "
                                      f"character in it ({key!r} in {where}); it is not a "
                                      "manifest deepwatch wrote")
            for key, value in node.items():
                walk(value, f"{where}.{key}", level + 1)
            if "d_in" in node and node["d_in"] != n_features:
                raise BundleError(f"the network takes {node['d_in']!r} features ({where}.d_in), "
                                  f"not the manifest's n_features ({n_features})")
            depth = node.get("depth")
            if depth is not None and not (type(depth) is int and 0 <= depth <= MAX_DEPTH):
                raise BundleError(f"the network's {where}.depth is {depth!r}, not 0 to "
                                  f"{MAX_DEPTH}")
        elif isinstance(node, list):
            if len(node) > MAX_MEMBERS:
                raise BundleError(f"the network's {where} has {len(node)} entries (at most "
                                  f"{MAX_MEMBERS})")
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]", level + 1)
        elif isinstance(node, bool) or node is None or isinstance(node, str):
            return
        elif isinstance(node, int):
            if not 0 <= node <= MAX_INT:
                raise BundleError(f"the network's {where} is {node}, not 0 to {MAX_INT:,}")
        elif isinstance(node, float) and not math.isfinite(node):
            raise BundleError(f"the network's {where} is {node}, not a finite number")

    walk(network, "network", 0)


def check_decision(decision: dict[str, Any], outputs: list[str]) -> None:
    """Labels, categories, policy, thresholds and cost matrix consistent with each other and
    with the network's outputs."""
    labels = decision.get("labels", [])
    categories = decision.get("categories", [])
    label_category = decision.get("label_category", [])
    for key, value in (("labels", labels), ("categories", categories),
                       ("label_category", label_category)):
        if not _str_list(value):
            raise BundleError(f"the decision's {key!r} is not a list of names")
    if len(set(labels)) != len(labels) or len(set(categories)) != len(categories):
        raise BundleError("the decision's 'labels' and 'categories' must not repeat a name")
    if len(label_category) != len(labels):
        raise BundleError(f"the decision has {len(labels)} labels but {len(label_category)} "
                          "label categories")
    unknown = sorted(set(label_category) - set(categories))
    if unknown:
        raise BundleError(f"the decision's label category {unknown[0]!r} is not one of its "
                          "categories")
    policy = decision.get("policy", "threshold")
    if policy not in POLICIES:
        raise BundleError(f"the decision's policy {policy!r} is not one of {', '.join(POLICIES)}")
    if "threshold" in decision and not _is_number(decision["threshold"]):
        raise BundleError(f"the decision's threshold {decision['threshold']!r} is not a number")
    anomaly = decision.get("anomaly_threshold")
    if anomaly is not None and not _is_number(anomaly):
        raise BundleError(f"the decision's anomaly_threshold {anomaly!r} is not a number")
    cost = decision.get("cost_matrix")
    if cost is not None:
        k = len(categories)
        if not (isinstance(cost, list) and len(cost) == k
                and all(isinstance(row, list) and len(row) == k and all(map(_is_number, row))
                        for row in cost)):
            raise BundleError(f"the decision's cost_matrix is not {k} x {k} numbers (one row "
                              "and column per category)")
    combine = decision.get("combine")
    if combine is not None and not (isinstance(combine, dict) and isinstance(
            combine.get("novel_category", ""), str)):
        raise BundleError("the decision's 'combine' is not {\"novel_category\": ...}")
    if labels and "proba" not in outputs:
        raise BundleError("the decision names labels but the network has no 'proba' output")
    if not labels and "anomaly" not in outputs:
        raise BundleError("the bundle cannot reach a verdict: no labels for a 'proba' output "
                          "and no 'anomaly' output")


def check_onnx(session: Any, n_features: int, outputs: list[str]) -> None:
    """The ONNX graph takes one float matrix of the featurizer's width and has the manifest's
    outputs."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BundleError(f"model.onnx takes {len(inputs)} inputs, not one feature matrix")
    shape = list(inputs[0].shape)
    if len(shape) != 2 or inputs[0].type != "tensor(float)":
        raise BundleError(f"model.onnx takes a {inputs[0].type} of shape {shape}, not a float "
                          "matrix of features")
    if isinstance(shape[1], int) and shape[1] != n_features:
        raise BundleError(f"model.onnx takes {shape[1]} features but the bundle's featurizer "
                          f"makes {n_features}")
    names = [o.name for o in session.get_outputs()]
    if sorted(names) != sorted(outputs):
        raise BundleError(f"model.onnx's outputs {names} are not the manifest's {outputs}")


def check_scoring(detector: Any) -> None:
    """Run the network on a few rows of zeros and decide on its outputs: every output has the
    shape the decision and explanations need, and a verdict comes out."""
    n = detector.featurizer.n_features
    try:
        out = detector.backend.run(np.zeros((SMOKE_ROWS, n), dtype=np.float32))
    except DeepwatchError:
        raise
    except Exception as exc:  # onnxruntime and torch raise their own errors here
        raise BundleError(f"the network cannot score the featurizer's {n} features: "
                          f"{first_line(exc)}") from None
    labels = detector.decision.labels
    for name in detector.outputs:
        value = out.get(name)
        shape = getattr(value, "shape", None)
        if shape is None or len(shape) == 0 or shape[0] != SMOKE_ROWS:
            raise BundleError(f"the network's {name!r} output is not one value per record")
        # what the decision and explanations index: (records, labels), (records,), ...
        want = {"proba": (2, len(labels) or None, f"one column per label ({len(labels)})"),
                "anomaly": (1, None, "one score per record"),
                "errors": (2, n, f"one column per feature ({n})"),
                "latent": (2, None, "a matrix")}.get(name)
        if want is not None and (len(shape) != want[0]
                                 or (want[1] is not None and shape[1] != want[1])):
            raise BundleError(f"the network's {name!r} output has the shape {tuple(shape)}, "
                              f"not {want[2]}")
        # a NaN or infinite weight (a damaged file, a training that diverged) makes every
        # score NaN, and a NaN score is never above a threshold: every record 'normal'
        if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
            raise BundleError(f"the network's {name!r} output is not a finite number for "
                              "a record of zeros: its weights hold NaN or infinite values")
    try:
        cols = detector.decision.apply(out)
    except Exception as exc:
        raise BundleError(f"the decision cannot use the network's outputs: "
                          f"{first_line(exc)}") from None
    if "verdict" not in cols or "score" not in cols:
        raise BundleError("the bundle's decision reaches no verdict from its network's outputs")
