"""Per-model configuration: read `config.pbtxt`, answer for every field it sets, complete it from the graph.

A model directory may hold a Triton `config.pbtxt`. It parses against Triton's whole ModelConfig
schema, and every field it sets is honoured, accepted as a harmless no-op (logged once per load,
naming the fields) or refused: one load error names every refused field and what to do, so a
Triton config never half-works. `FIELD_RULES` is that decision, in one place. Without a config,
everything is derived from the model: tensor names, datatypes and dims, and `max_batch_size` when
every input's first dim is dynamic. What the file says is checked against the graph, so a typo
fails the load with a message naming the tensor instead of failing every request later.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import onnxruntime as ort
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.serving.datatypes import BY_CONFIG_TYPE, BY_ONNX_TYPE, Datatype

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 64
"""`max_batch_size` given to a model without a config whose inputs all have a dynamic first dim."""
BATCH_POLICY_WORK_CONSERVING = "work_conserving"
"""The default: a free replica runs what is queued at once; requests gather only while every replica is busy."""
BATCH_POLICY_DELAY = "delay"
"""Triton's rule: a batch waits until it is full or its oldest request has waited `max_queue_delay_microseconds`."""
BATCH_POLICIES = (BATCH_POLICY_WORK_CONSERVING, BATCH_POLICY_DELAY)
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count", "dynamic_batching", "batch_policy", "execution",
              "allow_spinning")
"""The `parameters` keys hotpath reads; any other key is refused, so a misspelt one never goes unnoticed."""

_Group = model_config_pb2.ModelInstanceGroup


class Support(enum.Enum):
    """What hotpath does with a `config.pbtxt` field that is set to something other than its default."""

    HONOURED = "honoured"
    NO_OP = "no-op"
    """Accepted without effect, because leaving it out changes nothing a client can see; logged once per load."""
    REFUSED = "refused"
    """The load fails, naming the field and what to do."""


@dataclass(frozen=True)
class FieldRule:
    """hotpath's answer for one field of Triton's schema, and why (the README's table and the no-op log say it).

    A field supported for some values only has `accepts` (given the value and the message holding
    it) and says what to set `instead` of any other value, which is refused.
    """

    support: Support
    why: str
    accepts: Callable[[Any, Message], bool] | None = None
    instead: str = ""


def _honoured(why: str, accepts: Callable[[Any, Message], bool] | None = None, instead: str = "") -> FieldRule:
    return FieldRule(Support.HONOURED, why, accepts, instead)


def _no_op(why: str, accepts: Callable[[Any, Message], bool] | None = None, instead: str = "") -> FieldRule:
    return FieldRule(Support.NO_OP, why, accepts, instead)


def _refused(why: str) -> FieldRule:
    return FieldRule(Support.REFUSED, why)


_RESHAPE = _refused("hotpath does not reshape tensors between a request and the graph; give the dims the graph has")
_TENSORRT = _no_op("recognised only by Triton's TensorRT backend")
_TENSORRT_IO = _refused("TensorRT's tensors; ONNX Runtime has none")
_RAGGED = _refused("hotpath does not batch ragged inputs; requests batch when their non-batch dims match")
_STAGING = _no_op("Triton's staging buffers; hotpath hands request memory to ONNX Runtime as it is")
_PRIORITY_QUEUES = _refused("hotpath has one queue per model version, without priority levels")
_CUDA_GRAPHS = _refused("hotpath does not capture CUDA graphs")

CONTAINERS = frozenset({
    "input", "output", "optimization", "optimization.cuda", "optimization.execution_accelerators", "dynamic_batching",
    "dynamic_batching.default_queue_policy", "instance_group", "model_transaction_policy",
})
"""Message fields that get no answer of their own: each of their fields is answered in `FIELD_RULES`."""

FIELD_RULES: dict[str, FieldRule] = {
    "name": _honoured("must match the model's directory name"),
    "platform": _honoured("hotpath serves ONNX models on ONNX Runtime", lambda value, _: value == PLATFORM,
                          f'use "{PLATFORM}" or leave it out'),
    "backend": _honoured("hotpath serves ONNX models on ONNX Runtime", lambda value, _: value == BACKEND,
                         f'use "{BACKEND}" or leave it out'),
    "runtime": _refused("names a Triton backend library; hotpath is its own runtime"),
    "version_policy": _honoured("latest, all or specific versions"),
    "max_batch_size": _honoured("rows per batch; checked against the graph's first dims"),
    "input.name": _honoured("checked against the graph"),
    "input.data_type": _honoured("checked against the graph"),
    "input.format": _no_op("a layout hint for clients, reported by the ModelConfig RPC; the graph fixes the layout"),
    "input.dims": _honoured("checked against the graph; -1 is variable"),
    "input.reshape": _RESHAPE,
    "input.is_shape_tensor": _TENSORRT_IO,
    "input.allow_ragged_batch": _RAGGED,
    "input.optional": _honoured("the input may be left out of a request"),
    "input.is_non_linear_format_io": _TENSORRT_IO,
    "output.name": _honoured("checked against the graph"),
    "output.data_type": _honoured("checked against the graph"),
    "output.dims": _honoured("checked against the graph; -1 is variable"),
    "output.reshape": _RESHAPE,
    "output.label_filename": _refused("hotpath does not implement Triton's classification extension; map class indices "
                                      "to labels in the client"),
    "output.is_shape_tensor": _TENSORRT_IO,
    "output.is_non_linear_format_io": _TENSORRT_IO,
    "batch_input": _RAGGED,
    "batch_output": _RAGGED,
    "optimization.graph": _refused("hotpath always applies every ONNX Runtime graph optimization (ORT_ENABLE_ALL)"),
    "optimization.priority": _TENSORRT,
    "optimization.cuda.graphs": _CUDA_GRAPHS,
    "optimization.cuda.busy_wait_events": _TENSORRT,
    "optimization.cuda.graph_spec": _CUDA_GRAPHS,
    "optimization.cuda.output_copy_stream": _TENSORRT,
    "optimization.execution_accelerators.gpu_execution_accelerator": _no_op(
        "KIND_GPU replicas run on ONNX Runtime's CUDA provider, so `cuda` without parameters adds nothing; TensorRT "
        "and provider parameters are not available",
        lambda value, _: all(accelerator.name == "cuda" and not accelerator.parameters for accelerator in value),
        'remove it (or keep only { name: "cuda" } without parameters)'),
    "optimization.execution_accelerators.cpu_execution_accelerator": _refused(
        "hotpath runs ONNX Runtime's default CPU provider; OpenVINO is not available"),
    "optimization.input_pinned_memory": _STAGING,
    "optimization.output_pinned_memory": _STAGING,
    "optimization.gather_kernel_buffer_threshold": _TENSORRT,
    "optimization.eager_batching": _TENSORRT,
    "dynamic_batching.preferred_batch_size": _honoured("a batch starts once this many rows are queued"),
    "dynamic_batching.max_queue_delay_microseconds": _honoured("how long requests gather (see batch_policy)"),
    "dynamic_batching.preserve_ordering": _refused("hotpath answers each request as its batch finishes, so stream "
                                                   "responses may overtake each other; match them by id"),
    "dynamic_batching.priority_levels": _PRIORITY_QUEUES,
    "dynamic_batching.default_priority_level": _PRIORITY_QUEUES,
    "dynamic_batching.default_queue_policy.timeout_action": _refused(
        "hotpath fails a request whose queue timeout passes (REJECT, the default); it never runs it late (DELAY)"),
    "dynamic_batching.default_queue_policy.default_timeout_microseconds": _honoured(
        "a request not started in time fails with DEADLINE_EXCEEDED"),
    "dynamic_batching.default_queue_policy.allow_timeout_override": _honoured(
        "a request's gRPC deadline may shorten the timeout"),
    "dynamic_batching.default_queue_policy.max_queue_size": _honoured("a full queue answers RESOURCE_EXHAUSTED"),
    "dynamic_batching.priority_queue_policy": _PRIORITY_QUEUES,
    "sequence_batching": _refused("hotpath has no scheduler for stateful models; keep such a model on Triton"),
    "ensemble_scheduling": _refused("hotpath serves single ONNX models, not ensembles; call the steps from the client"),
    "instance_group.name": _no_op("Triton's label for the group's instances; hotpath numbers its replicas"),
    "instance_group.kind": _honoured("KIND_CPU or KIND_GPU (KIND_AUTO, the default, is the CPU); hotpath places "
                                     "replicas itself, so KIND_MODEL (the model places itself) is refused",
                                     lambda value, _: value in (_Group.KIND_CPU, _Group.KIND_GPU),
                                     "use KIND_CPU, or KIND_GPU with gpus"),
    "instance_group.count": _honoured("replicas, per listed GPU for KIND_GPU"),
    "instance_group.rate_limiter": _refused("hotpath has no rate limiter; count and max_queue_size bound the work"),
    "instance_group.gpus": _honoured("with kind: KIND_GPU; with any other kind the replicas would run on the CPU",
                                     lambda _, group: group.kind == _Group.KIND_GPU, "add kind: KIND_GPU"),
    "instance_group.secondary_devices": _refused("NVDLA devices are TensorRT's"),
    "instance_group.profile": _refused("optimization profiles are TensorRT's"),
    "instance_group.passive": _refused("every hotpath replica takes requests"),
    "instance_group.host_policy": _refused("Triton's host policies; hotpath has --cpus and --pin-threads"),
    "default_model_filename": _honoured("the file inside each version directory"),
    "cc_model_filenames": _refused("model files per CUDA compute capability are TensorRT's; use default_model_filename"),
    "metric_tags": _refused("hotpath's metrics carry the model and version labels only"),
    "parameters": _honoured("the keys listed in Per-model settings; any other key is refused, so a misspelt one "
                            "never goes unnoticed", lambda value, _: set(value) <= set(PARAMETERS),
                            f"hotpath reads only {', '.join(PARAMETERS)}"),
    "model_warmup": _no_op("warm-up requests only make the first requests faster; hotpath does not send them"),
    "model_operations": _refused("hotpath loads no custom operator libraries"),
    "model_transaction_policy.decoupled": _refused("hotpath answers every request with exactly one response; keep "
                                                   "decoupled models on Triton"),
    "model_repository_agents": _refused("Triton's repository agents; prepare the model files before loading"),
    "response_cache": _honoured("answers repeated requests from the cache (needs --cache-size)"),
    "model_metrics": _refused("hotpath's histogram buckets are fixed"),
    "drift": _honoured("hotpath's drift recording (see Drift monitoring)"),
    "evaluation": _honoured("hotpath's evaluation store"),
}
"""hotpath's answer for every field of the schema outside `CONTAINERS`, by dotted path without indices.

A field set to its default value is never answered: it is harmless. A message field counts as set
when it holds something, or when it is a oneof member (its presence picks the choice).
"""


@dataclass(frozen=True)
class FieldAnswer:
    """The answer for one field a config sets: `path` with indices (`input[0].dims`), and ` = value` when short.

    `instead` says what to set in place of a refused value; a refused field without it is to be removed.
    """

    path: str
    shown: str
    support: Support
    why: str
    instead: str = ""


def _shown(field: FieldDescriptor, value: Any) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return " = {" + ", ".join(json.dumps(str(key)) for key in sorted(value)) + "}"
    if field.message_type is not None:
        return ""
    if field.is_repeated:
        return " = [" + ", ".join(_scalar(field, item) for item in value) + "]"
    return f" = {_scalar(field, value)}"


def _scalar(field: FieldDescriptor, value: Any) -> str:
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def _is_set(field: FieldDescriptor, value: Any) -> bool:
    if field.message_type is None or field.is_repeated or field.containing_oneof is not None:
        return True
    return value.ByteSize() > 0


def answers(message: Message, prefix: str = "", shown_prefix: str = "") -> Iterator[FieldAnswer]:
    """hotpath's answer for every field `message` (a ModelConfig, or a container within one) sets, in schema order."""
    for field, value in sorted(message.ListFields(), key=lambda item: item[0].index):
        path, shown_path = prefix + field.name, shown_prefix + field.name
        if path in CONTAINERS:
            if field.is_repeated:
                for index, item in enumerate(value):
                    yield from answers(item, path + ".", f"{shown_path}[{index}].")
            else:
                yield from answers(value, path + ".", shown_path + ".")
        elif _is_set(field, value):
            rule = FIELD_RULES[path]
            shown = _shown(field, value)
            if rule.accepts is None or rule.accepts(value, message):
                yield FieldAnswer(shown_path, shown, rule.support, rule.why)
            else:
                yield FieldAnswer(shown_path, shown, Support.REFUSED, rule.why, rule.instead)


def check_fields(config: model_config_pb2.ModelConfig, where: str) -> None:
    """Refuse `config` (read from `where`) naming every field hotpath cannot honour, or log once the no-op fields it sets.

    The refusal says what to do for each field and leaves the why to the README's table, so that
    even a config setting every field of the schema fits one status message.
    """
    given = list(answers(config))
    refused = [answer for answer in given if answer.support is Support.REFUSED]
    if refused:
        lines = [f"{answer.path}{answer.shown}: {answer.instead}" for answer in refused if answer.instead]
        removals = [answer.path + answer.shown for answer in refused if not answer.instead]
        if removals:
            lines.append("remove " + ", ".join(removals))
        raise LoadError(f"{where} sets {len(refused)} field(s) hotpath does not support (the README's table of "
                        "config.pbtxt fields says why); change them, then load the model again:\n  " + "\n  ".join(lines))
    no_ops = [f"{answer.path}{answer.shown} ({answer.why})" for answer in given if answer.support is Support.NO_OP]
    if no_ops:
        log.info("%s: fields accepted without effect: %s", where, "; ".join(no_ops))


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
    """Parse `<model_dir>/config.pbtxt` and check the fields it sets, or return an empty config when there is none."""
    config = model_config_pb2.ModelConfig()
    path = model_dir / CONFIG_FILE
    where = f"{model_dir.name}/{CONFIG_FILE}"
    if path.exists():
        try:
            text_format.Parse(path.read_text(encoding="utf-8"), config)
        except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
            raise LoadError(f"{where}: {exc}") from exc
    if config.name and config.name != model_dir.name:
        raise LoadError(f"{where}: name '{config.name}' does not match the model's directory '{model_dir.name}'")
    config.name = model_dir.name
    check_fields(config, where)
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
    config.platform = PLATFORM
    config.backend = BACKEND
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
