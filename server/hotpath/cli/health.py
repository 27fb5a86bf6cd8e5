"""`hotpath health`: ask a server's grpc.health.v1 Check and exit 0 when SERVING, 1 otherwise.

A Docker HEALTHCHECK, an exec probe or a script can run it in the server's container; it reads the
same `HOTPATH_HOST` and `HOTPATH_PORT` as `hotpath serve`, so it finds the server with no arguments.
It speaks TLS and mutual TLS too, which Kubernetes' own gRPC probes cannot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hotpath.cli.environment import read_environment
from hotpath.settings import Settings

if TYPE_CHECKING:
    import grpc

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
    health.add_argument("--tls-ca", type=Path, metavar="PEM",
                        help="speak TLS, trusting the server's certificate when these CAs signed it (default: plaintext)")
    health.add_argument("--tls-client-cert", type=Path, metavar="PEM",
                        help="mutual TLS: the client certificate to present (needs --tls-client-key)")
    health.add_argument("--tls-client-key", type=Path, metavar="PEM", help="private key of --tls-client-cert")
    health.add_argument("--tls-server-name", metavar="NAME",
                        help="the name the server's certificate must carry, when it is not the host checked")
    health.set_defaults(func=check_command, log_level="WARNING")
    read_environment(health)


def target(host: str, port: int) -> str:
    """The gRPC target of a server listening on `host`:`port`, loopback for a wildcard address."""
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    """A plaintext channel, or a TLS one when --tls-ca is given; ValueError names a missing or unreadable file."""
    import grpc

    if args.tls_ca is None:
        if args.tls_client_cert or args.tls_client_key or args.tls_server_name:
            raise ValueError("--tls-client-cert, --tls-client-key and --tls-server-name need --tls-ca")
        return grpc.insecure_channel(address)
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        raise ValueError("--tls-client-cert and --tls-client-key go together")
    try:
        ca, cert, key = (path.read_bytes() if path else None for path in (args.tls_ca, args.tls_client_cert, args.tls_client_key))
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options)


def check_command(args: argparse.Namespace) -> int:
    """Print the status of `args.service` on the server; 0 when SERVING, else 1 with the reason on stderr."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = target(args.host, args.port)
    name = repr(args.service) if args.service else "readiness ('')"
    try:
        channel = _channel(address, args)
    except ValueError as exc:
        print(f"hotpath health: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            print(f"hotpath health: {address} {name}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address} {name}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1
