"""Per-model configuration: read `config.pbtxt`, complete it from the ONNX graph, validate it.

A model directory may hold a Triton `config.pbtxt`; without one, everything is derived from the
model: tensor names, datatypes and dims, and `max_batch_size` when every input's first dim is
dynamic. What the file says is checked against the graph, so a typo fails the load with a message
naming the tensor instead of failing every request later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnxruntime as ort
from google.protobuf import text_format

from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.serving.datatypes import BY_CONFIG_TYPE, BY_ONNX_TYPE, Datatype

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 64
"""`max_batch_size` given to a model without a config whose inputs all have a dynamic first dim."""
BATCH_POLICY_WORK_CONSERVING = "work_conserving"
"""The default: a free replica runs what is queued at once; requests gather only while every replica is busy."""
BATCH_POLICY_DELAY = "delay"
"""Triton's rule: a batch waits until it is full or its oldest request has waited `max_queue_delay_microseconds`."""
BATCH_POLICIES = (BATCH_POLICY_WORK_CONSERVING, BATCH_POLICY_DELAY)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the server checks and reports it; `dims` excludes the batch dim."""

    name: str
    datatype: Datatype
    dims: tuple[int, ...]

    def shape(self, batched: bool) -> list[int]:
        """The full shape as metadata reports it: -1 for the batch dim and for variable dims."""
        return [-1, *self.dims] if batched else list(self.dims)


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """Parse `<model_dir>/config.pbtxt`, or return an empty config when there is none."""
    config = model_config_pb2.ModelConfig()
    path = model_dir / CONFIG_FILE
    if path.exists():
        try:
            text_format.Parse(path.read_text(encoding="utf-8"), config)
        except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
            raise LoadError(f"{path}: {exc}") from exc
    if config.name and config.name != model_dir.name:
        raise LoadError(f"{path}: name '{config.name}' does not match the model's directory '{model_dir.name}'")
    config.name = model_dir.name
    return config


def _onnx_dims(shape: Sequence[object]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _graph_specs(args: Sequence[ort.NodeArg], what: str, model: str) -> dict[str, tuple[Datatype, list[int]]]:
    specs = {}
    for arg in args:
        datatype = BY_ONNX_TYPE.get(arg.type)
        if datatype is None:
            raise LoadError(f"model '{model}': {what} '{arg.name}' has type {arg.type}, which the Open Inference Protocol cannot carry")
        specs[arg.name] = (datatype, _onnx_dims(arg.shape))
    return specs


def _dims_compatible(config_dims: Sequence[int], graph_dims: Sequence[int]) -> bool:
    return len(config_dims) == len(graph_dims) and all(
        g == -1 or c == g for c, g in zip(config_dims, graph_dims))


def complete_config(config: model_config_pb2.ModelConfig, session: ort.InferenceSession) -> model_config_pb2.ModelConfig:
    """Fill in what `config` leaves out from the loaded graph and check what it says against it."""
    model = config.name
    inputs = _graph_specs(session.get_inputs(), "input", model)
    outputs = _graph_specs(session.get_outputs(), "output", model)
    if not config.platform:
        config.platform = "onnxruntime_onnx"
    if not config.backend:
        config.backend = "onnxruntime"
    all_first_dims_dynamic = all(dims and dims[0] == -1 for _, dims in inputs.values())
    if not config.input and not config.output and config.max_batch_size == 0 and all_first_dims_dynamic:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    if config.max_batch_size < 0:
        raise LoadError(f"model '{model}': max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.max_batch_size > 0 and not all_first_dims_dynamic:
        raise LoadError(f"model '{model}': max_batch_size is {config.max_batch_size} but not every input's first dim is dynamic in the graph")
    batch_dims = 1 if config.max_batch_size > 0 else 0
    for kind, graph, entries in (("input", inputs, config.input), ("output", outputs, config.output)):
        listed = {entry.name for entry in entries}
        for entry in entries:
            if entry.name not in graph:
                raise LoadError(f"model '{model}': config lists {kind} '{entry.name}' but the graph's {kind}s are {sorted(graph)}")
            datatype, dims = graph[entry.name]
            if entry.data_type != datatype.config_type:
                raise LoadError(f"model '{model}': {kind} '{entry.name}' is {model_config_pb2.DataType.Name(entry.data_type)} in the config but {datatype.name} in the graph")
            if not _dims_compatible(list(entry.dims), dims[batch_dims:]):
                raise LoadError(f"model '{model}': {kind} '{entry.name}' has dims {list(entry.dims)} in the config but {dims[batch_dims:]} in the graph (batch dim excluded: {bool(batch_dims)})")
        for name, (datatype, dims) in graph.items():
            if name not in listed:
                entries.add(name=name, data_type=datatype.config_type, dims=dims[batch_dims:])
    return config


def tensor_specs(entries: Sequence[model_config_pb2.ModelInput | model_config_pb2.ModelOutput]) -> tuple[TensorSpec, ...]:
    """The specs of a completed config's inputs or outputs, in config order."""
    return tuple(TensorSpec(e.name, BY_CONFIG_TYPE[e.data_type], tuple(e.dims)) for e in entries)


def parameter(config: model_config_pb2.ModelConfig, key: str, default: int) -> int:
    """An integer from the config's `parameters` map, with a load error naming a bad value."""
    if key not in config.parameters:
        return default
    value = config.parameters[key].string_value
    try:
        return int(value)
    except ValueError:
        raise LoadError(f"model '{config.name}': parameter '{key}' must be an integer, got '{value}'") from None


def batch_policy(config: model_config_pb2.ModelConfig) -> str:
    """The config's `batch_policy` parameter (default work_conserving), with a load error naming a bad value."""
    if "batch_policy" not in config.parameters:
        return BATCH_POLICY_WORK_CONSERVING
    value = config.parameters["batch_policy"].string_value
    if value not in BATCH_POLICIES:
        raise LoadError(f"model '{config.name}': parameter 'batch_policy' must be one of {list(BATCH_POLICIES)}, got '{value}'")
    return value
