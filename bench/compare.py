"""Compare two or more server configurations side by side, in one run, and print ratios to the first.

Every configuration is started at once (each on its own port) and measured on the same models and
load, in interleaved rounds (A B C, then C B A, ...), so machine noise that drifts over the run
falls on all of them alike. Medians over the rounds are reported, with each one's ratio to the
first configuration and to the in-process ONNX Runtime ceiling.

    python -m bench.compare --config 'default=' --config 'pinned=--pin-threads' --config 'naive=@naive' \\
        --models medium --concurrency 64 --rounds 3

A configuration is NAME=SPEC. SPEC is `hotpath serve` flags, or `@naive` for the naive reference
server, plus two options of its own: `--model-config MODEL=PATH` serves MODEL with the config.pbtxt
at PATH (say, one `hotpath tune` wrote), and `--model-repository DIR` serves DIR instead of the
generated bench models (it must hold the models named by --models).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import plotting, run
from bench.ceiling import cpu_session
from bench.loadgen import overlay_repository
from bench.models import write_repository


@dataclass
class ServerConfig:
    """One configuration under comparison, parsed from NAME=SPEC."""

    name: str
    server: str = "hotpath"
    flags: list[str] = field(default_factory=list)
    model_configs: dict[str, Path] = field(default_factory=dict)
    repository: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ServerConfig:
        """Read NAME=SPEC; raises ValueError saying what is wrong."""
        name, sep, spec = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--config {text!r}: expected NAME=SPEC, e.g. 'pinned=--pin-threads' or 'naive=@naive'")
        config = cls(name.strip())
        tokens = iter(shlex.split(spec))
        for token in tokens:
            if token in ("@naive", "@hotpath"):
                config.server = token[1:]
            elif token == "--model-config":
                model, sep, path = next(tokens, "").partition("=")
                if not sep or not Path(path).is_file():
                    raise ValueError(f"--config {text!r}: --model-config needs MODEL=PATH to an existing config.pbtxt")
                config.model_configs[model] = Path(path)
            elif token == "--model-repository":
                config.repository = Path(next(tokens, ""))
                if not config.repository.is_dir():
                    raise ValueError(f"--config {text!r}: --model-repository {config.repository} is not a directory")
            else:
                config.flags.append(token)
        if config.server == "naive" and config.flags:
            raise ValueError(f"--config {text!r}: the naive server takes no hotpath flags ({' '.join(config.flags)})")
        return config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", action="append", required=True, metavar="NAME=SPEC",
                        help="a server configuration; give two or more, the first is the reference")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario (default 3)")
    parser.add_argument("--out", type=Path, default=run.BENCH_DIR / "results", help="directory for JSON and PNG")
    run.add_load_arguments(parser)
    args = parser.parse_args(argv)
    run.check_load_arguments(parser, args, quick=True)
    try:
        args.configs = [ServerConfig.parse(text) for text in args.config]
    except ValueError as error:
        parser.error(str(error))
    names = [config.name for config in args.configs]
    if len(names) < 2 or len(set(names)) != len(names):
        parser.error(f"give two or more --config with distinct names (got {names})")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def summarize(runs: dict[str, list[dict]], ceiling: dict, configs: list[str]) -> list[dict]:
    """Median throughput and p99 per configuration and scenario, with ratios to the first configuration."""
    rows = []
    scenarios = list(dict.fromkeys((r["model"], run.run_level(r)) for r in runs[configs[0]]))
    for model, level in scenarios:
        medians = {}
        for name in configs:
            chosen = [r for r in runs[name] if r["model"] == model and run.run_level(r) == level]
            medians[name] = (statistics.median(r["throughput_rps"] for r in chosen),
                             statistics.median(r["latency_ms"].get("p99", float("nan")) for r in chosen))
        reference = medians[configs[0]][0]
        for name in configs:
            throughput, p99 = medians[name]
            rows.append({"model": model, "level": level, "config": name, "throughput_rps": throughput,
                         "p99_ms": p99, "vs_first": throughput / reference if reference else float("nan"),
                         "of_ceiling": throughput / ceiling[model]["batch_64_rows_per_s"]})
    return rows


def print_table(summary: list[dict], configs: list[str], open_loop: bool) -> None:
    unit = "req/s offered" if open_loop else "in flight"
    print(f"\n{'scenario':24}{'config':>14}{'req/s':>10}{'p99 ms':>9}{'vs ' + configs[0]:>14}{'of ceiling':>12}")
    for row in summary:
        scenario = f"{row['model']} @ {row['level']:g} {unit}"
        print(f"{scenario:24}{row['config']:>14}{row['throughput_rps']:10.0f}{row['p99_ms']:9.2f}"
              f"{row['vs_first']:14.2f}{row['of_ceiling']:12.3f}")


def plot(results: dict, path: Path) -> bool:
    """One panel per scenario: each configuration's median throughput as a bar, each round as a dot."""
    plt = plotting.pyplot(path)
    if plt is None:
        return False

    configs = list(results["configs"])
    scenarios = list(dict.fromkeys((row["model"], row["level"]) for row in results["summary"]))
    figure, axes = plt.subplots(1, len(scenarios), figsize=(max(4.5, 1.6 * len(configs) + 2) * len(scenarios), 4),
                                squeeze=False)
    for axis, (model, level) in zip(axes[0], scenarios):
        rows = {row["config"]: row for row in results["summary"] if (row["model"], row["level"]) == (model, level)}
        axis.bar(range(len(configs)), [rows[name]["throughput_rps"] for name in configs], color="tab:blue", alpha=0.6)
        for index, name in enumerate(configs):
            rounds = [r["throughput_rps"] for r in results["runs"][name]
                      if r["model"] == model and run.run_level(r) == level]
            axis.plot([index] * len(rounds), rounds, "k.", markersize=5)
            axis.annotate(f"{rows[name]['vs_first']:.2f}x", (index, rows[name]["throughput_rps"]),
                          ha="center", va="bottom", fontsize="small")
        axis.set_xticks(range(len(configs)), configs)
        axis.set_title(f"{model} @ {level:g}: requests/s (median, rounds as dots)\nONNX Runtime in-process ceiling "
                       f"{results['ceiling'][model]['batch_64_rows_per_s']:.0f} rows/s", fontsize="small")
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> Path:
    """Run the comparison; return the JSON results path."""
    args = parse_args(argv)
    scenarios = run.scenario_list(args)
    models = list(dict.fromkeys(scenario.model for scenario in scenarios))
    names = [config.name for config in args.configs]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": run.machine(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                     if key not in ("config", "configs")},
        "configs": {config.name: text for config, text in zip(args.configs, args.config)},
        "ceiling": {},
        "runs": {name: [] for name in names},
    }
    with tempfile.TemporaryDirectory(prefix="hotpath-compare-") as scratch, ExitStack() as servers:
        generated = write_repository(Path(scratch) / "generated", models, args.seed)
        results["ceiling"] = run.measure_ceiling(generated, models, args.ceiling_seconds, args.seed)
        sessions = {model: cpu_session(generated / model / "1" / "model.onnx") for model in models}
        started = {}
        for config in args.configs:
            repository = config.repository or generated
            if config.model_configs:
                repository = overlay_repository(
                    repository, Path(scratch) / config.name, models,
                    {model: path.read_text() for model, path in config.model_configs.items()})
            port = run.free_port()
            log_path = args.out / f"{stamp}-{config.name}.log"
            print(f"{config.name}: {config.server} on 127.0.0.1:{port} {' '.join(config.flags)} (log {log_path})",
                  flush=True)
            command = run.server_command(config.server, repository, port, config.flags)
            started[config.name] = servers.enter_context(run.start_server(config.name, command, log_path, port))
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            print(f"round {round_index + 1}/{args.rounds}:", flush=True)
            for scenario in scenarios:
                for name in order:
                    measured = run.measure(started[name], scenario, args, sessions[scenario.model])
                    results["runs"][name].append(measured)
                    print(run.summary_line(name, measured), flush=True)
    results["summary"] = summarize(results["runs"], results["ceiling"], names)
    print_table(results["summary"], names, args.mode == "open")
    json_path = args.out / f"{stamp}-compare.json"
    json_path.write_text(json.dumps(results, indent=2))
    plotted = plot(results, json_path.with_suffix(".png"))
    print(f"wrote {json_path}" + (f" and {json_path.with_suffix('.png')}" if plotted else ""))
    return json_path


def failures(results: dict) -> list[str]:
    """Runs that returned errors or wrong outputs: their numbers mean nothing."""
    return [f"{name} {r['model']}@{run.run_level(r):g}" for name, runs in results["runs"].items() for r in runs
            if r["errors"] or r.get("server_stats", {}).get("fail", 0) > r.get("cancelled_at_stop_max", 0)
            or r["verification"]["mismatched"]
            or r["verification"]["errors"]]


if __name__ == "__main__":
    bad = failures(json.loads(main().read_text()))
    if bad:
        sys.exit(f"wrong outputs or errors in: {', '.join(bad)} (see the JSON)")
