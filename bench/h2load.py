"""h2load runs at a chosen connection layout (`-c` connections x `-m` streams each), and reading h2load's output.

The issue's targets name the layout (64 in flight over 4 connections, and over 1), so the bench sets
it here rather than letting the load generator spread streams over connections its own way. h2load
replays one gRPC-framed request; it cannot read gRPC status (trailers), so an exchange that carried
fewer response bytes than a correct response counts as an error under `no_response_body`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench import procfs
from bench.loadgen import GRPC_PREFIX_SIZE, MODEL_INFER_PATH, LoadResult, grpc_frame, latency_summary

INSTALL_HINT = "h2load not found on PATH: install it with `apt-get install -y nghttp2-client`"
_COUNTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s),")
_DATA = re.compile(r"\((\d+)\) data")
_COUNT_KEYS = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")


def parse_summary(output: str) -> dict:
    """Read h2load's closing summary: request counts, `elapsed_s` and response `data_bytes`.

    Raises ValueError naming what is missing when the output has no summary (h2load failed to start,
    or could not connect).
    """
    counts, finished, data = _COUNTS.search(output), _FINISHED.search(output), _DATA.search(output)
    missing = [name for name, match in (("requests", counts), ("finished in", finished), ("traffic", data))
               if match is None]
    if missing:
        raise ValueError(f"h2load output has no {', '.join(missing)} line; it reads:\n{output[-2000:]}")
    summary: dict = dict(zip(_COUNT_KEYS, map(int, counts.groups())))
    summary["elapsed_s"] = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    summary["data_bytes"] = int(data.group(1))
    return summary


def layout(in_flight: int, connections: int) -> tuple[int, int]:
    """(connections, streams per connection) for `in_flight` requests over at most `connections`."""
    if in_flight < 1 or connections < 1:
        raise ValueError(f"in_flight and connections must be at least 1, got {in_flight} and {connections}")
    used = min(connections, in_flight)
    if in_flight % used:
        raise ValueError(f"in_flight must be a multiple of connections, got {in_flight} over {used}")
    return used, in_flight // used


def command(url: str, body_path: Path, log_path: Path, connections: int, streams: int, duration_s: float,
            rate_rps: float | None = None) -> list[str]:
    """The h2load command line: one client thread, gRPC headers, `connections` x `streams` in flight."""
    line = [
        "h2load", "--threads=1", f"--clients={connections}", f"--max-concurrent-streams={streams}",
        f"--data={body_path}", "--header=content-type: application/grpc", "--header=te: trailers",
        f"--duration={max(1, round(duration_s * 1000))}ms", f"--log-file={log_path}",
    ]
    if rate_rps is not None:
        line.append(f"--rps={rate_rps / connections:g}")
    return [*line, url]


def run(target: str, model: str, body: bytes, response_size: int, in_flight: int, connections: int,
        duration_s: float, server_pid: int, rate_rps: float | None = None) -> LoadResult:
    """Replay `body` (a serialized ModelInferRequest) at `in_flight` over `connections` for `duration_s`.

    `response_size` is a correct response's serialized size. The server's CPU (its threads and live
    descendants, from /proc) is read just before h2load starts and just after it exits.
    """
    if shutil.which("h2load") is None:
        raise RuntimeError(INSTALL_HINT)
    used, streams = layout(in_flight, connections)
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-h2load-") as workdir:
        body_path, log_path = Path(workdir) / "body", Path(workdir) / "latency.tsv"
        body_path.write_bytes(grpc_frame(body))
        line = command(f"http://{target}{MODEL_INFER_PATH}", body_path, log_path, used, streams, duration_s, rate_rps)
        cpu_before = procfs.cpu_seconds(server_pid)
        process = subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        server_cpu = procfs.cpu_seconds(server_pid) - cpu_before
        process.returncode = os.waitstatus_to_exitcode(status)
        try:
            if process.returncode != 0:
                raise ValueError(f"exit {process.returncode}")
            summary = parse_summary(output)
        except ValueError as error:
            raise RuntimeError(f"h2load failed ({error}): {' '.join(line)}\n{output[-2000:]}") from None
        log = np.loadtxt(log_path, dtype=np.int64, ndmin=2) if log_path.stat().st_size else np.empty((0, 3))
    latencies_s = log[:, 2] / 1e6 if log.size else np.empty(0)
    errors = {"h2load_" + key: summary[key] for key in ("failed", "errored", "timeout") if summary[key]}
    answered = round(summary["data_bytes"] / (GRPC_PREFIX_SIZE + response_size))
    if summary["succeeded"] > answered:
        errors["no_response_body"] = summary["succeeded"] - answered
    requests = min(summary["succeeded"], answered)
    return LoadResult(
        client="h2load", model=model, concurrency=in_flight, distribution="fixed",
        duration_s=summary["elapsed_s"], requests=requests, errors=errors,
        throughput_rps=requests / summary["elapsed_s"], latency_ms=latency_summary(latencies_s),
        server_cpu_s=server_cpu, cpu_us_per_request=server_cpu / max(requests, 1) * 1e6,
        client_cpu_s=usage.ru_utime + usage.ru_stime, rate_rps=rate_rps,
    )
