"""What one client does cannot hurt another: poisoned batches, oversized echoes, overload; through real servers."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from models import add_sub_model, string_cast_model
from test_batching import slow_model

GATHER = ('max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n'
          'parameters { key: "batch_policy" value { string_value: "delay" } }\n')


def _text(rows: list[list[str]]) -> list[grpcclient.InferInput]:
    tensor = aioclient.InferInput("X", [len(rows), 2], "BYTES")
    tensor.set_data_from_numpy(np.array(rows, dtype=object))
    return [tensor]


async def _status(call) -> str | np.ndarray:
    try:
        return (await call).as_numpy("Y")
    except InferenceServerException as exc:
        return f"{exc.status()}: {exc.message()}"


def test_a_poisoned_batch_fails_only_the_poisoned_requests(tmp_path: Path, start_server) -> None:
    string_cast_model(tmp_path, config=GATHER)
    server: ServerProcess = start_server(tmp_path)
    good = [[str(i), str(i / 4)] for i in range(240)]

    async def main() -> list:
        async with aioclient.InferenceServerClient(server.url) as client:
            calls = []
            for i, row in enumerate(good):
                calls.append(client.infer("string_cast", _text([row])))
                if i % 4 == 0:
                    calls.append(client.infer("string_cast", _text([["7", f"not a number {i}"]])))
            return await asyncio.gather(*(_status(call) for call in calls))

    results = asyncio.run(main())
    served = [r for r in results if isinstance(r, np.ndarray)]
    refused = [r for r in results if isinstance(r, str)]
    assert len(served) == len(good), "good requests failed: " + str([r for r in refused if "not a number" not in r][:3])
    np.testing.assert_array_equal(np.concatenate(sorted(served, key=lambda y: y[0, 0])), np.array(good, dtype=np.float32))
    assert len(refused) == 60 and all(r.startswith("StatusCode.INVALID_ARGUMENT: model 'string_cast' version 1 cannot run "
                                                   "this request's inputs") for r in refused), refused[:3]
    with grpcclient.InferenceServerClient(server.url) as client:
        stats = client.get_inference_statistics("string_cast").model_stats[0]
    assert stats.execution_count < len(good) / 4, "the requests must have been batched for the test to mean anything"
    log = server.output()
    mixed = re.findall(r"(\d+) of (\d+) request\(s\) in a batch failed on their own", log)
    assert mixed and all(int(total) > int(bad) for bad, total in mixed), log[-2000:]
    assert len(mixed) <= 2, "repeated request failures are summarised, not logged one by one"
    assert "sequential_executor" not in log, "ONNX Runtime's own error log stays quiet"


LONG = "x" * 100_000


@pytest.mark.parametrize("where", ["model_name", "model_version", "input_name", "output_name"])
def test_a_huge_value_in_a_request_is_not_echoed_whole(server: ServerProcess, where: str) -> None:
    names = {"model_name": "matmul", "model_version": "", "input_name": "X", "output_name": "Y", where: LONG}
    tensor = grpcclient.InferInput(names["input_name"], [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    with grpcclient.InferenceServerClient(server.url) as client, pytest.raises(InferenceServerException) as raised:
        client.infer(names["model_name"], [tensor], model_version=names["model_version"],
                     outputs=[grpcclient.InferRequestedOutput(names["output_name"])])
    assert raised.value.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"), raised.value
    assert len(raised.value.message()) < 1000 and "(100000 characters)" in raised.value.message(), raised.value.message()


def test_overload_sheds_with_resource_exhausted_and_recovers_at_once(tmp_path: Path, start_server) -> None:
    slow_model(tmp_path, "slow", "dynamic_batching { default_queue_policy { max_queue_size: 16 } }\n", matmuls=6)
    server: ServerProcess = start_server(tmp_path)

    async def main() -> tuple[list, float]:
        async with aioclient.InferenceServerClient(server.url) as client:
            x = aioclient.InferInput("X", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            results = await asyncio.gather(*(_status(client.infer("slow", [x])) for _ in range(300)))
            start = time.perf_counter()
            await client.infer("slow", [x])
            return results, time.perf_counter() - start

    results, after_s = asyncio.run(main())
    statuses = {"OK" if isinstance(r, np.ndarray) else r.split(":")[0] for r in results}
    assert statuses == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, statuses
    shed = sum(isinstance(r, str) for r in results)
    assert 0 < shed < 300
    assert after_s < 5, "the first request after the burst is served at once"


def test_control_plane_chaos_under_traffic_leaves_every_other_model_serving(tmp_path: Path, start_server) -> None:
    add_sub_model(tmp_path, "steady")
    add_sub_model(tmp_path, "cycled")
    add_sub_model(tmp_path, "bad_reference", config='max_batch_size: 8\ndrift { enable: true }\n')
    (tmp_path / "bad_reference" / "drift").mkdir()
    (tmp_path / "bad_reference" / "drift" / "reference.json").write_text("[]")
    (tmp_path / "corrupt" / "1").mkdir(parents=True)
    (tmp_path / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage")
    server: ServerProcess = start_server(tmp_path, "--model-control", "explicit")
    statuses: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def traffic() -> None:
        with grpcclient.InferenceServerClient(server.url) as client:
            inputs = [grpcclient.InferInput(name, [1, 16], "FP32") for name in ("INPUT0", "INPUT1")]
            for tensor in inputs:
                tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
            while not stop.is_set():
                try:
                    client.infer("steady", inputs, client_timeout=10)
                    statuses["OK"] += 1
                except InferenceServerException as exc:
                    statuses[exc.status()] += 1

    sender = threading.Thread(target=traffic)
    sender.start()
    answers: collections.Counter[str] = collections.Counter()
    try:
        with grpcclient.InferenceServerClient(server.url) as client:
            names = ["cycled", "bad_reference", "corrupt", "x" * 300, "../steady", "a/b", "", "ünïcode", "not_there"]
            for round_number in range(10):
                for name in names:
                    for action in (client.load_model, client.unload_model):
                        try:
                            action(name, client_timeout=10)
                            answers["OK"] += 1
                        except InferenceServerException as exc:
                            answers[exc.status()] += 1
            client.load_model("cycled", client_timeout=10)
            assert client.is_model_ready("cycled") and client.is_model_ready("steady")
    finally:
        stop.set()
        sender.join()
    assert set(answers) <= {"OK", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"}, answers
    assert statuses["OK"] > 0 and set(statuses) == {"OK"}, statuses


def test_sigterm_under_load_drains_as_a_balancer_expects_and_fails_nothing(tmp_path: Path, start_server) -> None:
    """Callers that stop sending when health turns NOT_SERVING, as a balancer or kube-proxy does, lose
    nothing to a SIGTERM: every call, those in flight at the signal included, is answered OK."""
    add_sub_model(tmp_path, config='max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n')
    server: ServerProcess = start_server(tmp_path, "--drain-s", "1", "--grace-s", "5")

    async def main() -> collections.Counter[str]:
        outcomes: collections.Counter[str] = collections.Counter()
        draining = asyncio.Event()
        async with grpc.aio.insecure_channel(server.url) as channel, aioclient.InferenceServerClient(server.url) as client:
            async def watch() -> None:
                async for answer in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                    if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        draining.set()
                        return

            inputs = [aioclient.InferInput(name, [1, 16], "FP32") for name in ("INPUT0", "INPUT1")]
            for tensor in inputs:
                tensor.set_data_from_numpy(np.ones((1, 16), np.float32))

            async def sender() -> None:
                while not draining.is_set():
                    try:
                        await client.infer("add_sub", inputs, client_timeout=10)
                        outcomes["OK"] += 1
                    except InferenceServerException as exc:
                        outcomes[exc.status()] += 1

            watcher = asyncio.create_task(watch())
            senders = [asyncio.create_task(sender()) for _ in range(32)]
            await asyncio.sleep(1.0)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(watcher, *senders), timeout=30)
        return outcomes

    outcomes = asyncio.run(main())
    print(f"drain under load: {dict(outcomes)}")
    assert server.proc.wait(timeout=30) == 0
    assert outcomes["OK"] > 100 and set(outcomes) == {"OK"}, outcomes
