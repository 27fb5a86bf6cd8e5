"""A server under test or measurement as a subprocess: started, known ready by a real signal, stopped.

The one launcher the tests, the bench and `hotpath tune` share. Readiness never comes from log text:
a `hotpath serve --port 0` learns its port from `--port-file` and is ready when the health service
answers; a server on a fixed port is ready when ServerReady says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc

POLL_S = 0.05
STOP_TIMEOUT_S = 30.0
"""How long a stopped server may take to exit after SIGTERM before it is killed."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerProcess:
    """A server subprocess in its own process group, its output (stdout and stderr) in `log_path`.

    Without `port`, `command` must be a `hotpath serve --port 0 ...`: `--port-file` is appended, and the
    server is ready once the file names its port and the health service reports service "" SERVING,
    or NOT_SERVING too when `require_serving` is false (some models failed to load, which a test may
    want). With `port`, any server speaking the inference protocol is ready once ServerReady is true.
    `start()` (or entering the context) waits for readiness and raises RuntimeError, with the end of
    the log, if the server exits or is not ready within `ready_timeout_s`; `stop()` (or leaving the
    context) ends it. A server that speaks TLS is probed with `credentials`. Only the thread that made
    it may start or stop it.
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path, port: int | None = None,
                 ready_timeout_s: float = 180.0, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 require_serving: bool = True, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.name, self.log_path, self.cwd = name, log_path, cwd
        self.port_file = log_path.with_name(log_path.name + ".port") if port is None else None
        self.command = [*command, "--port-file", str(self.port_file)] if self.port_file else list(command)
        self.env = {**os.environ, **env} if env else None
        self.ready_timeout_s, self.require_serving = ready_timeout_s, require_serving
        self.credentials = credentials
        self.port = port or 0
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        """host:port of the server; empty until its port is known."""
        return f"127.0.0.1:{self.port}" if self.port else ""

    def start(self) -> ServerProcess:
        """Start the server and return once it is ready (see the class docstring)."""
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            cwd=self.cwd, env=self.env)
        try:
            deadline = time.monotonic() + self.ready_timeout_s
            if self.port_file is not None:
                self.port = self._wait_port_file(deadline)
                self._wait_healthy(deadline)
            else:
                self._wait_server_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` to the server's process group (SIGKILL after STOP_TIMEOUT_S); return its exit status."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_port_file(self, deadline: float) -> int:
        while True:
            self.check_alive("before it listened")
            try:
                text = self.port_file.read_text()
            except FileNotFoundError:
                text = ""
            if text.endswith("\n"):
                return int(text)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} server did not write {self.port_file} within "
                                   f"{self.ready_timeout_s:.0f}s; its log ({self.log_path}) ends:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def _wait_healthy(self, deadline: float) -> None:
        status = None
        with self.channel() as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            while time.monotonic() < deadline:
                self.check_alive("before it was ready")
                try:
                    status = check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                except grpc.RpcError:
                    status = None
                if status == SERVING or (status == NOT_SERVING and not self.require_serving):
                    return
                if status == NOT_SERVING:
                    raise RuntimeError(f"{self.name} server is NOT_SERVING (a model failed to load); "
                                       f"its log ({self.log_path}) ends:\n{self.log_tail()}")
                time.sleep(POLL_S)
        raise RuntimeError(f"{self.name} server's health service did not answer within {self.ready_timeout_s:.0f}s "
                           f"(last status {status}); its log ({self.log_path}) ends:\n{self.log_tail()}")

    def _wait_server_ready(self, deadline: float) -> None:
        with self.channel() as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline:
                self.check_alive("before it was ready")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(POLL_S)
        raise RuntimeError(f"{self.name} server not ready after {self.ready_timeout_s:.0f}s; "
                           f"its log ({self.log_path}) ends:\n{self.log_tail()}")

    def channel(self) -> grpc.Channel:
        """A new channel to the server: over TLS with `credentials` when given, else plaintext."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    def check_alive(self, when: str) -> None:
        """Raise, with the end of the server's log, if the server has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} server exited with {self.process.returncode} {when}; "
                               f"its log ({self.log_path}) ends:\n{self.log_tail()}")

    def log_text(self) -> str:
        """Everything the server has written so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
