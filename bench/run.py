"""Benchmark hotpath against the naive reference server and the in-process ONNX Runtime ceiling.

Generates the bench models, measures the ceiling, then starts each server on 127.0.0.1 and drives it
with closed-loop load, one row per request, over a concurrency sweep. Writes
`bench/results/<timestamp>.json` and a PNG of throughput and p99 against concurrency, and prints the
ratios issue 3 sets targets for. Exits non-zero when a server returned wrong outputs or errors.

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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench import ceiling, load
from bench.models import INPUT_NAME, MODELS, write_repository
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc

BENCH_DIR = Path(__file__).resolve().parent
SERVERS = ("naive", "hotpath")
SWEEP = (1, 4, 16, 64)
VERIFY_ROWS = 64
READY_TIMEOUT_S = 180

# (model, concurrency, metric, comparison, bound): what issue 3 asks of hotpath.
TARGETS = (
    ("tiny", 64, "throughput vs naive", ">=", 2.0),
    ("medium", 64, "throughput vs naive", ">=", 1.5),
    ("large", 64, "throughput vs ceiling at batch 64", ">=", 0.6),
    ("large", 64, "throughput vs naive", ">=", 5.0),
    ("tiny", 1, "p50 latency vs naive", "<=", 1.5),
)


class ServerProcess:
    """A server subprocess in its own process group, stopped (group and all) on exit."""

    def __init__(self, name: str, command: list[str], log_path: Path, port: int) -> None:
        self.name, self.command, self.log_path = name, command, log_path
        self.target = f"127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=BENCH_DIR.parent
            )
        self._wait_ready()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                self.check_alive("before it was ready")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"{self.name} server not ready after {READY_TIMEOUT_S}s; log:\n{self._log_tail()}")

    def check_alive(self, when: str) -> None:
        """Raise, with the end of the server's log, if the server has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} server exited with {self.process.returncode} {when}; "
                f"its log ({self.log_path}) ends:\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(server: str, repository: Path, port: int) -> list[str]:
    program = [sys.executable, "-m", "bench.naive_server"] if server == "naive" else ["hotpath", "serve"]
    return program + ["--model-repository", str(repository), "--host", "127.0.0.1", "--port", str(port)]


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


def measure_server(
    server: ServerProcess, repository: Path, scenarios: list[tuple[str, int]], args: argparse.Namespace, runs: list
) -> None:
    """Run every (model, concurrency) scenario against a started server, verifying outputs after each;
    append each run's JSON to `runs` as it completes, so a server that dies keeps its earlier runs."""
    sessions = {model: ceiling.cpu_session(repository / model / "1" / "model.onnx") for model, _ in scenarios}
    for model, concurrency in scenarios:
        spec = MODELS[model]
        rows = load.input_pool(args.distribution, spec.in_features, args.pool_size, args.seed, args.replay)
        check_rows = np.random.default_rng(args.seed + 1).standard_normal((VERIFY_ROWS, spec.in_features), np.float32)
        try:
            if args.client == "h2load":
                body = load.infer_request(model, rows[:1]).SerializeToString()
                with grpc.insecure_channel(server.target) as channel:
                    probe = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest.FromString(body))

                def drive(seconds: float) -> load.LoadResult:
                    return load.run_h2load(
                        server.target, model, body, probe.ByteSize(), concurrency, seconds, server.process.pid
                    )
            else:
                order = load.input_order(args.distribution, len(rows), 1 << 20, args.seed)

                def drive(seconds: float) -> load.LoadResult:
                    return load.run_python(
                        server.target, model, rows, order, args.distribution, concurrency, seconds, server.process.pid
                    )
            if args.warmup > 0:
                drive(args.warmup)
            before = try_statistics(server.target, model)
            result = drive(args.duration)
            after = try_statistics(server.target, model)
        except (RuntimeError, grpc.RpcError):
            server.check_alive(f"during {model} at {concurrency} in flight")
            raise
        if before is not None and after is not None:
            result.server_stats = load.statistics_delta(before, after)
        expected = sessions[model].run(None, {INPUT_NAME: check_rows})[0]
        result.verification = asyncio.run(load.verify(server.target, model, check_rows, expected))
        runs.append(result.to_json())
        print(
            f"  {server.name:8} {model:6} c={concurrency:<3} {result.throughput_rps:9.0f} req/s  "
            f"p50 {result.latency_ms.get('p50', float('nan')):7.2f} ms  p99 {result.latency_ms.get('p99', float('nan')):7.2f} ms  "
            f"{result.cpu_us_per_request:6.0f} us CPU/req  errors {result.errors or 0}  "
            f"verify {result.verification['mismatched']} wrong, {result.verification['errors'] or 0} errors",
            flush=True,
        )


def find_run(results: dict, server: str, model: str, concurrency: int) -> dict | None:
    for run in results["servers"].get(server, {}).get("runs", []):
        if run["model"] == model and run["concurrency"] == concurrency:
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


def plot(results: dict, path: Path) -> None:
    """Throughput (top row) and p99 latency (bottom row) against concurrency, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(run["model"] for server in results["servers"].values() for run in server["runs"]))
    figure, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        throughput_axis, latency_axis = axes[0][column], axes[1][column]
        for name, server in results["servers"].items():
            runs = sorted((run for run in server["runs"] if run["model"] == model), key=lambda run: run["concurrency"])
            if not runs:
                continue
            concurrency = [run["concurrency"] for run in runs]
            throughput_axis.plot(concurrency, [run["throughput_rps"] for run in runs], marker="o", label=name)
            latency_axis.plot(concurrency, [run["latency_ms"].get("p99") for run in runs], marker="o", label=name)
        throughput_axis.axhline(results["ceiling"][model]["batch_64_rows_per_s"], linestyle="--", color="grey",
                                label="ORT in-process, batch 64")
        throughput_axis.set_title(f"{model}: requests/s (1 row each)")
        latency_axis.set_title(f"{model}: p99 latency (ms)")
        swept = sorted({run["concurrency"] for server in results["servers"].values() for run in server["runs"]
                        if run["model"] == model})
        for axis in (throughput_axis, latency_axis):
            axis.set_xscale("log", base=2)
            axis.set_xticks(swept, [str(value) for value in swept])
            axis.set_xlabel("requests in flight")
            axis.grid(True, alpha=0.3)
        throughput_axis.set_yscale("log")
        throughput_axis.legend(fontsize="small")
    figure.suptitle(f"hotpath bench, {results['machine']['cpus']} CPUs, client {results['settings']['client']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter runs, sweep tiny only")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: naive,hotpath")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--concurrency", help=f"comma-separated in-flight counts (default: {','.join(map(str, SWEEP))})")
    parser.add_argument("--client", choices=("h2load", "python"), default="h2load")
    parser.add_argument("--distribution", choices=load.DISTRIBUTIONS, default="fixed",
                        help="input distribution; h2load replays one input, so only 'fixed' works with it")
    parser.add_argument("--replay", type=Path, help=".npy file of rows for --distribution replay")
    parser.add_argument("--pool-size", type=int, default=10_000, help="distinct inputs for random and zipf")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 8, quick 3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each run (default 2, quick 1)")
    parser.add_argument("--ceiling-seconds", type=float, help="seconds per ceiling measurement (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for JSON and PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.client == "h2load" and args.distribution != "fixed":
        parser.error("h2load replays a single request body; use --client python for other distributions")
    for name, full, quick in (("duration", 8.0, 3.0), ("warmup", 2.0, 1.0), ("ceiling_seconds", 3.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def scenario_list(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(model, concurrency) pairs: the full sweep per model, or in --quick a tiny sweep plus medium and
    large at 64, which is what the targets need."""
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    sweep = [int(value) for value in args.concurrency.split(",")] if args.concurrency else list(SWEEP)
    if args.quick and not (args.models or args.concurrency):
        return [("tiny", c) for c in sweep] + [(model, max(sweep)) for model in models if model != "tiny"]
    return [(model, c) for model in models for c in sweep]


def main(argv: list[str] | None = None) -> Path:
    """Run the bench; return the JSON results path."""
    args = parse_args(argv)
    scenarios = scenario_list(args)
    models = list(dict.fromkeys(model for model, _ in scenarios))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "onnxruntime": ceiling.ort.__version__,
        },
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "ceiling": {},
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="hotpath-bench-models-") as scratch:
        repository = write_repository(Path(scratch), models, args.seed)
        print(f"ONNX Runtime in-process ceiling, {os.cpu_count()} cores:", flush=True)
        for model in models:
            path = repository / model / "1" / "model.onnx"
            results["ceiling"][model] = {
                f"batch_{batch}_rows_per_s": ceiling.rows_per_second(path, batch, args.ceiling_seconds, args.seed)
                for batch in (1, 64)
            }
            print(f"  {model:6} batch 1 {results['ceiling'][model]['batch_1_rows_per_s']:10.0f} rows/s   "
                  f"batch 64 {results['ceiling'][model]['batch_64_rows_per_s']:10.0f} rows/s", flush=True)
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
            try:
                with ServerProcess(name, server_command(name, repository, port), log_path, port) as server:
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
                found.append(f"{name} {run['model']}@{run['concurrency']}")
    return found


if __name__ == "__main__":
    bad = failures(json.loads(main().read_text()))
    if bad:
        sys.exit(f"wrong outputs or errors in: {', '.join(bad)} (see the JSON)")
