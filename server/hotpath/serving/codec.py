"""Request decoding and response encoding for ModelInfer, checked against the model's specs.

Decoding is zero-copy for raw contents (`np.frombuffer` over the request's bytes). Everything that
can be prepared once per model is, in `ModelCodec`; the per-request path only looks things up.
"""

from __future__ import annotations

import math

import numpy as np

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import model_config_pb2
from hotpath.errors import InvalidArgument, shown
from hotpath.serving._codec import BytesFormatError, join_bytes, split_bytes
from hotpath.serving.config import TensorSpec


def _text_array(where: str, items: list, shape: tuple[int, ...]) -> np.ndarray:
    """BYTES elements as an object array of str: ONNX Runtime's Python API carries string tensors only as UTF-8 text.

    It feeds a `bytes` element as its repr, reads an `S` array as NUL-terminated UTF-8, refuses a str
    holding surrogates, and cannot hand back a string tensor that is not UTF-8; so a BYTES element that
    is not UTF-8 is refused here, by index (tests/test_errors.py pins that ORT behaviour).
    """
    array = np.empty(len(items), dtype=object)
    try:
        array[:] = [item.decode() if isinstance(item, bytes) else item for item in items]
    except UnicodeDecodeError as exc:
        index = next(i for i, item in enumerate(items) if isinstance(item, bytes) and not _is_utf8(item))
        shown, more = items[index][:16], "..." if len(items[index]) > 16 else ""
        raise InvalidArgument(f"{where}: BYTES element {index} of {len(items)} must be valid UTF-8, got {shown!r}{more} "
                              f"({exc.reason} at byte {exc.start}); ONNX Runtime string tensors hold only text") from None
    return array.reshape(shape)


def _is_utf8(item: bytes) -> bool:
    try:
        item.decode()
    except UnicodeDecodeError:
        return False
    return True


def _dims_match(expected: tuple[int, ...], got: tuple[int, ...]) -> bool:
    return len(expected) == len(got) and all(e == -1 or e == g for e, g in zip(expected, got))


MAX_ELEMENTS = 2**31 - 1
"""Most elements an input's shape may claim: a protobuf message is under 2 GiB, so no request carries more,
and a larger claim must be refused before anything is sized from it."""


class ModelCodec:
    """Turns ModelInfer requests into one model version's input arrays and its outputs into responses.

    Each `Model` owns one, built from its completed config and specs.
    """

    def __init__(self, name: str, version: int, config: model_config_pb2.ModelConfig,
                 inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        self.name = name
        self.version = str(version)
        self.batched = config.max_batch_size > 0
        self.max_batch_size = config.max_batch_size
        self.inputs = {spec.name: (i, spec) for i, spec in enumerate(inputs)}
        self.outputs = {spec.name: (i, spec) for i, spec in enumerate(outputs)}
        self.all_outputs = tuple(self.outputs.values())
        self.optional = {e.name for e in config.input if e.optional}
        self.variable_dims = any(-1 in spec.dims for spec in inputs)
        self.cached = config.response_cache.enable

    def _where(self, name: str) -> str:
        return f"model '{self.name}' input {shown(name)}"

    def _shape(self, spec: TensorSpec, shape: tuple[int, ...]) -> int:
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{self._where(spec.name)}: shape {list(shape)} has a negative dim")
        if math.prod(shape) > MAX_ELEMENTS:
            raise InvalidArgument(f"{self._where(spec.name)}: shape {list(shape)} holds {math.prod(shape)} elements, more than "
                                  f"any request can carry (a protobuf message is under 2 GiB)")
        if self.batched:
            if len(shape) != len(spec.dims) + 1 or not _dims_match(spec.dims, shape[1:]):
                raise InvalidArgument(f"{self._where(spec.name)}: expected shape {[-1, *spec.dims]} (batch first), got {list(shape)}")
            rows = shape[0]
            if rows < 1 or rows > self.max_batch_size:
                raise InvalidArgument(f"{self._where(spec.name)}: batch of {rows} rows is outside 1..{self.max_batch_size} (max_batch_size)")
            return rows
        if not _dims_match(spec.dims, shape):
            raise InvalidArgument(f"{self._where(spec.name)}: expected shape {list(spec.dims)}, got {list(shape)}")
        return 1

    def _raw(self, spec: TensorSpec, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
        count = math.prod(shape)
        datatype = spec.datatype
        if datatype.name == "BYTES":
            try:
                items = split_bytes(raw, count)
            except BytesFormatError as exc:
                raise InvalidArgument(f"{self._where(spec.name)}: malformed BYTES raw contents for shape {list(shape)}: {exc}") from None
            return _text_array(self._where(spec.name), items, shape)
        expected = count * datatype.itemsize
        if len(raw) != expected:
            raise InvalidArgument(f"{self._where(spec.name)}: raw contents hold {len(raw)} bytes, expected {expected} "
                                  f"({count} {datatype.name} elements for shape {list(shape)})")
        return np.frombuffer(raw, datatype.dtype).reshape(shape)

    def _typed(self, spec: TensorSpec, shape: tuple[int, ...], tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
        datatype = spec.datatype
        values = getattr(tensor.contents, datatype.contents_field)
        count = math.prod(shape)
        if len(values) != count:
            raise InvalidArgument(f"{self._where(spec.name)}: contents.{datatype.contents_field} holds {len(values)} elements, "
                                  f"expected {count} for shape {list(shape)}")
        if datatype.name == "BYTES":
            return _text_array(self._where(spec.name), list(values), shape)
        wide = np.asarray(values)
        if count and wide.dtype.kind in "iu" and wide.dtype.itemsize > datatype.itemsize:
            low, high = np.iinfo(datatype.dtype).min, np.iinfo(datatype.dtype).max
            if wide.min() < low or wide.max() > high:
                raise InvalidArgument(f"{self._where(spec.name)}: contents.{datatype.contents_field} holds values in "
                                      f"[{wide.min()}, {wide.max()}], outside {datatype.name}'s range [{low}, {high}]")
        return wide.astype(datatype.dtype, copy=False).reshape(shape)

    def decode(self, request: pb.ModelInferRequest) -> tuple[tuple[np.ndarray, ...], int, object]:
        """The inputs in config order, the request's rows, and its batching key; raises InvalidArgument."""
        tensors = request.inputs
        raw = request.raw_input_contents
        if raw:
            for tensor in tensors:
                if tensor.HasField("contents"):
                    given = ", ".join(f"contents.{field.name} ({len(values)} elements)" for field, values in tensor.contents.ListFields())
                    raise InvalidArgument(f"{self._where(tensor.name)}: raw_input_contents, when used, must carry every input; "
                                          f"expected no typed contents, got {given or 'an empty contents'}")
        if raw and len(raw) != len(tensors):
            raise InvalidArgument(f"model '{self.name}': {len(raw)} raw_input_contents for {len(tensors)} inputs; "
                                  "send one raw entry per input, in the order of `inputs`")
        arrays: list[np.ndarray | None] = [None] * len(self.inputs)
        rows = -1
        for i, tensor in enumerate(tensors):
            entry = self.inputs.get(tensor.name)
            if entry is None:
                raise InvalidArgument(f"model '{self.name}' has no input {shown(tensor.name)}; its inputs are {sorted(self.inputs)}")
            position, spec = entry
            if arrays[position] is not None:
                raise InvalidArgument(f"{self._where(tensor.name)} is given more than once")
            if tensor.datatype != spec.datatype.name:
                raise InvalidArgument(f"{self._where(tensor.name)}: expected datatype {spec.datatype.name}, got {tensor.datatype or 'none'}")
            shape = tuple(tensor.shape)
            tensor_rows = self._shape(spec, shape)
            if rows not in (-1, tensor_rows):
                raise InvalidArgument(f"{self._where(tensor.name)}: batch of {tensor_rows} rows, but other inputs have {rows}")
            rows = tensor_rows
            arrays[position] = self._raw(spec, shape, raw[i]) if raw else self._typed(spec, shape, tensor)
        for name, (position, spec) in self.inputs.items():
            if arrays[position] is None and name not in self.optional:
                raise InvalidArgument(f"model '{self.name}': input '{name}' is missing; expected {spec.datatype.name} "
                                      f"{spec.shape(self.batched)}")
        key = tuple(a.shape[1:] for a in arrays) if self.batched and self.variable_dims else None
        return tuple(arrays), max(rows, 1), key

    def requested(self, request: pb.ModelInferRequest) -> tuple[tuple[int, TensorSpec], ...]:
        """(position, spec) of the outputs to return: those named in the request, else all."""
        if not request.outputs:
            return self.all_outputs
        chosen = []
        for wanted in request.outputs:
            entry = self.outputs.get(wanted.name)
            if entry is None:
                raise InvalidArgument(f"model '{self.name}' has no output {shown(wanted.name)}; its outputs are {sorted(self.outputs)}")
            chosen.append(entry)
        return tuple(chosen)

    def encode(self, request_id: str, outputs: list[np.ndarray], chosen: tuple[tuple[int, TensorSpec], ...]) -> pb.ModelInferResponse:
        """The ModelInfer response carrying the chosen outputs as raw contents."""
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request_id)
        for position, spec in chosen:
            array = outputs[position]
            response.outputs.add(name=spec.name, datatype=spec.datatype.name, shape=array.shape)
            if spec.datatype.name == "BYTES":
                response.raw_output_contents.append(join_bytes(array.ravel()))
            else:
                response.raw_output_contents.append(np.ascontiguousarray(array, spec.datatype.dtype).tobytes())
        return response

    def outputs_of(self, response: pb.ModelInferResponse) -> list[np.ndarray | None]:
        """The outputs a response of this model carries, in config order (one it does not carry is None):
        the inverse of `encode`, for responses the cache answered."""
        arrays: list[np.ndarray | None] = [None] * len(self.outputs)
        for tensor, raw in zip(response.outputs, response.raw_output_contents):
            position, spec = self.outputs[tensor.name]
            shape = tuple(tensor.shape)
            if spec.datatype.name == "BYTES":
                array = np.empty(math.prod(shape), dtype=object)
                array[:] = split_bytes(raw, len(array))
                arrays[position] = array.reshape(shape)
            else:
                arrays[position] = np.frombuffer(raw, spec.datatype.dtype).reshape(shape)
        return arrays
