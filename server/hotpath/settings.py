"""Server-wide settings: one object, filled from the command line, documented field by field.

Per-model settings live in each model's `config.pbtxt` (see `config.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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

    workers: int = 1
    """Front-end processes serving the port together (SO_REUSEPORT); each has its own GIL."""

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

    grace_seconds: float = 5.0
    """On shutdown, how long in-flight requests may take to finish."""


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
