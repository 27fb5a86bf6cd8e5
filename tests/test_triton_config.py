"""Triton's `config.pbtxt` files: the whole ModelConfig schema parses, and every field gets an answer.

Each field of Triton's schema is honoured, accepted as a logged no-op, or refused by one load error
that names every refused field. The schema is walked from its descriptor, so a field added to the
proto without an answer fails here, and a config with every field set checks the answers one by one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as triton_config_pb2
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.serving.config import CONTAINERS, FIELD_RULES, PARAMETERS, Support, answers, read_config
from models import add_sub_model

README = Path(__file__).resolve().parents[1] / "README.md"
EXTENSIONS_FROM = 1000
"""hotpath's own ModelConfig fields are numbered from here, clear of Triton's."""


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def schema_paths(descriptor: Descriptor, prefix: str = "") -> list[str]:
    """Every field path that needs an answer: the fields of ModelConfig and of its containers, recursively."""
    paths = []
    for field in descriptor.fields:
        path = prefix + field.name
        if path in CONTAINERS:
            assert field.message_type is not None and not _is_map(field), f"container {path} must be a message"
            paths += schema_paths(field.message_type, path + ".")
        else:
            paths.append(path)
    return paths


def test_every_field_of_the_schema_is_answered() -> None:
    paths = schema_paths(model_config_pb2.ModelConfig.DESCRIPTOR)
    unanswered = [path for path in paths if path not in FIELD_RULES]
    assert not unanswered, f"classify these ModelConfig fields in hotpath.serving.config.FIELD_RULES: {unanswered}"
    assert sorted(FIELD_RULES) == sorted(paths), "FIELD_RULES names fields the schema does not have"
    assert {path.split(".")[0] for path in CONTAINERS} <= set(model_config_pb2.ModelConfig.DESCRIPTOR.fields_by_name)
    assert "evaluation" in FIELD_RULES and FIELD_RULES["evaluation"].support is Support.HONOURED


def _same_schema(ours: Descriptor, triton: Descriptor, seen: set[str]) -> None:
    if triton.full_name in seen:
        return
    seen.add(triton.full_name)
    assert ours.full_name == triton.full_name
    for field in triton.fields:
        mine = ours.fields_by_number.get(field.number)
        assert mine is not None and (mine.name, mine.type, mine.is_repeated) == (field.name, field.type, field.is_repeated), \
            f"{triton.full_name}.{field.name} (field {field.number}) differs from Triton's"
        if field.enum_type is not None:
            assert [(v.name, v.number) for v in mine.enum_type.values] == [(v.name, v.number) for v in field.enum_type.values]
        if field.message_type is not None:
            _same_schema(mine.message_type, field.message_type, seen)
    extra = [field for field in ours.fields if field.number not in triton.fields_by_number]
    assert all(field.number >= EXTENSIONS_FROM for field in extra), [f.name for f in extra]


def test_the_schema_is_tritons_field_for_field() -> None:
    """The ModelConfig RPC's answer decodes in Triton's own client: same names, numbers and types throughout."""
    _same_schema(model_config_pb2.ModelConfig.DESCRIPTOR, triton_config_pb2.ModelConfig.DESCRIPTOR, set())
    for variant in range(VARIANTS):
        ours = model_config_pb2.ModelConfig()
        fill(ours, variant)
        theirs = triton_config_pb2.ModelConfig.FromString(ours.SerializeToString())
        for field, _ in ours.ListFields():
            if field.number >= EXTENSIONS_FROM:
                ours.ClearField(field.name)
        assert text_format.MessageToString(theirs) == text_format.MessageToString(ours)


VARIANTS = 3
"""Configs built per test: variant k sets the k-th member of every oneof (the largest has three)."""


def _sample(field: FieldDescriptor) -> Any:
    """A value other than the field's default."""
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    return {FieldDescriptor.CPPTYPE_BOOL: True, FieldDescriptor.CPPTYPE_STRING: "x",
            FieldDescriptor.CPPTYPE_FLOAT: 0.5, FieldDescriptor.CPPTYPE_DOUBLE: 0.5}.get(field.cpp_type, 1)


def fill(message: Message, variant: int, prefix: str = "", shown: str = "") -> list[str]:
    """Set every field of `message` (one member per oneof) to a non-default value; return the answered paths set."""
    leaves = []
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and field is not oneof.fields[variant % len(oneof.fields)]:
            continue
        path, shown_path = prefix + field.name, shown + field.name
        target = getattr(message, field.name)
        if _is_map(field):
            key, value = (field.message_type.fields_by_name[name] for name in ("key", "value"))
            if value.message_type is not None:
                fill(target[_sample(key)], variant)
            else:
                target[_sample(key)] = _sample(value)
        elif field.message_type is not None:
            item = target.add() if field.is_repeated else target
            item.SetInParent()
            inner = fill(item, variant, path + ".", f"{shown_path}[0]." if field.is_repeated else shown_path + ".")
            if path in CONTAINERS:
                leaves += inner
        elif field.is_repeated:
            target.append(_sample(field))
        else:
            setattr(message, field.name, _sample(field))
        if path not in CONTAINERS:
            leaves.append(shown_path)
    return leaves


@pytest.mark.parametrize("variant", range(VARIANTS))
def test_a_config_with_every_field_set_gets_an_answer_per_field(tmp_path: Path, variant: int) -> None:
    config = model_config_pb2.ModelConfig()
    expected = fill(config, variant)
    given = {answer.path: answer for answer in answers(config)}
    assert sorted(given) == sorted(expected)
    assert all(answer.support in Support and answer.why for answer in given.values())

    model_dir = tmp_path / config.name
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    with pytest.raises(LoadError) as raised:
        read_config(model_dir)
    message = raised.value.message
    refused = [path for path, answer in given.items() if answer.support is Support.REFUSED]
    assert message.startswith(f"x/config.pbtxt sets {len(refused)} field(s) hotpath does not support")
    for path in refused:
        answer = given[path]
        assert (f"{path}{answer.shown}: {answer.instead}\n" if answer.instead else f" {path}{answer.shown}") in message + "\n"
    assert "(message cut" not in message and str(tmp_path) not in message


HARMLESS = '''
name: "harmless"
max_batch_size: 8
input [{ name: "INPUT0", data_type: TYPE_FP32, format: FORMAT_NCHW, dims: [16] }]
instance_group [{ name: "add_sub_cpu", kind: KIND_CPU, count: 1 }]
optimization { input_pinned_memory { enable: true }, output_pinned_memory { enable: false }, priority: PRIORITY_MAX }
model_transaction_policy { decoupled: false }
model_warmup [{ name: "zeros", batch_size: 1, inputs { key: "INPUT0", value: { data_type: TYPE_FP32, dims: [16], zero_data: true } } }]
'''

FROM_TRITON = '''
name: "from_triton"
platform: "tensorflow_savedmodel"
backend: "python"
max_batch_size: 8
input [{ name: "INPUT0", data_type: TYPE_FP32, dims: [16], allow_ragged_batch: true }]
dynamic_batching { default_queue_policy { timeout_action: DELAY, max_queue_size: 16 } }
instance_group [{ kind: KIND_MODEL }, { kind: KIND_CPU, gpus: [0] }]
optimization { cuda { graphs: true } }
parameters [{ key: "intra_op_threads", value: { string_value: "2" } }, { key: "batch_policy", value: { string_value: "delay" } }]
model_transaction_policy { decoupled: true }
'''


def test_a_triton_repository_gets_one_answer_per_model(tmp_path: Path, start_server) -> None:
    """Harmless Triton fields load and are named once in the log; unsupported ones fail the load all at once."""
    add_sub_model(tmp_path, "harmless", config=HARMLESS)
    add_sub_model(tmp_path, "from_triton", config=FROM_TRITON)
    server = start_server(tmp_path)
    with grpcclient.InferenceServerClient(server.url) as client:
        rows = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
        assert rows["harmless"][0] == "READY", rows
        tensors = [grpcclient.InferInput(name, [1, 16], "FP32") for name in ("INPUT0", "INPUT1")]
        for tensor in tensors:
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        assert (client.infer("harmless", tensors).as_numpy("OUTPUT0") == 2).all()
        served = client.get_model_config("harmless").config
        assert served.input[0].format == triton_config_pb2.ModelInput.FORMAT_NCHW and served.platform == "onnxruntime_onnx"

        state, reason = rows["from_triton"]
        assert state == "UNAVAILABLE" and reason.startswith("from_triton/config.pbtxt sets 9 field(s) hotpath does not support")
        for fragment in ('platform = "tensorflow_savedmodel"', 'backend = "python"', "input[0].allow_ragged_batch = true",
                         "dynamic_batching.default_queue_policy.timeout_action = DELAY", "instance_group[0].kind = KIND_MODEL",
                         "instance_group[1].gpus = [0]: add kind: KIND_GPU", "optimization.cuda.graphs = true",
                         'parameters = {"batch_policy", "intra_op_threads"}: hotpath reads only ' + ", ".join(PARAMETERS),
                         "model_transaction_policy.decoupled = true"):
            assert fragment in reason, (fragment, reason)
        assert "max_queue_size" not in reason and "instance_group[1].kind" not in reason
    no_ops = re.findall(r"harmless/config.pbtxt: fields accepted without effect: (.*)", server.output())
    assert len(no_ops) == 1, server.output()
    for path in ("input[0].format = FORMAT_NCHW", "instance_group[0].name", "optimization.priority = PRIORITY_MAX",
                 "optimization.input_pinned_memory", "model_warmup"):
        assert path in no_ops[0], (path, no_ops[0])
    assert "output_pinned_memory" not in no_ops[0] and "model_transaction_policy" not in no_ops[0], \
        "a field set to its default is harmless and gets no answer"


def _readme_table() -> dict[str, str]:
    section = README.read_text().split("### Triton's `config.pbtxt` fields", 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^\| `([a-z_.]+)` \| ([^|]+?) \|", section, flags=re.M))


def test_the_readme_tables_every_answer() -> None:
    expected = {path: rule.support.value + ("; other values refused" if rule.accepts else "")
                for path, rule in FIELD_RULES.items()}
    assert _readme_table() == expected
