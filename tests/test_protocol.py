"""The Open Inference Protocol as Triton's own Python clients (sync and asyncio) see it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from models import IDENTITY_TYPES

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


def sample(dt: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dt == "BYTES":
        return np.array([f"v{i}-é\x00 ✓".encode() for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if dt == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.startswith("FP"):
        values = rng.normal(size=shape).astype(NUMPY[dt])
        values.flat[0] = np.nan
        return values
    info = np.iinfo(NUMPY[dt])
    return rng.integers(info.min, info.max, shape, dtype=NUMPY[dt], endpoint=True)


@pytest.fixture
def client(server):
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("identity") and not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta.name == "hotpath" and "model_repository" in meta.extensions
    model = client.get_model_metadata("add_sub")
    assert model.versions == ["1"] and model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]


def test_config_derived_and_given(client):
    derived = client.get_model_config("identity").config
    assert derived.max_batch_size == 64 and len(derived.input) == len(IDENTITY_TYPES)
    assert {i.name: list(i.dims) for i in derived.input}["IN_FP32"] == [4]
    fixed = client.get_model_config("identity_fixed").config
    assert fixed.max_batch_size == 0 and list(fixed.input[0].dims) == [2, 3]
    given = client.get_model_config("add_sub").config
    assert given.max_batch_size == 8 and given.dynamic_batching.max_queue_delay_microseconds == 2000


@pytest.mark.parametrize("dt", list(IDENTITY_TYPES))
def test_every_datatype_round_trips_raw(client, dt):
    data = sample(dt, (3, 4))
    tensor = grpcclient.InferInput(f"IN_{dt}", data.shape, dt)
    tensor.set_data_from_numpy(data)
    others = []
    for other in IDENTITY_TYPES:
        if other != dt:
            t = grpcclient.InferInput(f"IN_{other}", [3, 4], other)
            t.set_data_from_numpy(sample(other, (3, 4), seed=1))
            others.append(t)
    result = client.infer("identity", [tensor, *others], outputs=[grpcclient.InferRequestedOutput(f"OUT_{dt}")], request_id=f"req-{dt}")
    got = result.as_numpy(f"OUT_{dt}")
    assert result.get_response().id == f"req-{dt}"
    assert [o.name for o in result.get_response().outputs] == [f"OUT_{dt}"]
    assert got.shape == data.shape
    if dt == "BYTES":
        assert got.tolist() == data.tolist()
    else:
        np.testing.assert_array_equal(got, data)


def test_typed_contents(client, server):
    from hotpath._proto import grpc_service_pb2 as pb
    request = pb.ModelInferRequest(model_name="add_sub", id="typed")
    for name, values in (("INPUT0", [1.0] * 16), ("INPUT1", [0.5] * 16)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend(values)
    import grpc
    from hotpath._proto import grpc_service_pb2_grpc
    with grpc.insecure_channel(server.url) as channel:
        response = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    out = {o.name: np.frombuffer(raw, np.float32) for o, raw in zip(response.outputs, response.raw_output_contents)}
    np.testing.assert_array_equal(out["OUTPUT0"], np.full(16, 1.5, np.float32))
    np.testing.assert_array_equal(out["OUTPUT1"], np.full(16, 0.5, np.float32))
    assert response.id == "typed"


def test_statistics_count_requests(client):
    before = client.get_inference_statistics("add_sub").model_stats[0]
    x = np.ones((2, 16), np.float32)
    inputs = [grpcclient.InferInput(n, x.shape, "FP32") for n in ("INPUT0", "INPUT1")]
    for t in inputs:
        t.set_data_from_numpy(x)
    for _ in range(3):
        client.infer("add_sub", inputs)
    after = client.get_inference_statistics("add_sub").model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_count - before.inference_count == 6
    assert after.execution_count > before.execution_count
    all_models = {s.name for s in client.get_inference_statistics().model_stats}
    assert {"identity", "add_sub", "matmul"} <= all_models


def test_streaming_infer(server):
    results: list = []
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    with grpcclient.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: results.append((result, error)))
        for i in range(20):
            inputs = [grpcclient.InferInput(n, x.shape, "FP32") for n in ("INPUT0", "INPUT1")]
            inputs[0].set_data_from_numpy(x + i)
            inputs[1].set_data_from_numpy(x)
            c.async_stream_infer("add_sub", inputs, request_id=str(i))
        bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        c.async_stream_infer("add_sub", [bad], request_id="bad")
        c.stop_stream()
    assert len(results) == 21
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 1 and "INPUT0" in str(errors[0])
    for result, error in results:
        if error is None:
            i = int(result.get_response().id)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x + i - x)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + i + x)


def test_asyncio_client_concurrent_rows_are_each_callers_own(server):
    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as c:
            assert await c.is_server_ready()

            async def one(i: int) -> None:
                x = np.full((1, 16), i, np.float32)
                inputs = [aioclient.InferInput(n, x.shape, "FP32") for n in ("INPUT0", "INPUT1")]
                inputs[0].set_data_from_numpy(x)
                inputs[1].set_data_from_numpy(x * 2)
                result = await c.infer("add_sub", inputs, request_id=str(i))
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 3)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), -x)

            await asyncio.gather(*(one(i) for i in range(64)))
            stats = await c.get_inference_statistics("add_sub")
            sizes = [b.batch_size for b in stats.model_stats[0].batch_stats]
            assert max(sizes) > 1, f"no batch formed: {sizes}"

    asyncio.run(main())


def test_non_batched_model(client):
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    inputs = []
    for dt in IDENTITY_TYPES:
        t = grpcclient.InferInput(f"IN_{dt}", [2, 3], dt)
        t.set_data_from_numpy(data if dt == "FP32" else sample(dt, (2, 3)))
        inputs.append(t)
    result = client.infer("identity_fixed", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUT_FP32"), data)
    with pytest.raises(InferenceServerException, match=r"expected shape \[2, 3\], got \[1, 2, 3\]"):
        bad = [grpcclient.InferInput("IN_FP32", [1, 2, 3], "FP32")]
        bad[0].set_data_from_numpy(data.reshape(1, 2, 3))
        client.infer("identity_fixed", bad)
