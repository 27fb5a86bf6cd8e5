"""The Prometheus endpoint: every model version's statistics in the text exposition format.

It renders the counters the server keeps in-process (`stats.py`), each twice: as `hotpath_*` series
and, for dashboards built on Triton, under Triton's `nv_inference_*` names and units (integer
microseconds); then the model readiness, build and standard `process_*` series. A model that
reloads starts its counters from zero, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np

from hotpath import __version__
from hotpath.evaluation.log import metric_samples as evaluation_samples
from hotpath.observability.stats import (DURATION_BUCKETS, DURATION_INDEX, EXECUTION_COUNT, FAILURES, GAUGE, HISTOGRAM, INFERENCE_COUNT,
                                         STATUS_NAMES, StatsStore, batch_sizes)

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ModelIndex = Callable[[], Iterable[tuple[str, str, str, str]]]
"""(name, version, state, reason) of every model on disk or loaded, as `ModelRepository.index` gives."""

METRICS = {
    "hotpath_request_success_total": ("counter", "Inference requests answered successfully."),
    "hotpath_request_failure_total": ("counter", "Inference requests that failed, by gRPC status (reason)."),
    "hotpath_inference_rows_total": ("counter", "Rows (batch elements) of successful inference requests."),
    "hotpath_request_duration_seconds": ("histogram", "Time from a successful request's arrival at the model to its encoded response."),
    "hotpath_request_failure_duration_seconds": ("histogram", "Time from a failed request's arrival at the model to its error."),
    "hotpath_queue_duration_seconds": ("histogram", "Time each request waited in the batch queue for a replica."),
    "hotpath_compute_duration_seconds": ("histogram", "Time of each model execution (batch): gathering inputs, running, delivering outputs."),
    "hotpath_batch_size_rows": ("histogram", "Rows in each model execution."),
    "hotpath_queue_depth_requests": ("gauge", "Requests waiting in the batch queue."),
    "hotpath_inflight_requests": ("gauge", "Requests queued or running in a batch."),
    "hotpath_replicas": ("gauge", "Model replicas (ONNX Runtime sessions) loaded, over every worker process."),
    "hotpath_replica_busy_seconds_total": ("counter", "Time replicas spent executing batches, summed over replicas."),
    "hotpath_cache_hits_total": ("counter", "Requests answered from the response cache."),
    "hotpath_cache_misses_total": ("counter", "Requests the response cache could not answer (then stored)."),
    "hotpath_cache_evictions_total": ("counter", "Cached responses evicted to stay within the cache budget."),
    "hotpath_cache_entries": ("gauge", "Responses held in the cache."),
    "hotpath_cache_bytes": ("gauge", "Bytes the cached responses take, as charged against the budget."),
    "hotpath_evaluation_logged_total": ("counter", "Sampled requests written to the evaluation store."),
    "hotpath_evaluation_dropped_total": ("counter", "Sampled requests left out of the evaluation store (inference unaffected), by reason: queue_full (the writer fell behind) or store_error."),
    "hotpath_model_ready": ("gauge", "1 when the model version serves, 0 when it is unloaded or failed to load (version empty then)."),
    "hotpath_build_info": ("gauge", "Always 1; the labels say which hotpath, Python and ONNX Runtime serve."),
}
"""Every hotpath metric the endpoint shows: name -> (type, help). Labels: model, version (and reason, le)."""

TRITON_METRICS = {
    "nv_inference_request_success": ("counter", "Number of successful inference requests, all batch sizes"),
    "nv_inference_request_failure": ("counter", "Number of failed inference requests, all batch sizes"),
    "nv_inference_count": ("counter", "Number of inferences performed (rows of successful requests)"),
    "nv_inference_exec_count": ("counter", "Number of model executions performed (does not include cached requests)"),
    "nv_inference_request_duration_us": ("counter", "Cumulative inference request duration in microseconds (includes cached requests)"),
    "nv_inference_queue_duration_us": ("counter", "Cumulative inference queuing duration in microseconds"),
    "nv_inference_compute_input_duration_us": ("counter", "Cumulative compute input duration in microseconds (does not include cached requests)"),
    "nv_inference_compute_infer_duration_us": ("counter", "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    "nv_inference_compute_output_duration_us": ("counter", "Cumulative inference compute output duration in microseconds (does not include cached requests)"),
    "nv_inference_pending_request_count": ("gauge", "Instantaneous number of pending requests awaiting execution per-model."),
}
"""Triton's per-model series, same names, labels (model, version) and units, from the same counters."""

PROCESS_METRICS = {
    "process_cpu_seconds_total": ("counter", "Total user and system CPU time spent in seconds."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
}
"""The standard process series (as the Prometheus client libraries name them), read from /proc; absent without it."""


@functools.cache
def _build_labels() -> str:
    """The labels of `hotpath_build_info` (computed on the first scrape; the server has ONNX Runtime loaded by then)."""
    try:
        import onnxruntime
        runtime = onnxruntime.__version__
    except ImportError:
        runtime = "none"
    return f'version="{_escape(__version__)}",python="{_escape(platform.python_version())}",onnxruntime="{_escape(runtime)}"'


_REASONS_SHOWN = frozenset(code.value[0] for code in (
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE))
"""Failure reasons shown from 0, so that `increase()` and `rate()` count a reason's first failures
(a series that appears at 4 reads as 4 since an unknown start, and counts nothing); others appear once they occur."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def _batch_bounds(max_batch_size: int) -> list[int]:
    bounds = [1]
    while bounds[-1] * 2 < max_batch_size:
        bounds.append(bounds[-1] * 2)
    return bounds + [max_batch_size] if max_batch_size > 1 else bounds


def _histogram(name: str, labels: str, bounds: list, counts: list[int] | np.ndarray, total: float) -> list[str]:
    """Lines of one histogram from per-bucket counts (one more than `bounds`: the last is +Inf)."""
    lines, cumulative = [], 0
    for bound, count in zip([*bounds, "+Inf"], counts):
        cumulative += int(count)
        lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
    return lines + [f"{name}_sum{{{labels}}} {_number(total)}", f"{name}_count{{{labels}}} {cumulative}"]


def _samples(name: str, version: int, max_batch_size: int, c: np.ndarray) -> dict[str, list[str]]:
    """Every metric's lines for one model version's summed counters."""
    labels = f'model="{_escape(name)}",version="{version}"'

    def count(duration: str) -> int:
        return int(c[DURATION_INDEX[duration]])

    def seconds(*durations: str) -> float:
        return sum(int(c[DURATION_INDEX[d] + 1]) for d in durations) * 1e-9

    out = {metric: [f"{metric}{{{labels}}} {_number(value)}"] for metric, value in (
        ("hotpath_request_success_total", count("success")),
        ("hotpath_inference_rows_total", int(c[INFERENCE_COUNT])),
        ("hotpath_queue_depth_requests", int(c[GAUGE["queue_depth"]])),
        ("hotpath_inflight_requests", int(c[GAUGE["in_flight"]])),
        ("hotpath_replicas", int(c[GAUGE["replicas"]])),
        ("hotpath_replica_busy_seconds_total", int(c[GAUGE["busy_ns"]]) * 1e-9),
        ("hotpath_cache_hits_total", count("cache_hit")),
        ("hotpath_cache_misses_total", count("cache_miss")),
        ("hotpath_cache_evictions_total", int(c[GAUGE["cache_evictions"]])),
        ("hotpath_cache_entries", int(c[GAUGE["cache_entries"]])),
        ("hotpath_cache_bytes", int(c[GAUGE["cache_bytes"]])),
    )}
    out["hotpath_request_failure_total"] = [f'hotpath_request_failure_total{{{labels},reason="{STATUS_NAMES[code]}"}} {int(c[FAILURES + code])}'
                                            for code in sorted(STATUS_NAMES) if c[FAILURES + code] or code in _REASONS_SHOWN]
    buckets = len(DURATION_BUCKETS) + 1
    for key, metric, total in (("request", "hotpath_request_duration_seconds", seconds("success")),
                               ("failure", "hotpath_request_failure_duration_seconds", seconds("fail")),
                               ("queue", "hotpath_queue_duration_seconds", seconds("queue")),
                               ("compute", "hotpath_compute_duration_seconds", seconds("compute_input", "compute_infer", "compute_output"))):
        start = HISTOGRAM[key]
        out[metric] = _histogram(metric, labels, list(DURATION_BUCKETS), c[start:start + buckets], total)
    bounds = _batch_bounds(max_batch_size)
    counts = [0] * (len(bounds) + 1)
    executed = batch_sizes(c, max_batch_size)
    for size, executions in executed.items():
        counts[next(i for i, bound in enumerate(bounds) if size <= bound)] += executions
    out["hotpath_batch_size_rows"] = _histogram("hotpath_batch_size_rows", labels, bounds, counts,
                                                sum(size * n for size, n in executed.items()))

    def us(duration: str) -> int:
        return int(c[DURATION_INDEX[duration] + 1]) // 1000

    for metric, value in (
        ("nv_inference_request_success", count("success")),
        ("nv_inference_request_failure", count("fail")),
        ("nv_inference_count", int(c[INFERENCE_COUNT])),
        ("nv_inference_exec_count", int(c[EXECUTION_COUNT])),
        ("nv_inference_request_duration_us", us("success")),
        ("nv_inference_queue_duration_us", us("queue")),
        ("nv_inference_compute_input_duration_us", us("compute_input")),
        ("nv_inference_compute_infer_duration_us", us("compute_infer")),
        ("nv_inference_compute_output_duration_us", us("compute_output")),
        ("nv_inference_pending_request_count", int(c[GAUGE["queue_depth"]])),
    ):
        out[metric] = [f"{metric}{{{labels}}} {value}"]
    return out


def _process_samples(proc: str = "/proc") -> dict[str, list[str]]:
    """The `process_*` lines for this process, from `proc`; none where it cannot be read (not Linux)."""
    try:
        with open(f"{proc}/self/stat") as file:
            # The command name, in parentheses, may hold spaces: the fields that matter follow its ")".
            fields = file.read().rsplit(")", 1)[1].split()
        with open(f"{proc}/stat") as file:
            boot_time_s = next(int(line.split()[1]) for line in file if line.startswith("btime "))
        open_fds = len(os.listdir(f"{proc}/self/fd"))
        with open(f"{proc}/self/limits") as file:
            limit = next(line.split()[3] for line in file if line.startswith("Max open files"))
    except (OSError, IndexError, ValueError, StopIteration):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    # fields[0] is field 3 of proc(5), state: utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
    values = {
        "process_cpu_seconds_total": (int(fields[11]) + int(fields[12])) / ticks,
        "process_resident_memory_bytes": int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
        "process_virtual_memory_bytes": int(fields[20]),
        "process_open_fds": open_fds,
        "process_start_time_seconds": boot_time_s + int(fields[19]) / ticks,
    }
    if limit.isdigit():
        values["process_max_fds"] = int(limit)
    return {metric: [f"{metric} {_number(value)}"] for metric, value in values.items()}


def _ready_samples(store: StatsStore, index: ModelIndex | None) -> list[str]:
    """`hotpath_model_ready` lines: 1 for a serving version, 0 for one that served and no longer does.

    Without `index` a version serves while it has replicas loaded; with it, while the repository
    says READY, and a model that never loaded shows as `version=""` 0.
    """
    ready = {(name, str(version)): bool(c[GAUGE["replicas"]] > 0 and index is None) for name, version, _, c in store.totals()}
    if index is not None:
        # The event loop's thread may change the repository meanwhile; its dicts then fail iteration.
        for attempt in range(3):
            try:
                rows = list(index())
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(0.001)
        served = {name for name, _ in ready}
        for name, version, state, _ in rows:
            if version or name not in served:
                ready[(name, version)] = state == "READY"
    return [f'hotpath_model_ready{{model="{_escape(name)}",version="{_escape(version)}"}} {int(value)}'
            for (name, version), value in sorted(ready.items())]


def render(store: StatsStore, index: ModelIndex | None = None) -> str:
    """The exposition text for every model version in `store`, grouped by metric.

    `index` gives the repository's models for `hotpath_model_ready` (see `_ready_samples`).
    """
    families = {**METRICS, **TRITON_METRICS, **PROCESS_METRICS}
    grouped: dict[str, list[str]] = {metric: [] for metric in families}
    for name, version, max_batch_size, counters in store.totals():
        for metric, lines in _samples(name, version, max_batch_size, counters).items():
            grouped[metric].extend(lines)
    grouped["hotpath_model_ready"] = _ready_samples(store, index)
    grouped["hotpath_build_info"] = [f"hotpath_build_info{{{_build_labels()}}} 1"]
    grouped.update(evaluation_samples())
    grouped.update(_process_samples())
    out = []
    for metric, (kind, text) in families.items():
        if metric in PROCESS_METRICS and not grouped[metric]:
            continue
        out += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}", *grouped[metric]]
    return "\n".join(out) + "\n"


class MetricsEndpoint:
    """`GET /metrics` over HTTP, from a thread of the top-level server process."""

    def __init__(self, store: StatsStore, host: str, port: int, index: ModelIndex | None = None) -> None:
        """`index` (the repository's `index`, called from this endpoint's thread) feeds `hotpath_model_ready`."""
        self.store = store
        self.index = index
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "the metrics are at /metrics")
                    return
                try:
                    body = render(endpoint.store, endpoint.index).encode()
                except Exception:
                    log.exception("rendering metrics failed")
                    self.send_error(500, "rendering metrics failed; see the server log")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; choose another --metrics-port, or 0 to turn metrics off") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
