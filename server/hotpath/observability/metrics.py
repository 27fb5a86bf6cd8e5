"""The Prometheus endpoint: every model version's statistics in the text exposition format.

It reads the counter files that the serving processes keep (`stats.py`) and sums them, so one port
shows the whole server however many worker processes serve; it never talks to the workers. A
process that restarts (or a model that reloads) starts its counters from zero, which Prometheus
reads as a counter reset.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from hotpath.observability.stats import (DURATION_BUCKETS, DURATION_INDEX, FAILURES, GAUGE, HISTOGRAM, INFERENCE_COUNT, STATUS_NAMES, StatsStore,
                           batch_sizes)

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

METRICS = {
    "hotpath_request_success_total": ("counter", "Inference requests answered successfully."),
    "hotpath_request_failure_total": ("counter", "Inference requests that failed, by gRPC status (reason)."),
    "hotpath_inference_rows_total": ("counter", "Rows (batch elements) of successful inference requests."),
    "hotpath_request_duration_seconds": ("histogram", "Time from a request's arrival at the model to its encoded response."),
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
}
"""Every metric the endpoint shows: name -> (type, help). Labels: model, version (and reason, le)."""


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
                                            for code in sorted(STATUS_NAMES) if c[FAILURES + code]]
    buckets = len(DURATION_BUCKETS) + 1
    for key, total in (("request", seconds("success", "fail")), ("queue", seconds("queue")),
                       ("compute", seconds("compute_input", "compute_infer", "compute_output"))):
        start = HISTOGRAM[key]
        out[f"hotpath_{key}_duration_seconds"] = _histogram(f"hotpath_{key}_duration_seconds", labels, list(DURATION_BUCKETS),
                                                            c[start:start + buckets], total)
    bounds = _batch_bounds(max_batch_size)
    counts = [0] * (len(bounds) + 1)
    executed = batch_sizes(c, max_batch_size)
    for size, executions in executed.items():
        counts[next(i for i, bound in enumerate(bounds) if size <= bound)] += executions
    out["hotpath_batch_size_rows"] = _histogram("hotpath_batch_size_rows", labels, bounds, counts,
                                                sum(size * n for size, n in executed.items()))
    return out


def render(store: StatsStore) -> str:
    """The exposition text for every model version in `store`, grouped by metric."""
    grouped: dict[str, list[str]] = {metric: [] for metric in METRICS}
    for name, version, max_batch_size, counters in store.totals():
        for metric, lines in _samples(name, version, max_batch_size, counters).items():
            grouped[metric].extend(lines)
    out = []
    for metric, (kind, text) in METRICS.items():
        out += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}", *grouped[metric]]
    return "\n".join(out) + "\n"


class MetricsEndpoint:
    """`GET /metrics` over HTTP, from a thread of the top-level server process."""

    def __init__(self, store: StatsStore, host: str, port: int) -> None:
        self.store = store
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "the metrics are at /metrics")
                    return
                try:
                    body = render(endpoint.store).encode()
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
