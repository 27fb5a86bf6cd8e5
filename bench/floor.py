"""The gRPC floor peer: shared/floor/canned_server.cc, built once, answering every call with one real response.

The canned server is grpc++ (the gRPC core every official binding sits on) doing nothing but the
transport: no decode, no model. It serves the tiny model's real serialized ModelInferResponse to the
bench's one-row request, so h2load sees the same bytes from it as from a real server. It has no
ServerReady, ModelStatistics or metadata (every method gets the canned bytes), so the bench drives it
with h2load only and checks nothing it returns.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.ceiling import cpu_session
from bench.models import INPUT_NAME, OUTPUT_NAME
from hotpath._proto import grpc_service_pb2 as pb

THREADS = 2
"""Completion-queue threads: one per core of the 2-core bench machine, as the floor's README measured."""
SOURCE_NAME = "canned_server.cc"
_REPO = Path(__file__).resolve().parent.parent
SOURCE_CANDIDATES = (_REPO / "shared" / "floor" / SOURCE_NAME, _REPO.parent / "shared" / "floor" / SOURCE_NAME)


def find_source(explicit: Path | None = None) -> tuple[Path | None, str]:
    """The floor's source and what was found, or (None, why not)."""
    for path in [explicit] if explicit else SOURCE_CANDIDATES:
        if path.is_file():
            return path, str(path)
    looked = explicit or " or ".join(map(str, SOURCE_CANDIDATES))
    return None, f"{SOURCE_NAME} not found at {looked} (pass --floor-source PATH)"


def compile_flags() -> tuple[list[str] | None, str]:
    """`pkg-config --cflags --libs grpc++` as arguments, or (None, why not)."""
    if shutil.which("g++") is None or shutil.which("pkg-config") is None:
        return None, "g++ or pkg-config not found: apt-get install -y g++ pkg-config libgrpc++-dev"
    probe = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"pkg-config finds no grpc++ ({probe.stderr.strip()}): apt-get install -y libgrpc++-dev"
    return probe.stdout.split(), "grpc++ " + subprocess.run(
        ["pkg-config", "--modversion", "grpc++"], capture_output=True, text=True).stdout.strip()


def build(source: Path, cache_dir: Path) -> Path:
    """Compile `source` into `cache_dir` unless a binary of the same source and flags is there already.

    The binary's name carries a hash of both, so an edit to the source or a grpc++ upgrade rebuilds.
    Raises RuntimeError with the compiler's output when the build fails.
    """
    flags, why = compile_flags()
    if flags is None:
        raise RuntimeError(why)
    command = ["g++", "-O2", "-std=c++17", str(source), *flags]
    digest = hashlib.sha256(source.read_bytes() + " ".join(command[3:]).encode()).hexdigest()[:12]
    binary = cache_dir / f"canned_server-{digest}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
    compiled = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
    if compiled.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the floor failed: {' '.join(command)}\n{compiled.stderr[-3000:]}")
    os.replace(partial, binary)  # atomic: a concurrent bench sees the old state or the whole binary
    return binary


def canned_response(model: str, model_path: Path, request: pb.ModelInferRequest) -> bytes:
    """The serialized ModelInferResponse a server gives `request`, from running the real ONNX model on it."""
    tensor = request.inputs[0]
    rows = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tensor.shape)
    (output,) = cpu_session(model_path).run([OUTPUT_NAME], {INPUT_NAME: rows})
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request.id)
    response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=output.shape)
    response.raw_output_contents.append(output.tobytes())
    return response.SerializeToString()


class CannedServer:
    """The floor as a subprocess in its own process group: listening on enter, stopped on exit.

    Same attributes as `bench.server_process.ServerProcess` (name, target, process, check_alive), so the
    bench drives it alike; it is ready once it prints "ready" and the port accepts a connection.
    """

    def __init__(self, name: str, binary: Path, response_path: Path, log_path: Path, port: int,
                 threads: int = THREADS, ready_timeout_s: float = 30.0) -> None:
        self.name, self.log_path, self.ready_timeout_s = name, log_path, ready_timeout_s
        self.command = [str(binary), str(port), str(response_path), str(threads)]
        self.target = f"127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> CannedServer:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while not self._listening():
                self.check_alive("before it listened")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen within {self.ready_timeout_s:.0f}s; "
                                       f"its log ends:\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _listening(self) -> bool:
        if "ready" not in self.log_path.read_text(errors="replace"):
            return False
        host, port = self.target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return False
        return True

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def check_alive(self, when: str) -> None:
        """Raise, with the end of its log, if the server has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode} {when}; "
                               f"its log ({self.log_path}) ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
