"""trtexec shape specs from an ONNX model's inputs, for scripts/onnx2trt.sh.

    python3 scripts/onnx_shapes.py models/model.onnx 1 256 256
    -> atom_features:1x128x55,adjacency:1x128x128,atom_mask:1x128,descriptors:1x269   (one line
       per batch size given: trtexec's --minShapes / --optShapes / --maxShapes)

Standard library only: it runs inside the TensorRT and Triton containers, which have python3 but
not the `onnx` package. It reads the few protobuf fields it needs straight from the file
(ModelProto.graph -> GraphProto.input -> ValueInfoProto.type.tensor_type.shape.dim); tests check
it against `onnx` on the real exported model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

# Field numbers from onnx/onnx.proto.
MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_INPUT = 5, 11
TENSOR_NAME = 8
VALUE_INFO_NAME, VALUE_INFO_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_TYPE_SHAPE = 2
SHAPE_DIM = 1
DIM_VALUE, DIM_PARAM = 1, 2

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class ShapeError(ValueError):
    """The file is not an ONNX model, or its inputs do not fit a TensorRT batch profile."""


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise ShapeError("truncated protobuf varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, position = _varint(data, position)
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            value, position = data[position : position + size], position + size
        elif wire_type == LENGTH_DELIMITED:
            size, position = _varint(data, position)
            value, position = data[position : position + size], position + size
        else:
            raise ShapeError(f"unsupported protobuf wire type {wire_type}: not an ONNX model")
        if position > len(data):
            raise ShapeError("truncated protobuf message: not an ONNX model")
        yield number, value


def _first(data: memoryview, number: int) -> memoryview | None:
    return next((value for field, value in _fields(data) if field == number), None)


def _dims(value_info: memoryview) -> list[int | str]:
    """A ValueInfoProto's dims: an int where fixed, the symbol (or "?") where dynamic."""
    type_proto = _first(value_info, VALUE_INFO_TYPE)
    tensor = _first(type_proto, TYPE_TENSOR) if type_proto is not None else None
    shape = _first(tensor, TENSOR_TYPE_SHAPE) if tensor is not None else None
    if shape is None:
        return []
    dims: list[int | str] = []
    for field, dimension in _fields(shape):
        if field != SHAPE_DIM:
            continue
        parts = dict(_fields(dimension))
        if DIM_VALUE in parts:
            dims.append(int(parts[DIM_VALUE]))
        else:
            dims.append(bytes(parts.get(DIM_PARAM, b"?")).decode() or "?")
    return dims


def read_input_shapes(path: Path) -> dict[str, list[int | str]]:
    """Input name -> dims of the graph inputs that are fed at run time (not initializers)."""
    data = memoryview(Path(path).read_bytes())
    graph = _first(data, MODEL_GRAPH)
    if graph is None:
        raise ShapeError(f"{path} is not an ONNX model (no graph)")
    initializers = {
        bytes(_first(tensor, TENSOR_NAME) or b"").decode()
        for field, tensor in _fields(graph)
        if field == GRAPH_INITIALIZER
    }
    shapes: dict[str, list[int | str]] = {}
    for field, value_info in _fields(graph):
        if field != GRAPH_INPUT:
            continue
        name = bytes(_first(value_info, VALUE_INFO_NAME) or b"").decode()
        if name not in initializers:
            shapes[name] = _dims(value_info)
    if not shapes:
        raise ShapeError(f"{path} has no graph inputs: not an ONNX model")
    return shapes


def trtexec_shapes(shapes: dict[str, list[int | str]], batch: int) -> str:
    """`name:BxD1xD2,...`: the batch axis set to `batch`, other axes as the model fixes them."""
    specs = []
    for name, dims in shapes.items():
        if not dims or isinstance(dims[0], int):
            raise ShapeError(f"input {name} {dims} has no dynamic batch axis")
        dynamic = [str(dim) for dim in dims[1:] if not isinstance(dim, int)]
        if dynamic:
            raise ShapeError(
                f"input {name} has dynamic axes besides the batch ({', '.join(dynamic)}): "
                "convert the fixed-shape model (models/model.onnx), not model_dynamic_atoms.onnx"
            )
        specs.append(f"{name}:" + "x".join(str(dim) for dim in [batch, *dims[1:]]))
    return ",".join(specs)


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: onnx_shapes.py MODEL.onnx BATCH [BATCH ...]", file=sys.stderr)
        return 2
    try:
        shapes = read_input_shapes(Path(sys.argv[1]))
        for batch in sys.argv[2:]:
            print(trtexec_shapes(shapes, int(batch)))
    except (OSError, ShapeError, ValueError) as error:
        print(f"onnx_shapes.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
