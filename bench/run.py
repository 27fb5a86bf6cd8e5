"""Benchmark hotpath against the naive reference server and the in-process ONNX Runtime ceiling.

Generates the bench models, measures the ceiling, then starts each server on 127.0.0.1 and drives it,
one row per request, over a sweep: of requests in flight (closed loop, the default) or of offered
request rates (`--mode open`, Poisson arrivals). Writes `bench/results/<timestamp>.json` and a PNG
of throughput and p99 against the sweep, and prints the ratios issue 3 sets targets for. Exits
non-zero when a server returned wrong outputs or errors.

    python -m bench.run            # full run, under 10 minutes
    python -m bench.run --quick    # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from bench import ceiling, load
from bench.load import ServerProcess
from bench.models import INPUT_NAME, MODELS, write_repository
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc

BENCH_DIR = Path(__file__).resolve().parent
SERVERS = ("naive", "hotpath")
SWEEP = (1, 4, 16, 64)
RATES = (500, 2000)
VERIFY_ROWS = 64

# (model, concurrency, metric, comparison, bound): what issue 3 asks of hotpath.
TARGETS = (
    ("tiny", 64, "throughput vs naive", ">=", 2.0),
    ("medium", 64, "throughput vs naive", ">=", 1.5),
    ("large", 64, "throughput vs ceiling at batch 64", ">=", 0.6),
    ("large", 64, "throughput vs naive", ">=", 5.0),
    ("tiny", 1, "p50 latency vs naive", "<=", 1.5),
)


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


def start_server(name: str, command: list[str], log_path: Path, port: int) -> ServerProcess:
    """A ServerProcess for `command`, run from the repository root so `python -m bench...` resolves."""
    return ServerProcess(name, command, log_path, port, cwd=BENCH_DIR.parent)


def hotpath_unavailable() -> str | None:
    """Say why `hotpath serve` cannot run here, or None when it can."""
    if importlib.util.find_spec("hotpath.cli") is None:
        return "hotpath.cli does not exist yet (server/hotpath/cli.py), so `hotpath serve` cannot start"
    return None


def try_statistics(target: str, model: str) -> pb.ModelStatistics | None:
    """ModelStatistics for `model`, or None when the server does not implement the RPC."""
    try:
        return load.model_statistics(target, model)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


def measure(server: ServerProcess, model: str, level: float, args: argparse.Namespace,
            session: ort.InferenceSession) -> load.LoadResult:
    """One scenario against a started server: warm-up, a measured run at `level` (requests in flight, or
    requests/s with `--mode open`), the server's statistics over it, then an output check."""
    spec = MODELS[model]
    rows = load.input_rows(args.distribution, spec.in_features, args.pool_size, args.seed, args.replay)
    check_rows = np.random.default_rng(args.seed + 1).standard_normal((VERIFY_ROWS, spec.in_features), np.float32)
    open_loop = args.mode == "open"
    concurrency = args.max_in_flight if open_loop else int(level)
    rate = float(level) if open_loop else None
    drive: Callable[[float], load.LoadResult]
    try:
        if args.client == "h2load":
            body = load.infer_request(model, rows[:1]).SerializeToString()
            with grpc.insecure_channel(server.target) as channel:
                probe = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest.FromString(body))

            def drive(seconds: float) -> load.LoadResult:
                return load.run_h2load(server.target, model, body, probe.ByteSize(), concurrency, seconds,
                                       server.process.pid, rate)
        else:
            bodies = [load.infer_request(model, row[None, :]).SerializeToString() for row in rows]
            order = load.input_order(args.distribution, len(rows), 1 << 20, args.seed)

            def drive(seconds: float) -> load.LoadResult:
                return load.run_python(server.target, model, bodies, order, args.distribution, concurrency, seconds,
                                       server.process.pid, rate, args.streaming, args.seed)
        if args.warmup > 0:
            drive(args.warmup)
        before = try_statistics(server.target, model)
        result = drive(args.duration)
        after = try_statistics(server.target, model)
    except (RuntimeError, grpc.RpcError):
        server.check_alive(f"during {model} at {level:g} {'requests/s' if open_loop else 'in flight'}")
        raise
    if before is not None and after is not None:
        result.server_stats = load.statistics_delta(before, after)
    expected = session.run(None, {INPUT_NAME: check_rows})[0]
    result.verification = asyncio.run(load.verify(server.target, model, check_rows, expected))
    return result


def summary_line(name: str, result: load.LoadResult) -> str:
    """One printed line per run: load level, throughput, latency, CPU, errors, verification."""
    level = f"r={result.rate_rps:<6g}" if result.rate_rps is not None else f"c={result.concurrency:<3}"
    latency = result.latency_ms
    return (f"  {name:8} {result.model:6} {level} {result.throughput_rps:9.0f} req/s  "
            f"p50 {latency.get('p50', float('nan')):7.2f} ms  p99 {latency.get('p99', float('nan')):7.2f} ms  "
            f"p99.9 {latency.get('p99.9', float('nan')):7.2f} ms  {result.cpu_us_per_request:6.0f} us CPU/req  "
            f"errors {result.errors or 0}  verify {result.verification['mismatched']} wrong, "
            f"{result.verification['errors'] or 0} errors")


def measure_server(
    server: ServerProcess, repository: Path, scenarios: list[tuple[str, float]], args: argparse.Namespace, runs: list
) -> None:
    """Run every (model, level) scenario against a started server, verifying outputs after each;
    append each run's JSON to `runs` as it completes, so a server that dies keeps its earlier runs."""
    sessions = {model: ceiling.cpu_session(repository / model / "1" / "model.onnx") for model, _ in scenarios}
    for model, level in scenarios:
        result = measure(server, model, level, args, sessions[model])
        runs.append(result.to_json())
        print(summary_line(server.name, result), flush=True)


def find_run(results: dict, server: str, model: str, concurrency: int) -> dict | None:
    """The closed-loop run of `server` on `model` at `concurrency`, if this invocation made it."""
    for run in results["servers"].get(server, {}).get("runs", []):
        if run["model"] == model and run["concurrency"] == concurrency and run.get("rate_rps") is None:
            return run
    return None


def target_ratios(results: dict) -> list[dict]:
    """Evaluate issue 3's targets on the runs this invocation made (skipping those it did not make)."""
    evaluated = []
    for model, concurrency, metric, comparison, bound in TARGETS:
        ours = find_run(results, "hotpath", model, concurrency)
        naive = find_run(results, "naive", model, concurrency)
        if ours is None:
            continue
        if metric == "throughput vs naive" and naive is not None:
            ratio = ours["throughput_rps"] / naive["throughput_rps"]
        elif metric == "p50 latency vs naive" and naive is not None:
            ratio = ours["latency_ms"]["p50"] / naive["latency_ms"]["p50"]
        elif metric == "throughput vs ceiling at batch 64":
            ratio = ours["throughput_rps"] / results["ceiling"][model]["batch_64_rows_per_s"]
        else:
            continue
        met = ratio >= bound if comparison == ">=" else ratio <= bound
        evaluated.append(
            {"model": model, "concurrency": concurrency, "metric": metric, "target": f"{comparison} {bound}",
             "ratio": ratio, "met": met}
        )
    return evaluated


def run_level(run: dict) -> float:
    """Where a run sits on the sweep: its offered rate (open loop) or requests in flight (closed loop)."""
    return run["rate_rps"] if run.get("rate_rps") is not None else run["concurrency"]


def plot(results: dict, path: Path) -> None:
    """Throughput (top row) and p99 latency (bottom row) against the sweep, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    open_loop = results["settings"]["mode"] == "open"
    models = list(dict.fromkeys(run["model"] for server in results["servers"].values() for run in server["runs"]))
    figure, axes = plt.subplots(2, max(1, len(models)), figsize=(4.5 * max(1, len(models)), 7), squeeze=False)
    for column, model in enumerate(models):
        throughput_axis, latency_axis = axes[0][column], axes[1][column]
        for name, server in results["servers"].items():
            runs = sorted((run for run in server["runs"] if run["model"] == model), key=run_level)
            if not runs:
                continue
            levels = [run_level(run) for run in runs]
            throughput_axis.plot(levels, [run["throughput_rps"] for run in runs], marker="o", label=name)
            latency_axis.plot(levels, [run["latency_ms"].get("p99") for run in runs], marker="o", label=name)
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


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options `bench.run` and `bench.compare` share."""
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed",
                        help="closed: a fixed number of requests in flight; open: requests arrive at fixed rates")
    parser.add_argument("--concurrency", help=f"closed loop: comma-separated in-flight counts (default: {','.join(map(str, SWEEP))})")
    parser.add_argument("--rate", help=f"open loop: comma-separated requests/s (default: {','.join(map(str, RATES))})")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="open loop: outstanding requests beyond this are dropped and counted (default 256)")
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
    for name, full, short in (("duration", 8.0, 3.0), ("warmup", 2.0, 1.0), ("ceiling_seconds", 3.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter runs, sweep tiny only")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: naive,hotpath")
    parser.add_argument("--hotpath-args", default="", help="extra `hotpath serve` flags, e.g. '--workers 2'")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for JSON and PNG")
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    check_load_arguments(parser, args, args.quick)
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


def scenario_list(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(model, level) pairs: the full sweep per model, or in --quick a tiny sweep plus medium and
    large at the top level, which is what the targets need."""
    models = model_names(args)
    sweep = load_levels(args)
    if getattr(args, "quick", False) and not (args.models or args.concurrency or args.rate):
        return [("tiny", level) for level in sweep] + [(model, max(sweep)) for model in models if model != "tiny"]
    return [(model, level) for model in models for level in sweep]


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


def main(argv: list[str] | None = None) -> Path:
    """Run the bench; return the JSON results path."""
    args = parse_args(argv)
    scenarios = scenario_list(args)
    models = list(dict.fromkeys(model for model, _ in scenarios))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "ceiling": {},
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-models-") as scratch:
        repository = write_repository(Path(scratch), models, args.seed)
        results["ceiling"] = measure_ceiling(repository, models, args.ceiling_seconds, args.seed)
        for name in args.servers.split(","):
            if name not in SERVERS:
                raise SystemExit(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
            reason = hotpath_unavailable() if name == "hotpath" else None
            if reason:
                print(f"NOT RUN: {name}: {reason}", flush=True)
                results["servers"][name] = {"status": f"not run: {reason}", "runs": []}
                continue
            port = free_port()
            log_path = args.out / f"{stamp}-{name}.log"
            print(f"{name} server on 127.0.0.1:{port} (log {log_path}):", flush=True)
            results["servers"][name] = {"status": "ran", "runs": []}
            extra = shlex.split(args.hotpath_args) if name == "hotpath" else []
            try:
                with start_server(name, server_command(name, repository, port, extra), log_path, port) as server:
                    measure_server(server, repository, scenarios, args, results["servers"][name]["runs"])
            except RuntimeError as error:
                print(f"FAILED: {name}: {error}", flush=True)
                results["servers"][name]["status"] = f"failed: {error}"
    results["targets"] = target_ratios(results)
    for target in results["targets"]:
        print(f"hotpath {target['model']}@{target['concurrency']} {target['metric']}: {target['ratio']:.2f} "
              f"(target {target['target']}) {'met' if target['met'] else 'NOT MET'}")
    json_path = args.out / f"{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stamp}.png")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return json_path


def failures(results: dict) -> list[str]:
    """Servers that died and runs whose responses were wrong or failed: their numbers mean nothing."""
    found = [f"{name} server {server['status']}" for name, server in results["servers"].items()
             if server["status"].startswith("failed")]
    for name, server in results["servers"].items():
        for run in server["runs"]:
            stats = run.get("server_stats", {})
            if run["errors"] or stats.get("fail") or run["verification"]["mismatched"] or run["verification"]["errors"]:
                found.append(f"{name} {run['model']}@{run_level(run):g}")
    return found


if __name__ == "__main__":
    bad = failures(json.loads(main().read_text()))
    if bad:
        sys.exit(f"wrong outputs or errors in: {', '.join(bad)} (see the JSON)")
