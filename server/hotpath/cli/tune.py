"""`hotpath tune MODEL`: find the configuration that serves one model fastest on this machine.

The tuner drives the real server, not a model of it: every candidate is a `hotpath serve` subprocess
on 127.0.0.1 with the candidate's config.pbtxt, measured under closed-loop load from the bench's
load generator (`bench.loadgen`, imported when the command runs, so tuning needs a hotpath checkout).
A full grid is far too slow, so it searches by coordinate descent from the model's own configuration:
replicas x intra-op threads first (never more ONNX Runtime threads than the CPUs the process may use), then the response cache (only for traffic that repeats), then max
batch size, then the batch policy and queue delay, and again while the time budget lasts. A candidate
replaces the best only when it is clearly faster (`MIN_GAIN`), so noise does not walk the search.

The score of a candidate is its best throughput, over the load levels tried, whose p99 latency is
within the budget. At the end the starting and the winning configuration run side by side in
interleaved rounds; if the winner does not beat the start there, the start is what is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf import text_format

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc
from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.serving.config import BATCH_POLICY_DELAY, BATCH_POLICY_WORK_CONSERVING, batch_policy, read_config
from hotpath.settings import available_cpus

if TYPE_CHECKING:
    from bench import loadgen
    from bench.server_process import ServerProcess

MIN_GAIN = 0.03
"""A candidate must beat the best so far by this fraction of throughput to replace it."""
BATCH_SIZES = (8, 16, 32, 64, 128)
QUEUE_DELAYS_US = (0, 100, 250, 500, 1000, 2000, 5000, 20000)
"""0 is the work-conserving batch policy (a free replica takes what is queued at once); any other
delay is the delay policy, under which a batch waits until full or until its oldest request has
waited the delay: how a compute-bound model may get fuller batches (large model, 2 cores: 1.38x with
20 ms over 1 ms)."""
CACHE_BYTES = "256MiB"
REPEATING_DISTRIBUTIONS = ("zipf", "replay")
"""Traffic that repeats inputs, the only kind a response cache can help."""
TUNE_DISTRIBUTIONS = ("random", *REPEATING_DISTRIBUTIONS)
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
BENCH_MISSING = ("needs the load generator in a hotpath checkout's bench/ ({error}): install hotpath from a "
                 "checkout (pip install -e .) or put the checkout's root on PYTHONPATH")


@dataclass(frozen=True)
class Candidate:
    """One configuration to try. `replicas == 0` keeps the model's own instance_group and thread
    parameters (the server then chooses as it would for the user), `max_batch_size == 0` its batching
    settings; the rest override the config. With `max_batch_size` set, `queue_delay_us == 0` means
    the work-conserving batch policy and any other delay the delay policy. The tuner starts from the
    model's own config."""

    replicas: int = 0
    intra_threads: int = 0
    execution: str = "auto"
    max_batch_size: int = 0
    queue_delay_us: int = 0
    cache: bool = False

    def describe(self) -> str:
        if self.replicas == 0:
            placement = "replicas as configured"
        elif self.execution == "inline":
            placement = f"inline x {self.intra_threads} thread(s)"
        else:
            placement = f"{self.replicas} replica(s) x {self.intra_threads} thread(s)"
        if not self.max_batch_size:
            batching = "batching as configured"
        elif self.queue_delay_us:
            batching = f"batch {self.max_batch_size}, delay {self.queue_delay_us} us"
        else:
            batching = f"batch {self.max_batch_size}, work-conserving"
        return f"{placement}, {batching}, cache {'on' if self.cache else 'off'}"

    @property
    def batch_policy(self) -> str:
        """The batch policy a candidate with `max_batch_size` set gives the model."""
        return BATCH_POLICY_DELAY if self.queue_delay_us else BATCH_POLICY_WORK_CONSERVING

    def server_flags(self, cpus: int) -> list[str]:
        """The `hotpath serve` flags this candidate needs besides the repository and address."""
        return ["--cpus", str(cpus)] + (["--cache-size", CACHE_BYTES] if self.cache else [])

    def apply(self, config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
        """Return a copy of `config` with this candidate's per-model settings."""
        tuned = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
        if self.replicas:
            del tuned.instance_group[:]
            if self.execution == "threads":
                tuned.instance_group.add(count=self.replicas, kind=KIND_CPU)
            tuned.parameters["intra_op_thread_count"].string_value = str(self.intra_threads)
            tuned.parameters["execution"].string_value = self.execution
        if self.max_batch_size:
            tuned.max_batch_size = self.max_batch_size
            tuned.dynamic_batching.max_queue_delay_microseconds = self.queue_delay_us
            tuned.parameters["batch_policy"].string_value = self.batch_policy
        if self.cache or tuned.HasField("response_cache"):
            tuned.response_cache.enable = self.cache
        return tuned


def import_bench() -> tuple[ModuleType, ModuleType, ModuleType]:
    """`bench.loadgen`, `bench.h2load` and `bench.server_process`: from the import path, else from the
    checkout this hotpath is installed from (an editable install); ImportError when neither has them."""
    root = Path(__file__).resolve().parents[3]
    if importlib.util.find_spec("bench") is None and (root / "bench" / "loadgen.py").is_file():
        sys.path.append(str(root))
    from bench import h2load, loadgen, server_process

    return loadgen, h2load, server_process


def placements(cpus: int) -> list[tuple[int, int, str]]:
    """(replicas, intra-op threads, execution) to try on `cpus` CPUs.

    One inline session (1 thread, or all of them) or replicas x threads that use every CPU; ONNX
    Runtime threads never exceed `cpus`.
    """
    found = [(1, threads, "inline") for threads in sorted({1, cpus})]
    found += [(replicas, cpus // replicas, "threads") for replicas in range(1, cpus + 1) if cpus % replicas == 0]
    return found


def threads_used(candidate: Candidate, cpus: int) -> int:
    """ONNX Runtime compute threads of the candidate (a replica-less candidate uses the server's plan)."""
    if candidate.replicas == 0:
        return cpus
    return candidate.replicas * candidate.intra_threads


@dataclass
class Trial:
    """A measured candidate: its best throughput within the latency budget, per load level tried."""

    number: int
    stage: str
    candidate: Candidate
    levels: list[dict]
    score_rps: float | None
    """Best throughput among levels with p99 within budget and no errors; None when none qualifies."""
    p99_ms: float | None
    concurrency: int | None
    note: str = ""

    def beats(self, other: Trial) -> bool:
        if self.score_rps is None:
            return False
        return other.score_rps is None or self.score_rps > other.score_rps * (1 + MIN_GAIN)


class Tuner:
    """Runs candidates of one model as real servers and keeps the best."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.loadgen, self.h2load, self.server_process = import_bench()
        self.args = args
        self.model = args.model
        self.workdir = workdir
        self.config = read_config(args.model_repository / self.model)
        self.cpus = args.cpus or available_cpus()
        self.started = time.monotonic()
        self.trials: list[Trial] = []
        self.tried: dict[Candidate, Trial] = {}
        self.bodies: list[bytes] = []
        self.order = np.arange(1)
        self.response_size = 0
        self.served_config = model_config_pb2.ModelConfig()
        self.eval_seconds: list[float] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def server(self, candidate: Candidate, label: str) -> ServerProcess:
        """A not yet started server for `candidate`, over a repository holding only the tuned model."""
        repository = self.loadgen.overlay_repository(
            self.args.model_repository, self.workdir / label, [self.model],
            {self.model: text_format.MessageToString(candidate.apply(self.config))})
        command = [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(repository),
                   "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *candidate.server_flags(self.cpus)]
        return self.server_process.ServerProcess(label, command, self.workdir / f"{label}.log", ready_timeout_s=120)

    def prepare_load(self, server: ServerProcess) -> model_config_pb2.ModelConfig:
        """Build the request bodies from the served model's inputs; return the completed config."""
        with grpc.insecure_channel(server.target) as channel:
            served = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
                pb.ModelConfigRequest(name=self.model), timeout=10).config
        specs, batched = self.loadgen.model_inputs(server.target, self.model)
        pool = self.loadgen.input_pool(self.args.distribution, specs, self.args.pool_size, self.args.seed, self.args.replay)
        self.bodies = self.loadgen.request_bodies(self.model, pool, batched)
        self.order = self.loadgen.input_order(self.args.distribution, len(self.bodies), 1 << 20, self.args.seed)
        if self.args.client == "h2load":
            with grpc.insecure_channel(server.target) as channel:
                probe = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    pb.ModelInferRequest.FromString(self.bodies[0]), timeout=30)
            self.response_size = probe.ByteSize()
        return served

    def drive(self, server: ServerProcess, concurrency: int, seconds: float) -> loadgen.LoadResult:
        if self.args.client == "h2load":
            return self.h2load.run(server.target, self.model, self.bodies[0], self.response_size, concurrency,
                                   self.loadgen.connections_for(concurrency), seconds, server.process.pid)
        return self.loadgen.run_python(server.target, self.model, self.bodies, self.order, self.args.distribution,
                                  concurrency, seconds, server.process.pid, seed=self.args.seed)

    def measure(self, server: ServerProcess, concurrency: int) -> loadgen.LoadResult:
        if self.args.warmup > 0:
            self.drive(server, concurrency, self.args.warmup)
        return self.drive(server, concurrency, self.args.duration)

    def within_budget(self, result: loadgen.LoadResult) -> bool:
        budget = self.args.latency_budget_ms
        return not result.errors and result.requests > 0 and (budget is None or result.latency_ms["p99"] <= budget)

    def evaluate(self, candidate: Candidate, stage: str) -> Trial:
        """Start `candidate`'s server, measure it at every load level, and record the trial."""
        if candidate in self.tried:
            return self.tried[candidate]
        began = time.monotonic()
        number = len(self.trials) + 1
        levels: list[dict] = []
        note = ""
        try:
            with self.server(candidate, f"trial-{number}") as server:
                if not self.bodies:
                    self.served_config = self.prepare_load(server)
                for concurrency in self.args.concurrency:
                    result = self.measure(server, concurrency)
                    levels.append({"concurrency": concurrency, "throughput_rps": result.throughput_rps,
                                   "latency_ms": result.latency_ms, "errors": result.errors,
                                   "within_budget": self.within_budget(result)})
        except (RuntimeError, grpc.RpcError) as error:
            note = f"failed: {str(error).splitlines()[0]}"
        fits = [level for level in levels if level["within_budget"]]
        best = max(fits, key=lambda level: level["throughput_rps"], default=None)
        if not note and best is None:
            note = "errors" if any(level["errors"] for level in levels) else "over the latency budget"
        trial = Trial(number, stage, candidate, levels, best and best["throughput_rps"],
                      best and best["latency_ms"]["p99"], best and best["concurrency"], note)
        self.trials.append(trial)
        self.tried[candidate] = trial
        self.eval_seconds.append(time.monotonic() - began)
        score = f"{trial.score_rps:9.0f} req/s  p99 {trial.p99_ms:7.2f} ms" if trial.score_rps else f"{'-':>9}"
        print(f"  #{number:<3} {stage:9} {candidate.describe():70} {score}  {note}", flush=True)
        return trial

    def time_for_another(self, reserve: float) -> bool:
        """Whether one more evaluation fits in the time budget, keeping `reserve` seconds for the confirmation."""
        typical = statistics.median(self.eval_seconds) if self.eval_seconds else 0.0
        return self.elapsed() + typical + reserve <= self.args.time_budget

    def search(self, start: Candidate, reserve: float) -> Trial:
        """Coordinate descent from `start`; returns the best trial found within the time budget."""
        best = self.evaluate(start, "start")
        if best.score_rps is None and best.note.startswith("failed"):
            raise LoadError(f"model '{self.model}' does not serve with its own configuration: {best.note}")
        batching = self.served_config.max_batch_size > 0
        delay_us = (self.served_config.dynamic_batching.max_queue_delay_microseconds
                    if batch_policy(self.served_config) == BATCH_POLICY_DELAY else 0)
        base = replace(start, max_batch_size=self.served_config.max_batch_size, queue_delay_us=delay_us)
        self.tried[base] = best
        best_candidate = base
        stages: list[tuple[str, list]] = [("placement", placements(self.cpus))]
        if self.args.distribution in REPEATING_DISTRIBUTIONS:
            stages.append(("cache", [False, True]))
        if batching:
            stages.append(("batch", sorted({*BATCH_SIZES, base.max_batch_size})))
            stages.append(("delay", sorted({*QUEUE_DELAYS_US, base.queue_delay_us})))
        improved = True
        while improved:
            improved = False
            for stage, values in stages:
                for value in values:
                    if not self.time_for_another(reserve):
                        return best
                    candidate = self.vary(best_candidate, stage, value)
                    trial = self.evaluate(candidate, stage)
                    if trial.beats(best):
                        best, best_candidate, improved = trial, candidate, True
        return best

    @staticmethod
    def vary(candidate: Candidate, stage: str, value: object) -> Candidate:
        if stage == "placement":
            replicas, threads, execution = value
            return replace(candidate, replicas=replicas, intra_threads=threads, execution=execution)
        if stage == "batch":
            return replace(candidate, max_batch_size=value)
        if stage == "delay":
            return replace(candidate, queue_delay_us=value)
        return replace(candidate, cache=value)

    def confirm(self, start: Candidate, winner: Candidate, concurrency: int) -> dict:
        """Run the start and the winner side by side, interleaved, at `concurrency`; medians and ratio."""
        runs: dict[str, list[dict]] = {"start": [], "tuned": []}
        with ExitStack() as stack:
            servers = {"start": stack.enter_context(self.server(start, "confirm-start")),
                       "tuned": stack.enter_context(self.server(winner, "confirm-tuned"))}
            for round_index in range(self.args.confirm_rounds):
                for name in ("start", "tuned") if round_index % 2 == 0 else ("tuned", "start"):
                    result = self.measure(servers[name], concurrency)
                    runs[name].append({"throughput_rps": result.throughput_rps, "latency_ms": result.latency_ms,
                                       "errors": result.errors, "within_budget": self.within_budget(result)})
        summary = {name: {"throughput_rps": statistics.median(r["throughput_rps"] for r in rounds),
                          "p99_ms": statistics.median(r["latency_ms"].get("p99", float("inf")) for r in rounds),
                          "within_budget": all(r["within_budget"] for r in rounds)}
                   for name, rounds in runs.items()}
        summary["ratio"] = summary["tuned"]["throughput_rps"] / max(summary["start"]["throughput_rps"], 1e-9)
        summary["concurrency"] = concurrency
        summary["rounds"] = runs
        return summary


def _budget(milliseconds: float | None) -> str:
    return "none" if milliseconds is None else f"{milliseconds:g} ms"


def _markdown(result: dict) -> str:
    lines = [f"# hotpath tune: {result['model']}", "",
             f"{result['cpus']} CPUs, client {result['client']}, distribution {result['distribution']}, "
             f"p99 latency budget {_budget(result['latency_budget_ms'])}, "
             f"{len(result['trials'])} trials in {result['elapsed_s']:.0f} s.", "",
             "| # | stage | configuration | best req/s | p99 ms | in flight | note |",
             "|---|---|---|---|---|---|---|"]
    for trial in result["trials"]:
        score = f"{trial['score_rps']:.0f}" if trial["score_rps"] else "-"
        p99 = f"{trial['p99_ms']:.2f}" if trial["p99_ms"] else "-"
        lines.append(f"| {trial['number']} | {trial['stage']} | {trial['description']} | {score} | {p99} | "
                     f"{trial['concurrency'] or '-'} | {trial['note']} |")
    confirm = result["confirmation"]
    lines += ["", f"Confirmation, {len(confirm['rounds']['start'])} interleaved rounds at {confirm['concurrency']} "
              f"in flight: start {confirm['start']['throughput_rps']:.0f} req/s (p99 {confirm['start']['p99_ms']:.2f} ms), "
              f"tuned {confirm['tuned']['throughput_rps']:.0f} req/s (p99 {confirm['tuned']['p99_ms']:.2f} ms): "
              f"{confirm['ratio']:.2f}x.", "", f"Chosen: {result['chosen']['description']}.",
              f"Serve with: `hotpath serve {' '.join(result['chosen']['serve_flags'])}`", ""]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> bool:
    """Each trial's score (bars; grey when no load level met the budget), and the confirmation.

    False, after saying so in one line, when matplotlib is not installed: the plot is optional.
    """
    from bench.plotting import pyplot

    plt = pyplot(path)
    if plt is None:
        return False
    from matplotlib.patches import Patch

    trials = result["trials"]
    figure, (trials_axis, confirm_axis) = plt.subplots(
        1, 2, figsize=(max(6.0, 0.35 * len(trials) + 3), 4), gridspec_kw={"width_ratios": [4, 1]})
    colors = {"start": "tab:grey", "placement": "tab:blue", "batch": "tab:orange", "delay": "tab:green",
              "cache": "tab:purple"}
    numbers = [trial["number"] for trial in trials]
    trials_axis.bar(numbers, [trial["score_rps"] or 0 for trial in trials],
                    color=[colors[trial["stage"]] if trial["score_rps"] else "lightgrey" for trial in trials])
    trials_axis.set_xlabel("trial")
    trials_axis.set_ylabel("best requests/s within budget")
    trials_axis.set_title(f"hotpath tune {result['model']}: {len(trials)} trials")
    trials_axis.legend(handles=[Patch(color=color, label=stage) for stage, color in colors.items()], fontsize="small")
    confirm = result["confirmation"]
    confirm_axis.bar(["start", "tuned"], [confirm["start"]["throughput_rps"], confirm["tuned"]["throughput_rps"]],
                     color=["tab:grey", "tab:red"])
    confirm_axis.set_title(f"side by side: {confirm['ratio']:.2f}x", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _trial_json(trial: Trial) -> dict:
    return {"number": trial.number, "stage": trial.stage, "description": trial.candidate.describe(),
            "candidate": asdict(trial.candidate), "score_rps": trial.score_rps, "p99_ms": trial.p99_ms,
            "concurrency": trial.concurrency, "levels": trial.levels, "note": trial.note}


def check_arguments(args: argparse.Namespace) -> str | None:
    """Fill in defaults that depend on the machine; return what is wrong with the arguments, or None."""
    model_dir = args.model_repository / args.model
    if not model_dir.is_dir():
        return f"no model '{args.model}' in {args.model_repository}: expected a directory {model_dir}"
    if args.distribution == "replay" and args.replay is None:
        return "--distribution replay needs --replay FILE.npy"
    if args.client == "auto":
        args.client = "h2load" if args.distribution == "random" and shutil.which("h2load") else "python"
    elif args.client == "h2load" and args.distribution != "random":
        return f"h2load replays one request, so it cannot send {args.distribution} traffic: use --client python"
    if args.cpus and args.cpus > available_cpus():
        return f"--cpus {args.cpus} is more than the {available_cpus()} CPUs this process may use"
    if any(level < 1 for level in args.concurrency):
        return "--concurrency values must be at least 1"
    args.output = args.output or model_dir / ("config.pbtxt" if args.write else "config.tuned.pbtxt")
    if args.output.resolve() == (model_dir / "config.pbtxt").resolve() and not args.write:
        return f"--output {args.output} is the model's own config: add --write to replace it"
    return None


def tune(args: argparse.Namespace) -> dict:
    """Search, confirm, write the chosen config.pbtxt and the report; return the report's data."""
    with tempfile.TemporaryDirectory(prefix="hotpath-tune-") as scratch:
        tuner = Tuner(args, Path(scratch))
        print(f"tuning model '{args.model}' on {tuner.cpus} CPUs for {args.time_budget:.0f} s "
              f"(client {args.client}, {args.distribution} inputs, in flight {args.concurrency}, "
              f"p99 latency budget {_budget(args.latency_budget_ms)}):", flush=True)
        start = Candidate(cache=tuner.config.response_cache.enable)
        reserve = args.confirm_rounds * 2 * (args.warmup + args.duration) + 6.0
        best = tuner.search(start, reserve)
        start_trial = tuner.trials[0]
        winner = best.candidate
        confirmation = tuner.confirm(start, winner, best.concurrency or max(args.concurrency))
        tuned_ok = confirmation["tuned"]["within_budget"] or not confirmation["start"]["within_budget"]
        if winner != start and not (confirmation["ratio"] >= 1.0 and tuned_ok):
            print(f"side by side the winner did not beat the start ({confirmation['ratio']:.2f}x): "
                  "keeping the model's own configuration", flush=True)
            winner = start
        chosen_config = winner.apply(tuner.config) if winner != start else tuner.config
        log_dir = Path(scratch)
        failed_logs = [trial.number for trial in tuner.trials if trial.note.startswith("failed")]
        if failed_logs:
            print(f"{len(failed_logs)} trial(s) failed to serve; first log:\n"
                  f"{(log_dir / f'trial-{failed_logs[0]}.log').read_text(errors='replace')[-2000:]}", flush=True)
        elapsed = tuner.elapsed()
    text = text_format.MessageToString(chosen_config)
    text_format.Parse(text, model_config_pb2.ModelConfig())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    serve_flags = ["--model-repository", str(args.model_repository)]
    if winner.cache:
        serve_flags += ["--cache-size", CACHE_BYTES]
    result = {
        "model": args.model, "cpus": tuner.cpus, "client": args.client, "distribution": args.distribution,
        "latency_budget_ms": args.latency_budget_ms, "time_budget_s": args.time_budget, "elapsed_s": elapsed,
        "concurrency": args.concurrency, "start": _trial_json(start_trial), "best": _trial_json(best),
        "chosen": {"description": winner.describe(), "candidate": asdict(winner), "serve_flags": serve_flags,
                   "config_path": str(args.output)},
        "confirmation": confirmation, "trials": [_trial_json(trial) for trial in tuner.trials],
    }
    report = args.output.with_name("tune-report")
    report.with_suffix(".json").write_text(json.dumps(result, indent=2))
    report.with_suffix(".md").write_text(_markdown(result))
    plotted = _plot(result, report.with_suffix(".png"))
    print(f"\nstart {confirmation['start']['throughput_rps']:.0f} req/s, tuned {confirmation['tuned']['throughput_rps']:.0f} "
          f"req/s side by side ({confirmation['ratio']:.2f}x) at {confirmation['concurrency']} in flight")
    print(f"chosen: {winner.describe()}")
    print(f"wrote {args.output}; serve with: hotpath serve {' '.join(serve_flags)}")
    files = [report.with_suffix(".md"), *([report.with_suffix(".png")] if plotted else []), report.with_suffix(".json")]
    print(f"report: {', '.join(map(str, files))}")
    return result


def tune_command(args: argparse.Namespace) -> int:
    """`hotpath tune`: 0 when a config was written, 2 for a usage or load error."""
    try:
        import_bench()
    except ImportError as error:
        print(f"hotpath tune: {BENCH_MISSING.format(error=error)}", file=sys.stderr)
        return 2
    problem = check_arguments(args)
    if problem:
        print(f"hotpath tune: {problem}", file=sys.stderr)
        return 2
    try:
        tune(args)
    except (LoadError, ValueError) as error:
        print(f"hotpath tune: {error}", file=sys.stderr)
        return 2
    return 0
