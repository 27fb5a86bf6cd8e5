"""The metrics endpoint against the real thing: Debian's `prometheus` scrapes a real server, and PromQL
(Triton's series, an `increase`, a `rate`, a `histogram_quantile`) returns the numbers the traffic
sent implies."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from models import add_sub_model

PROMETHEUS = shutil.which("prometheus")
BATCHED = 'name: "add_sub"\nmax_batch_size: 8\n'
DEADLINE_S = 25
"""The whole conversation with Prometheus fits in this, however it fails."""

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not on PATH (Debian: apt-get install prometheus)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A prometheus process on 127.0.0.1 scraping one target every second, with its own storage."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
                          "scrape_configs:\n  - job_name: hotpath\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """The instant vector `promql` gives (at time `at`, else now)."""
        params = {"query": promql, **({"time": repr(at)} if at is not None else {})}
        body = json.loads(self.get("/api/v1/query", **params))
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def value(self, promql: str, at: float | None = None) -> float | None:
        """The single value `promql` gives, or None when its vector is empty."""
        result = self.query(promql, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, check, deadline: float) -> object:
        while True:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                result = check()
            except (urllib.error.URLError, ConnectionError):
                result = None
            if result:
                return result
            assert time.monotonic() < deadline, f"{what} within {DEADLINE_S}s; prometheus log: {self.log.read_text()[-2000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus_for(tmp_path):
    started = []

    def start(target: str) -> Prometheus:
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        started.append(Prometheus(workdir, target))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


def _bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """histogram_quantile's interpolation over cumulative (le, count) pairs, +Inf last."""
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    raise AssertionError("rank beyond the +Inf bucket")


def test_prometheus_scrapes_and_promql_adds_up(tmp_path, start_server, prometheus_for):
    repo = tmp_path / "repo"
    add_sub_model(repo, config=BATCHED)
    metrics_port = _free_port()
    server = start_server(repo, "--metrics-port", str(metrics_port))
    deadline = time.monotonic() + DEADLINE_S
    prometheus = prometheus_for(f"127.0.0.1:{metrics_port}")
    prometheus.wait_for("prometheus ready", lambda: prometheus.get("/-/ready"), deadline)
    # A scrape before any traffic: every counter's first sample is 0, so increase() has nothing to guess.
    prometheus.wait_for("a first scrape of the idle server",
                        lambda: prometheus.value('hotpath_request_success_total{model="add_sub"}') == 0, deadline)
    assert prometheus.value('up{job="hotpath"}') == 1

    with grpcclient.InferenceServerClient(server.url) as client:
        for rows, count in ((2, 20), (9, 4)):
            for i in range(count):
                inputs = [grpcclient.InferInput(name, [rows, 16], "FP32") for name in ("INPUT0", "INPUT1")]
                for tensor in inputs:
                    tensor.set_data_from_numpy(np.full((rows, 16), i, np.float32))
                try:
                    client.infer("add_sub", inputs)
                except grpcclient.InferenceServerException:
                    assert rows == 9, "only requests over max_batch_size fail"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        exposed = response.read().decode()

    # The sample that holds all the traffic, and its time: queries evaluated then see exactly it.
    selector = '{model="add_sub",version="1"}'
    prometheus.wait_for("the traffic's scrape", lambda: prometheus.value(f"nv_inference_request_failure{selector}") == 4, deadline)
    at = prometheus.value(f"timestamp(nv_inference_request_failure{selector})")
    assert prometheus.value(f"nv_inference_request_success{selector}", at) == 20
    assert prometheus.value(f"nv_inference_request_failure{selector}", at) == 4
    assert prometheus.value(f"nv_inference_count{selector}", at) == 40
    assert prometheus.value(f"nv_inference_exec_count{selector}", at) == 20, "no dynamic batching: one execution per request"
    assert prometheus.value(f"nv_inference_pending_request_count{selector}", at) == 0
    assert prometheus.value(f"nv_inference_compute_infer_duration_us{selector}", at) > 0
    request_us = prometheus.value(f"nv_inference_request_duration_us{selector}", at)
    request_s = prometheus.value(f"hotpath_request_duration_seconds_sum{selector}", at)
    assert abs(request_us - request_s * 1e6) <= 1

    # The series began at 0 within the window and the window ends on the last sample: no extrapolation.
    assert prometheus.value(f"increase(hotpath_request_success_total{selector}[5m])", at) == pytest.approx(20)
    assert prometheus.value(f"rate(hotpath_request_success_total{selector}[5m])", at) == pytest.approx(20 / 300)
    assert prometheus.value(f'sum(increase(hotpath_request_failure_total{{model="add_sub",reason="INVALID_ARGUMENT"}}[5m]))', at) \
        == pytest.approx(4)
    assert prometheus.value(f"increase(hotpath_request_duration_seconds_count{selector}[5m])", at) == pytest.approx(20), \
        "failures stay out of the successes' histogram"
    assert prometheus.value(f"increase(hotpath_request_failure_duration_seconds_count{selector}[5m])", at) == pytest.approx(4)

    # histogram_quantile over the exposed buckets gives what their interpolation implies.
    buckets = []
    for line in exposed.splitlines():
        if line.startswith('hotpath_request_duration_seconds_bucket{model="add_sub",version="1",le="'):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    assert buckets[-1] == (float("inf"), 20)
    for q in (0.5, 0.9, 0.99):
        expected = _bucket_quantile(q, buckets)
        got = prometheus.value(f"histogram_quantile({q}, sum by (le) (increase(hotpath_request_duration_seconds_bucket{selector}[5m])))", at)
        assert got == pytest.approx(expected, rel=1e-9), (q, buckets)
        assert 0 < got < 1
    # Buckets resolve 10 us steps: a fast model's requests are not all interpolated inside 0 to 100 us.
    assert sum(1 for bound, _ in buckets if bound <= 0.0001) >= 8

    assert prometheus.value(f"hotpath_model_ready{selector}", at) == 1
    assert prometheus.value("hotpath_build_info", at) == 1
    assert prometheus.value("process_resident_memory_bytes", at) > 1e6
    assert prometheus.value("process_open_fds", at) > 0
    assert time.monotonic() < deadline
