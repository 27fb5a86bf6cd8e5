"""The response cache inside a real server: hits skip the model, keys are exact, reloads invalidate."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from models import add_sub_model

CACHED = 'name: "{name}"\nmax_batch_size: 8\nresponse_cache {{ enable: true }}\n'


def _inputs(x: np.ndarray, y: np.ndarray, module=grpcclient) -> list:
    inputs = [module.InferInput(n, list(x.shape), "FP32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    return inputs


def _stats(client: grpcclient.InferenceServerClient, name: str):
    s = client.get_inference_statistics(name).model_stats[0]
    return s.inference_stats.cache_hit.count, s.inference_stats.cache_miss.count, s.execution_count


def test_cache_hits_are_exact_and_skip_the_model(tmp_path, start_server):
    add_sub_model(tmp_path, "cached", config=CACHED.format(name="cached"))
    add_sub_model(tmp_path, "uncached", config='name: "uncached"\nmax_batch_size: 8\n')
    server = start_server(tmp_path, "--cache-size", "1MiB", "--model-control", "explicit")
    x, y = np.arange(16, dtype=np.float32).reshape(1, 16), np.ones((1, 16), np.float32)
    with grpcclient.InferenceServerClient(server.url) as client:
        first = client.infer("cached", _inputs(x, y), request_id="a")
        second = client.infer("cached", _inputs(x, y), request_id="b")
        assert second.get_response().id == "b"
        assert first.as_numpy("OUTPUT0").tobytes() == second.as_numpy("OUTPUT0").tobytes()
        assert _stats(client, "cached") == (1, 1, 1)

        client.infer("cached", _inputs(x + 1, y))
        client.infer("cached", _inputs(x, y), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
        client.infer("cached", _inputs(np.vstack([x, x]), np.vstack([y, y])))
        assert _stats(client, "cached") == (1, 4, 4)

        for _ in range(3):
            client.infer("uncached", _inputs(x, y))
        assert _stats(client, "uncached") == (0, 0, 3)

        add_sub_model(tmp_path, "cached", config=CACHED.format(name="cached"), offset=100.0)
        client.load_model("cached")
        reloaded = client.infer("cached", _inputs(x, y))
        np.testing.assert_array_equal(reloaded.as_numpy("OUTPUT0"), x + y + 100)


def test_cache_is_correct_under_concurrent_clients(tmp_path, start_server):
    add_sub_model(tmp_path, "cached", config=CACHED.format(name="cached"))
    server = start_server(tmp_path, "--cache-size", "64KiB")

    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as client:
            async def one(i: int) -> None:
                x = np.full((1, 16), i % 37, np.float32)
                result = await client.infer("cached", _inputs(x, x, aioclient))
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * x)

            await asyncio.gather(*(one(i) for i in range(400)))

    asyncio.run(main())
    asyncio.run(main())
    with grpcclient.InferenceServerClient(server.url) as client:
        hits, misses, _ = _stats(client, "cached")
    assert hits + misses == 800 and hits >= 400, "the second burst finds every one of the 37 inputs cached"


def test_a_response_finished_by_a_retired_model_is_not_cached(tmp_path, start_server):
    """A request queued before a reload is answered by the old model; that answer must not be cached."""
    import threading

    slow = 'name: "cached"\nmax_batch_size: 8\nresponse_cache { enable: true }\ndynamic_batching { max_queue_delay_microseconds: 1000000 }\n'
    add_sub_model(tmp_path, "cached", config=slow)
    server = start_server(tmp_path, "--cache-size", "1MiB", "--model-control", "explicit")
    x = np.ones((1, 16), np.float32)
    answers: list = []

    def queued() -> None:
        with grpcclient.InferenceServerClient(server.url) as client:
            answers.append(client.infer("cached", _inputs(x, x)).as_numpy("OUTPUT0"))

    thread = threading.Thread(target=queued)
    thread.start()
    time.sleep(0.3)
    add_sub_model(tmp_path, "cached", config=slow, offset=100.0)
    with grpcclient.InferenceServerClient(server.url) as client:
        client.load_model("cached")
        thread.join(timeout=30)
        np.testing.assert_array_equal(answers[0], 2 * x)
        np.testing.assert_array_equal(client.infer("cached", _inputs(x, x)).as_numpy("OUTPUT0"), 2 * x + 100)
