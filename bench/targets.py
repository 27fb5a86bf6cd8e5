"""The issue's targets for hotpath: which runs each compares, the ratios from one bench run, and their tables.

Every ratio compares runs of the same invocation (same machine, same minutes). A target whose runs
were not made (a peer not installed, a model or load level not in the sweep) is reported as skipped,
with the reason, rather than left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TOP_IN_FLIGHT = 64
"""The load level the throughput targets are set at."""


@dataclass(frozen=True)
class Target:
    """hotpath's `metric` on `model` at `in_flight` over `connections`, against `peer` on the same load.

    `peer` is a server name, or "ceiling" for in-process ONNX Runtime at batch 64. `metric` is
    "throughput" (higher is better) or "p50" (median latency, lower is better).
    """

    model: str
    in_flight: int
    connections: int
    metric: str
    peer: str
    comparison: str
    bound: float

    @property
    def label(self) -> str:
        load = f"{self.model} @{self.in_flight} in flight/{self.connections} conn"
        versus = "ORT in-process batch 64" if self.peer == "ceiling" else self.peer
        return f"{load}: {'p50 latency' if self.metric == 'p50' else 'throughput'} vs {versus}"


TARGETS = (
    Target("tiny", TOP_IN_FLIGHT, 4, "throughput", "floor", ">=", 0.25),
    Target("tiny", TOP_IN_FLIGHT, 4, "throughput", "pytriton", ">=", 3.5),
    Target("tiny", TOP_IN_FLIGHT, 1, "throughput", "floor", ">=", 0.30),
    Target("tiny", 1, 1, "p50", "naive", "<=", 1.0),
    Target("medium", TOP_IN_FLIGHT, 4, "throughput", "pytriton", ">=", 4.0),
    Target("large", TOP_IN_FLIGHT, 4, "throughput", "ceiling", ">=", 0.85),
)


def find_run(results: dict, server: str, model: str, in_flight: int, connections: int) -> dict | None:
    """The closed-loop h2load run of `server` on `model` at `in_flight` over `connections`, if made.

    A run from the Python client matches on `in_flight` alone (it spreads connections its own way).
    """
    for run in results["servers"].get(server, {}).get("runs", []):
        if run["model"] != model or run["concurrency"] != in_flight or run.get("rate_rps") is not None:
            continue
        if run.get("client") != "h2load" or run.get("connections") == connections:
            return run
    return None


def needs(peer: str, model: str, in_flight: int, connections: int) -> bool:
    """Whether a target compares hotpath against `peer` at this scenario."""
    return any((target.peer, target.model, target.in_flight, target.connections) == (peer, model, in_flight, connections)
               for target in TARGETS)


def _value(run: dict, metric: str) -> float:
    return run["latency_ms"].get("p50", math.nan) if metric == "p50" else run["throughput_rps"]


def _missing(results: dict, server: str, target: Target) -> str:
    status = results["servers"].get(server, {}).get("status")
    if status is None:
        return f"{server} not in --servers"
    if status != "ran":
        return f"{server} {status.splitlines()[0]}"
    return f"{server} has no run of {target.model} at {target.in_flight} in flight over {target.connections} conn"


def evaluate(results: dict) -> list[dict]:
    """Each target with hotpath's value, the peer's, their ratio and whether it was met; a target that
    could not be measured has ratio and met None and says why under `skipped`."""
    evaluated = []
    for target in TARGETS:
        row = {"target": target.label, "model": target.model, "in_flight": target.in_flight,
               "connections": target.connections, "metric": target.metric, "peer": target.peer,
               "bound": f"{target.comparison} {target.bound:g}", "hotpath": None, "peer_value": None,
               "ratio": None, "met": None, "skipped": None}
        ours = find_run(results, "hotpath", target.model, target.in_flight, target.connections)
        if target.peer == "ceiling":
            ceiling = results.get("ceiling", {}).get(target.model)
            theirs = ceiling["batch_64_rows_per_s"] if ceiling else None
            why_not = f"no ceiling measured for {target.model}"
        else:
            run = find_run(results, target.peer, target.model, target.in_flight, target.connections)
            theirs = _value(run, target.metric) if run else None
            why_not = _missing(results, target.peer, target)
        if ours is None:
            row["skipped"] = _missing(results, "hotpath", target)
        elif theirs is None:
            row["skipped"] = why_not
        else:
            row["hotpath"], row["peer_value"] = _value(ours, target.metric), theirs
            row["ratio"] = row["hotpath"] / theirs if theirs else math.nan
            row["met"] = row["ratio"] >= target.bound if target.comparison == ">=" else row["ratio"] <= target.bound
        evaluated.append(row)
    return evaluated


def _number(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ms" if metric == "p50" else f"{value:,.0f}/s"


def format_targets(evaluated: list[dict]) -> str:
    """The ratios table, one target a line: hotpath's value, the peer's, the ratio, the bound, verdict."""
    width = max(len(row["target"]) for row in evaluated)
    lines = [f"{'target':{width}}  {'hotpath':>12}  {'peer':>12}  {'ratio':>6}  {'bound':>7}  verdict"]
    for row in evaluated:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        verdict = f"skipped: {row['skipped']}" if row["skipped"] else ("met" if row["met"] else "NOT MET")
        lines.append(f"{row['target']:{width}}  {_number(row['hotpath'], row['metric']):>12}  "
                     f"{_number(row['peer_value'], row['metric']):>12}  {ratio:>6}  {row['bound']:>7}  {verdict}")
    return "\n".join(lines)


def cpu_per_request(results: dict, connections: int) -> dict[str, dict[str, float]]:
    """Server CPU microseconds per request at TOP_IN_FLIGHT over `connections`, per server and model."""
    found: dict[str, dict[str, float]] = {}
    for name in results["servers"]:
        for model in results.get("ceiling", {}):
            run = find_run(results, name, model, TOP_IN_FLIGHT, connections)
            if run is not None and run["requests"]:
                found.setdefault(name, {})[model] = run["cpu_us_per_request"]
    return found


def format_cpu(table: dict[str, dict[str, float]], models: list[str], connections: int) -> str:
    lines = [f"server CPU per request at {TOP_IN_FLIGHT} in flight over {connections} conn (us; process, "
             f"its threads and live children):", f"  {'server':10}" + "".join(f"{model:>10}" for model in models)]
    for name, per_model in table.items():
        cells = "".join(f"{per_model[model]:10.1f}" if model in per_model else f"{'-':>10}" for model in models)
        lines.append(f"  {name:10}{cells}")
    return "\n".join(lines)
