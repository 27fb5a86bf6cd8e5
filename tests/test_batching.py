"""Dynamic batching, replicas and thread tuning: end to end through real servers and tritonclient, and
the scheduler in process over sessions whose batches the test holds and releases."""

from __future__ import annotations

import asyncio
import re
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.observability.stats import ModelStats, StatsStore
from hotpath.serving.config import read_config
from hotpath.serving.model import Model
from hotpath.serving.replicas import CPU_DEVICE, Replica, ReplicaPlan, plan_replicas
from hotpath.settings import Settings, available_cpus
from models import add_sub_model, matmul_model

INLINE = 'parameters { key: "execution" value { string_value: "inline" } }\n'
ONE_THREAD = 'instance_group [{ count: 1 }]\nparameters { key: "intra_op_thread_count" value { string_value: "1" } }\n'
DELAY_POLICY = 'parameters { key: "batch_policy" value { string_value: "delay" } }\n'


def slow_model(repo: Path, name: str, config: str, matmuls: int = 60, size: int = 1024) -> None:
    """Y = X, after a chain of `size`-square MatMuls that depend on X (so none is folded at load).

    Every batch costs the same whatever its rows: about half a second on one thread of a current CPU.
    """
    weight = numpy_helper.from_array(np.full((size, size), 1e-3, np.float32), "W")
    zero = numpy_helper.from_array(np.array(0, np.float32), "ZERO")
    nodes = [helper.make_node("ReduceSum", ["X"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "ZERO"], ["s0"]),
             helper.make_node("Add", ["W", "s0"], ["P0"])]
    nodes += [helper.make_node("MatMul", [f"P{i}", "W"], [f"P{i + 1}"]) for i in range(matmuls)]
    nodes += [helper.make_node("ReduceSum", [f"P{matmuls}"], ["r"], keepdims=0),
              helper.make_node("Mul", ["r", "ZERO"], ["r0"]),
              helper.make_node("Add", ["X", "r0"], ["Y"])]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])], [weight, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, repo / name / "1" / "model.onnx")
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nmax_batch_size: 8\n{ONE_THREAD}{config}')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("batching")
    add_sub_model(repo, config=f'name: "add_sub"\nmax_batch_size: 64\n{ONE_THREAD}'
                               'dynamic_batching { max_queue_delay_microseconds: 20000 }\n')
    add_sub_model(repo, "add_sub_inline", config='name: "add_sub_inline"\nmax_batch_size: 64\n'
                                                 'dynamic_batching { max_queue_delay_microseconds: 20000 }\n')
    add_sub_model(repo, "lone_wait", config=f'name: "lone_wait"\nmax_batch_size: 8\n{DELAY_POLICY}'
                                            'dynamic_batching { max_queue_delay_microseconds: 200000 }\n')
    add_sub_model(repo, "lone_go", config='name: "lone_go"\nmax_batch_size: 8\n'
                                          'dynamic_batching { max_queue_delay_microseconds: 50000 }\n')
    add_sub_model(repo, "lone_delay", config=f'name: "lone_delay"\nmax_batch_size: 8\n{DELAY_POLICY}'
                                             'dynamic_batching { max_queue_delay_microseconds: 50000 }\n')
    add_sub_model(repo, "no_wait", config='name: "no_wait"\nmax_batch_size: 8\ndynamic_batching { }\n')
    add_sub_model(repo, "tuned")
    add_sub_model(repo, "gpu", config='name: "gpu"\nmax_batch_size: 8\ninstance_group [{ kind: KIND_GPU, gpus: [0] }]\n')
    matmul_model(repo, config=f'name: "matmul"\nmax_batch_size: 8\n{ONE_THREAD}'
                              'dynamic_batching { max_queue_delay_microseconds: 50000 }\n')
    matmul_model(repo, "matmul_inline", config=f'name: "matmul_inline"\nmax_batch_size: 8\n{INLINE}'
                                                'dynamic_batching { max_queue_delay_microseconds: 50000 }\n')
    slow_model(repo, "slow_deadline", "")
    slow_model(repo, "slow_cancel", "")
    slow_model(repo, "slow_policy", "dynamic_batching { default_queue_policy { default_timeout_microseconds: 100000 } }\n")
    slow_model(repo, "slow_queue", "dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n")
    slow_model(repo, "slow_gather", "dynamic_batching { max_queue_delay_microseconds: 10000000 }\n")
    proc = ServerProcess(repo)
    yield proc
    assert proc.stop() == 0, proc.output()


def _inputs(names: tuple[str, ...], *arrays: np.ndarray) -> list[aioclient.InferInput]:
    inputs = []
    for name, array in zip(names, arrays):
        tensor = aioclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def _add_sub(client: aioclient.InferenceServerClient, model: str, a: np.ndarray, b: np.ndarray) -> aioclient.InferResult:
    return await client.infer(model, _inputs(("INPUT0", "INPUT1"), a, b))


async def _x(client: aioclient.InferenceServerClient, model: str, x: np.ndarray, **kwargs) -> np.ndarray:
    return (await client.infer(model, _inputs(("X",), x), **kwargs)).as_numpy("Y")


def _stats(url: str, model: str):
    with grpcclient.InferenceServerClient(url) as client:
        return client.get_inference_statistics(model).model_stats[0]


async def _while_busy(client: aioclient.InferenceServerClient, model: str) -> asyncio.Task:
    """Start a batch that keeps `model`'s only replica busy for a while, and return its task."""
    task = asyncio.create_task(_x(client, model, np.zeros((1, 4), np.float32)))
    await asyncio.sleep(0.15)
    assert not task.done(), "the slow model finished too fast to keep its replica busy"
    return task


@pytest.mark.parametrize("model", ["add_sub", "add_sub_inline"])
def test_concurrent_callers_batch_and_each_gets_its_own_rows(server: ServerProcess, model: str) -> None:
    rows = [1 + i % 3 for i in range(200)]
    firsts = [np.arange(16, dtype=np.float32) + 1000 * i + np.arange(n, dtype=np.float32)[:, None] * 100
              for i, n in enumerate(rows)]
    seconds = [np.full((n, 16), i, np.float32) for i, n in enumerate(rows)]

    async def main() -> list[aioclient.InferResult]:
        async with aioclient.InferenceServerClient(server.url) as client:
            return await asyncio.gather(*(_add_sub(client, model, a, b) for a, b in zip(firsts, seconds)))

    for a, b, result in zip(firsts, seconds, asyncio.run(main())):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    stats = _stats(server.url, model)
    sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert max(sizes) > 1, sizes
    assert stats.inference_count == sum(rows)
    assert sum(size * count for size, count in sizes.items()) == sum(rows)
    assert stats.execution_count == sum(sizes.values()) < 200


def test_a_lone_request_waits_its_delay_and_no_longer(server: ServerProcess) -> None:
    one = np.ones((1, 16), np.float32)

    async def timed(client: aioclient.InferenceServerClient, model: str) -> float:
        start = time.perf_counter()
        await _add_sub(client, model, one, one)
        return time.perf_counter() - start

    async def main() -> tuple[float, float]:
        async with aioclient.InferenceServerClient(server.url) as client:
            await timed(client, "no_wait")
            return await timed(client, "lone_wait"), min([await timed(client, "no_wait") for _ in range(3)])

    waited, immediate = asyncio.run(main())
    assert 0.2 <= waited < 0.5
    assert immediate < 0.1


def test_a_lone_request_on_an_idle_model_waits_out_the_delay_only_under_the_delay_policy(server: ServerProcess) -> None:
    """Both models have a 50 ms queue delay; only the one that asks for batch_policy "delay" waits it out."""
    one = np.ones((1, 16), np.float32)

    async def timed(client: aioclient.InferenceServerClient, model: str) -> float:
        start = time.perf_counter()
        await _add_sub(client, model, one, one)
        return time.perf_counter() - start

    async def main() -> tuple[list[float], list[float]]:
        async with aioclient.InferenceServerClient(server.url) as client:
            await timed(client, "no_wait")
            return [await timed(client, "lone_go") for _ in range(3)], [await timed(client, "lone_delay") for _ in range(3)]

    work_conserving, delayed = asyncio.run(main())
    assert statistics.median(work_conserving) < 0.025, work_conserving
    assert min(delayed) >= 0.05, delayed


def test_requests_gather_while_the_replica_is_busy_and_run_as_soon_as_it_is_free(server: ServerProcess) -> None:
    """With a 10 s queue delay, requests that queued behind a running batch run together when it ends."""
    async def main() -> float:
        async with aioclient.InferenceServerClient(server.url) as client:
            busy = await _while_busy(client, "slow_gather")
            queued = [asyncio.create_task(_x(client, "slow_gather", np.full((1, 4), i, np.float32), client_timeout=5))
                      for i in range(3)]
            await asyncio.sleep(0.05)
            assert not busy.done(), "the slow model finished before the queued requests arrived"
            start = time.perf_counter()
            await busy
            for i, task in enumerate(queued):
                np.testing.assert_array_equal(await task, np.full((1, 4), i, np.float32))
            return time.perf_counter() - start

    assert asyncio.run(main()) < 5
    stats = _stats(server.url, "slow_gather")
    assert (stats.execution_count, stats.inference_count) == (2, 4)
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 1, 3: 1}


def test_requests_whose_deadline_passes_in_the_queue_never_run(server: ServerProcess) -> None:
    async def main() -> list:
        async with aioclient.InferenceServerClient(server.url) as client:
            busy = await _while_busy(client, "slow_deadline")
            late = await asyncio.gather(*(_x(client, "slow_deadline", np.full((1, 4), i, np.float32), client_timeout=0.1)
                                          for i in range(3)), return_exceptions=True)
            await busy
            await asyncio.sleep(0.1)
            return late

    for error in asyncio.run(main()):
        assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.DEADLINE_EXCEEDED", error
    stats = _stats(server.url, "slow_deadline")
    assert (stats.execution_count, stats.inference_count) == (1, 1)


def test_the_queue_policy_timeout_fails_a_waiting_request_with_deadline_exceeded(server: ServerProcess) -> None:
    async def main() -> None:
        async with aioclient.InferenceServerClient(server.url) as client:
            busy = await _while_busy(client, "slow_policy")
            with pytest.raises(InferenceServerException, match="in the queue and its deadline passed") as caught:
                await _x(client, "slow_policy", np.ones((1, 4), np.float32))
            assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            await busy

    asyncio.run(main())
    stats = _stats(server.url, "slow_policy")
    assert (stats.execution_count, stats.inference_count, stats.inference_stats.fail.count) == (1, 1, 1)


def test_a_cancelled_queued_request_never_runs_and_the_server_goes_on(server: ServerProcess) -> None:
    async def main() -> np.ndarray:
        async with aioclient.InferenceServerClient(server.url) as client:
            busy = await _while_busy(client, "slow_cancel")
            queued = asyncio.create_task(_x(client, "slow_cancel", np.ones((1, 4), np.float32)))
            await asyncio.sleep(0.05)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            await busy
            await asyncio.sleep(0.1)
            stats = _stats(server.url, "slow_cancel")
            assert (stats.execution_count, stats.inference_count) == (1, 1)
            return await _x(client, "slow_cancel", np.full((1, 4), 7, np.float32))

    np.testing.assert_array_equal(asyncio.run(main()), np.full((1, 4), 7, np.float32))
    assert _stats(server.url, "slow_cancel").execution_count == 2


def test_a_full_queue_rejects_at_once_with_resource_exhausted(server: ServerProcess) -> None:
    async def main() -> float:
        async with aioclient.InferenceServerClient(server.url) as client:
            busy = await _while_busy(client, "slow_queue")
            queued = [asyncio.create_task(_x(client, "slow_queue", np.full((1, 4), i, np.float32))) for i in (1, 2)]
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            with pytest.raises(InferenceServerException, match=r"queue is full \(2 requests waiting\)") as caught:
                await _x(client, "slow_queue", np.ones((1, 4), np.float32))
            rejected_in = time.perf_counter() - start
            assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert not busy.done()
            await busy
            for i, task in zip((1, 2), queued):
                np.testing.assert_array_equal(await task, np.full((1, 4), i, np.float32))
            return rejected_in

    assert asyncio.run(main()) < 0.25
    stats = _stats(server.url, "slow_queue")
    assert (stats.execution_count, stats.inference_count) == (2, 3)


@pytest.mark.parametrize("model", ["matmul", "matmul_inline"])
def test_a_request_the_model_cannot_run_fails_alone_with_invalid_argument(server: ServerProcess, model: str) -> None:
    bad = [np.full((1, 3), i, np.float32) for i in range(4)]
    good = [np.arange(4, dtype=np.float32)[None, :] + i for i in range(4)]

    async def main() -> tuple[list, np.ndarray]:
        async with aioclient.InferenceServerClient(server.url) as client:
            results = await asyncio.gather(*(_x(client, model, x) for pair in zip(bad, good) for x in pair),
                                           return_exceptions=True)
            return results, await _x(client, model, np.ones((2, 4), np.float32))

    results, after = asyncio.run(main())
    for error in results[0::2]:
        assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.INVALID_ARGUMENT", error
        assert re.search(rf"model '{model}' version 1 cannot run this request's inputs: .*MatMul", error.message()), error.message()
    for x, y in zip(good, results[1::2]):
        np.testing.assert_array_equal(y, np.repeat(x.sum(axis=1, keepdims=True), 2, axis=1))
    np.testing.assert_array_equal(after, np.full((2, 2), 4, np.float32))
    assert re.search(rf"model '{model}' version 1: \d+ of \d+ request\(s\) in a batch failed on their own", server.output())


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 5, 8, 16])
def test_tuned_replicas_and_threads_never_exceed_the_cpus(cpus: int) -> None:
    settings = Settings(cpus=cpus)
    plan = plan_replicas(model_config_pb2.ModelConfig(name="m"), settings)
    assert plan.count >= 1 and plan.intra_threads >= 1 and plan.inter_threads == 1
    assert plan.count * plan.intra_threads <= cpus
    assert plan.count == 1 and plan.intra_threads == cpus, "one replica gets every CPU of the one process"
    counted = model_config_pb2.ModelConfig(name="m", instance_group=[model_config_pb2.ModelInstanceGroup(count=3)])
    plan = plan_replicas(counted, settings)
    assert plan.count == 3 and plan.intra_threads == max(1, cpus // 3)


def test_thread_parameters_and_the_process_cpus_drive_the_plan() -> None:
    config = model_config_pb2.ModelConfig(name="m")
    config.parameters["intra_op_thread_count"].string_value = "3"
    config.parameters["inter_op_thread_count"].string_value = "2"
    plan = plan_replicas(config, Settings(cpus=2))
    assert (plan.intra_threads, plan.inter_threads) == (3, 2)
    assert plan_replicas(model_config_pb2.ModelConfig(name="m"), Settings()) == \
        plan_replicas(model_config_pb2.ModelConfig(name="m"), Settings(cpus=available_cpus()))
    config.parameters["intra_op_thread_count"].string_value = "0"
    with pytest.raises(LoadError, match="thread counts must be >= 1"):
        plan_replicas(config, Settings())
    gpus = model_config_pb2.ModelConfig(name="m", instance_group=[model_config_pb2.ModelInstanceGroup(
        count=2, kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, gpus=[0, 1])])
    plan = plan_replicas(gpus, Settings(cpus=8))
    assert (plan.count, sorted(plan.gpus)) == (4, [0, 0, 1, 1])


def test_the_server_logs_a_tuned_plan_that_fits_the_cpus(server: ServerProcess) -> None:
    assert re.search(r"loaded model 'add_sub_inline' .* batches run on the event loop's thread", server.output())
    assert re.search(r"loaded model 'add_sub' .* batches run each on its own thread", server.output())
    match = re.search(r"loaded model 'tuned' version 1: (\d+) replica\(s\) on CPU x (\d+) intra-op thread\(s\)", server.output())
    assert match, server.output()
    assert 1 <= int(match.group(1)) * int(match.group(2)) <= available_cpus()


def test_kind_gpu_without_cuda_falls_back_to_cpu_and_says_so(server: ServerProcess) -> None:
    assert re.search(r"model 'gpu' replica 0: KIND_GPU on device 0 unavailable \(.+\); running on CPU", server.output()), \
        server.output()

    async def main() -> aioclient.InferResult:
        async with aioclient.InferenceServerClient(server.url) as client:
            return await _add_sub(client, "gpu", np.ones((2, 16), np.float32), np.ones((2, 16), np.float32))

    np.testing.assert_array_equal(asyncio.run(main()).as_numpy("OUTPUT0"), np.full((2, 16), 2, np.float32))


def test_require_gpu_fails_the_load_saying_cuda_is_unavailable(tmp_path: Path, start_server) -> None:
    add_sub_model(tmp_path, "gpu", config='name: "gpu"\nmax_batch_size: 8\ninstance_group [{ kind: KIND_GPU }]\n')
    add_sub_model(tmp_path, "cpu")
    server = start_server(tmp_path, "--require-gpu", "--model-control", "explicit")
    expected = r"model 'gpu': KIND_GPU on device 0 asked for, but .*CUDA.*; --require-gpu forbids falling back to CPU"
    assert re.search(expected, server.output()), server.output()
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("cpu") and not client.is_model_ready("gpu")
        with pytest.raises(InferenceServerException, match=expected):
            client.load_model("gpu")


class HeldSession:
    """Stands in for an ONNX Runtime session: Y = 2 X. Every run is recorded as (replica, rows) when
    it starts, and waits while the test holds `release` clear."""

    def __init__(self, index: int, runs: list[tuple[int, int]]) -> None:
        self.index = index
        self.runs = runs
        self.running = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs.append((self.index, len(feeds["X"])))
        self.running.set()
        assert self.release.wait(10), "the test never released the batch"
        return [feeds["X"] * 2]


def _held_model(replicas: int = 1, delay_us: int = 0, policy: str | None = None,
                inline: bool = False) -> tuple[Model, list[HeldSession], list[tuple[int, int]]]:
    """A Model with max_batch_size 8 over HeldSessions; returns it, its sessions and their shared run log."""
    config = model_config_pb2.ModelConfig(
        name="held", max_batch_size=8,
        input=[model_config_pb2.ModelInput(name="X", data_type=model_config_pb2.TYPE_FP32, dims=[2])],
        output=[model_config_pb2.ModelOutput(name="Y", data_type=model_config_pb2.TYPE_FP32, dims=[2])])
    config.dynamic_batching.max_queue_delay_microseconds = delay_us
    if policy is not None:
        config.parameters["batch_policy"].string_value = policy
    runs: list[tuple[int, int]] = []
    sessions = [HeldSession(i, runs) for i in range(replicas)]
    plan = ReplicaPlan(replicas, 1, 1, (CPU_DEVICE,) * replicas, inline=inline)
    model = Model("held", 1, Path("held/1/model.onnx"), config, [Replica(i, s, "cpu") for i, s in enumerate(sessions)],
                  plan, ModelStats(config.max_batch_size))
    return model, sessions, runs


async def _held_infer(model: Model, value: float) -> np.ndarray:
    (y,) = await model.infer((np.full((1, 2), value, np.float32),), 1, (2,))
    return y


@pytest.mark.parametrize("inline", [False, True], ids=["threads", "inline"])
def test_a_burst_pushed_in_one_loop_pass_runs_as_one_batch(inline: bool) -> None:
    """The front end delivers requests in bulk: the first of a burst must not run alone."""
    model, _, runs = _held_model(inline=inline)

    async def main() -> list[np.ndarray]:
        try:
            return await asyncio.gather(*(_held_infer(model, i) for i in range(5)))
        finally:
            await model.close()

    for i, y in enumerate(asyncio.run(main())):
        np.testing.assert_array_equal(y, np.full((1, 2), 2 * i, np.float32))
    assert runs == [(0, 5)]


@pytest.mark.parametrize("policy", [None, "work_conserving", "delay"])
def test_a_lone_request_on_an_idle_model_waits_out_the_delay_only_under_the_delay_policy_in_process(policy: str | None) -> None:
    model, _, runs = _held_model(delay_us=50_000, policy=policy)

    async def main() -> list[float]:
        took = []
        try:
            for _ in range(3):
                start = time.perf_counter()
                await _held_infer(model, 1)
                took.append(time.perf_counter() - start)
            return took
        finally:
            await model.close()

    took = asyncio.run(main())
    assert runs == [(0, 1)] * 3
    if policy == "delay":
        assert min(took) >= 0.05, took
    else:
        assert statistics.median(took) < 0.02, f"lone requests on an idle work-conserving model took {took} s"


def test_requests_gather_while_every_replica_is_busy_and_the_freed_one_takes_up_to_max_rows() -> None:
    model, (session,), runs = _held_model(delay_us=10_000_000)

    async def main() -> list[np.ndarray]:
        try:
            session.release.clear()
            busy = asyncio.create_task(_held_infer(model, -1))
            assert await asyncio.to_thread(session.running.wait, 5)
            queued = [asyncio.create_task(_held_infer(model, i)) for i in range(10)]
            await asyncio.sleep(0.02)
            assert not any(task.done() for task in queued) and runs == [(0, 1)]
            session.release.set()
            return await asyncio.wait_for(asyncio.gather(busy, *queued), 2)
        finally:
            session.release.set()
            await model.close()

    results = asyncio.run(main())
    for i, y in enumerate(results[1:]):
        np.testing.assert_array_equal(y, np.full((1, 2), 2 * i, np.float32))
    assert runs == [(0, 1), (0, 8), (0, 2)], "the freed replica takes what gathered, max_batch_size rows at a time, at once"


def test_while_a_batch_runs_requests_gather_for_the_delay_on_a_free_replica() -> None:
    model, sessions, runs = _held_model(replicas=2, delay_us=200_000)

    async def main() -> tuple[np.ndarray, float]:
        try:
            sessions[0].release.clear()
            busy = asyncio.create_task(_held_infer(model, -1))
            assert await asyncio.to_thread(sessions[0].running.wait, 5)
            started = time.monotonic()
            lone = await asyncio.wait_for(_held_infer(model, 3), 5)
            waited = time.monotonic() - started
            assert not busy.done()
            sessions[0].release.set()
            await busy
            return lone, waited
        finally:
            sessions[0].release.set()
            await model.close()

    lone, waited = asyncio.run(main())
    np.testing.assert_array_equal(lone, np.full((1, 2), 6, np.float32))
    assert waited >= 0.2, "with a batch running, a request gathers company for the queue delay"
    assert runs == [(0, 1), (1, 1)], "then it runs on the free replica, not behind the busy one"


def test_an_unknown_batch_policy_fails_the_load_naming_the_allowed_values(tmp_path: Path) -> None:
    model_dir = add_sub_model(tmp_path, config='name: "add_sub"\nmax_batch_size: 8\n'
                                                'parameters { key: "batch_policy" value { string_value: "fifo" } }\n')
    expected = r"model 'add_sub': parameter 'batch_policy' must be one of \['work_conserving', 'delay'\], got 'fifo'"
    with pytest.raises(LoadError, match=expected):
        Model.load("add_sub", 1, model_dir / "1" / "model.onnx", read_config(model_dir), Settings(cpus=1), StatsStore())
