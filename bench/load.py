"""The load generator: closed-loop unary ModelInfer load, with latency, errors and server CPU.

Two clients drive the same servers. `h2load` (Debian's nghttp2-client) is compiled and replays one
gRPC-framed ModelInferRequest as an HTTP/2 POST, so it is not the bottleneck at peak rates; it cannot
read gRPC status (that travels in trailers), so failures come from the server's ModelStatistics and
from the response bytes received. The Python client (grpc.aio) is slower but sees every status and
can vary the input: "fixed" (one input), "random" (cycles through distinct random inputs), "zipf"
(reuse with s=1.1 over the pool) and "replay" (rows of a `.npy` file in order).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.models import INPUT_NAME, OUTPUT_NAME
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc

MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
DISTRIBUTIONS = ("fixed", "random", "zipf", "replay")
ZIPF_EXPONENT = 1.1
MAX_CONNECTIONS = 8
GRPC_PREFIX_SIZE = 5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_H2LOAD_INSTALL_HINT = "h2load not found on PATH: install it with `apt-get install -y nghttp2-client`"


@dataclass
class LoadResult:
    """One measured run: what was sent, what came back, and what it cost the server."""

    client: str
    model: str
    concurrency: int
    distribution: str
    duration_s: float
    requests: int
    errors: dict[str, int]
    throughput_rps: float
    latency_ms: dict[str, float]
    server_cpu_s: float
    cpu_us_per_request: float
    client_cpu_s: float
    server_stats: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def infer_request(model: str, rows: np.ndarray) -> pb.ModelInferRequest:
    """Return a ModelInferRequest carrying `rows` (2-D fp32) as raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return request


def grpc_frame(message: bytes) -> bytes:
    """Prefix a serialized message with gRPC's 5-byte header (uncompressed flag, big-endian length)."""
    return b"\x00" + len(message).to_bytes(GRPC_PREFIX_SIZE - 1, "big") + message


def input_pool(
    distribution: str, in_features: int, pool_size: int, seed: int, replay: Path | None = None
) -> np.ndarray:
    """Return the distinct inputs a run draws from, one row each, shape (n, in_features)."""
    if distribution == "replay":
        if replay is None:
            raise ValueError("the replay distribution needs a .npy file of rows (--replay PATH)")
        rows = np.load(replay).astype(np.float32, copy=False)
        if rows.ndim != 2 or rows.shape[1] != in_features:
            raise ValueError(f"{replay} holds shape {rows.shape}; expected (n, {in_features})")
        return rows
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    count = 1 if distribution == "fixed" else pool_size
    return np.random.default_rng(seed).standard_normal((count, in_features), dtype=np.float32)


def input_order(distribution: str, pool_len: int, length: int, seed: int) -> np.ndarray:
    """Return pool indices in the order requests use them (cycled when a run outlasts them)."""
    if distribution == "zipf":
        weights = np.arange(1, pool_len + 1, dtype=np.float64) ** -ZIPF_EXPONENT
        return np.random.default_rng(seed).choice(pool_len, size=length, p=weights / weights.sum())
    return np.arange(pool_len)


def latency_summary(latencies_s: np.ndarray) -> dict[str, float]:
    """Return mean and p50/p90/p99/p99.9 latency in milliseconds."""
    if latencies_s.size == 0:
        return {}
    ms = latencies_s * 1e3
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "p99.9": float(p999)}


def connections_for(concurrency: int) -> int:
    """Spread `concurrency` streams evenly over up to MAX_CONNECTIONS connections, so a multi-process
    front end sees several sockets while each connection still multiplexes."""
    return math.gcd(concurrency, MAX_CONNECTIONS)


class ProcessTreeCPU:
    """CPU seconds (user + system) used by a process and all its live descendants, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def seconds(self) -> float:
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    text = (entry / "stat").read_text()
                except OSError:
                    continue
                fields = text[text.rindex(")") + 2 :].split()
                stats[int(entry.name)] = (int(fields[1]), sum(int(value) for value in fields[11:15]))
        tree, frontier = set(), [self.pid]
        while frontier:
            pid = frontier.pop()
            tree.add(pid)
            frontier += [child for child, (ppid, _) in stats.items() if ppid == pid and child not in tree]
        return sum(stats[pid][1] for pid in tree if pid in stats) / _CLOCK_TICKS


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


async def verify(target: str, model: str, rows: np.ndarray, expected: np.ndarray, rtol: float = 1e-3) -> dict:
    """Send each row of `rows` as its own request, all at once, and compare outputs to `expected`.

    Requests go concurrently so a batching server mixes them; a mismatch means rows were mixed up,
    corrupted or dropped, not that the server is slow.
    """
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        outcomes = await asyncio.gather(
            *(stub.ModelInfer(infer_request(model, row[None, :]), timeout=30) for row in rows),
            return_exceptions=True,
        )
    errors: Counter = Counter()
    mismatched = 0
    for outcome, want in zip(outcomes, expected):
        if isinstance(outcome, grpc.aio.AioRpcError):
            errors[outcome.code().name] += 1
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        output = outcome.outputs[0] if outcome.outputs else None
        if (
            output is None
            or output.name != OUTPUT_NAME
            or output.datatype != "FP32"
            or list(output.shape) != [1, want.size]
            or not np.allclose(np.frombuffer(outcome.raw_output_contents[0], np.float32), want, rtol=rtol, atol=1e-4)
        ):
            mismatched += 1
    return {"checked": len(rows), "mismatched": mismatched, "errors": dict(errors)}


def run_h2load(
    target: str,
    model: str,
    body: bytes,
    response_size: int,
    concurrency: int,
    duration_s: float,
    server_pid: int,
) -> LoadResult:
    """Replay `body` (a serialized ModelInferRequest) with h2load at `concurrency` in flight.

    `response_size` is the serialized size of a correct response; HTTP/2 exchanges that carried
    fewer response bytes than that are counted as errors under "no_response_body", since a gRPC
    error is a trailers-only response that h2load still counts as HTTP 200.
    """
    if shutil.which("h2load") is None:
        raise RuntimeError(_H2LOAD_INSTALL_HINT)
    connections = connections_for(concurrency)
    with tempfile.TemporaryDirectory(prefix="hotpath-h2load-") as workdir:
        body_path, log_path = Path(workdir) / "body", Path(workdir) / "latency.tsv"
        body_path.write_bytes(grpc_frame(body))
        command = [
            "h2load",
            f"--clients={connections}",
            f"--max-concurrent-streams={concurrency // connections}",
            "--threads=1",
            f"--data={body_path}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"http://{target}{MODEL_INFER_PATH}",
        ]
        cpu = ProcessTreeCPU(server_pid)
        cpu_before = cpu.seconds()
        summary, client_cpu = _h2load(command + [f"--duration={max(1, round(duration_s * 1000))}ms", f"--log-file={log_path}"])
        server_cpu = cpu.seconds() - cpu_before
        log = np.loadtxt(log_path, dtype=np.int64, ndmin=2)
    latencies = log[:, 2] / 1e6 if log.size else np.empty(0)
    errors = {"h2load_" + key: summary[key] for key in ("failed", "errored", "timeout") if summary[key]}
    answered = round(summary["data_bytes"] / (GRPC_PREFIX_SIZE + response_size))
    if summary["succeeded"] > answered:
        errors["no_response_body"] = summary["succeeded"] - answered
    requests = min(summary["succeeded"], answered)
    return LoadResult(
        client="h2load",
        model=model,
        concurrency=concurrency,
        distribution="fixed",
        duration_s=summary["elapsed_s"],
        requests=requests,
        errors=errors,
        throughput_rps=requests / summary["elapsed_s"],
        latency_ms=latency_summary(latencies),
        server_cpu_s=server_cpu,
        cpu_us_per_request=server_cpu / max(requests, 1) * 1e6,
        client_cpu_s=client_cpu,
    )


def _h2load(command: list[str]) -> tuple[dict, float]:
    """Run h2load and return its parsed summary and the CPU seconds it used."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        output,
    )
    finished = re.search(r"finished in ([\d.]+)(m?s)", output)
    traffic = re.search(r"\((\d+)\) data", output)
    if process.returncode != 0 or not (counts and finished and traffic):
        raise RuntimeError(f"h2load failed (exit {process.returncode}): {' '.join(command)}\n{output}")
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    summary = dict(zip(keys, map(int, counts.groups())), elapsed_s=elapsed)
    summary["data_bytes"] = int(traffic.group(1))
    return summary, usage.ru_utime + usage.ru_stime


async def _python_load(
    target: str, bodies: list[bytes], order: np.ndarray, concurrency: int, seconds: float
) -> tuple[np.ndarray, Counter, float]:
    """Closed loop: `concurrency` coroutines each send, await, repeat, until `seconds` pass."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections_for(concurrency))
    ]
    calls = [channel.unary_unary(MODEL_INFER_PATH) for channel in channels]
    latencies: list[float] = []
    errors: Counter = Counter()
    next_index = itertools.count()
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(call) -> None:
        clock = time.perf_counter
        while clock() < deadline:
            body = bodies[order[next(next_index) % len(order)]]
            sent = clock()
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                continue
            latencies.append(clock() - sent)

    await asyncio.gather(*(worker(calls[index % len(calls)]) for index in range(concurrency)))
    elapsed = time.perf_counter() - start
    for channel in channels:
        await channel.close()
    return np.asarray(latencies), errors, elapsed


def run_python(
    target: str,
    model: str,
    rows: np.ndarray,
    order: np.ndarray,
    distribution: str,
    concurrency: int,
    duration_s: float,
    server_pid: int,
) -> LoadResult:
    """Drive the server from grpc.aio, one row per request, rows drawn from `rows` in `order`."""
    bodies = [infer_request(model, row[None, :]).SerializeToString() for row in rows]
    cpu = ProcessTreeCPU(server_pid)
    cpu_before, client_before = cpu.seconds(), time.process_time()
    latencies, errors, elapsed = asyncio.run(_python_load(target, bodies, order, concurrency, duration_s))
    server_cpu = cpu.seconds() - cpu_before
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
    )
