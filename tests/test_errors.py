"""Bad requests get the right gRPC status and a message naming what was expected and what came; the
server survives every one of them.

Requests are built with the stubs generated from our `proto/` so each malformation can be exact; the
shared server runs with `--max-message-size 1MiB`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc
from hotpath.serving.datatypes import DATATYPES
from models import IDENTITY_TYPES, _model, _save, identity_model

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
MIB = 1 << 20
BAD_NAMES = ["../x", "a/b", "", "..", "/etc/passwd", "a\\b", ".", "x\x00y"]


@pytest.fixture(scope="module")
def stub(server) -> Iterator[grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def control_stub(shared_repo: Path) -> Iterator[grpc_service_pb2_grpc.GRPCInferenceServiceStub]:
    """A stub of a server over the shared repository that serves model control (`--model-control explicit`)."""
    proc = ServerProcess(shared_repo, "--model-control", "explicit")
    with grpc.insecure_channel(proc.url) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert proc.stop() == 0, proc.output()


def rejected(call: grpc.UnaryUnaryMultiCallable, request: object, code: grpc.StatusCode, *fragments: str) -> str:
    """Assert that `call(request)` fails with `code` and a message holding every fragment; return the message."""
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    details = info.value.details()
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    return details


def add_sub_request(rows: int = 1, **overrides: object) -> pb.ModelInferRequest:
    """A valid raw add_sub request; `overrides` replace fields of the INPUT1 tensor."""
    request = pb.ModelInferRequest(model_name="add_sub", id="r")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[rows, 16])
        if name == "INPUT1":
            for field, value in overrides.items():
                if field == "shape":
                    tensor.ClearField("shape")
                    tensor.shape.extend(value)
                else:
                    setattr(tensor, field, value)
        request.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
    return request


def identity_request(raw_bytes: bytes | None = None, typed: dict[str, list] | None = None) -> pb.ModelInferRequest:
    """A valid one-row request for `identity` (every datatype, dims [4]), as raw contents or, given `typed`, typed ones.

    `raw_bytes` replaces IN_BYTES' raw contents; `typed` replaces the typed values of the inputs it names.
    """
    request = pb.ModelInferRequest(model_name="identity")
    for dt in IDENTITY_TYPES:
        datatype = DATATYPES[dt]
        tensor = request.inputs.add(name=f"IN_{dt}", datatype=dt, shape=[1, 4])
        values = [b"abc"] * 4 if dt == "BYTES" else np.zeros(4, datatype.dtype)
        if typed is not None:
            getattr(tensor.contents, datatype.contents_field).extend(typed.get(tensor.name, list(values)))
        elif dt == "BYTES":
            prefixed = b"".join(struct.pack("<I", len(v)) + v for v in values)
            request.raw_input_contents.append(prefixed if raw_bytes is None else raw_bytes)
        else:
            request.raw_input_contents.append(values.tobytes())
    return request


def test_unknown_model_and_version_are_not_found(stub):
    rejected(stub.ModelInfer, pb.ModelInferRequest(model_name="no_such_model"), NOT_FOUND, "no_such_model")
    request = add_sub_request()
    request.model_version = "7"
    rejected(stub.ModelInfer, request, NOT_FOUND, "add_sub", "'7'", "[1]")
    rejected(stub.ModelMetadata, pb.ModelMetadataRequest(name="add_sub", version="7"), NOT_FOUND, "'7'")
    rejected(stub.ModelConfig, pb.ModelConfigRequest(name="no_such_model"), NOT_FOUND, "no_such_model")
    rejected(stub.ModelStatistics, pb.ModelStatisticsRequest(name="no_such_model"), NOT_FOUND, "no_such_model")
    assert not stub.ModelReady(pb.ModelReadyRequest(name="add_sub", version="7")).ready


def test_tritonclient_sees_status_and_message(server):
    with grpcclient.InferenceServerClient(server.url) as client:
        x = np.ones((1, 16), np.float64)
        inputs = [grpcclient.InferInput(n, x.shape, "FP64") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as info:
            client.infer("add_sub", inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'INPUT0'" in info.value.message() and "expected datatype FP32, got FP64" in info.value.message()


def test_missing_input(stub):
    request = add_sub_request()
    del request.inputs[1]
    del request.raw_input_contents[1]
    rejected(stub.ModelInfer, request, INVALID, "input 'INPUT1' is missing", "expected FP32 [-1, 16]")


def test_unknown_input(stub):
    rejected(stub.ModelInfer, add_sub_request(name="INPUT9"), INVALID, "no input 'INPUT9'", "['INPUT0', 'INPUT1']")


def test_duplicated_input(stub):
    rejected(stub.ModelInfer, add_sub_request(name="INPUT0"), INVALID, "input 'INPUT0' is given more than once")


def test_wrong_datatype(stub):
    rejected(stub.ModelInfer, add_sub_request(datatype="INT32"), INVALID, "input 'INPUT1'", "expected datatype FP32, got INT32")
    rejected(stub.ModelInfer, add_sub_request(datatype=""), INVALID, "input 'INPUT1'", "expected datatype FP32, got none")


@pytest.mark.parametrize("shape, expected", [
    ([1, 5], "expected shape [-1, 16] (batch first), got [1, 5]"),
    ([16], "expected shape [-1, 16] (batch first), got [16]"),
    ([1, 16, 1], "expected shape [-1, 16] (batch first), got [1, 16, 1]"),
    ([1, -16], "shape [1, -16] has a negative dim"),
])
def test_wrong_shape(stub, shape, expected):
    rejected(stub.ModelInfer, add_sub_request(shape=shape), INVALID, "input 'INPUT1'", expected)


def test_inputs_with_different_rows(stub):
    rejected(stub.ModelInfer, add_sub_request(shape=[2, 16]), INVALID, "input 'INPUT1'", "batch of 2 rows, but other inputs have 1")


def test_non_batched_model_wrong_shape(stub):
    request = identity_request()
    request.model_name = "identity_fixed"
    rejected(stub.ModelInfer, request, INVALID, "input 'IN_BOOL'", "expected shape [2, 3], got [1, 4]")


def test_raw_length_does_not_match_shape(stub):
    request = add_sub_request()
    request.raw_input_contents[1] = request.raw_input_contents[1][:-4]
    rejected(stub.ModelInfer, request, INVALID, "input 'INPUT1'", "hold 60 bytes, expected 64", "16 FP32 elements for shape [1, 16]")


@pytest.mark.parametrize("rows, expected", [(9, "batch of 9 rows is outside 1..8"), (0, "batch of 0 rows is outside 1..8")])
def test_batch_outside_max_batch_size(stub, rows, expected):
    rejected(stub.ModelInfer, add_sub_request(rows=rows), INVALID, "input 'INPUT0'", expected, "max_batch_size")


def test_raw_contents_count_differs_from_inputs(stub):
    request = add_sub_request()
    del request.raw_input_contents[1]
    rejected(stub.ModelInfer, request, INVALID, "1 raw_input_contents for 2 inputs")


@pytest.mark.parametrize("raw, expected", [
    (struct.pack("<I", 100) + b"abc", "element 0 of 4: length prefix says 100 bytes but only 3 remain"),
    (b"\x03\x00", "element 0 of 4: buffer ends at byte 2, inside its 4-byte length prefix"),
    (b"".join(struct.pack("<I", 1) + b"a" for _ in range(4)) + b"zz", "2 bytes left over after 4 elements"),
    (b"".join(struct.pack("<I", 2) + b"\xff\xfe" for _ in range(4)), "element 0 of 4 must be valid UTF-8, got b'\\xff\\xfe'"),
])
def test_malformed_bytes(stub, raw, expected):
    rejected(stub.ModelInfer, identity_request(raw_bytes=raw), INVALID, "input 'IN_BYTES'", expected)


def test_typed_contents_checked(stub):
    assert stub.ModelInfer(identity_request(typed={})).outputs
    rejected(stub.ModelInfer, identity_request(typed={"IN_INT32": [1, 2, 3]}), INVALID,
             "input 'IN_INT32'", "contents.int_contents holds 3 elements, expected 4 for shape [1, 4]")
    rejected(stub.ModelInfer, identity_request(typed={"IN_INT8": [1, 2, 3, 1000]}), INVALID,
             "input 'IN_INT8'", "values in [1, 1000], outside INT8's range [-128, 127]")
    rejected(stub.ModelInfer, identity_request(typed={"IN_BYTES": [b"ok", b"ok", b"ok", b"\xff"]}), INVALID,
             "model 'identity' input 'IN_BYTES'", "element 3 of 4 must be valid UTF-8, got b'\\xff'", "string tensors hold only text")


def test_raw_contents_mixed_with_typed_contents(stub):
    both = add_sub_request()
    both.inputs[1].contents.fp32_contents.extend([1.0] * 16)
    rejected(stub.ModelInfer, both, INVALID, "model 'add_sub' input 'INPUT1'", "raw_input_contents, when used, must carry every input",
             "expected no typed contents, got contents.fp32_contents (16 elements)")
    typed_second = add_sub_request()
    del typed_second.raw_input_contents[1]
    typed_second.inputs[1].contents.fp32_contents.extend([1.0] * 16)
    rejected(stub.ModelInfer, typed_second, INVALID, "input 'INPUT1'", "raw_input_contents, when used, must carry every input")
    empty = add_sub_request()
    empty.inputs[0].contents.SetInParent()
    rejected(stub.ModelInfer, empty, INVALID, "input 'INPUT0'", "expected no typed contents, got an empty contents")


def test_onnxruntime_string_tensors_hold_only_text():
    """Why binary BYTES are refused: ORT's Python API cannot carry non-UTF-8 bytes in a string tensor, either way.

    If this starts failing, ORT has learned to; `_text_array` in serving/codec.py can then pass bytes through.
    """
    x = helper.make_tensor_value_info("x", TensorProto.STRING, [None])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, [None])
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [x], [y])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(feed: np.ndarray) -> list:
        return session.run(None, {"x": feed})[0].tolist()

    assert run(np.array(["a", "bé"], dtype=object)) == ["a", "bé"]
    assert run(np.array([b"\xff\x00"], dtype=object)) == ["b'\\xff\\x00'"]  # bytes go in as their repr
    with pytest.raises(UnicodeDecodeError):
        run(np.array([b"\xff\x00"], dtype="S2"))  # S arrays are read as UTF-8 text
    with pytest.raises(UnicodeEncodeError):
        run(np.array([b"\xff\x00".decode("utf-8", "surrogateescape")], dtype=object))
    constant = helper.make_tensor("c", TensorProto.STRING, [1], [b"\xff\x00"])
    model = _model([helper.make_node("Identity", ["c"], ["y"])], [], [y], [constant])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(UnicodeDecodeError):
        session.run(None, {})  # nor can a string tensor holding non-UTF-8 bytes come back out


def test_unknown_requested_output(stub):
    request = add_sub_request()
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT7")
    rejected(stub.ModelInfer, request, INVALID, "no output 'OUTPUT7'", "['OUTPUT0', 'OUTPUT1']")


def test_nan_is_data(stub):
    request = add_sub_request()
    x = np.arange(16, dtype=np.float32)
    x[[0, 5]] = np.nan
    request.raw_input_contents[0] = x.tobytes()
    response = stub.ModelInfer(request)
    out = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(out, x + 1)
    assert np.isnan(out[[0, 5]]).all()


def test_request_over_message_limit(stub):
    request = add_sub_request()
    request.raw_input_contents[0] = bytes(MIB + 1)
    rejected(stub.ModelInfer, request, EXHAUSTED, str(MIB))


def tile_model(repo: Path, reps: int = 64) -> None:
    """`tile`: Y = Tile(X, [1, reps]) over FP32 [batch, 1024], so the response is `reps` times the request."""
    repeats = helper.make_tensor("R", TensorProto.INT64, [2], [1, reps])
    nodes = [helper.make_node("Tile", ["X", "R"], ["Y"])]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 1024])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 1024 * reps])
    _save(_model(nodes, [x], [y], [repeats]), repo, "tile")


def tile_request(rows: int, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tile", id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[rows, 1024])
    request.raw_input_contents.append(np.arange(rows * 1024, dtype=np.float32).tobytes())
    return request


def test_response_over_message_limit_fails_and_server_keeps_serving(tmp_path, start_server):
    tile_model(tmp_path)
    proc = start_server(tmp_path, "--max-message-size", "1MiB")
    with grpc.insecure_channel(proc.url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = np.arange(2 * 1024, dtype=np.float32).reshape(2, 1024)
        response = stub.ModelInfer(tile_request(2))
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, -1), np.tile(x, (1, 64)))
        rejected(stub.ModelInfer, tile_request(8), EXHAUSTED, "model 'tile'", "response would be 2097", f"message limit of {MIB} bytes",
                 "--max-message-size")
        stream = stub.ModelStreamInfer(iter([tile_request(1, "a"), tile_request(8, "big"), tile_request(1, "c")]))
        answers = {r.infer_response.id: r for r in stream}
        assert answers.keys() == {"a", "big", "c"}
        assert "--max-message-size" in answers["big"].error_message
        assert answers["a"].error_message == answers["c"].error_message == ""
        assert len(answers["c"].infer_response.raw_output_contents[0]) == 256 * 1024
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tile")).model_stats[0].inference_stats
        assert (stats.success.count, stats.fail.count) == (3, 2)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert proc.proc.poll() is None and "Traceback" not in proc.output(), proc.output()


RPCS_WITH_A_MODEL_NAME = {
    "ModelReady": lambda name: pb.ModelReadyRequest(name=name),
    "ModelMetadata": lambda name: pb.ModelMetadataRequest(name=name),
    "ModelConfig": lambda name: pb.ModelConfigRequest(name=name),
    "ModelStatistics": lambda name: pb.ModelStatisticsRequest(name=name),
    "ModelInfer": lambda name: pb.ModelInferRequest(model_name=name),
    "RepositoryModelLoad": lambda name: pb.RepositoryModelLoadRequest(model_name=name),
    "RepositoryModelUnload": lambda name: pb.RepositoryModelUnloadRequest(model_name=name),
}


@pytest.mark.parametrize("rpc", list(RPCS_WITH_A_MODEL_NAME))
@pytest.mark.parametrize("name", BAD_NAMES)
def test_name_that_is_not_plain_is_refused(request, stub, rpc, name):
    if rpc.startswith("Repository"):
        stub = request.getfixturevalue("control_stub")
    message = RPCS_WITH_A_MODEL_NAME[rpc](name)
    if rpc == "ModelStatistics" and name == "":
        assert {s.name for s in stub.ModelStatistics(message).model_stats} >= {"add_sub", "identity"}
        return
    rejected(getattr(stub, rpc), message, INVALID, "invalid model name", repr(name))


def test_stream_answers_bad_requests_by_id_and_goes_on(stub):
    requests = [add_sub_request(datatype="INT32"), pb.ModelInferRequest(model_name="../x"), add_sub_request()]
    for request, request_id in zip(requests, ("bad-datatype", "bad-name", "good")):
        request.id = request_id
    errors = {r.infer_response.id: r.error_message for r in stub.ModelStreamInfer(iter(requests))}
    assert errors.keys() == {"bad-datatype", "bad-name", "good"}
    assert "input 'INPUT1': expected datatype FP32, got INT32" in errors["bad-datatype"]
    assert "invalid model name '../x'" in errors["bad-name"]
    assert errors["good"] == ""


def test_server_survives_the_barrage(stub, server):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    request = add_sub_request(rows=3)
    x = np.random.default_rng(3).normal(size=(3, 16)).astype(np.float32)
    request.raw_input_contents[0] = x.tobytes()
    response = stub.ModelInfer(request)
    out = {o.name: np.frombuffer(raw, np.float32).reshape(o.shape) for o, raw in zip(response.outputs, response.raw_output_contents)}
    np.testing.assert_array_equal(out["OUTPUT0"], x + 1)
    np.testing.assert_array_equal(out["OUTPUT1"], x - 1)
    assert server.proc.poll() is None
    assert "Traceback" not in server.output(), server.output()


@pytest.mark.parametrize("datatype", ["BYTES", "FP32"])
def test_a_shape_whose_product_overflows_is_invalid_not_internal(tmp_path, start_server, datatype):
    identity_model(tmp_path, "wide", dims=(-1,))
    server = start_server(tmp_path)
    request = pb.ModelInferRequest(model_name="wide")
    request.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[2, 2**63 - 1])
    request.raw_input_contents.append(b"\x00" * 16)
    with grpc.insecure_channel(server.url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        rejected(stub.ModelInfer, request, INVALID, f"input 'IN_{datatype}'", f"shape [2, {2**63 - 1}] holds",
                 "more than any request can carry")
