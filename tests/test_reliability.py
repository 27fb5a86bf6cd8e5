"""What one client does cannot hurt another: poisoned batches, oversized echoes, overload; through real servers."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from models import identity_model, string_cast_model
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
