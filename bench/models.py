"""The benchmark's fp32 MLP models, written as a Triton-layout model repository.

Three sizes bracket the server's regimes: "tiny" is all per-request overhead, "medium" is balanced and
"large" is compute-bound (about 2 ms per row at batch 1), where batching pays most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from hotpath._proto import model_config_pb2

INPUT_NAME = "INPUT0"
OUTPUT_NAME = "OUTPUT0"
MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class MLPSpec:
    """An MLP by its layer widths: `widths[0]` inputs, `widths[-1]` outputs, ReLU between layers."""

    name: str
    widths: tuple[int, ...]
    max_queue_delay_us: int

    @property
    def in_features(self) -> int:
        return self.widths[0]

    @property
    def out_features(self) -> int:
        return self.widths[-1]


MAX_QUEUE_DELAY_US = 500
"""Every model's dynamic-batching delay: the configuration PyTriton is benchmarked with
(bench/pytriton_server.py), so hotpath is compared at the same batching settings, not at its best ones."""

MODELS: dict[str, MLPSpec] = {
    spec.name: spec
    for spec in (
        MLPSpec("tiny", (16, 64, 4), max_queue_delay_us=MAX_QUEUE_DELAY_US),
        MLPSpec("medium", (256, 1024, 1024, 10), max_queue_delay_us=MAX_QUEUE_DELAY_US),
        MLPSpec("large", (1024, 4096, 4096, 1024), max_queue_delay_us=MAX_QUEUE_DELAY_US),
    )
}


def build_mlp(spec: MLPSpec, seed: int = 0) -> onnx.ModelProto:
    """Return `spec` as an ONNX model with a dynamic batch dimension and seeded He-scaled weights."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = INPUT_NAME
    layers = list(zip(spec.widths[:-1], spec.widths[1:]))
    for index, (fan_in, fan_out) in enumerate(layers):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"W{index}"), numpy_helper.from_array(bias, f"B{index}")]
        last = index == len(layers) - 1
        gemm_out = OUTPUT_NAME if last else f"gemm{index}"
        nodes.append(helper.make_node("Gemm", [current, f"W{index}", f"B{index}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{index}"]))
            current = f"relu{index}"
    graph = helper.make_graph(
        nodes,
        spec.name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", spec.in_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", spec.out_features])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hotpath-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def model_config(spec: MLPSpec) -> model_config_pb2.ModelConfig:
    """Return the Triton config for `spec`; instance_group is left out so the server picks it."""
    config = model_config_pb2.ModelConfig(
        name=spec.name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH_SIZE
    )
    config.input.add(name=INPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[spec.in_features])
    config.output.add(name=OUTPUT_NAME, data_type=model_config_pb2.TYPE_FP32, dims=[spec.out_features])
    config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    return config


def write_repository(repository: Path, names: list[str] | None = None, seed: int = 0) -> Path:
    """Write `<repository>/<name>/1/model.onnx` and `<name>/config.pbtxt` for each named model."""
    for name in names or list(MODELS):
        spec = MODELS[name]
        (repository / name / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(build_mlp(spec, seed), repository / name / "1" / "model.onnx")
        (repository / name / "config.pbtxt").write_text(text_format.MessageToString(model_config(spec)))
    return repository
