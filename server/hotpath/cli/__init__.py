"""The `hotpath` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from hotpath import __version__
from hotpath.cli import health
from hotpath.cli.environment import read_environment, resolve_environment
from hotpath.cli.evaluate import add_command as add_evaluate_command
from hotpath.cli.label import add_command as add_label_command
from hotpath.drift.cli import add_commands as add_drift_commands
from hotpath.observability.logs import configure_logging
from hotpath.settings import DEFAULT_MAX_MESSAGE_BYTES, Settings, available_cpus, grpc_threads, parse_size
from hotpath.transport.security import MODEL_CONTROL_MODES, PROTOCOLS, Restriction, check_restrictions, check_tls_files, parse_restriction

log = logging.getLogger("hotpath")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _restriction(text: str) -> Restriction:
    try:
        return parse_restriction(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    defaults = Settings()
    serve = subparsers.add_parser("serve", help="serve a model repository over gRPC (the demo model when none is given)",
                                  epilog="Every flag can also be set by its environment variable, HOTPATH_ and the flag's "
                                         "name (--model-repository: HOTPATH_MODEL_REPOSITORY, --pin-threads: "
                                         "HOTPATH_PIN_THREADS=1); a flag given on the command line beats its variable.")
    serve.add_argument("--model-repository", type=Path, help="Triton-layout model repository; omit to serve the built-in demo model")
    serve.add_argument("--host", default=defaults.host, help=f"address to listen on (default {defaults.host}; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=defaults.port, help=f"gRPC port (default {defaults.port})")
    serve.add_argument("--port-file", type=Path, metavar="PATH",
                       help="once listening, write the bound port (decimal, newline) to PATH, atomically; "
                            "with --port 0 this is how a launcher learns the port")
    serve.add_argument("--drain-s", type=float, default=defaults.drain_s, metavar="SECONDS",
                       help="on SIGTERM, keep serving this long while health reports NOT_SERVING, so balancers "
                            f"stop sending calls first (default {defaults.drain_s:g})")
    serve.add_argument("--grace-s", type=float, default=defaults.grace_s, metavar="SECONDS",
                       help="then, how long accepted calls may take to finish; the rest are answered UNAVAILABLE "
                            f"(default {defaults.grace_s:g})")
    serve.add_argument("--max-message-size", type=_size, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help="largest request or response message (default 64MiB)")
    serve.add_argument("--cache-size", type=_size, default=defaults.cache_bytes,
                       help="response cache budget shared by every model with response_cache { enable: true }, "
                            "e.g. 256MiB (default 0: off)")
    serve.add_argument("--grpc-threads", type=int, default=defaults.grpc_threads,
                       help="gRPC threads that accept calls and move messages, without the GIL "
                            "(default: one per two usable CPUs, at most 4)")
    serve.add_argument("--cpus", type=int, default=defaults.cpus,
                       help="CPUs for replicas x threads (default: what the process may use)")
    serve.add_argument("--pin-threads", action="store_true", help="pin each replica's ONNX Runtime threads to its own cores")
    serve.add_argument("--require-gpu", action="store_true", help="fail KIND_GPU models when CUDA is unavailable instead of using the CPU")
    serve.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                       help=f"HTTP port of the Prometheus metrics endpoint at /metrics (default {defaults.metrics_port}; 0 turns it off)")
    serve.add_argument("--metrics-host", default=defaults.metrics_host, metavar="ADDRESS",
                       help="address of the metrics endpoint (default: --host); plain HTTP without access control")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="certificate chain to serve TLS with (needs --tls-key); "
                                                                  "without it the port is plaintext")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    serve.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                       help="CA bundle for mutual TLS: every client must present a certificate one of these signed")
    serve.add_argument("--tls-reload-s", type=int, default=defaults.tls_reload_s, metavar="SECONDS",
                       help=f"re-read the TLS files this often, so renewed certificates need no restart (default {defaults.tls_reload_s})")
    serve.add_argument("--model-control", default=defaults.model_control, choices=MODEL_CONTROL_MODES,
                       help="none (default): RepositoryModelLoad and RepositoryModelUnload are refused; explicit: they are served")
    serve.add_argument("--grpc-restricted-protocol", dest="restricted_protocols", action="append", type=_restriction,
                       default=[], metavar="PROTOCOL[,PROTOCOL...]:KEY=VALUE",
                       help=f"as Triton's: serve these protocols ({', '.join(PROTOCOLS)}) only to callers that send "
                            "header KEY with VALUE; repeatable")
    serve.add_argument("--model-control-allow-identity", dest="allowed_identities", action="append", default=[], metavar="NAME",
                       help="admit to the model-repository RPCs callers whose mutual-TLS certificate has NAME as common "
                            "name or subject alternative name (needs --tls-client-ca); repeatable")
    serve.add_argument("--trace-endpoint", default=defaults.trace_endpoint,
                       help="OTLP collector for traces, e.g. http://localhost:4317 (default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; "
                            "tracing is off without either)")
    serve.add_argument("--trace-sampling", type=float, default=defaults.trace_sampling, metavar="RATIO",
                       help="fraction of calls without a sampled caller that start a trace (default: OTEL_TRACES_SAMPLER_ARG, else 0.01)")
    serve.add_argument("--no-trace", dest="tracing", action="store_false", help="turn tracing off whatever OTEL_* says")
    serve.add_argument("--log-level", default=defaults.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", default=defaults.log_format, choices=["text", "json"],
                       help="text lines, or one JSON object per line for log collectors (default text)")
    serve.set_defaults(func=_serve)
    read_environment(serve)


def _serve(args: argparse.Namespace) -> int:
    from hotpath.cli.demo import ensure_demo_repository
    from hotpath.server import serve

    from hotpath.observability.telemetry import trace_settings

    if args.grpc_threads < 0:
        log.error("--grpc-threads must be at least 1 (or 0 to choose from the usable CPUs), got %d", args.grpc_threads)
        return 2
    for flag, value in (("--drain-s", args.drain_s), ("--grace-s", args.grace_s)):
        if not value >= 0:
            log.error("%s must be a number of seconds >= 0, got %s", flag, value)
            return 2
    if not 0 <= args.metrics_port <= 65535:
        log.error("--metrics-port must be a port number (0 turns the endpoint off), got %d", args.metrics_port)
        return 2
    if args.tls_reload_s < 1:
        log.error("--tls-reload-s must be at least 1 second, got %d", args.tls_reload_s)
        return 2
    if args.allowed_identities and args.tls_client_ca is None:
        log.error("--model-control-allow-identity needs --tls-client-ca: only mutual TLS verifies a client's identity")
        return 2
    try:
        check_restrictions(args.restricted_protocols)
        check_tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    settings = Settings(model_repository=args.model_repository, host=args.host, port=args.port,
                        max_message_bytes=args.max_message_size, grpc_threads=args.grpc_threads, cpus=args.cpus,
                        pin_threads=args.pin_threads, require_gpu=args.require_gpu, log_level=args.log_level,
                        cache_bytes=args.cache_size, metrics_port=args.metrics_port, tracing=args.tracing,
                        trace_endpoint=args.trace_endpoint, trace_sampling=args.trace_sampling,
                        drain_s=args.drain_s, grace_s=args.grace_s, metrics_host=args.metrics_host,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                        tls_reload_s=args.tls_reload_s, model_control=args.model_control,
                        restricted_protocols=tuple(args.restricted_protocols),
                        model_control_allow_identities=tuple(args.allowed_identities), log_format=args.log_format)
    try:
        tracing = trace_settings(settings)
    except ValueError as exc:
        log.error("tracing: %s", exc)
        return 2
    repository = settings.model_repository
    if repository is None:
        repository = ensure_demo_repository()
        log.info("no --model-repository given: serving the built-in demo model from %s", repository)
    elif not repository.is_dir():
        log.error("model repository %s is not a directory", repository)
        return 2
    log.info("settings: %d gRPC thread(s), %s CPUs for replicas, max message %d bytes, cache %s, metrics %s, tracing %s%s%s",
             grpc_threads(settings), settings.cpus or available_cpus(), settings.max_message_bytes,
             f"{settings.cache_bytes} bytes" if settings.cache_bytes else "off",
             f"port {settings.metrics_port}" if settings.metrics_port else "off",
             f"to {tracing.endpoint or 'the OTEL_* endpoint'} at ratio {tracing.ratio}" if tracing else "off",
             ", threads pinned" if settings.pin_threads else "", ", GPU required" if settings.require_gpu else "")
    try:
        asyncio.run(serve(settings, repository, port_file=args.port_file))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


def _concurrency_list(text: str) -> list[int]:
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 16,64; got {text!r}") from None


def _add_tune(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser(
        "tune", help="find the fastest configuration of one model on this machine, within a p99 latency budget",
        description="Serve MODEL under load in a series of candidate configurations (replicas x threads, "
                    "max batch size, queue delay, response cache), keep the fastest whose p99 fits the budget, "
                    "and write its config.pbtxt with a report (table and plot) of every trial.")
    tune.add_argument("model", metavar="MODEL", help="the model's directory name in the repository")
    tune.add_argument("--model-repository", type=Path, required=True, help="Triton-layout model repository holding MODEL")
    tune.add_argument("--latency-budget-ms", type=float, help="p99 latency a configuration must stay within (default: none)")
    tune.add_argument("--time-budget", type=float, default=180.0, help="seconds the whole search may take (default 180)")
    tune.add_argument("--concurrency", type=_concurrency_list, default=[64],
                      help="requests in flight to measure at, comma-separated; the best level within budget counts (default 64)")
    tune.add_argument("--distribution", choices=("random", "zipf", "replay"), default="random",
                      help="inputs like your traffic: random (no repeats), zipf (popular inputs repeat) or replay "
                           "(--replay rows); the response cache is tried only for zipf and replay")
    tune.add_argument("--replay", type=Path, help=".npy file of input rows for --distribution replay")
    tune.add_argument("--pool-size", type=int, default=10_000, help="distinct inputs for random and zipf (default 10000)")
    tune.add_argument("--client", choices=("auto", "h2load", "python"), default="auto",
                      help="load client: auto uses h2load for random inputs when installed, else the Python client")
    tune.add_argument("--cpus", type=int, default=0, help="CPUs the tuned server may use (default: what this process may use)")
    tune.add_argument("--duration", type=float, default=2.0, help="measured seconds per load level (default 2)")
    tune.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement (default 1)")
    tune.add_argument("--confirm-rounds", type=int, default=3,
                      help="interleaved rounds of the start and the winner side by side at the end (default 3)")
    tune.add_argument("--output", type=Path, help="where to write the tuned config (default MODEL/config.tuned.pbtxt)")
    tune.add_argument("--write", action="store_true", help="replace MODEL/config.pbtxt with the tuned config")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(func=_tune, log_level="WARNING")


def _tune(args: argparse.Namespace) -> int:
    from hotpath.cli.tune import tune_command

    return tune_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="hotpath", description="A fast gRPC inference server for ONNX models.")
    parser.add_argument("--version", action="version", version=f"hotpath {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_tune(subparsers)
    add_drift_commands(subparsers)
    add_label_command(subparsers)
    add_evaluate_command(subparsers)
    health.add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    resolve_environment(args)
    configure_logging(getattr(args, "log_level", "INFO"), log_format=getattr(args, "log_format", "text"))
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
