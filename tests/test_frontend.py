"""The native front end on real sockets: one process owns the port, every call reaches its handler,
calls on one connection batch together, and the gRPC corners (compression, unknown methods,
malformed messages, health Watch, cancelled streams) behave as grpcio clients expect."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc
from models import add_sub_model


def _add_sub_request(value: float = 1.0) -> pb.ModelInferRequest:
    x = np.full((1, 16), value, np.float32)
    tensors = [pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[1, 16]) for name in ("INPUT0", "INPUT1")]
    return pb.ModelInferRequest(model_name="add_sub", inputs=tensors, raw_input_contents=[x.tobytes(), x.tobytes()])


def test_the_log_says_the_native_front_end_serves(server):
    assert "native front end with" in server.output()


def test_a_second_server_cannot_share_the_port(server, shared_repo):
    run = subprocess.run([sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(shared_repo),
                          "--port", str(server.port), "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert f"could not listen on 127.0.0.1:{server.port}" in run.stderr


def test_calls_on_one_connection_batch_together(tmp_path, start_server):
    add_sub_model(tmp_path, config='name: "add_sub"\nmax_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n'
                                   'parameters [{ key: "batch_policy", value: { string_value: "delay" } }]\n')
    server = start_server(tmp_path)
    with grpc.insecure_channel(server.url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(_add_sub_request(i), timeout=30) for i in range(200)]
        for i, call in enumerate(calls):
            assert np.frombuffer(call.result().raw_output_contents[0], np.float32)[0] == 2 * i
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub")).model_stats[0]
    assert stats.inference_count == 200
    assert stats.execution_count <= 40, "requests in flight on one connection share batches"


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_are_served(server, compression):
    with grpc.insecure_channel(server.url, compression=compression) as channel:
        response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_add_sub_request(3.0), timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], np.float32)[0] == 6.0


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/NoSuchMethod", "/other.Service/Call"])
def test_unknown_methods_are_unimplemented(server, method):
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(method)(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED and method in raised.value.details()


def test_a_malformed_message_is_invalid_argument_and_the_server_goes_on(server):
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ModelInfer" in raised.value.details() and "not a valid protobuf message" in raised.value.details()
        assert grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_health_watch_streams_every_change(tmp_path, start_server):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--model-control", "explicit")
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(server.url) as channel, grpcclient.InferenceServerClient(server.url) as client:
        health = health_pb2_grpc.HealthStub(channel)
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=30)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()
        watch = health.Watch(health_pb2.HealthCheckRequest(service="add_sub"), timeout=30)
        assert next(watch).status == serving
        client.unload_model("add_sub")
        assert next(watch).status == not_serving
        client.load_model("add_sub")
        assert next(watch).status == serving
        watch.cancel()
        assert health.Check(health_pb2.HealthCheckRequest(service="add_sub"), timeout=10).status == serving


def test_a_cancelled_stream_leaves_the_server_serving(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        more = threading.Event()

        def requests():
            yield _add_sub_request(1.0)
            more.wait(10)

        stream = stub.ModelStreamInfer(requests(), timeout=30)
        first = next(stream)
        assert first.error_message == "" and np.frombuffer(first.infer_response.raw_output_contents[0], np.float32)[0] == 2.0
        stream.cancel()
        more.set()
        with pytest.raises(grpc.RpcError) as raised:
            next(stream)
        assert raised.value.code() == grpc.StatusCode.CANCELLED
        with futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: stub.ModelInfer(_add_sub_request(i), timeout=10), range(32)))
    assert [np.frombuffer(a.raw_output_contents[0], np.float32)[0] for a in answers] == [2.0 * i for i in range(32)]


def _sigterm_under_load(tmp_path, start_server, delay_us: int, *flags: str) -> tuple[list, int, float]:
    """Send 24 calls that sit in a `delay_us` queue, SIGTERM the server while they wait; return each
    call's outcome (an output value or a status code), the exit code and the seconds the server took to exit."""
    add_sub_model(tmp_path, config=f'name: "add_sub"\nmax_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n'
                                   'parameters [{ key: "batch_policy", value: { string_value: "delay" } }]\n')
    server = start_server(tmp_path, *flags)
    with grpc.insecure_channel(server.url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(_add_sub_request(i), timeout=30) for i in range(24)]
        time.sleep(0.6)  # every call reaches the queue first, even on a busy machine; the queue holds them 1 s
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        outcomes = []
        for call in calls:
            try:
                outcomes.append(float(np.frombuffer(call.result().raw_output_contents[0], np.float32)[0]))
            except grpc.RpcError as error:
                outcomes.append(error.code())
        code = server.proc.wait(timeout=30)
    return outcomes, code, time.monotonic() - stopped


def test_sigterm_finishes_every_accepted_call_within_the_grace_period(tmp_path, start_server):
    outcomes, code, _ = _sigterm_under_load(tmp_path, start_server, 1_000_000, "--grace-s", "5")
    assert outcomes == [2.0 * i for i in range(24)] and code == 0


def test_calls_the_grace_period_cannot_finish_are_unavailable_not_cancelled(tmp_path, start_server):
    outcomes, code, took_s = _sigterm_under_load(tmp_path, start_server, 20_000_000, "--grace-s", "0.5")
    assert outcomes == [grpc.StatusCode.UNAVAILABLE] * 24 and code == 0
    assert took_s < 10


def test_the_drain_period_reports_not_serving_and_still_serves(tmp_path, start_server):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--drain-s", "3")
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
        response = stub.ModelInfer(_add_sub_request(4.0), timeout=10)
        assert np.frombuffer(response.raw_output_contents[0], np.float32)[0] == 8.0
    assert server.proc.wait(timeout=30) == 0
