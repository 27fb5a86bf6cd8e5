"""Per-model statistics in Triton's shape, kept as counters in one flat int64 array.

A flat array (rather than Python attributes) lets several server processes each keep their own
counters in shared memory and any one of them report the sum.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from hotpath._proto import grpc_service_pb2 as pb

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
"""Triton's InferStatistics durations; each is a (count, ns) pair of counters."""

_INDEX = {name: 2 * i for i, name in enumerate(DURATIONS)}
INFERENCE_COUNT = 2 * len(DURATIONS)
EXECUTION_COUNT = INFERENCE_COUNT + 1
LAST_INFERENCE_MS = INFERENCE_COUNT + 2
_BATCH_BASE = INFERENCE_COUNT + 3
_BATCH_FIELDS = 4
"""Per batch size: executions, then input, infer and output nanoseconds."""


def counters_size(max_batch_size: int) -> int:
    """Number of int64 counters a model with this max_batch_size needs."""
    return _BATCH_BASE + (max(max_batch_size, 1) + 1) * _BATCH_FIELDS


class ModelStats:
    """Counters for one model version; `counters` may be a view into shared memory."""

    def __init__(self, max_batch_size: int, counters: np.ndarray | None = None) -> None:
        size = counters_size(max_batch_size)
        self.counters = np.zeros(size, np.int64) if counters is None else counters
        if self.counters.shape != (size,):
            raise ValueError(f"counters must have shape ({size},), got {self.counters.shape}")
        self.max_batch_size = max(max_batch_size, 1)

    def add(self, duration: str, ns: int, count: int = 1) -> None:
        """Count `count` events of a named duration that took `ns` nanoseconds together."""
        i = _INDEX[duration]
        c = self.counters
        c[i] += count
        c[i + 1] += ns

    def request_done(self, success: bool, ns: int, rows: int) -> None:
        """Count one finished request of `rows` rows."""
        self.add("success" if success else "fail", ns)
        if success:
            self.counters[INFERENCE_COUNT] += rows
            self.counters[LAST_INFERENCE_MS] = time.time_ns() // 1_000_000

    def batch_done(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """Count one model execution over `rows` rows."""
        c = self.counters
        c[EXECUTION_COUNT] += 1
        b = _BATCH_BASE + min(rows, self.max_batch_size) * _BATCH_FIELDS
        c[b] += 1
        c[b + 1] += input_ns
        c[b + 2] += infer_ns
        c[b + 3] += output_ns
        for name, ns in (("compute_input", input_ns), ("compute_infer", infer_ns), ("compute_output", output_ns)):
            self.add(name, ns)

    def batch_sizes(self) -> dict[int, int]:
        """Executions per batch size, for sizes that ran at least once."""
        return {size: int(self.counters[_BATCH_BASE + size * _BATCH_FIELDS])
                for size in range(self.max_batch_size + 1)
                if self.counters[_BATCH_BASE + size * _BATCH_FIELDS]}


def to_proto(name: str, version: int, counters: np.ndarray, max_batch_size: int) -> pb.ModelStatistics:
    """Triton's ModelStatistics message from (possibly summed) counters."""
    c = counters
    out = pb.ModelStatistics(name=name, version=str(version), last_inference=int(c[LAST_INFERENCE_MS]),
                             inference_count=int(c[INFERENCE_COUNT]), execution_count=int(c[EXECUTION_COUNT]))
    for duration, i in _INDEX.items():
        getattr(out.inference_stats, duration).count = int(c[i])
        getattr(out.inference_stats, duration).ns = int(c[i + 1])
    for size in range(max(max_batch_size, 1) + 1):
        b = _BATCH_BASE + size * _BATCH_FIELDS
        executions = int(c[b])
        if executions:
            batch = out.batch_stats.add(batch_size=size)
            for field, offset in (("compute_input", 1), ("compute_infer", 2), ("compute_output", 3)):
                getattr(batch, field).count = executions
                getattr(batch, field).ns = int(c[b + offset])
    return out


class StatsStore:
    """Counters of every model version, one file per server process, under a shared run directory.

    Each process writes only its own files (memory-mapped, so an update is a store to memory); any
    process, or the metrics endpoint, reports the sum over all of them.
    """

    def __init__(self, run_dir: Path, worker: int) -> None:
        self.root = run_dir / "stats"
        self.worker = worker

    def _dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def create(self, name: str, version: int, max_batch_size: int) -> ModelStats:
        """Fresh zeroed counters for this process's copy of a model version."""
        directory = self._dir(name, version)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"w{self.worker}.i64"
        staging = directory / f".w{self.worker}.i64.tmp"
        np.zeros(counters_size(max_batch_size), np.int64).tofile(staging)
        staging.replace(path)
        return ModelStats(max_batch_size, np.memmap(path, np.int64, mode="r+"))

    def total(self, name: str, version: int, max_batch_size: int) -> np.ndarray:
        """The sum of every process's counters for a model version."""
        size = counters_size(max_batch_size)
        total = np.zeros(size, np.int64)
        for path in self._dir(name, version).glob("w*.i64"):
            counters = np.fromfile(path, np.int64)
            if counters.shape == (size,):
                total += counters
        total[LAST_INFERENCE_MS] = max((np.fromfile(p, np.int64)[LAST_INFERENCE_MS]
                                        for p in self._dir(name, version).glob("w*.i64")), default=0)
        return total
