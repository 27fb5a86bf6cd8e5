"""Generated stubs stay in step with proto/, our own stubs drive the server, and the standard services answer."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc, model_config_pb2

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "server" / "hotpath" / "_proto"
CLIENT_COMMITTED = ROOT / "clients" / "python" / "hotpath_client" / "_proto"


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _embedded_descriptor(path: Path) -> bytes:
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", path.read_text(), re.S)
    assert match, f"no serialized descriptor in {path}"
    return eval(match.group(1))


@pytest.mark.parametrize("committed", [COMMITTED, CLIENT_COMMITTED], ids=["server", "client"])
def test_committed_stubs_match_proto(tmp_path, committed):
    """Regenerate from proto/ and compare what the stubs encode: the file descriptors and the RPC paths."""
    generator = _load_generator()
    assert committed in generator.TARGETS
    generator.generate(tmp_path)
    for name in ("grpc_service_pb2.py", "model_config_pb2.py"):
        assert _embedded_descriptor(committed / name) == _embedded_descriptor(tmp_path / name), \
            f"{committed / name} is stale: run `python proto/generate.py`"
    paths = lambda p: sorted(re.findall(r"'/inference\.GRPCInferenceService/(\w+)'", p.read_text()))  # noqa: E731
    assert paths(committed / "grpc_service_pb2_grpc.py") == paths(tmp_path / "grpc_service_pb2_grpc.py")
    assert sorted(p.name for p in committed.glob("*.py*")) == sorted(p.name for p in tmp_path.glob("*.py*"))


def test_user_generated_stubs_drive_the_server(tmp_path, server):
    """Stubs a user makes from our proto/ with grpcio-tools, imported as plain modules, run an inference."""
    from grpc_tools import protoc
    proto = ROOT / "proto"
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        str(proto / "grpc_service.proto"), str(proto / "model_config.proto")]) == 0
    script = tmp_path / "call.py"
    script.write_text(f"""
import grpc, numpy as np, grpc_service_pb2 as pb, grpc_service_pb2_grpc as rpc
stub = rpc.GRPCInferenceServiceStub(grpc.insecure_channel("{server.url}"))
req = pb.ModelInferRequest(model_name="add_sub")
for name in ("INPUT0", "INPUT1"):
    req.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(np.full(16, 2, np.float32).tobytes())
res = stub.ModelInfer(req)
print(np.frombuffer(res.raw_output_contents[0], np.float32).sum())
""")
    import subprocess
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 64.0


def test_reflection_lists_and_describes_services(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
        ])))
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    files = replies[1].file_descriptor_response.file_descriptor_proto
    from google.protobuf import descriptor_pb2
    names = {descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files}
    assert {"grpc_service.proto", "model_config.proto"} <= names
    assert replies[2].file_descriptor_response.file_descriptor_proto


def test_health_overall_and_per_model(server):
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="add_sub")).status == serving
        try:
            health.Check(health_pb2.HealthCheckRequest(service="no_such_model"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("unknown service must be NOT_FOUND")


def test_model_config_matches_tritons_schema():
    """Every config field we define has Triton's number and type, so configs and ModelConfig answers interoperate."""
    from tritonclient.grpc import model_config_pb2 as triton

    def check(ours, theirs) -> None:
        for field in ours.fields:
            if field.number >= 1000:
                continue
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{ours.full_name}.{field.name} is not in Triton's schema"
            assert (field.number, field.type) == (other.number, other.type), f"{ours.full_name}.{field.name}"
            if field.message_type and not field.message_type.GetOptions().map_entry:
                check(field.message_type, other.message_type)

    check(model_config_pb2.ModelConfig.DESCRIPTOR, triton.ModelConfig.DESCRIPTOR)


def test_service_matches_tritons_wire_format():
    from tritonclient.grpc import service_pb2 as triton

    def check(ours, theirs) -> None:
        for field in ours.fields:
            other = theirs.fields_by_name.get(field.name)
            assert other is not None, f"{ours.full_name}.{field.name} is not in Triton's protocol"
            assert (field.number, field.type) == (other.number, other.type), f"{ours.full_name}.{field.name}"
            if field.message_type and field.message_type.full_name.startswith("inference.") \
                    and field.message_type.name != "ModelConfig":
                check(field.message_type, other.message_type)

    ours_service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours_service.methods:
        other = theirs_service.methods_by_name[method.name]
        check(method.input_type, other.input_type)
        check(method.output_type, other.output_type)
    assert np.all([m.name in theirs_service.methods_by_name for m in ours_service.methods])
