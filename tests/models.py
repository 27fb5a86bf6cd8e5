"""ONNX models the tests generate with the `onnx` helper API, and Triton-layout repositories of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IDENTITY_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(model: onnx.ModelProto, repo: Path, name: str, version: int = 1, config: str | None = None) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    (repo / name / str(version)).mkdir(parents=True, exist_ok=True)
    onnx.save(model, repo / name / str(version) / "model.onnx")
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return repo / name


def _model(nodes: list, inputs: list, outputs: list, initializers: list = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def identity_model(repo: Path, name: str = "identity", dims: tuple = (4,), batch: bool = True,
                   version: int = 1, config: str | None = None) -> Path:
    """One Identity per datatype: input `IN_<DT>` -> output `OUT_<DT>`."""
    shape = (["batch"] if batch else []) + list(dims)
    nodes, ins, outs = [], [], []
    for dt, onnx_type in IDENTITY_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"IN_{dt}"], [f"OUT_{dt}"]))
        ins.append(helper.make_tensor_value_info(f"IN_{dt}", onnx_type, shape))
        outs.append(helper.make_tensor_value_info(f"OUT_{dt}", onnx_type, shape))
    return _save(_model(nodes, ins, outs), repo, name, version, config)


def add_sub_model(repo: Path, name: str = "add_sub", width: int = 16, version: int = 1,
                  config: str | None = None, offset: float = 0.0) -> Path:
    """Triton's classic: OUTPUT0 = INPUT0 + INPUT1 + offset, OUTPUT1 = INPUT0 - INPUT1 (FP32, batched)."""
    shape = ["batch", width]
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["sum"]),
             helper.make_node("Add", ["sum", "OFFSET"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("INPUT0", "INPUT1")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("OUTPUT0", "OUTPUT1")]
    offset_init = numpy_helper.from_array(np.array(offset, np.float32), "OFFSET")
    return _save(_model(nodes, ins, outs, [offset_init]), repo, name, version, config)


def matmul_model(repo: Path, name: str = "matmul", inner: int = 4, version: int = 1, config: str | None = None) -> Path:
    """Y = X @ W with X declared [batch, -1]: rows of the wrong width make ONNX Runtime raise at run time."""
    w = numpy_helper.from_array(np.ones((inner, 2), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "width"])]
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 2])]
    return _save(_model(nodes, ins, outs, [w]), repo, name, version, config)


def string_cast_model(repo: Path, name: str = "string_cast", config: str | None = None) -> Path:
    """Y (FP32 [-1, 2]) = X (BYTES [-1, 2]) parsed as numbers: ONNX Runtime fails the run on text that is not one."""
    return _save(_model([helper.make_node("Cast", ["X"], ["Y"], to=TensorProto.FLOAT)],
                        [helper.make_tensor_value_info("X", TensorProto.STRING, ["batch", 2])],
                        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 2])]), repo, name, config=config)
