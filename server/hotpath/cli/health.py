"""`hotpath health`: ask a server's grpc.health.v1 Check and exit 0 when SERVING, 1 otherwise.

A Docker HEALTHCHECK, an exec probe or a script can run it in the server's container; it reads the
same `HOTPATH_HOST` and `HOTPATH_PORT` as `hotpath serve`, so it finds the server with no arguments.
"""

from __future__ import annotations

import argparse
import sys

from hotpath.cli.environment import read_environment
from hotpath.settings import Settings

WILDCARD_HOSTS = frozenset(("", "0.0.0.0", "::", "[::]"))
"""Listen addresses that mean every interface; a check reaches such a server on loopback."""


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `hotpath health`."""
    defaults = Settings()
    health = subparsers.add_parser(
        "health", help="check a server's health (grpc.health.v1): exit 0 when SERVING, 1 otherwise",
        description="Ask a hotpath server's grpc.health.v1 Check for SERVICE and print its status; exit 0 when "
                    "it is SERVING, 1 otherwise (NOT_SERVING, unknown service, no answer). Service '' (the "
                    "default) is readiness: every model serving; 'liveness' is the process running; a model's "
                    "name is that model's readiness.")
    health.add_argument("--host", default=defaults.host,
                        help=f"the server's address (default {defaults.host}; 0.0.0.0 or :: mean this machine)")
    health.add_argument("--port", type=int, default=defaults.port, help=f"the server's gRPC port (default {defaults.port})")
    health.add_argument("--service", default="", help="what to check: '' (readiness, the default), 'liveness' or a model name")
    health.add_argument("--timeout-s", type=float, default=3.0, metavar="SECONDS",
                        help="how long to wait for the answer (default 3)")
    health.set_defaults(func=check_command, log_level="WARNING")
    read_environment(health)


def target(host: str, port: int) -> str:
    """The gRPC target of a server listening on `host`:`port`, loopback for a wildcard address."""
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def check_command(args: argparse.Namespace) -> int:
    """Print the status of `args.service` on the server; 0 when SERVING, else 1 with the reason on stderr."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = target(args.host, args.port)
    name = repr(args.service) if args.service else "readiness ('')"
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"hotpath health: {address} {name}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address} {name}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1
