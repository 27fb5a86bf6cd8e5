"""The Prometheus endpoint, scraped while a real server serves: counters add up to the requests sent."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from models import add_sub_model, matmul_model

BATCHED = 'name: "add_sub"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n'
CACHED = 'name: "cached"\nmax_batch_size: 8\nresponse_cache { enable: true }\n'


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape(port: int) -> dict[tuple, float]:
    """Every sample as {(name, sorted labels...): value}, through Prometheus's own text parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("hotpath_")
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


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
        assert _send(server.url, "matmul", rows=1, count=3, width=3, names=("X",)) == 3, "wrong width fails in ONNX Runtime: INTERNAL"
        assert _send(server.url, "matmul", rows=1, count=5, width=4, names=("X",)) == 0
    finally:
        stop.set()
        scraper.join()
    assert scrapes, "the endpoint answered while the server served"

    samples = _scrape(port)
    assert _value(samples, "hotpath_request_success_total", "add_sub") == 30
    assert _value(samples, "hotpath_request_failure_total", "add_sub", reason="INVALID_ARGUMENT") == 4
    assert _value(samples, "hotpath_inference_rows_total", "add_sub") == 60
    assert _value(samples, "hotpath_request_duration_seconds_count", "add_sub") == 34
    assert _value(samples, "hotpath_request_duration_seconds_bucket", "add_sub", le="+Inf") == 34
    assert 0 < _value(samples, "hotpath_request_duration_seconds_sum", "add_sub") < 34 * 10
    assert _value(samples, "hotpath_queue_duration_seconds_count", "add_sub") == 30, "invalid requests never queue"
    assert _value(samples, "hotpath_batch_size_rows_count", "add_sub") == _value(samples, "hotpath_compute_duration_seconds_count", "add_sub")
    assert _value(samples, "hotpath_batch_size_rows_sum", "add_sub") == 60
    assert _value(samples, "hotpath_batch_size_rows_bucket", "add_sub", le="1") == 0
    assert _value(samples, "hotpath_replica_busy_seconds_total", "add_sub") > 0

    assert _value(samples, "hotpath_request_success_total", "matmul") == 5
    assert _value(samples, "hotpath_request_failure_total", "matmul", reason="INTERNAL") == 3
    failures = {key: value for key, value in samples.items() if key[0] == "hotpath_request_failure_total"}
    assert sum(failures.values()) == 7, failures

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
    assert _value(samples, "hotpath_request_duration_seconds_count", "add_sub") == 46
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
