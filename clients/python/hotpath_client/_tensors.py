"""numpy arrays to ModelInfer requests and responses back to numpy arrays, for every V2 datatype.

Tensors always travel as raw contents: little-endian element bytes, and for BYTES each element as a
4-byte little-endian length followed by its bytes (the protocol's raw BYTES layout).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from hotpath_client._errors import HotpathError
from hotpath_client._proto import grpc_service_pb2 as pb

NUMPY_TYPES: dict[str, np.dtype] = {name: np.dtype(dtype) for name, dtype in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64), ("BYTES", np.object_),
)}
_DATATYPES = {dtype: name for name, dtype in NUMPY_TYPES.items() if name != "BYTES"}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class StreamResult:
    """One answer on an inference stream.

    `id` is the position of the request in the iterable given to `stream_infer`, as a string (the
    request id sent). A request that failed has `error` set and no outputs; the stream goes on.
    """

    id: str
    outputs: dict[str, np.ndarray]
    error: str | None = None


def datatype_of(name: str, array: np.ndarray) -> str:
    """The V2 datatype for an array: by dtype, and BYTES for object, str and bytes arrays."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    datatype = _DATATYPES.get(array.dtype.newbyteorder("="))
    if datatype is None:
        raise HotpathError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input '{name}': numpy dtype {array.dtype} has no V2 datatype; use one of "
                           "bool, (u)int8/16/32/64, float16/32/64, or str/bytes/object for BYTES")
    return datatype


def _element_bytes(name: str, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    raise HotpathError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input '{name}': BYTES elements must be bytes or str, got {type(item).__name__}")


def encode_bytes(name: str, array: np.ndarray) -> bytes:
    """The raw BYTES layout of an array's elements, in C order."""
    parts = []
    for item in array.ravel():
        data = _element_bytes(name, item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes(name: str, raw: bytes, shape: Sequence[int]) -> np.ndarray:
    """An object array of bytes from the raw BYTES layout; raises if the layout does not fit the shape."""
    count = math.prod(shape)
    items = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise HotpathError(grpc.StatusCode.INTERNAL, f"output '{name}': BYTES contents end before element {i} of {count}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise HotpathError(grpc.StatusCode.INTERNAL, f"output '{name}': BYTES element {i} overruns the contents")
        items[i] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise HotpathError(grpc.StatusCode.INTERNAL, f"output '{name}': {len(view) - offset} bytes left after {count} BYTES elements")
    return items.reshape(shape)


def infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None,
                  version: str, request_id: str) -> pb.ModelInferRequest:
    """A ModelInfer request carrying `inputs` as raw contents and asking for `outputs` (all when None)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = datatype_of(name, array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            request.raw_input_contents.append(encode_bytes(name, array))
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def infer_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs by name; numeric arrays are read-only views over the response's bytes."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise HotpathError(grpc.StatusCode.INTERNAL, f"response carries {len(response.raw_output_contents)} raw contents "
                           f"for {len(response.outputs)} outputs; this client reads raw contents only")
    arrays = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        dtype = NUMPY_TYPES.get(tensor.datatype)
        if dtype is None:
            raise HotpathError(grpc.StatusCode.INTERNAL, f"output '{tensor.name}' has unknown datatype '{tensor.datatype}'")
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            arrays[tensor.name] = decode_bytes(tensor.name, raw, shape)
        elif len(raw) != math.prod(shape) * dtype.itemsize:
            raise HotpathError(grpc.StatusCode.INTERNAL, f"output '{tensor.name}': {len(raw)} bytes do not hold "
                               f"{tensor.datatype} of shape {list(shape)}")
        else:
            arrays[tensor.name] = np.frombuffer(raw, dtype.newbyteorder("<")).reshape(shape)
    return arrays


def stream_result(response: pb.ModelStreamInferResponse) -> StreamResult:
    """A stream answer as a StreamResult."""
    if response.error_message:
        return StreamResult(response.infer_response.id, {}, response.error_message)
    return StreamResult(response.infer_response.id, infer_outputs(response.infer_response))
