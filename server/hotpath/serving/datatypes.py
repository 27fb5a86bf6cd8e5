"""The Open Inference Protocol datatypes and their numpy, ONNX and model-config counterparts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hotpath._proto import model_config_pb2


@dataclass(frozen=True)
class Datatype:
    """One V2 datatype: its name on the wire, numpy dtype and where typed contents keep it."""

    name: str
    dtype: np.dtype
    config_type: int
    onnx_type: str
    contents_field: str

    @property
    def itemsize(self) -> int:
        """Bytes per element in raw contents (0 for variable-size BYTES)."""
        return 0 if self.name == "BYTES" else self.dtype.itemsize


def _dt(name: str, dtype: object, onnx: str, field: str) -> Datatype:
    return Datatype(name, np.dtype(dtype), model_config_pb2.DataType.Value(
        "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"), onnx, field)


DATATYPES: dict[str, Datatype] = {d.name: d for d in (
    _dt("BOOL", np.bool_, "tensor(bool)", "bool_contents"),
    _dt("UINT8", np.uint8, "tensor(uint8)", "uint_contents"),
    _dt("UINT16", np.uint16, "tensor(uint16)", "uint_contents"),
    _dt("UINT32", np.uint32, "tensor(uint32)", "uint_contents"),
    _dt("UINT64", np.uint64, "tensor(uint64)", "uint64_contents"),
    _dt("INT8", np.int8, "tensor(int8)", "int_contents"),
    _dt("INT16", np.int16, "tensor(int16)", "int_contents"),
    _dt("INT32", np.int32, "tensor(int32)", "int_contents"),
    _dt("INT64", np.int64, "tensor(int64)", "int64_contents"),
    _dt("FP16", np.float16, "tensor(float16)", "fp32_contents"),
    _dt("FP32", np.float32, "tensor(float)", "fp32_contents"),
    _dt("FP64", np.float64, "tensor(double)", "fp64_contents"),
    _dt("BYTES", np.object_, "tensor(string)", "bytes_contents"),
)}

BY_ONNX_TYPE: dict[str, Datatype] = {d.onnx_type: d for d in DATATYPES.values()}
BY_CONFIG_TYPE: dict[int, Datatype] = {d.config_type: d for d in DATATYPES.values()}
