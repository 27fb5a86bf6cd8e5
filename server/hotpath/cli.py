"""The `hotpath` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from hotpath.drift.cli import add_commands as add_drift_commands
from hotpath.logs import configure_logging
from hotpath.settings import DEFAULT_MAX_MESSAGE_BYTES, Settings, parse_size

log = logging.getLogger("hotpath")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    defaults = Settings()
    serve = subparsers.add_parser("serve", help="serve a model repository over gRPC (the demo model when none is given)")
    serve.add_argument("--model-repository", type=Path, help="Triton-layout model repository; omit to serve the built-in demo model")
    serve.add_argument("--host", default=defaults.host, help=f"address to listen on (default {defaults.host}; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=defaults.port, help=f"gRPC port (default {defaults.port})")
    serve.add_argument("--max-message-size", type=_size, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help="largest request or response message (default 64MiB)")
    serve.add_argument("--cache-size", type=_size, default=defaults.cache_bytes,
                       help="response cache budget shared by every model with response_cache { enable: true }, "
                            "e.g. 256MiB (default 0: off); split evenly over the workers")
    serve.add_argument("--workers", type=int, default=defaults.workers,
                       help=f"front-end processes sharing the port, each with its own GIL (default {defaults.workers})")
    serve.add_argument("--cpus", type=int, default=defaults.cpus,
                       help="CPUs for replicas x threads over all workers (default: what the process may use)")
    serve.add_argument("--pin-threads", action="store_true", help="pin each replica's ONNX Runtime threads to its own cores")
    serve.add_argument("--require-gpu", action="store_true", help="fail KIND_GPU models when CUDA is unavailable instead of using the CPU")
    serve.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                       help=f"HTTP port of the Prometheus metrics endpoint at /metrics (default {defaults.metrics_port}; 0 turns it off)")
    serve.add_argument("--trace-endpoint", default=defaults.trace_endpoint,
                       help="OTLP collector for traces, e.g. http://localhost:4317 (default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; "
                            "tracing is off without either)")
    serve.add_argument("--trace-sampling", type=float, default=defaults.trace_sampling, metavar="RATIO",
                       help="fraction of calls without a sampled caller that start a trace (default: OTEL_TRACES_SAMPLER_ARG, else 0.01)")
    serve.add_argument("--no-trace", dest="tracing", action="store_false", help="turn tracing off whatever OTEL_* says")
    serve.add_argument("--log-level", default=defaults.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from hotpath.demo import ensure_demo_repository
    from hotpath.server import serve

    from hotpath.telemetry import trace_settings

    if args.workers < 1:
        log.error("--workers must be at least 1, got %d", args.workers)
        return 2
    if not 0 <= args.metrics_port <= 65535:
        log.error("--metrics-port must be a port number (0 turns the endpoint off), got %d", args.metrics_port)
        return 2
    settings = Settings(model_repository=args.model_repository, host=args.host, port=args.port,
                        max_message_bytes=args.max_message_size, workers=args.workers, cpus=args.cpus,
                        pin_threads=args.pin_threads, require_gpu=args.require_gpu, log_level=args.log_level,
                        cache_bytes=args.cache_size, metrics_port=args.metrics_port, tracing=args.tracing,
                        trace_endpoint=args.trace_endpoint, trace_sampling=args.trace_sampling)
    try:
        trace_settings(settings)
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
    log.info("settings: %s", settings)
    try:
        asyncio.run(serve(settings, repository))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="hotpath", description="A fast gRPC inference server for ONNX models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    add_drift_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"))
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
