"""Benchmark hotpath against its peers and print the ratios the issue sets as targets, all from one run.

The peers: the gRPC floor (a grpc++ server answering every call with one canned response,
`bench.floor`), PyTriton serving the same models (`bench.pytriton_server`), the naive grpcio server
(`bench.naive_server`) and in-process ONNX Runtime (`bench.ceiling`). Generates the bench models,
measures the ceiling and a bare session's memory, then starts each server on 127.0.0.1 in turn and
drives it, one row per request: over a sweep of requests in flight (closed loop, the default) or
of offered request rates (`--mode open`). Writes `bench/results/<timestamp>.json` and a PNG of
throughput and p99 against the sweep, and prints the target ratios, server CPU per request and
memory. Exits non-zero when a server returned wrong outputs or errors.

    python -m bench.run            # full run, about 8 minutes
    python -m bench.run --quick    # a few minutes: what the targets need
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import onnxruntime as ort

from bench import ceiling, floor, h2load, load, plotting, procfs, pytriton_server, targets
from bench.loadgen import connections_for
from bench.models import INPUT_NAME, MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, MODELS, write_repository
from bench.server_process import ServerProcess
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc
from hotpath_client._proto import grpc_service_pb2 as client_pb

BENCH_DIR = Path(__file__).resolve().parent
FLOOR_CACHE = BENCH_DIR / "results" / "cache"
SERVERS = ("naive", "hotpath", "floor", "pytriton")
SWEEP = (1, 4, 16, 64)
RATES = (500, 2000)
CONNECTIONS = 4
VERIFY_ROWS = 64
PLOT_COLORS = {"hotpath": "tab:orange", "naive": "tab:blue", "floor": "tab:green", "pytriton": "tab:purple"}
FLOOR_NOTE = ("floor: measured with h2load only; correctness checks skipped (it answers every call with one "
              "canned response and has no ModelStatistics, ServerReady or metadata)")


class Scenario(NamedTuple):
    """One measured load: `level` is requests in flight (closed loop) or requests/s (open loop), spread
    over `connections` (h2load; the Python client spreads its own way)."""

    model: str
    level: float
    connections: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(server: str, repository: Path, port: int, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The command line that starts `server` ("naive" or "hotpath"); `extra` is appended (hotpath serve flags).

    hotpath's metrics endpoint is off unless `extra` turns it on, so several servers can run at once.
    """
    if server == "naive":
        program = [sys.executable, "-m", "bench.naive_server"]
    else:
        program = [sys.executable, "-m", "hotpath.cli", "serve", "--metrics-port", "0"]
    return program + ["--model-repository", str(repository), "--host", "127.0.0.1", "--port", str(port), *extra]


def pytriton_command(python: Path, repository: Path, models: list[str], port: int) -> list[str]:
    """The command line that serves `models` from `repository` with PyTriton, batching as hotpath is configured."""
    return [str(python), "-m", "bench.pytriton_server", "--model-repository", str(repository),
            "--models", ",".join(models), "--host", "127.0.0.1", "--port", str(port),
            "--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue-delay-us", str(MAX_QUEUE_DELAY_US)]


def start_server(name: str, command: list[str], log_path: Path, port: int) -> ServerProcess:
    """A ServerProcess for `command`, run from the repository root so `python -m bench...` resolves."""
    return ServerProcess(name, command, log_path, port, cwd=BENCH_DIR.parent)


def hotpath_unavailable() -> str | None:
    """Say why `hotpath serve` cannot run here, or None when it can."""
    if importlib.util.find_spec("hotpath.cli") is None:
        return "hotpath.cli does not exist yet (server/hotpath/cli.py), so `hotpath serve` cannot start"
    return None


def wait_models_ready(target: str, models: list[str], timeout_s: float = 180.0) -> None:
    """Block until every model answers ModelReady; a server may be ready before its models are (PyTriton
    binds them after Triton starts)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model in models:
            while True:
                try:
                    if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"model {model!r} on {target} not ready after {timeout_s:.0f}s")
                time.sleep(0.1)


def try_statistics(target: str, model: str) -> pb.ModelStatistics | None:
    """ModelStatistics for `model`, or None when the server does not implement the RPC."""
    try:
        return load.model_statistics(target, model)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


def h2load_request(model: str, args: argparse.Namespace) -> client_pb.ModelInferRequest:
    """The one request h2load replays for `model` (and the floor's canned response answers)."""
    rows = load.input_rows("fixed", MODELS[model].in_features, args.pool_size, args.seed)
    return load.infer_request(model, rows[:1])


def measure(server: ServerProcess | floor.CannedServer, scenario: Scenario, args: argparse.Namespace,
            session: ort.InferenceSession | None, response_size: int | None = None) -> dict:
    """One scenario against a started server: warm-up, a measured run, the server's statistics over it,
    then an output check; returns the run's JSON.

    With `session` None the server is not checked (the floor): no statistics, no verification, and
    `response_size` (a correct response's size) is given rather than asked of the server.
    """
    model, level = scenario.model, scenario.level
    spec = MODELS[model]
    open_loop = args.mode == "open"
    concurrency = args.max_in_flight if open_loop else int(level)
    rate = float(level) if open_loop else None
    drive: Callable[[float], load.LoadResult]
    try:
        if args.client == "h2load":
            request = h2load_request(model, args)
            connections = h2load.layout(concurrency, scenario.connections)[0]
            if response_size is None:
                with grpc.insecure_channel(server.target) as channel:
                    response_size = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request).ByteSize()
            body = request.SerializeToString()

            def drive(seconds: float) -> load.LoadResult:
                return h2load.run(server.target, model, body, response_size, concurrency, connections, seconds,
                                  server.process.pid, rate)
        else:
            rows = load.input_rows(args.distribution, spec.in_features, args.pool_size, args.seed, args.replay)
            bodies = [load.infer_request(model, row[None, :]).SerializeToString() for row in rows]
            order = load.input_order(args.distribution, len(rows), 1 << 20, args.seed)
            connections = connections_for(concurrency)

            def drive(seconds: float) -> load.LoadResult:
                return load.run_python(server.target, model, bodies, order, args.distribution, concurrency, seconds,
                                       server.process.pid, rate, args.streaming, args.seed)
        if args.warmup > 0:
            drive(args.warmup)
        before = try_statistics(server.target, model) if session is not None else None
        result = drive(args.duration)
        after = try_statistics(server.target, model) if session is not None else None
    except (RuntimeError, grpc.RpcError):
        server.check_alive(f"during {model} at {level:g} {'requests/s' if open_loop else 'in flight'}")
        raise
    if before is not None and after is not None:
        result.server_stats = load.statistics_delta(before, after)
    if session is None:
        result.verification = {"skipped": "canned response: outputs not checked, no ModelStatistics"}
    else:
        check_rows = np.random.default_rng(args.seed + 1).standard_normal((VERIFY_ROWS, spec.in_features), np.float32)
        expected = session.run(None, {INPUT_NAME: check_rows})[0]
        result.verification = asyncio.run(load.verify(server.target, model, check_rows, expected))
    # h2load stops with requests in flight, warm-up's and the measured run's; Triton counts those it had
    # not run yet as failures, late enough that the warm-up's can land in the measured delta.
    stopped = concurrency * (2 if args.warmup > 0 else 1) if args.client == "h2load" else 0
    return {**result.to_json(), "connections": connections, "cancelled_at_stop_max": stopped}


def summary_line(name: str, run: dict) -> str:
    """One printed line per run: load level, throughput, latency, CPU, errors, verification."""
    level = f"r={run['rate_rps']:<6g}" if run["rate_rps"] is not None else f"c={run['concurrency']:<3}"
    latency = run["latency_ms"]
    verification = run["verification"]
    checked = ("not checked" if "skipped" in verification else
               f"verify {verification['mismatched']} wrong, {verification['errors'] or 0} errors")
    return (f"  {name:8} {run['model']:6} {level} x{run['connections']} conn {run['throughput_rps']:9.0f} req/s  "
            f"p50 {latency.get('p50', math.nan):7.3f} ms  p99 {latency.get('p99', math.nan):7.2f} ms  "
            f"{run['cpu_us_per_request']:6.0f} us CPU/req  errors {run['errors'] or 0}  {checked}")


def measure_server(server: ServerProcess | floor.CannedServer, repository: Path, scenarios: list[Scenario],
                   args: argparse.Namespace, record: dict, checks: bool = True,
                   response_size: int | None = None) -> None:
    """Run every scenario against a started server, verifying outputs after each (unless `checks` is
    off); append each run's JSON to `record["runs"]` as it completes, so a server that dies keeps its
    earlier runs, and record its memory after the large model has run."""
    models = list(dict.fromkeys(scenario.model for scenario in scenarios))
    sessions = {model: ceiling.cpu_session(repository / model / "1" / "model.onnx") if checks else None
                for model in models}
    for scenario in scenarios:
        run = measure(server, scenario, args, sessions[scenario.model], response_size)
        record["runs"].append(run)
        print(summary_line(server.name, run), flush=True)
        if scenario.model == "large":
            record["memory"] = {"after": "large loaded and measured", **procfs.memory(server.process.pid)}


def run_level(run: dict) -> float:
    """Where a run sits on the sweep: its offered rate (open loop) or requests in flight (closed loop)."""
    return run["rate_rps"] if run.get("rate_rps") is not None else run["concurrency"]


def series_label(name: str, run: dict, settings: dict) -> str:
    """The plot series a run belongs to: the server's, or its own for a layout off the sweep's."""
    sweep_layout = settings.get("sweep_connections", {}).get(str(run["concurrency"]))
    if run["client"] != "h2load" or run.get("rate_rps") is not None or run.get("connections") == sweep_layout:
        return name
    return f"{name}, {run['connections']} conn"


def plot(results: dict, path: Path) -> bool:
    """Throughput (top row) and p99 latency (bottom row) against the sweep, one column per model; runs
    over a connection layout other than the sweep's are drawn as their own series."""
    plt = plotting.pyplot(path)
    if plt is None:
        return False

    open_loop = results["settings"]["mode"] == "open"
    models = list(dict.fromkeys(run["model"] for server in results["servers"].values() for run in server["runs"]))
    figure, axes = plt.subplots(2, max(1, len(models)), figsize=(4.5 * max(1, len(models)), 7), squeeze=False)
    for column, model in enumerate(models):
        throughput_axis, latency_axis = axes[0][column], axes[1][column]
        for name, server in results["servers"].items():
            series: dict[str, list[dict]] = {}
            for run in server["runs"]:
                if run["model"] == model:
                    series.setdefault(series_label(name, run, results["settings"]), []).append(run)
            for label, runs in series.items():
                runs.sort(key=run_level)
                levels = [run_level(run) for run in runs]
                style = {"color": PLOT_COLORS.get(name), "marker": "o" if label == name else "s",
                         "linestyle": "-" if label == name else ":", "label": label}
                throughput_axis.plot(levels, [run["throughput_rps"] for run in runs], **style)
                latency_axis.plot(levels, [run["latency_ms"].get("p99") for run in runs], **style)
        if model in results["ceiling"]:
            throughput_axis.axhline(results["ceiling"][model]["batch_64_rows_per_s"], linestyle="--", color="grey",
                                    label="ORT in-process, batch 64")
        throughput_axis.set_title(f"{model}: requests/s (1 row each)")
        latency_axis.set_title(f"{model}: p99 latency (ms)")
        swept = sorted({run_level(run) for server in results["servers"].values() for run in server["runs"]
                        if run["model"] == model})
        for axis in (throughput_axis, latency_axis):
            axis.set_xscale("log", base=2)
            axis.set_xticks(swept, [f"{value:g}" for value in swept])
            axis.set_xlabel("offered requests/s" if open_loop else "requests in flight")
            axis.grid(True, alpha=0.3)
        throughput_axis.set_yscale("log")
        throughput_axis.legend(fontsize="small")
    figure.suptitle(f"hotpath bench, {results['machine']['cpus']} CPUs, client {results['settings']['client']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options `bench.run` and `bench.compare` share."""
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed",
                        help="closed: a fixed number of requests in flight; open: requests arrive at fixed rates")
    parser.add_argument("--concurrency", help=f"closed loop: comma-separated in-flight counts (default: {','.join(map(str, SWEEP))})")
    parser.add_argument("--rate", help=f"open loop: comma-separated requests/s (default: {','.join(map(str, RATES))})")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="open loop: outstanding requests beyond this are dropped and counted (default 256)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help=f"h2load: spread requests in flight over up to this many connections (default {CONNECTIONS})")
    parser.add_argument("--client", choices=("h2load", "python"), default="h2load")
    parser.add_argument("--streaming", action="store_true", help="send over ModelStreamInfer streams (python client)")
    parser.add_argument("--distribution", choices=load.DISTRIBUTIONS, default="fixed",
                        help="input distribution; h2load replays one input, so only 'fixed' works with it")
    parser.add_argument("--replay", type=Path, help=".npy file of rows for --distribution replay")
    parser.add_argument("--pool-size", type=int, default=10_000, help="distinct inputs for random and zipf")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 8, quick 3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 2, quick 1)")
    parser.add_argument("--ceiling-seconds", type=float, help="seconds per ceiling measurement (default 3, quick 1)")
    parser.add_argument("--seed", type=int, default=0)


def check_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, quick: bool) -> None:
    """Reject option combinations the clients cannot do, and fill in the duration defaults."""
    if args.client == "h2load" and args.distribution != "fixed":
        parser.error("h2load replays a single request body; use --client python for other distributions")
    if args.client == "h2load" and args.streaming:
        parser.error("h2load sends unary ModelInfer only; use --client python for --streaming")
    if args.mode == "closed" and args.rate:
        parser.error("--rate sets an open-loop rate: add --mode open")
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, got {args.connections}")
    for name, full, short in (("duration", 8.0, 3.0), ("warmup", 2.0, 1.0), ("ceiling_seconds", 3.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: shorter runs, sweep tiny only, peers run only what the targets compare")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    parser.add_argument("--hotpath-args", default="", help="extra `hotpath serve` flags, e.g. '--cache-size 64MiB'")
    parser.add_argument("--pytriton-python", type=Path,
                        help=f"interpreter with nvidia-pytriton (default: {pytriton_server.DEFAULT_VENV}/bin/python, "
                             "else this one)")
    parser.add_argument("--floor-source", type=Path, help=f"the floor's {floor.SOURCE_NAME} (default: shared/floor/)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for JSON and PNG")
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    check_load_arguments(parser, args, args.quick)
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown:
        parser.error(f"unknown server(s) {', '.join(sorted(unknown))}; choose from {', '.join(SERVERS)}")
    return args


def model_names(args: argparse.Namespace) -> list[str]:
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    return models


def load_levels(args: argparse.Namespace) -> list[float]:
    """The sweep: requests/s in open loop, requests in flight in closed loop."""
    if args.mode == "open":
        return [float(value) for value in args.rate.split(",")] if args.rate else [float(rate) for rate in RATES]
    return [int(value) for value in args.concurrency.split(",")] if args.concurrency else list(SWEEP)


def sweep_connections(args: argparse.Namespace, level: float) -> int:
    """Connections for the sweep at `level`: the most, up to --connections, that divide the requests in flight."""
    in_flight = args.max_in_flight if args.mode == "open" else int(level)
    return math.gcd(in_flight, getattr(args, "connections", CONNECTIONS))


def scenario_list(args: argparse.Namespace) -> list[Scenario]:
    """The sweep: every level per model, or in --quick a tiny sweep plus medium and large at the top
    level, which is what the targets need."""
    models = model_names(args)
    sweep = load_levels(args)
    if getattr(args, "quick", False) and not (args.models or args.concurrency or args.rate):
        pairs = [("tiny", level) for level in sweep] + [(model, max(sweep)) for model in models if model != "tiny"]
    else:
        pairs = [(model, level) for model in models for level in sweep]
    return [Scenario(model, level, sweep_connections(args, level)) for model, level in pairs]


def layout_scenarios(args: argparse.Namespace, sweep: list[Scenario]) -> list[Scenario]:
    """Runs the targets ask for beyond the sweep: a swept closed-loop level over another connection
    layout (tiny at 64 in flight over 1 connection)."""
    if args.mode != "closed" or args.client != "h2load":
        return []
    swept = {(scenario.model, scenario.level) for scenario in sweep}
    wanted = dict.fromkeys(Scenario(target.model, target.in_flight, target.connections) for target in targets.TARGETS
                           if (target.model, target.in_flight) in swept)
    return [scenario for scenario in wanted if scenario not in sweep]


def peer_scenarios(name: str, sweep: list[Scenario], extra: list[Scenario], quick: bool) -> list[Scenario]:
    """What `name` is measured on: hotpath on everything; the floor on tiny only (its canned response is
    tiny's); the others on the sweep. In --quick, peers run only the scenarios a target compares."""
    if name == "hotpath":
        return sweep + extra
    chosen = [scenario for scenario in sweep + extra if scenario.model == "tiny"] if name == "floor" else sweep
    if quick:
        chosen = [scenario for scenario in chosen
                  if targets.needs(name, scenario.model, int(scenario.level), scenario.connections)]
    return chosen


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "grpcio": grpc.__version__, "onnxruntime": ort.__version__}


def measure_ceiling(repository: Path, models: list[str], seconds: float, seed: int) -> dict:
    """In-process ONNX Runtime rows/s at batch 1 and 64 per model, printed as it goes."""
    print(f"ONNX Runtime in-process ceiling, {os.cpu_count()} cores:", flush=True)
    found = {}
    for model in models:
        path = repository / model / "1" / "model.onnx"
        found[model] = {f"batch_{batch}_rows_per_s": ceiling.rows_per_second(path, batch, seconds, seed)
                        for batch in (1, 64)}
        print(f"  {model:6} batch 1 {found[model]['batch_1_rows_per_s']:10.0f} rows/s   "
              f"batch 64 {found[model]['batch_64_rows_per_s']:10.0f} rows/s", flush=True)
    return found


def start_peer(name: str, args: argparse.Namespace, repository: Path, scratch: Path, models: list[str],
               log_path: Path) -> tuple[AbstractContextManager, dict]:
    """The server `name` ready to start (a context manager) and how to measure it (measure_server's
    `checks` and `response_size`). Raises LookupError saying why when it cannot run here."""
    port = free_port()
    if name == "hotpath":
        reason = hotpath_unavailable()
        if reason:
            raise LookupError(reason)
        command = server_command(name, repository, port, shlex.split(args.hotpath_args))
        return start_server(name, command, log_path, port), {}
    if name == "naive":
        return start_server(name, server_command(name, repository, port), log_path, port), {}
    if name == "pytriton":
        python, found = pytriton_server.interpreter(args.pytriton_python)
        if python is None:
            raise LookupError(found)
        print(f"  pytriton: {found}", flush=True)
        return start_server(name, pytriton_command(python, repository, models, port), log_path, port), {}
    if args.client != "h2load":
        raise LookupError("the floor is measured with h2load only (--client h2load)")
    source, found = floor.find_source(args.floor_source)
    if source is None:
        raise LookupError(found)
    try:
        binary = floor.build(source, FLOOR_CACHE)
    except RuntimeError as error:
        raise LookupError(str(error)) from None
    response = floor.canned_response("tiny", repository / "tiny" / "1" / "model.onnx", h2load_request("tiny", args))
    response_path = scratch / "floor-response.pb"
    response_path.write_bytes(response)
    print(f"  {FLOOR_NOTE}\n  floor: {binary} serving a {len(response)}-byte tiny response with "
          f"{floor.THREADS} threads", flush=True)
    server = floor.CannedServer(name, binary, response_path, log_path, port)
    return server, {"checks": False, "response_size": len(response)}


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a stopped server's process group. A server whose leader exited on its
    own (PyTriton's Python after tritonserver crashed) is not signalled when it is stopped, and its
    Triton Python-backend stubs would live on."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_peer(name: str, args: argparse.Namespace, repository: Path, scratch: Path, plan: list[Scenario],
             log_stem: Path, record: dict) -> None:
    """Start `name` and measure it on `plan`, filling `record`. A server that dies during a scenario is
    restarted and the scenario retried; dying twice in one scenario fails it. Each crash is kept in
    `record["crashes"]` with the end of its log, and the runs before and after it still count.

    Raises LookupError when the server cannot run here, RuntimeError when it failed.
    """
    pending, attempt = list(plan), 0
    served = list(dict.fromkeys(scenario.model for scenario in plan))
    while pending:
        log_path = log_stem.with_name(f"{log_stem.name}{f'-restart{attempt}' if attempt else ''}.log")
        server, how = start_peer(name, args, repository, scratch, served, log_path)
        print(f"{name} server on {server.target} (log {log_path}):", flush=True)
        done_before = len(record["runs"])
        try:
            with server:
                if how.get("checks", True):
                    wait_models_ready(server.target, served)
                measure_server(server, repository, pending, args, record, **how)
            return
        except RuntimeError as error:
            index = len(record["runs"]) - done_before
            died = server.process is not None and server.process.poll() is not None
            if not died or index >= len(pending):
                raise
            crashed = pending[index]
            if any(crash["scenario"] == list(crashed) for crash in record["crashes"]):
                raise
            first_line = str(error).splitlines()[0]
            print(f"CRASHED: {name} during {crashed.model} at {crashed.level:g} over {crashed.connections} conn "
                  f"({first_line}); restarting it to retry that scenario once", flush=True)
            record["crashes"].append({"scenario": list(crashed), "error": str(error), "log": str(log_path)})
            pending = pending[index:]
            attempt += 1
        finally:
            if server.process is not None:
                kill_group(server.process.pid)


def report(results: dict) -> None:
    """Print the target ratios, CPU per request and memory that `results` holds."""
    print(f"\nTargets (hotpath / peer; same run, h2load, one row per request):\n"
          f"{targets.format_targets(results['targets'])}")
    models = list(results["ceiling"])
    cpu = results["cpu_us_per_request_at_64"]
    print("\n" + targets.format_cpu(cpu["servers"], models, cpu["connections"]))
    memory = results["memory"]
    if memory.get("bare_ort_large_rss_mib") is not None:
        print(f"\nmemory after the large model is loaded and warmed (VmRSS, MiB): bare Python + one ORT session "
              f"{memory['bare_ort_large_rss_mib']:.0f}")
        for name, server in results["servers"].items():
            if "memory" in server:
                found = server["memory"]
                tree = (f" (with {found['processes'] - 1} child processes: {found['tree_rss_mib']:.0f})"
                        if found["processes"] > 1 else "")
                print(f"  {name:10} {found['rss_mib']:.0f}{tree}")
    if results["servers"].get("floor", {}).get("runs"):
        print(FLOOR_NOTE)
    for name, server in results["servers"].items():
        for crash in server.get("crashes", []):
            print(f"{name} crashed during {crash['scenario']} and was restarted: see {crash['log']}")


def main(argv: list[str] | None = None) -> Path:
    """Run the bench; return the JSON results path."""
    args = parse_args(argv)
    sweep = scenario_list(args)
    extra = layout_scenarios(args, sweep)
    names = args.servers.split(",")
    plans = {name: peer_scenarios(name, sweep, extra, args.quick) for name in names}
    models = list(dict.fromkeys(scenario.model for plan in plans.values() for scenario in plan))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    settings["sweep_connections"] = {str(int(scenario.level)): scenario.connections for scenario in sweep
                                     if args.mode == "closed"}
    results: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": settings,
        "batching": {"max_batch_size": MAX_BATCH_SIZE, "max_queue_delay_us": MAX_QUEUE_DELAY_US},
        "ceiling": {},
        "memory": {},
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-models-") as scratch:
        repository = write_repository(Path(scratch), models, args.seed)
        results["ceiling"] = measure_ceiling(repository, models, args.ceiling_seconds, args.seed)
        if "large" in models:
            rss = ceiling.bare_session_rss_bytes(repository / "large" / "1" / "model.onnx")
            results["memory"]["bare_ort_large_rss_mib"] = rss / 2**20
        for name in names:
            record = results["servers"][name] = {"status": "ran", "runs": [], "crashes": []}
            if not plans[name]:
                record["status"] = "not run: no scenario in this run compares it"
                print(f"NOT RUN: {name}: no scenario in this run compares it", flush=True)
                continue
            try:
                run_peer(name, args, repository, Path(scratch), plans[name], args.out / f"{stamp}-{name}", record)
            except LookupError as error:
                record["status"] = f"not run: {error}"
                print(f"NOT RUN: {name}: {error}", flush=True)
            except RuntimeError as error:
                print(f"FAILED: {name}: {error}", flush=True)
                record["status"] = f"failed: {error}"
    results["targets"] = targets.evaluate(results)
    top_connections = sweep_connections(args, targets.TOP_IN_FLIGHT)
    results["cpu_us_per_request_at_64"] = {"connections": top_connections,
                                           "servers": targets.cpu_per_request(results, top_connections)}
    report(results)
    json_path = args.out / f"{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2))
    plotted = plot(results, args.out / f"{stamp}.png")
    print(f"wrote {json_path}" + (f" and {json_path.with_suffix('.png')}" if plotted else ""))
    return json_path


def failures(results: dict) -> list[str]:
    """Servers that failed, hotpath crashing at all, and runs whose responses were wrong or failed: their
    numbers mean nothing. A peer that crashed once and was restarted is reported, not failed."""
    found = [f"{name} server {server['status'].splitlines()[0]}" for name, server in results["servers"].items()
             if server["status"].startswith("failed")]
    found += [f"hotpath crashed during {crash['scenario']}" for crash in results["servers"].get("hotpath", {})
              .get("crashes", [])]
    for name, server in results["servers"].items():
        for run in server["runs"]:
            stats, verification = run.get("server_stats", {}), run["verification"]
            unexplained_fail = stats.get("fail", 0) > run.get("cancelled_at_stop_max", 0)
            if run["errors"] or unexplained_fail or verification.get("mismatched") or verification.get("errors"):
                found.append(f"{name} {run['model']}@{run_level(run):g}x{run.get('connections')}")
    return found


if __name__ == "__main__":
    bad = failures(json.loads(main().read_text()))
    if bad:
        sys.exit(f"wrong outputs or errors in: {', '.join(bad)} (see the JSON)")
