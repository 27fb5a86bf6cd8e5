"""The `hotpath` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from hotpath.settings import DEFAULT_MAX_MESSAGE_BYTES, Settings

log = logging.getLogger("hotpath")


def parse_size(text: str) -> int:
    """Bytes from a size like 64MiB, 256MB, 1GiB or 1048576."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number):].upper()
    if unit not in units:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must not be negative")
    return int(value * units[unit])


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    defaults = Settings()
    serve = subparsers.add_parser("serve", help="serve a model repository over gRPC (the demo model when none is given)")
    serve.add_argument("--model-repository", type=Path, help="Triton-layout model repository; omit to serve the built-in demo model")
    serve.add_argument("--host", default=defaults.host, help=f"address to listen on (default {defaults.host}; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=defaults.port, help=f"gRPC port (default {defaults.port})")
    serve.add_argument("--max-message-size", type=parse_size, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help="largest request or response message (default 64MiB)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from hotpath.demo import ensure_demo_repository
    from hotpath.server import serve

    settings = Settings(model_repository=args.model_repository, host=args.host, port=args.port,
                        max_message_bytes=args.max_message_size)
    repository = settings.model_repository
    if repository is None:
        repository = ensure_demo_repository()
        log.info("no --model-repository given: serving the built-in demo model from %s", repository)
    elif not repository.is_dir():
        log.error("model repository %s is not a directory", repository)
        return 2
    log.info("settings: %s", settings)
    asyncio.run(serve(settings, repository))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="hotpath", description="A fast gRPC inference server for ONNX models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
