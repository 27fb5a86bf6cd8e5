"""The Prometheus endpoint, scraped while a real server serves: counters add up to the requests sent,
under hotpath's names and Triton's."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from hotpath.observability.metrics import render
from hotpath.observability.stats import DURATION_BUCKETS, StatsStore

from models import add_sub_model, matmul_model

BATCHED = 'name: "add_sub"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n'
CACHED = 'name: "cached"\nmax_batch_size: 8\nresponse_cache { enable: true }\n'


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _samples(text: str) -> dict[tuple, float]:
    """Every sample as {(name, sorted labels...): value}, by the names exposed.

    Prometheus's own Python parser checks the text first; it is not used for the names because it
    reads a counter without `_total` (Triton's `nv_inference_count`) as `nv_inference_count_total`.
    """
    for family in text_string_to_metric_families(text):
        assert family.name.startswith(("hotpath_", "nv_inference_", "process_")), family.name
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, labels, value = _SAMPLE.match(line).groups()
            samples[(name, *sorted(_LABEL.findall(labels or "")))] = float(value)
    return samples


def _scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return _samples(response.read().decode())


def _value(samples: dict, name: str, model: str, **labels: str) -> float:
    key = (name, *sorted({"model": model, "version": "1", **labels}.items()))
    return samples.get(key, 0.0)


def _inputs(x: np.ndarray, names=("INPUT0", "INPUT1")) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput(n, list(x.shape), "FP32") for n in names]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    return inputs


def _send(url: str, model: str, rows: int, count: int, fresh_channels: bool = False, **kwargs) -> int:
    """Send `count` requests; returns how many failed."""
    failures = 0
    client = None
    for i in range(count):
        if client is None or fresh_channels:
            client = grpcclient.InferenceServerClient(url)
        try:
            client.infer(model, _inputs(np.full((rows, kwargs.get("width", 16)), i, np.float32), kwargs.get("names", ("INPUT0", "INPUT1"))))
        except grpcclient.InferenceServerException:
            failures += 1
        if fresh_channels:
            client.close()
    return failures


def test_counters_add_up_to_requests_sent_by_status(tmp_path, start_server):
    add_sub_model(tmp_path, config=BATCHED)
    matmul_model(tmp_path)
    port = _free_port()
    server = start_server(tmp_path, "--metrics-port", str(port))
    assert f"Prometheus metrics at http://127.0.0.1:{port}/metrics" in server.output()

    scrapes = []
    stop = threading.Event()

    def scrape_while_serving() -> None:
        while not stop.is_set():
            scrapes.append(_scrape(port))

    scraper = threading.Thread(target=scrape_while_serving)
    scraper.start()
    try:
        assert _send(server.url, "add_sub", rows=2, count=30) == 0
        assert _send(server.url, "add_sub", rows=9, count=4) == 4, "9 rows is over max_batch_size: INVALID_ARGUMENT"
        assert _send(server.url, "matmul", rows=1, count=3, width=3, names=("X",)) == 3, "wrong width fails in ONNX Runtime: INVALID_ARGUMENT"
        assert _send(server.url, "matmul", rows=1, count=5, width=4, names=("X",)) == 0
    finally:
        stop.set()
        scraper.join()
    assert scrapes, "the endpoint answered while the server served"

    samples = _scrape(port)
    assert _value(samples, "hotpath_request_success_total", "add_sub") == 30
    assert _value(samples, "hotpath_request_failure_total", "add_sub", reason="INVALID_ARGUMENT") == 4
    assert _value(samples, "hotpath_inference_rows_total", "add_sub") == 60
    assert _value(samples, "hotpath_request_duration_seconds_count", "add_sub") == 30, "successes only"
    assert _value(samples, "hotpath_request_duration_seconds_bucket", "add_sub", le="+Inf") == 30
    assert 0 < _value(samples, "hotpath_request_duration_seconds_sum", "add_sub") < 30 * 10
    assert _value(samples, "hotpath_request_failure_duration_seconds_count", "add_sub") == 4
    assert _value(samples, "hotpath_request_failure_duration_seconds_count", "matmul") == 3
    assert _value(samples, "hotpath_queue_duration_seconds_count", "add_sub") == 30, "invalid requests never queue"
    assert _value(samples, "hotpath_batch_size_rows_count", "add_sub") == _value(samples, "hotpath_compute_duration_seconds_count", "add_sub")
    assert _value(samples, "hotpath_batch_size_rows_sum", "add_sub") == 60
    assert _value(samples, "hotpath_batch_size_rows_bucket", "add_sub", le="1") == 0
    assert _value(samples, "hotpath_replica_busy_seconds_total", "add_sub") > 0

    assert _value(samples, "hotpath_request_success_total", "matmul") == 5
    assert _value(samples, "hotpath_request_failure_total", "matmul", reason="INVALID_ARGUMENT") == 3
    failures = {key: value for key, value in samples.items() if key[0] == "hotpath_request_failure_total"}
    assert sum(failures.values()) == 7, failures

    # Triton's names for the same counters, in microseconds.
    for model, success, failure, rows in (("add_sub", 30, 4, 60), ("matmul", 5, 3, 5)):
        assert _value(samples, "nv_inference_request_success", model) == success
        assert _value(samples, "nv_inference_request_failure", model) == failure
        assert _value(samples, "nv_inference_count", model) == rows
        assert _value(samples, "nv_inference_exec_count", model) == _value(samples, "hotpath_compute_duration_seconds_count", model)
        assert _value(samples, "nv_inference_pending_request_count", model) == 0
        seconds = _value(samples, "hotpath_request_duration_seconds_sum", model)
        assert abs(_value(samples, "nv_inference_request_duration_us", model) - seconds * 1e6) <= 1 + seconds * 1e-6
        compute_us = sum(_value(samples, f"nv_inference_compute_{part}_duration_us", model) for part in ("input", "infer", "output"))
        assert abs(compute_us - _value(samples, "hotpath_compute_duration_seconds_sum", model) * 1e6) <= 3
        assert _value(samples, "nv_inference_compute_infer_duration_us", model) > 0
        assert _value(samples, "hotpath_model_ready", model) == 1

    build = [key for key in samples if key[0] == "hotpath_build_info"]
    assert len(build) == 1 and samples[build[0]] == 1 and dict(build[0][1:])["version"]
    assert samples[("process_resident_memory_bytes",)] > 1e6
    assert samples[("process_open_fds",)] > 0
    assert samples[("process_cpu_seconds_total",)] > 0
    assert abs(samples[("process_start_time_seconds",)] - time.time()) < 600

    for model in ("add_sub", "matmul"):
        assert _value(samples, "hotpath_inflight_requests", model) == 0
        assert _value(samples, "hotpath_queue_depth_requests", model) == 0
        assert _value(samples, "hotpath_replicas", model) >= 1

    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)


def test_every_connection_counts_in_one_set_of_numbers(tmp_path, start_server):
    add_sub_model(tmp_path, config=BATCHED)
    port = _free_port()
    server = start_server(tmp_path, "--metrics-port", str(port))
    assert _send(server.url, "add_sub", rows=1, count=40, fresh_channels=True) == 0
    assert _send(server.url, "add_sub", rows=9, count=6, fresh_channels=True) == 6
    samples = _scrape(port)
    assert _value(samples, "hotpath_request_success_total", "add_sub") == 40
    assert _value(samples, "hotpath_request_failure_total", "add_sub", reason="INVALID_ARGUMENT") == 6
    assert _value(samples, "hotpath_request_duration_seconds_count", "add_sub") == 40
    assert _value(samples, "hotpath_request_failure_duration_seconds_count", "add_sub") == 6
    assert _value(samples, "nv_inference_request_success", "add_sub") == 40
    assert _value(samples, "hotpath_batch_size_rows_sum", "add_sub") == 40
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.get_inference_statistics("add_sub").model_stats[0].inference_stats.success.count == 40
    assert _value(samples, "hotpath_replicas", "add_sub") >= 1


def test_cache_numbers_are_exported(tmp_path, start_server):
    add_sub_model(tmp_path, "cached", config=CACHED)
    port = _free_port()
    server = start_server(tmp_path, "--cache-size", "1MiB", "--metrics-port", str(port))
    x = np.ones((1, 16), np.float32)
    with grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(3):
            client.infer("cached", _inputs(x))
        client.infer("cached", _inputs(x + 1))
    deadline = time.monotonic() + 10
    while (samples := _scrape(port)) and _value(samples, "hotpath_cache_entries", "cached") < 2:
        assert time.monotonic() < deadline, "cache entries never reached the metrics"
        time.sleep(0.2)
    assert _value(samples, "hotpath_cache_hits_total", "cached") == 2
    assert _value(samples, "hotpath_cache_misses_total", "cached") == 2
    assert _value(samples, "hotpath_cache_entries", "cached") == 2
    assert _value(samples, "hotpath_cache_bytes", "cached") > 0
    assert _value(samples, "hotpath_cache_evictions_total", "cached") == 0


def test_taken_metrics_port_fails_with_a_clear_message(tmp_path):
    add_sub_model(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(tmp_path),
                              "--port", "0", "--metrics-port", str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in run.stderr and "--metrics-port" in run.stderr


def test_unloaded_model_reads_not_ready(tmp_path, start_server):
    add_sub_model(tmp_path, config=BATCHED)
    port = _free_port()
    server = start_server(tmp_path, "--metrics-port", str(port), "--model-control", "explicit")
    assert _value(_scrape(port), "hotpath_model_ready", "add_sub") == 1
    with grpcclient.InferenceServerClient(server.url) as client:
        client.unload_model("add_sub")
        deadline = time.monotonic() + 10
        while _value(_scrape(port), "hotpath_model_ready", "add_sub") != 0:
            assert time.monotonic() < deadline, "hotpath_model_ready never went to 0 after the unload"
            time.sleep(0.1)


def _rendered(store: StatsStore, **kwargs) -> dict[tuple, float]:
    return _samples(render(store, **kwargs))


def test_buckets_resolve_tens_of_microseconds_and_failures_stand_apart():
    assert DURATION_BUCKETS[0] == 0.00001 and list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    store = StatsStore()
    stats = store.create("tiny", 1, 8)
    for us in (5, 15, 25, 35, 45):
        stats.request_done(True, us * 1000, 1)
    stats.request_done(False, 12_000_000, 0, grpc.StatusCode.INVALID_ARGUMENT)
    samples = _rendered(store)
    buckets = {le: _value(samples, "hotpath_request_duration_seconds_bucket", "tiny", le=le) for le in ("1e-05", "2e-05", "3e-05", "4e-05", "5e-05")}
    assert buckets == {"1e-05": 1, "2e-05": 2, "3e-05": 3, "4e-05": 4, "5e-05": 5}, "each 10 us step its own bucket"
    assert _value(samples, "hotpath_request_duration_seconds_count", "tiny") == 5
    assert _value(samples, "hotpath_request_duration_seconds_sum", "tiny") == pytest.approx(125e-6)
    assert _value(samples, "hotpath_request_failure_duration_seconds_count", "tiny") == 1
    assert _value(samples, "hotpath_request_failure_duration_seconds_bucket", "tiny", le="0.01") == 0
    assert _value(samples, "hotpath_request_failure_duration_seconds_bucket", "tiny", le="0.025") == 1
    assert _value(samples, "nv_inference_request_duration_us", "tiny") == 125
    assert _value(samples, "nv_inference_request_failure", "tiny") == 1


def test_model_ready_comes_from_the_repository_index_when_given():
    store = StatsStore()
    store.create("served", 1, 0).set_gauge("replicas", 1)
    store.create("unloaded", 1, 0)
    samples = _rendered(store)
    assert _value(samples, "hotpath_model_ready", "served") == 1
    assert _value(samples, "hotpath_model_ready", "unloaded") == 0
    index = [("broken", "", "UNAVAILABLE", "bad model.onnx"), ("served", "1", "READY", ""), ("unloaded", "", "UNAVAILABLE", "unloaded")]
    samples = _rendered(store, index=lambda: index)
    ready = {key: value for key, value in samples.items() if key[0] == "hotpath_model_ready"}
    assert ready == {("hotpath_model_ready", ("model", "broken"), ("version", "")): 0,
                     ("hotpath_model_ready", ("model", "served"), ("version", "1")): 1,
                     ("hotpath_model_ready", ("model", "unloaded"), ("version", "1")): 0}, "a version that served stays, at 0"


def test_a_model_that_failed_to_load_reads_not_ready(tmp_path, start_server):
    add_sub_model(tmp_path)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    port = _free_port()
    start_server(tmp_path, "--metrics-port", str(port))
    samples = _scrape(port)
    assert samples[("hotpath_model_ready", ("model", "broken"), ("version", ""))] == 0
    assert samples[("hotpath_model_ready", ("model", "add_sub"), ("version", "1"))] == 1
