"""Traces reach a real OTLP receiver on loopback: RPC spans, request steps, batch spans and their links."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from hotpath.observability.telemetry import DEFAULT_SAMPLING, trace_settings
from hotpath.settings import Settings
from models import add_sub_model

DELAYED = ('name: "add_sub"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000000 }\n'
           'parameters [{ key: "batch_policy", value: { string_value: "delay" } }]\n')
"""Batches wait up to a second for 8 rows (Triton's policy): concurrent requests share a batch, 8 of them fill it."""

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
SPAN_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "hotpath-under-test"}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that keeps every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, trace_pb2.Span]] = []
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout: float = 15.0) -> list[trace_pb2.Span]:
        """Spans once `predicate(spans)` holds; fails the test when it does not within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = [span for _, span in self.spans]
            if predicate(spans):
                return spans
            assert time.monotonic() < deadline, f"spans never matched; got {[s.name for s in spans]}"
            time.sleep(0.05)


def _attributes(item) -> dict:
    out = {}
    for kv in item.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, f"http://127.0.0.1:{port}"
    server.stop(None)


def _inputs(rows: int, value: float = 1.0) -> list[grpcclient.InferInput]:
    x = np.full((rows, 16), value, np.float32)
    inputs = [grpcclient.InferInput(n, list(x.shape), "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    return inputs


def _infer_concurrently(url: str, count: int) -> None:
    barrier = threading.Barrier(count)
    errors = []

    def one(i: int) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            barrier.wait()
            try:
                client.infer("add_sub", _inputs(1, i), request_id=str(i))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def _named(spans, name: str) -> list[trace_pb2.Span]:
    return [s for s in spans if s.name == name]


def test_caller_traceparent_is_continued_and_steps_are_children(tmp_path, start_server, receiver):
    collector, endpoint = receiver
    add_sub_model(tmp_path)
    # Sampling 0: only a caller's sampled traceparent may start a trace.
    server = start_server(tmp_path, "--trace-endpoint", endpoint, "--trace-sampling", "0", env=SPAN_ENV)
    sampled = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"}
    unsampled = {"traceparent": f"00-{'1' * 32}-{CALLER_SPAN_ID}-00"}
    with grpcclient.InferenceServerClient(server.url) as client:
        client.infer("add_sub", _inputs(2), headers=unsampled)
        client.infer("add_sub", _inputs(2))
        result = client.infer("add_sub", _inputs(2), headers=sampled)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((2, 16), 2, np.float32))
        with pytest.raises(grpcclient.InferenceServerException):
            client.infer("add_sub", _inputs(2), model_version="7", headers=sampled)

    spans = collector.wait_for(lambda s: len(_named(s, "inference.GRPCInferenceService/ModelInfer")) == 2
                               and _named(s, "hotpath.batch") and _named(s, "hotpath.response.encode"))
    time.sleep(0.3)
    spans = collector.wait_for(lambda s: True)
    assert {s.trace_id.hex() for s in spans if s.name != "hotpath.batch"} == {TRACE_ID}, "only the sampled caller's requests are traced"
    ok, failed = sorted(_named(spans, "inference.GRPCInferenceService/ModelInfer"),
                        key=lambda s: _attributes(s)["rpc.grpc.status_code"])
    for span in (ok, failed):
        assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert span.parent_span_id.hex() == CALLER_SPAN_ID
        attributes = _attributes(span)
        assert attributes["rpc.system"] == "grpc"
        assert attributes["rpc.service"] == "inference.GRPCInferenceService"
        assert attributes["rpc.method"] == "ModelInfer"
    assert _attributes(ok)["rpc.grpc.status_code"] == 0
    assert _attributes(ok)["hotpath.model.name"] == "add_sub"
    assert _attributes(failed)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed.status.code != trace_pb2.Status.STATUS_CODE_ERROR, "NOT_FOUND is the caller's error, not the server's"

    steps = {s.name: s for s in spans if s.parent_span_id == ok.span_id}
    assert set(steps) == {"hotpath.queue.wait", "hotpath.response.encode"}
    for step in steps.values():
        assert ok.start_time_unix_nano <= step.start_time_unix_nano <= step.end_time_unix_nano <= ok.end_time_unix_nano

    (batch,) = _named(spans, "hotpath.batch")
    assert batch.parent_span_id == b"" and batch.trace_id.hex() != TRACE_ID
    assert [(link.trace_id.hex(), link.span_id) for link in batch.links] == [(TRACE_ID, ok.span_id)]
    resource = next(r for r, s in collector.spans if s.span_id == ok.span_id)
    assert resource["service.name"] == "hotpath-under-test"


def test_batch_span_links_every_request_it_served(tmp_path, start_server, receiver):
    collector, endpoint = receiver
    add_sub_model(tmp_path, config=DELAYED)
    server = start_server(tmp_path, "--trace-endpoint", endpoint, "--trace-sampling", "1.0", env=SPAN_ENV)
    _infer_concurrently(server.url, 3)
    spans = collector.wait_for(lambda s: len(_named(s, "hotpath.batch")) == 1 and len(_named(s, "inference.GRPCInferenceService/ModelInfer")) == 3)
    _infer_concurrently(server.url, 8)
    spans = collector.wait_for(lambda s: len(_named(s, "hotpath.batch")) == 2 and len(_named(s, "inference.GRPCInferenceService/ModelInfer")) == 11)

    requests = {s.span_id: s for s in _named(spans, "inference.GRPCInferenceService/ModelInfer")}
    batches = sorted(_named(spans, "hotpath.batch"), key=lambda s: s.start_time_unix_nano)
    expected = [(3, "delay"), (8, "full")]
    linked = set()
    for batch, (size, reason) in zip(batches, expected):
        attributes = _attributes(batch)
        assert attributes["hotpath.batch.size"] == size and attributes["hotpath.batch.requests"] == size
        assert attributes["hotpath.batch.dispatch"] == reason
        assert attributes["hotpath.replica"] == 0
        assert attributes["hotpath.model.name"] == "add_sub" and attributes["hotpath.model.version"] == 1
        assert batch.parent_span_id == b""
        assert len(batch.links) == size
        for link in batch.links:
            request = requests[link.span_id]
            assert link.trace_id == request.trace_id
            assert request.start_time_unix_nano <= batch.start_time_unix_nano <= batch.end_time_unix_nano <= request.end_time_unix_nano
            waits = [s for s in spans if s.name == "hotpath.queue.wait" and s.parent_span_id == request.span_id]
            assert len(waits) == 1 and waits[0].end_time_unix_nano == batch.start_time_unix_nano
        linked |= {link.span_id for link in batch.links}
    assert linked == set(requests), "every request span is linked from the batch that served it"
    assert len({s.trace_id for s in requests.values()}) == 11, "requests without a caller each start their own trace"


def test_tracing_is_configured_by_flags_then_environment():
    endpoint = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}
    assert trace_settings(Settings(), {}) is None, "no endpoint: tracing off"
    assert trace_settings(Settings(tracing=False), endpoint) is None
    assert trace_settings(Settings(), {**endpoint, "OTEL_SDK_DISABLED": "true"}) is None
    assert trace_settings(Settings(), {**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert trace_settings(Settings(), endpoint).ratio == DEFAULT_SAMPLING
    env_ratio = {**endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    assert trace_settings(Settings(), env_ratio).ratio == 0.25
    assert trace_settings(Settings(trace_sampling=0.5), env_ratio).ratio == 0.5
    assert trace_settings(Settings(trace_endpoint="http://other:4317"), {}).endpoint == "http://other:4317"
    with pytest.raises(ValueError, match="between 0 and 1"):
        trace_settings(Settings(trace_sampling=1.5), endpoint)
    with pytest.raises(ValueError, match="not supported"):
        trace_settings(Settings(), {**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_a_sampled_stream_has_one_server_span_parenting_every_request(tmp_path, start_server, receiver):
    collector, endpoint = receiver
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--trace-endpoint", endpoint, "--trace-sampling", "1.0", env=SPAN_ENV)
    answers: list = []
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: answers.append(error))
        for i in range(3):
            client.async_stream_infer("add_sub", _inputs(1, i), request_id=str(i))
        client.stop_stream()
    assert answers == [None, None, None]

    spans = collector.wait_for(lambda s: _named(s, "inference.GRPCInferenceService/ModelStreamInfer")
                               and len(_named(s, "hotpath.queue.wait")) == 3)
    (stream,) = _named(spans, "inference.GRPCInferenceService/ModelStreamInfer")
    assert _attributes(stream)["rpc.method"] == "ModelStreamInfer" and _attributes(stream)["rpc.grpc.status_code"] == 0
    waits = _named(spans, "hotpath.queue.wait")
    assert all(wait.parent_span_id == stream.span_id for wait in waits)
    linked = {link.span_id for batch in _named(spans, "hotpath.batch") for link in batch.links}
    assert linked == {stream.span_id}
