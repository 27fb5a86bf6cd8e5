"""Per-model statistics in Triton's shape, kept as counters in one flat int64 array.

Beyond Triton's statistics the array holds what the Prometheus endpoint (`metrics.py`) shows:
failures by gRPC status, fixed-bucket duration histograms (successes and failures apart), and gauges.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

import grpc
import numpy as np

from hotpath._proto import grpc_service_pb2 as pb

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
"""Triton's InferStatistics durations; each is a (count, ns) pair of counters."""

DURATION_BUCKETS = (0.00001, 0.00002, 0.00003, 0.00004, 0.00005, 0.00006, 0.00008, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004,
                    0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds, in seconds, of the duration histograms (then +Inf): 10 us steps up to 60 us, so a
tiny model's requests spread over buckets instead of all landing in the first one."""

HISTOGRAMS = ("request", "failure", "queue", "compute")
"""Duration histograms: request (whole successful request), failure (whole failed request), queue
(per request), compute (per batch execution)."""

STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
"""gRPC status number -> name, the reasons a request can fail with."""

GAUGES = ("queue_depth", "in_flight", "replicas", "busy_ns", "cache_entries", "cache_bytes", "cache_evictions")
"""Values the server sets (or, for busy_ns, accumulates) for a model version."""

DURATION_INDEX = {name: 2 * i for i, name in enumerate(DURATIONS)}
"""Where each duration's (count, ns) pair starts."""
INFERENCE_COUNT = 2 * len(DURATIONS)
EXECUTION_COUNT = INFERENCE_COUNT + 1
LAST_INFERENCE_MS = INFERENCE_COUNT + 2
FAILURES = LAST_INFERENCE_MS + 1
"""Failed requests per gRPC status number."""
_BUCKETS_NS = tuple(round(bound * 1e9) for bound in DURATION_BUCKETS)
_HISTOGRAM_SIZE = len(DURATION_BUCKETS) + 1
HISTOGRAM = {name: FAILURES + len(STATUS_NAMES) + i * _HISTOGRAM_SIZE for i, name in enumerate(HISTOGRAMS)}
"""Where each duration histogram's per-bucket (not cumulative) counts start, the last one +Inf."""
GAUGE = {name: HISTOGRAM[HISTOGRAMS[-1]] + _HISTOGRAM_SIZE + i for i, name in enumerate(GAUGES)}
_BATCH_BASE = GAUGE[GAUGES[-1]] + 1
_BATCH_FIELDS = 4
"""Per batch size: executions, then input, infer and output nanoseconds."""


def counters_size(max_batch_size: int) -> int:
    """Number of int64 counters a model with this max_batch_size needs."""
    return _BATCH_BASE + (max(max_batch_size, 1) + 1) * _BATCH_FIELDS


class ModelStats:
    """Counters for one model version."""

    def __init__(self, max_batch_size: int, counters: np.ndarray | None = None) -> None:
        size = counters_size(max_batch_size)
        self.counters = np.zeros(size, np.int64) if counters is None else counters
        if self.counters.shape != (size,):
            raise ValueError(f"counters must have shape ({size},), got {self.counters.shape}")
        self.max_batch_size = max(max_batch_size, 1)

    def add(self, duration: str, ns: int, count: int = 1) -> None:
        """Count `count` events of a named duration that took `ns` nanoseconds together."""
        i = DURATION_INDEX[duration]
        c = self.counters
        c[i] += count
        c[i + 1] += ns

    def request_done(self, success: bool, ns: int, rows: int, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        """Count one finished request of `rows` rows; a failed one under its gRPC status `code`."""
        c = self.counters
        c[HISTOGRAM["request" if success else "failure"] + bisect_left(_BUCKETS_NS, ns)] += 1
        if success:
            self.add("success", ns)
            c[INFERENCE_COUNT] += rows
            c[LAST_INFERENCE_MS] = time.time_ns() // 1_000_000
        else:
            self.add("fail", ns)
            c[FAILURES + code.value[0]] += 1

    def queued(self, waits_ns: list[int]) -> None:
        """Count requests that left the queue for a replica after waiting `waits_ns` each."""
        c = self.counters
        base = HISTOGRAM["queue"]
        for ns in waits_ns:
            c[base + bisect_left(_BUCKETS_NS, ns)] += 1
        self.add("queue", sum(waits_ns), len(waits_ns))

    def batch_done(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """Count one model execution over `rows` rows; the replica was busy for input and infer."""
        c = self.counters
        c[EXECUTION_COUNT] += 1
        b = _BATCH_BASE + min(rows, self.max_batch_size) * _BATCH_FIELDS
        c[b] += 1
        c[b + 1] += input_ns
        c[b + 2] += infer_ns
        c[b + 3] += output_ns
        for name, ns in (("compute_input", input_ns), ("compute_infer", infer_ns), ("compute_output", output_ns)):
            self.add(name, ns)
        c[HISTOGRAM["compute"] + bisect_left(_BUCKETS_NS, input_ns + infer_ns + output_ns)] += 1
        c[GAUGE["busy_ns"]] += input_ns + infer_ns

    def set_gauge(self, name: str, value: int) -> None:
        """Set a gauge in GAUGES."""
        self.counters[GAUGE[name]] = value

    def set_load(self, queued: int, running: int) -> None:
        """Record the requests waiting in the queue and those in running batches."""
        c = self.counters
        c[GAUGE["queue_depth"]] = queued
        c[GAUGE["in_flight"]] = queued + running

    def set_cache(self, entries: int, size_bytes: int, evictions: int) -> None:
        """Record the response cache's state for the model: entries, bytes, evictions so far."""
        c = self.counters
        c[GAUGE["cache_entries"]] = entries
        c[GAUGE["cache_bytes"]] = size_bytes
        c[GAUGE["cache_evictions"]] = evictions

    def batch_sizes(self) -> dict[int, int]:
        """Executions per batch size, for sizes that ran at least once."""
        return batch_sizes(self.counters, self.max_batch_size)


def batch_sizes(counters: np.ndarray, max_batch_size: int) -> dict[int, int]:
    """Executions per batch size in (possibly summed) counters, for sizes that ran at least once."""
    return {size: int(counters[_BATCH_BASE + size * _BATCH_FIELDS])
            for size in range(max(max_batch_size, 1) + 1)
            if counters[_BATCH_BASE + size * _BATCH_FIELDS]}


def to_proto(name: str, version: int, counters: np.ndarray, max_batch_size: int) -> pb.ModelStatistics:
    """Triton's ModelStatistics message from (possibly summed) counters."""
    c = counters
    out = pb.ModelStatistics(name=name, version=str(version), last_inference=int(c[LAST_INFERENCE_MS]),
                             inference_count=int(c[INFERENCE_COUNT]), execution_count=int(c[EXECUTION_COUNT]))
    for duration, i in DURATION_INDEX.items():
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
    """Counters of every model version the server has served, kept after it unloads.

    Written on the event loop's thread; the metrics endpoint's thread reads them (a torn read of a
    counter being updated shows the value before or after, never garbage: int64 stores are atomic).
    """

    def __init__(self) -> None:
        self._stats: dict[tuple[str, int], ModelStats] = {}

    def create(self, name: str, version: int, max_batch_size: int) -> ModelStats:
        """Fresh zeroed counters for a model version (a reload starts it from zero)."""
        stats = self._stats[(name, version)] = ModelStats(max_batch_size)
        return stats

    def total(self, name: str, version: int, max_batch_size: int) -> np.ndarray:
        """The counters of a model version (zeros when it never served)."""
        stats = self._stats.get((name, version))
        return stats.counters if stats is not None else np.zeros(counters_size(max_batch_size), np.int64)

    def totals(self) -> Iterator[tuple[str, int, int, np.ndarray]]:
        """(name, version, max_batch_size, counters) of every model version served, in name and version order."""
        for (name, version), stats in sorted(self._stats.items()):
            yield name, version, stats.max_batch_size, stats.counters
