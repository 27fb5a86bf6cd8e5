"""Scale-out on one machine: three hotpath instances, each in its own network namespace, behind real
L7 gRPC balancers that balance per call (nginx's grpc_pass; haproxy in HTTP/2 mode, health-checking
each instance with grpc.health.v1), and grpc's own round_robin over the three.

Topology, all inside namespaces this test makes and deletes: instance i listens on 10.77.i.2 in
namespace <tag>-s<i>, joined by a veth pair to 10.77.i.1 in namespace <tag>-lb, where the balancers
run. They listen on Unix sockets, which cross namespaces: nginx's lb.sock and haproxy's ha.sock
balance over the three, and nginx's s<i>.sock reaches instance i alone, which is how this process
reads each instance's statistics.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc
from models import add_sub_model

INSTANCES = 3
PORT = 8001
WORKERS = 12
"""Client threads under load; each has at most one call in flight."""
START_TIMEOUT_S = 60.0
FAIL_TIMEOUT_S = 1
"""How long nginx leaves an instance out after a failed call (max_fails=1)."""

pytestmark = [
    pytest.mark.skipif(shutil.which("nginx") is None or shutil.which("haproxy") is None,
                       reason="needs nginx and haproxy (apt-get install nginx haproxy)"),
    pytest.mark.skipif(shutil.which("ip") is None or os.geteuid() != 0,
                       reason="needs root and iproute2 for network namespaces (ip netns)"),
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _address(i: int) -> str:
    return f"10.77.{i}.2"


def _request(value: float) -> pb.ModelInferRequest:
    x = np.full((1, 16), value, np.float32)
    tensors = [pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[1, 16]) for name in ("INPUT0", "INPUT1")]
    return pb.ModelInferRequest(model_name="add_sub", inputs=tensors, raw_input_contents=[x.tobytes(), x.tobytes()])


NGINX_CONF = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream hotpath {{
{servers}
    }}
    server {{
        listen unix:{dir}/lb.sock http2;
        location / {{
            grpc_pass grpc://hotpath;
            grpc_next_upstream error timeout;
        }}
    }}
{direct}
}}
"""

HAPROXY_CONF = """
global
    stats socket {dir}/haproxy-stats.sock mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 500ms
frontend grpc
    bind unix@{dir}/ha.sock proto h2
    default_backend hotpath
backend hotpath
    balance roundrobin
    option tcp-check
    tcp-check connect
    tcp-check send-binary {check}
    tcp-check expect rbinary 000000000208
    tcp-check expect rbinary 00000000020801
{servers}
"""


def _health_check_bytes() -> str:
    """A grpc.health.v1 Check of service "" as raw HTTP/2 (preface, SETTINGS, HEADERS, DATA), in hex.

    haproxy's HTTP checks cannot send a gRPC message (its 5-byte prefix holds NULs), but its TCP
    checks send and match binary: the first expect waits for the answer, HealthCheckResponse status
    1 or 2, and the second passes only SERVING (`08 01`).
    """
    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def string(value: bytes) -> bytes:
        return bytes([len(value)]) + value

    # HPACK without Huffman: :method POST and :scheme http from the static table, then literals
    # without indexing for :path (static name 4), :authority (1), content-type (31) and te (new name).
    headers = (b"\x83\x86" + b"\x04" + string(b"/grpc.health.v1.Health/Check") + b"\x01" + string(b"hotpath")
               + b"\x0f\x10" + string(b"application/grpc") + b"\x00" + string(b"te") + string(b"trailers"))
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 4, 1, headers)
            + frame(0, 1, 1, b"\x00\x00\x00\x00\x00")).hex()


@dataclass
class Cluster:
    """Three instances in their namespaces, nginx and haproxy in front; only the test's thread starts or stops them."""

    tag: str
    dir: Path
    repo: Path
    instances: dict[int, subprocess.Popen] = field(default_factory=dict)
    nginx: subprocess.Popen | None = None
    haproxy: subprocess.Popen | None = None

    @property
    def balancer(self) -> str:
        return f"unix:{self.dir}/lb.sock"

    @property
    def health_checking_balancer(self) -> str:
        return f"unix:{self.dir}/ha.sock"

    def direct(self, i: int) -> str:
        return f"unix:{self.dir}/s{i}.sock"

    def build(self) -> None:
        _ip("netns", "add", f"{self.tag}-lb")
        _ip("-n", f"{self.tag}-lb", "link", "set", "lo", "up")
        for i in range(1, INSTANCES + 1):
            namespace, lb_side, instance_side = f"{self.tag}-s{i}", f"{self.tag}l{i}", f"{self.tag}s{i}"
            _ip("netns", "add", namespace)
            _ip("link", "add", lb_side, "netns", f"{self.tag}-lb", "type", "veth", "peer", "name", instance_side,
                "netns", namespace)
            _ip("-n", f"{self.tag}-lb", "addr", "add", f"10.77.{i}.1/24", "dev", lb_side)
            _ip("-n", f"{self.tag}-lb", "link", "set", lb_side, "up")
            _ip("-n", namespace, "addr", "add", f"{_address(i)}/24", "dev", instance_side)
            _ip("-n", namespace, "link", "set", instance_side, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def start_nginx(self) -> None:
        servers = "\n".join(f"        server {_address(i)}:{PORT} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;"
                            for i in range(1, INSTANCES + 1))
        direct = "\n".join(f"    server {{ listen unix:{self.dir}/s{i}.sock http2; "
                           f"location / {{ grpc_pass grpc://{_address(i)}:{PORT}; }} }}" for i in range(1, INSTANCES + 1))
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, servers=servers, direct=direct))
        self.nginx = subprocess.Popen(["ip", "netns", "exec", f"{self.tag}-lb", "nginx", "-c", str(conf), "-p", str(self.dir),
                                       "-e", str(self.dir / "nginx-error.log"), "-g", "daemon off;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start_haproxy(self) -> None:
        servers = "\n".join(f"    server s{i} {_address(i)}:{PORT} proto h2 check inter 100ms fall 1 rise 1"
                            for i in range(1, INSTANCES + 1))
        conf = self.dir / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(dir=self.dir, check=_health_check_bytes(), servers=servers))
        with (self.dir / "haproxy.log").open("ab") as log:
            self.haproxy = subprocess.Popen(["ip", "netns", "exec", f"{self.tag}-lb", "haproxy", "-db", "-f", str(conf)],
                                            stdout=log, stderr=subprocess.STDOUT)

    def haproxy_up(self) -> set[int]:
        """The instances haproxy's health checks currently find SERVING (from its stats socket)."""
        with socket.socket(socket.AF_UNIX) as stats:
            stats.connect(str(self.dir / "haproxy-stats.sock"))
            stats.sendall(b"show servers state hotpath\n")
            answer = b"".join(iter(lambda: stats.recv(65536), b"")).decode()
        rows = [line.split() for line in answer.splitlines() if line and not line.startswith("#") and len(line.split()) > 5]
        return {int(row[3].removeprefix("s")) for row in rows if row[5] == "2"}

    def wait_haproxy_up(self, instances: set[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not instances <= self.haproxy_up():
            assert self.haproxy.poll() is None, (self.dir / "haproxy.log").read_text(errors="replace")
            assert time.monotonic() < deadline, (self.dir / "haproxy.log").read_text(errors="replace")
            time.sleep(0.05)

    def start(self, i: int, *args: str) -> None:
        """Start instance i (`ip netns exec` execs, so the Popen is hotpath itself) and wait until it serves."""
        port_file = self.dir / f"s{i}.port"
        port_file.unlink(missing_ok=True)
        with (self.dir / f"s{i}.log").open("ab") as log:
            self.instances[i] = subprocess.Popen(
                ["ip", "netns", "exec", f"{self.tag}-s{i}", sys.executable, "-m", "hotpath.cli", "serve",
                 "--model-repository", str(self.repo), "--host", _address(i), "--port", str(PORT), "--metrics-port", "0",
                 "--cpus", "1", "--grpc-threads", "1", "--port-file", str(port_file), *args],
                stdout=log, stderr=subprocess.STDOUT)

    def restart(self, i: int, *args: str) -> None:
        """Kill instance i if it runs, start it again with `args`, and wait until it serves."""
        if self.instances[i].poll() is None:
            self.instances[i].kill()
        self.instances[i].wait()
        self.start(i, *args)
        self.wait_serving(i)

    def wait_serving(self, i: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.direct(i)) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while time.monotonic() < deadline:
                if self.nginx.poll() is not None:
                    raise RuntimeError(f"nginx exited with {self.nginx.returncode}:\n"
                                       f"{(self.dir / 'nginx-error.log').read_text(errors='replace')}")
                if self.instances[i].poll() is not None:
                    raise RuntimeError(f"instance {i} exited with {self.instances[i].returncode}:\n{self.log(i)}")
                try:
                    if check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"instance {i} not SERVING within {START_TIMEOUT_S:.0f} s:\n{self.log(i)}")

    def ensure_running(self) -> None:
        """Restart any instance an earlier test stopped, wait for every one to serve, and for nginx to
        take restarted ones back."""
        restarted = [i for i, process in self.instances.items() if process.poll() is not None]
        for i in range(1, INSTANCES + 1):
            if i not in self.instances or i in restarted:
                self.start(i)
        for i in range(1, INSTANCES + 1):
            self.wait_serving(i)
        if restarted:
            time.sleep(FAIL_TIMEOUT_S)

    def successes(self, i: int) -> int:
        """Successful add_sub inferences instance i has served (its own ModelStatistics)."""
        with grpc.insecure_channel(self.direct(i)) as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name="add_sub"), timeout=5)
        return sum(model.inference_stats.success.count for model in stats.model_stats)

    def all_successes(self) -> dict[int, int]:
        return {i: self.successes(i) for i in range(1, INSTANCES + 1)}

    def log(self, i: int) -> str:
        return (self.dir / f"s{i}.log").read_text(errors="replace")

    def close(self) -> None:
        for process in [*self.instances.values(), self.nginx, self.haproxy]:
            if process is not None and process.poll() is None:
                process.terminate()  # nginx's master stops its workers on SIGTERM; SIGKILL would orphan them
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for namespace in [f"{self.tag}-lb", *(f"{self.tag}-s{i}" for i in range(1, INSTANCES + 1))]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = Path(tmp_path_factory.mktemp("scale-out"))
    repo = directory / "models"
    add_sub_model(repo, config='name: "add_sub"\nmax_batch_size: 8\n')
    cluster = Cluster(tag=f"hp{os.getpid() % 100000}", dir=directory, repo=repo)
    try:
        try:
            cluster.build()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
        cluster.start_nginx()
        cluster.start_haproxy()
        cluster.ensure_running()
        yield cluster
    finally:
        cluster.close()


@dataclass
class Load:
    """WORKERS threads calling ModelInfer on one channel until stopped; outcomes as (monotonic time, code)."""

    target: str
    outcomes: list[tuple[float, grpc.StatusCode]] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._channel = grpc.insecure_channel(self.target)
        stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        lock = threading.Lock()

        def work(worker: int) -> None:
            while not self._stop.is_set():
                try:
                    response = stub.ModelInfer(_request(float(worker)), timeout=10)
                    assert np.frombuffer(response.raw_output_contents[0], np.float32)[0] == 2.0 * worker
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                    self.details.append(exc.details())
                with lock:
                    self.outcomes.append((time.monotonic(), code))

        self._threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(WORKERS)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._channel.close()

    def failures(self, since: float = 0.0) -> list[tuple[float, grpc.StatusCode]]:
        return [(at, code) for at, code in self.outcomes if code != grpc.StatusCode.OK and at >= since]

    def succeeded(self) -> int:
        return sum(code == grpc.StatusCode.OK for _, code in self.outcomes)


def test_one_channel_through_the_balancer_reaches_every_instance_evenly(cluster: Cluster):
    cluster.ensure_running()
    before = cluster.all_successes()
    with grpc.insecure_channel(cluster.balancer) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for n in range(300):
            stub.ModelInfer(_request(float(n)), timeout=10)
    served = {i: count - before[i] for i, count in cluster.all_successes().items()}
    print(f"\nnginx, one channel, 300 sequential calls: per instance {served}")
    assert sum(served.values()) == 300
    assert all(90 <= count <= 110 for count in served.values()), served


def test_grpc_round_robin_over_the_three_addresses(cluster: Cluster):
    cluster.ensure_running()
    before = cluster.all_successes()
    targets = ",".join(f"{_address(i)}:{PORT}" for i in range(1, INSTANCES + 1))
    client = (
        "import grpc, sys; sys.path.insert(0, 'tests'); from test_scale_out import _request, pb_grpc\n"
        f"channel = grpc.insecure_channel('ipv4:{targets}', options=[('grpc.lb_policy_name', 'round_robin')])\n"
        "stub = pb_grpc.GRPCInferenceServiceStub(channel)\n"
        "for n in range(300): stub.ModelInfer(_request(float(n)), timeout=10)\n"
    )
    subprocess.run(["ip", "netns", "exec", f"{cluster.tag}-lb", sys.executable, "-c", client],
                   check=True, cwd=Path(__file__).parent.parent, timeout=60)
    served = {i: count - before[i] for i, count in cluster.all_successes().items()}
    print(f"\nround_robin, one channel, 300 sequential calls: per instance {served}")
    assert sum(served.values()) == 300
    assert all(80 <= count <= 120 for count in served.values()), served


def test_killing_an_instance_under_load_fails_at_most_its_calls_in_flight(cluster: Cluster):
    cluster.ensure_running()
    before = cluster.all_successes()
    with Load(cluster.balancer) as load:
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.instances[2].kill()
        cluster.instances[2].wait()
        time.sleep(1.5)
        after_kill = {i: cluster.successes(i) for i in (1, 3)}
        time.sleep(1.0)
    failures = load.failures()
    survivors = {i: cluster.successes(i) for i in (1, 3)}
    print(f"\nSIGKILL under load: {load.succeeded()} calls succeeded, {len(failures)} failed, all within "
          f"{max((at - killed_at for at, _ in failures), default=0) * 1000:.0f} ms of the kill "
          f"({sorted(set(load.details))})")
    assert len(failures) <= WORKERS, failures
    assert all(killed_at <= at <= killed_at + 0.5 and code == grpc.StatusCode.UNAVAILABLE
               for at, code in failures), (killed_at, failures, load.details)
    assert all(survivors[i] > after_kill[i] for i in (1, 3)), (after_kill, survivors)
    assert load.succeeded() > 10 * WORKERS


def test_a_sigtermed_instance_finishes_what_it_accepted_while_haproxy_stops_sending_to_it(cluster: Cluster):
    cluster.ensure_running()
    cluster.restart(3, "--drain-s", "2", "--grace-s", "5")
    cluster.wait_haproxy_up({1, 2, 3})
    before = cluster.all_successes()
    with Load(cluster.health_checking_balancer) as load:
        time.sleep(1.0)
        cluster.instances[3].send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        while 3 in cluster.haproxy_up():
            time.sleep(0.01)
        marked_down_s = time.monotonic() - sigterm_at
        at_down = cluster.successes(3)
        exited = cluster.instances[3].wait(timeout=30)
        exited_s = time.monotonic() - sigterm_at
        at_exit = {i: cluster.successes(i) for i in (1, 2)}
        time.sleep(0.5)
    after = {i: cluster.successes(i) for i in (1, 2)}
    served_by_3 = load.succeeded() - sum(after[i] - before[i] for i in (1, 2))
    print(f"\nSIGTERM under load via haproxy: {load.succeeded()} calls succeeded, {len(load.failures())} failed; haproxy "
          f"marked the instance down {marked_down_s * 1000:.0f} ms after SIGTERM (it exited after {exited_s:.1f} s); "
          f"it served {served_by_3}, {served_by_3 - (at_down - before[3])} of them after being marked down; "
          f"the others {[after[i] - before[i] for i in (1, 2)]}")
    assert exited == 0, cluster.log(3)
    assert load.failures() == [], load.details
    assert "draining for 2 s" in cluster.log(3)
    assert marked_down_s < 1.0
    assert at_down - before[3] <= served_by_3 <= at_down - before[3] + WORKERS
    assert all(after[i] > at_exit[i] > before[i] for i in (1, 2))
