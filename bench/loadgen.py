"""The load generator behind `bench/` and `hotpath tune`: drives a running server, measures what it did.

It lives with the bench, not in the server package: `hotpath tune` imports it when run, from a checkout.
Requests are built by the client package's builder (`hotpath_client`), datatypes come from
`hotpath.serving.datatypes`, and servers are launched by `bench.server_process`.

Two clients. `h2load` (Debian's nghttp2-client, driven by `bench.h2load`) is compiled and replays one gRPC-framed
ModelInferRequest as an HTTP/2 POST, so it is not the bottleneck at peak rates; it cannot read gRPC
status (that travels in trailers), so failures come from the response bytes received and from the
server's ModelStatistics. The Python client (grpc.aio) is slower but sees every status, sends distinct
inputs (see `DISTRIBUTIONS`), and speaks both ModelInfer and the ModelStreamInfer stream.

Both run closed-loop (a fixed number of requests in flight) or open-loop (requests arrive at a fixed
rate whatever the server does: Poisson arrivals in Python, evenly spaced in h2load). Open-loop latency
counts from when a request was due, so a client or server that falls behind shows in the tail.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from bench import procfs
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc
from hotpath.serving.config import TensorSpec, tensor_specs
from hotpath.serving.datatypes import DATATYPES
from hotpath_client._tensors import infer_request

MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
DISTRIBUTIONS = ("fixed", "random", "zipf", "replay")
ZIPF_EXPONENT = 1.1
MAX_CONNECTIONS = 8
GRPC_PREFIX_SIZE = 5
REQUEST_TIMEOUT_S = 30.0
NUMERIC_DATATYPES = tuple(name for name, datatype in DATATYPES.items() if datatype.itemsize)
"""The datatypes the load generator can make inputs of (every one but BYTES)."""
STREAM_ERROR = "STREAM_ERROR"
"""Errors key for a stream response that carried `error_message` (streams have no per-request status)."""
CLIENT_BACKLOG = "CLIENT_BACKLOG"
"""Errors key for open-loop arrivals dropped because `max_in_flight` requests were already outstanding."""
_REQUEST_ID_TAG = b"\x1a"
"""ModelInferRequest.id is field 3, length-delimited: appended to a serialized request, it sets the id."""


@dataclass
class LoadResult:
    """One measured run: what was sent, what came back, and what it cost the server."""

    client: str
    model: str
    concurrency: int
    """Closed loop: requests in flight. Open loop: the most allowed in flight before arrivals are dropped."""
    distribution: str
    duration_s: float
    requests: int
    errors: dict[str, int]
    throughput_rps: float
    latency_ms: dict[str, float]
    server_cpu_s: float
    cpu_us_per_request: float
    client_cpu_s: float
    rate_rps: float | None = None
    """Open loop: the offered arrival rate; None for a closed-loop run."""
    streaming: bool = False
    server_stats: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def model_inputs(target: str, model: str) -> tuple[list[TensorSpec], bool]:
    """Read `model`'s inputs from a running server's ModelConfig; returns them and whether it batches.

    Variable dims (-1) become 1. Only numeric inputs can be generated; BYTES inputs raise ValueError.
    """
    with grpc.insecure_channel(target) as channel:
        config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            pb.ModelConfigRequest(name=model), timeout=10).config
    specs = []
    for spec in tensor_specs(config.input):
        if spec.datatype.itemsize == 0:
            raise ValueError(f"model '{model}' input '{spec.name}' is {spec.datatype.name}: the load generator only "
                             f"makes numeric inputs ({', '.join(NUMERIC_DATATYPES)})")
        specs.append(replace(spec, dims=tuple(max(1, dim) for dim in spec.dims)))
    return specs, config.max_batch_size > 0


def input_pool(distribution: str, specs: Sequence[TensorSpec], pool_size: int, seed: int,
               replay: Path | None = None) -> dict[str, np.ndarray]:
    """Return the distinct inputs a run draws from: per input name, an array of shape (n, *dims).

    `fixed` is one input, `random` and `zipf` are `pool_size` seeded random ones, and `replay` is the
    rows of a `.npy` file (single-input models), in file order.
    """
    if distribution == "replay":
        if replay is None:
            raise ValueError("the replay distribution needs a .npy file of rows (--replay PATH)")
        if len(specs) != 1:
            raise ValueError(f"--replay feeds one input, but the model has {len(specs)}: {[s.name for s in specs]}")
        (spec,) = specs
        rows = np.load(replay).astype(spec.datatype.dtype, copy=False)
        if rows.shape[1:] != spec.dims:
            raise ValueError(f"{replay} holds shape {rows.shape}; expected (n, {', '.join(map(str, spec.dims))})")
        return {spec.name: rows}
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    count = 1 if distribution == "fixed" else pool_size
    rng = np.random.default_rng(seed)
    pool = {}
    for spec in specs:
        dtype = spec.datatype.dtype
        if dtype.kind == "f":
            pool[spec.name] = rng.standard_normal((count, *spec.dims)).astype(dtype)
        elif dtype.kind == "b":
            pool[spec.name] = rng.integers(0, 2, (count, *spec.dims)).astype(dtype)
        else:
            pool[spec.name] = rng.integers(0, min(100, np.iinfo(dtype).max), (count, *spec.dims)).astype(dtype)
    return pool


def input_order(distribution: str, pool_len: int, length: int, seed: int) -> np.ndarray:
    """Return pool indices in the order requests use them (cycled when a run outlasts them)."""
    if distribution == "zipf":
        weights = np.arange(1, pool_len + 1, dtype=np.float64) ** -ZIPF_EXPONENT
        return np.random.default_rng(seed).choice(pool_len, size=length, p=weights / weights.sum())
    return np.arange(pool_len)


def request_bodies(model: str, pool: Mapping[str, np.ndarray], batched: bool = True) -> list[bytes]:
    """Serialize one request per pool entry: one row each (a batch of 1 when the model batches)."""
    count = len(next(iter(pool.values())))
    return [
        infer_request(model, {name: rows[i : i + 1] if batched else rows[i] for name, rows in pool.items()},
                      None, "", "").SerializeToString()
        for i in range(count)
    ]


def grpc_frame(message: bytes) -> bytes:
    """Prefix a serialized message with gRPC's 5-byte header (uncompressed flag, big-endian length)."""
    return b"\x00" + len(message).to_bytes(GRPC_PREFIX_SIZE - 1, "big") + message


def latency_summary(latencies_s: np.ndarray) -> dict[str, float]:
    """Return mean and p50/p90/p99/p99.9 latency in milliseconds."""
    if latencies_s.size == 0:
        return {}
    ms = latencies_s * 1e3
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "p99.9": float(p999)}


def connections_for(concurrency: int) -> int:
    """Spread `concurrency` streams evenly over up to MAX_CONNECTIONS connections, so the server sees
    several sockets, as from several clients, while each connection still multiplexes."""
    return math.gcd(concurrency, MAX_CONNECTIONS)


def model_statistics(target: str, model: str) -> pb.ModelStatistics:
    """Return the server's cumulative statistics for `model`."""
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    return next(stats for stats in response.model_stats if stats.name == model)


def statistics_delta(before: pb.ModelStatistics, after: pb.ModelStatistics) -> dict:
    """Return what the server counted between two ModelStatistics snapshots, batch sizes included."""

    def executions(stats: pb.ModelStatistics) -> Counter:
        return Counter({entry.batch_size: entry.compute_infer.count for entry in stats.batch_stats})

    batches = executions(after) - executions(before)
    before_infer, after_infer = before.inference_stats, after.inference_stats
    return {
        "success": after_infer.success.count - before_infer.success.count,
        "fail": after_infer.fail.count - before_infer.fail.count,
        "inference_count": after.inference_count - before.inference_count,
        "execution_count": after.execution_count - before.execution_count,
        "batch_size_executions": {str(size): batches[size] for size in sorted(batches)},
    }


class StreamFailed(Exception):
    """A ModelStreamInfer response carried `error_message` for this request."""


class _Stream:
    """One ModelStreamInfer stream with many requests in flight, matched to responses by request id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = channel.stream_stream(MODEL_STREAM_INFER_PATH)()
        self.pending: dict[bytes, asyncio.Future] = {}
        self.ids = itertools.count()
        self.write_lock = asyncio.Lock()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, body: bytes, timeout: float) -> None:
        request_id = str(next(self.ids)).encode()
        future = self.pending[request_id] = asyncio.get_running_loop().create_future()
        async with self.write_lock:
            await self.call.write(body + _REQUEST_ID_TAG + bytes([len(request_id)]) + request_id)
        await asyncio.wait_for(future, timeout)

    async def _read(self) -> None:
        try:
            async for raw in self.call:
                response = pb.ModelStreamInferResponse.FromString(raw)
                future = self.pending.pop(response.infer_response.id.encode(), None)
                if future is None or future.done():
                    continue
                if response.error_message:
                    future.set_exception(StreamFailed(response.error_message))
                else:
                    future.set_result(None)
        except grpc.aio.AioRpcError as error:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()

    async def close(self) -> None:
        await self.call.done_writing()
        self.reader.cancel()


async def _python_load(
    target: str, bodies: list[bytes], order: np.ndarray, concurrency: int, seconds: float,
    rate_rps: float | None, streaming: bool, seed: int,
) -> tuple[np.ndarray, Counter, float]:
    """Send requests until `seconds` pass: closed loop (`concurrency` senders each send, await, repeat)
    or, with `rate_rps`, open loop (Poisson arrivals, at most `concurrency` outstanding)."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections_for(concurrency))
    ]
    await asyncio.gather(*(channel.channel_ready() for channel in channels))
    if streaming:
        streams = [_Stream(channel) for channel in channels]
        senders: list[Callable[[bytes], Awaitable]] = [
            lambda body, stream=stream: stream.send(body, REQUEST_TIMEOUT_S) for stream in streams]
    else:
        calls = [channel.unary_unary(MODEL_INFER_PATH) for channel in channels]
        senders = [lambda body, call=call: call(body, timeout=REQUEST_TIMEOUT_S) for call in calls]
    latencies: list[float] = []
    errors: Counter = Counter()
    next_index = itertools.count()
    clock = time.perf_counter

    async def one(send: Callable[[bytes], Awaitable], due: float) -> None:
        body = bodies[order[next(next_index) % len(order)]]
        try:
            await send(body)
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1
        except StreamFailed:
            errors[STREAM_ERROR] += 1
        except asyncio.TimeoutError:
            errors[grpc.StatusCode.DEADLINE_EXCEEDED.name] += 1
        else:
            latencies.append(clock() - due)

    start = clock()
    deadline = start + seconds
    if rate_rps is None:
        async def sender(send: Callable[[bytes], Awaitable]) -> None:
            while clock() < deadline:
                await one(send, clock())

        await asyncio.gather(*(sender(senders[index % len(senders)]) for index in range(concurrency)))
    else:
        gaps = np.random.default_rng(seed).exponential(1.0 / rate_rps, size=int(rate_rps * seconds * 1.5) + 64)
        outstanding: set[asyncio.Task] = set()
        for number, due in enumerate(start + np.cumsum(gaps)):
            if due >= deadline:
                break
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if len(outstanding) >= concurrency:
                errors[CLIENT_BACKLOG] += 1
                continue
            task = asyncio.create_task(one(senders[number % len(senders)], float(due)))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        await asyncio.gather(*outstanding)
    elapsed = clock() - start
    if streaming:
        await asyncio.gather(*(stream.close() for stream in streams))
    for channel in channels:
        await channel.close()
    return np.asarray(latencies), errors, elapsed


def run_python(
    target: str,
    model: str,
    bodies: list[bytes],
    order: np.ndarray,
    distribution: str,
    concurrency: int,
    duration_s: float,
    server_pid: int,
    rate_rps: float | None = None,
    streaming: bool = False,
    seed: int = 0,
) -> LoadResult:
    """Drive the server from grpc.aio with `bodies` (serialized ModelInferRequests) sent in `order`.

    Closed loop keeps `concurrency` requests in flight; with `rate_rps`, requests arrive as a seeded
    Poisson process and at most `concurrency` may be outstanding (later arrivals count as CLIENT_BACKLOG
    errors). `streaming` sends them over ModelStreamInfer streams (one per connection) instead of ModelInfer.
    """
    cpu_before, client_before = procfs.cpu_seconds(server_pid), time.process_time()
    latencies, errors, elapsed = asyncio.run(
        _python_load(target, bodies, order, concurrency, duration_s, rate_rps, streaming, seed))
    server_cpu = procfs.cpu_seconds(server_pid) - cpu_before
    return LoadResult(
        client="python",
        model=model,
        concurrency=concurrency,
        distribution=distribution,
        duration_s=elapsed,
        requests=int(latencies.size),
        errors=dict(errors),
        throughput_rps=latencies.size / elapsed,
        latency_ms=latency_summary(latencies),
        server_cpu_s=server_cpu,
        cpu_us_per_request=server_cpu / max(latencies.size, 1) * 1e6,
        client_cpu_s=time.process_time() - client_before,
        rate_rps=rate_rps,
        streaming=streaming,
    )


def overlay_repository(source: Path, dest: Path, models: Sequence[str], configs: Mapping[str, str]) -> Path:
    """Make `dest` a model repository serving `models` from `source`, with `configs[name]` (pbtxt text)
    in place of a model's own config.pbtxt. Everything else is symlinked, so nothing large is copied."""
    for name in models:
        if not (source / name).is_dir():
            raise ValueError(f"model '{name}' is not in {source}: expected a directory {source / name}")
        model_dir = dest / name
        model_dir.mkdir(parents=True)
        for entry in (source / name).iterdir():
            if entry.name != "config.pbtxt":
                (model_dir / entry.name).symlink_to(entry.resolve())
        if name in configs:
            (model_dir / "config.pbtxt").write_text(configs[name])
        elif (source / name / "config.pbtxt").exists():
            (model_dir / "config.pbtxt").write_text((source / name / "config.pbtxt").read_text())
    return dest
