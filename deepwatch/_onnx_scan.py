"""Find ONNX tensors that keep their data in another file, without importing ``onnx``.

An ONNX model can say that a tensor's bytes live in a separate file ("external data": a
``location`` relative to the model, an offset and a length). A bundle's ``model.onnx`` is
checked against the manifest and handed to ONNX Runtime as bytes; ONNX Runtime then resolves
such a location against the process's working directory. A bundle has no business reading files
outside itself, so the loader refuses any model that uses external data before ONNX Runtime sees
it. So is a model with an ``EPContext`` node: an execution provider's compiled engine
(TensorRT, QNN, OpenVINO), either a file to load that the manifest does not cover
(``ep_cache_context``) or an opaque engine inside the model; deepwatch exports plain graphs, and
TensorRT builds its engine from the graph on the machine that scores (see ``runtime``).
Importing the ``onnx`` package for this would add about 0.1 s to every ``score``; this walks
the protobuf wire format instead, descending only into the messages that can hold tensors and
skipping everything else (weights included) by its length, so it costs microseconds.

Paths through ``onnx.proto`` (field numbers):

- ModelProto: graph 7, training_info 20, functions 25
- TrainingInfoProto: initialization 1, algorithm 2
- GraphProto: node 1, initializer 5, sparse_initializer 15
- FunctionProto: node 7, attribute_proto 11 (an attribute's default value, which ONNX Runtime
  puts into the graph when it inlines the function)
- NodeProto: op_type 4, attribute 5
- AttributeProto: t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
- SparseTensorProto: values 1, indices 2
- TensorProto: external_data 13, data_location 14 (EXTERNAL = 1)
"""

from __future__ import annotations

_MODEL, _GRAPH, _FUNCTION, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR, _TRAINING = range(8)
#: message kind -> {field number: kind of the embedded message}
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_MAX_DEPTH = 64


class MalformedModel(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise MalformedModel("truncated or over-long varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


#: Why a model is refused (see :func:`refusal`).
EXTERNAL_DATA = ("it keeps tensor data in other files (ONNX external data), and a bundle's "
                 "model must hold all its weights")
EP_CONTEXT = ("it holds an EPContext node (an execution provider's compiled engine, which can "
              "name a file outside the bundle to load), and a bundle's model must be a plain "
              "ONNX graph")


def _walk(buf: memoryview, i: int, end: int, kind: int, depth: int) -> str | None:
    """Why the message in ``buf[i:end]`` (of ``kind``) is refused (an external tensor, an
    EPContext node), or None."""
    if depth > _MAX_DEPTH:
        raise MalformedModel("messages nested too deeply")
    children = _CHILDREN[kind]
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            if kind == _TENSOR and field == 14 and value == 1:
                return EXTERNAL_DATA
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise MalformedModel("a field runs past the end of its message")
            if kind == _TENSOR and field == 13:
                return EXTERNAL_DATA
            if kind == _NODE and field == 4 and buf[i:i + n] == b"EPContext":
                return EP_CONTEXT
            child = children.get(field)
            why = _walk(buf, i, i + n, child, depth + 1) if child is not None else None
            if why is not None:
                return why
            i += n
        else:  # groups (3, 4) are not used by onnx.proto; 6, 7 do not exist
            raise MalformedModel(f"unexpected wire type {wire}")
        if i > end:
            raise MalformedModel("a field runs past the end of its message")
    return None


def refusal(model: bytes) -> str | None:
    """Why the serialised ONNX ``model`` is refused: a tensor keeps its data in another file
    (:data:`EXTERNAL_DATA`), or a node is an ``EPContext`` (:data:`EP_CONTEXT`); None when
    neither.

    Raises :class:`MalformedModel` when the bytes are not a protobuf message."""
    view = memoryview(model)
    return _walk(view, 0, len(view), _MODEL, 0)


def uses_external_data(model: bytes) -> bool:
    """Whether any tensor of the serialised ONNX ``model`` keeps its data in another file (as
    far as the walk goes: it stops at the first reason to refuse the model).

    Raises :class:`MalformedModel` when the bytes are not a protobuf message."""
    return refusal(model) == EXTERNAL_DATA
