"""Server-wide settings: one object, filled from the command line (or its HOTPATH_* variables), documented field by field.

Per-model settings live in each model's `config.pbtxt` (see `config.py`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hotpath.transport.security import Restriction

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class Settings:
    """Everything `hotpath serve` can be told; the defaults are what a new user gets."""

    model_repository: Path | None = None
    """Triton-layout model repository; None serves the built-in demo model."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""

    port: int = 8001
    """gRPC port (Triton's default)."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest request or response message, in bytes; larger ones fail with RESOURCE_EXHAUSTED."""

    grpc_threads: int = 0
    """gRPC threads that accept calls and read and write messages (without the GIL); 0 means
    `grpc_threads()`'s choice for the usable CPUs."""

    cpus: int = 0
    """CPUs the server may use for replicas x threads; 0 means what the process may actually use."""

    pin_threads: bool = False
    """Pin each replica's ONNX Runtime threads to its own cores."""

    require_gpu: bool = False
    """Fail a KIND_GPU model's load when CUDA is unavailable instead of falling back to CPU."""

    cache_bytes: int = 0
    """Server-wide response cache budget in bytes; 0 disables the cache for every model."""

    metrics_port: int = 8002
    """HTTP port of the Prometheus metrics endpoint; 0 turns it off."""

    metrics_host: str = ""
    """Address the metrics endpoint listens on; "" means `host`. The endpoint is plain HTTP without access
    control, so a server exposed with TLS usually keeps it on 127.0.0.1 or a private interface."""

    tls_cert: Path | None = None
    """PEM certificate chain the gRPC port presents; with `tls_key` the port speaks TLS only."""

    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""

    tls_client_ca: Path | None = None
    """PEM bundle of the CAs whose client certificates are accepted; set, every client must present one
    (mutual TLS)."""

    tls_reload_s: int = 60
    """How often the TLS files are re-read, so renewed certificates are served without a restart."""

    model_control: str = "none"
    """Triton's model control mode: "none" refuses RepositoryModelLoad and RepositoryModelUnload with
    FAILED_PRECONDITION; "explicit" serves them."""

    restricted_protocols: tuple[Restriction, ...] = ()
    """Triton's --grpc-restricted-protocol: protocol groups answered only to callers sending a header."""

    model_control_allow_identities: tuple[str, ...] = ()
    """Client certificate identities (common name or subject alternative name, verified by mutual TLS)
    admitted to the model-repository RPCs; set, other callers need the restriction header, if any."""

    tracing: bool = True
    """False (--no-trace) turns tracing off whatever the OTEL_* variables say."""

    trace_endpoint: str = ""
    """OTLP collector endpoint for traces, e.g. http://localhost:4317; "" reads OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
    and without either tracing is off."""

    trace_sampling: float | None = None
    """Fraction of calls without a caller's trace context that start a trace; None reads OTEL_TRACES_SAMPLER[_ARG],
    else 0.01. A caller's sampled `traceparent` is always continued."""

    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""

    log_format: str = "text"
    """"text" lines, or "json": one JSON object per line (time, level, role, logger, message) for log collectors."""

    drain_s: float = 0.0
    """On SIGTERM, how long to keep serving while health reports NOT_SERVING, so load balancers and
    Kubernetes stop sending new calls before the listener closes."""

    grace_s: float = 5.0
    """After the drain, how long accepted requests may take to finish; the rest are answered UNAVAILABLE."""


MAX_AUTO_GRPC_THREADS = 4
"""Most gRPC threads chosen automatically."""


def grpc_threads(settings: Settings) -> int:
    """gRPC threads for the server: as set, else one per two usable CPUs, at most MAX_AUTO_GRPC_THREADS.

    The event loop's thread and the replicas need the other cores.
    """
    if settings.grpc_threads:
        return settings.grpc_threads
    return max(1, min((settings.cpus or available_cpus()) // 2, MAX_AUTO_GRPC_THREADS))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, further capped by a cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_size(text: str) -> int:
    """Read a byte count such as "256MiB", "1.5 GB" or "1048576" (a bare number is bytes).

    KB, MB and GB are decimal (powers of 1000); KiB, MiB and GiB are binary (powers of 1024).
    Units are case-insensitive. Raises ValueError for anything else, or for a fraction of a byte.
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in ("", *_UNITS):
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit, one of "
            "B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024), for example '256MiB'"
        )
    size = Decimal(match.group(1)) * _UNITS[match.group(2) or "b"]
    if size != size.to_integral_value():
        raise ValueError(f"invalid size {text!r}: it comes to {size} bytes, not a whole number of bytes")
    return int(size)
