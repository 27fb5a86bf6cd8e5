"""Shared fixtures: real hotpath servers in subprocesses on 127.0.0.1, over generated repositories."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import add_sub_model, identity_model, matmul_model  # noqa: E402

_LISTENING = re.compile(r"on 127\.0\.0\.1:(\d+)")


class ServerProcess:
    """A `hotpath serve` subprocess; `url` is its host:port once it listens."""

    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.repo = repo
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
            start_new_session=True)
        self.port = self._wait_listening()
        self.url = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_listening(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.log.append(line)
            match = _LISTENING.search(line)
            if match and "serving" in line:
                return int(match.group(1))
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def output(self) -> str:
        return "".join(self.log)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    identity_model(repo)
    identity_model(repo, "identity_fixed", batch=False, dims=(2, 3))
    add_sub_model(repo, config='name: "add_sub"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n')
    matmul_model(repo)
    return repo


@pytest.fixture(scope="session")
def server(shared_repo: Path) -> Iterator[ServerProcess]:
    """One server for the read-mostly tests; tests that load or unload models start their own."""
    proc = ServerProcess(shared_repo, "--max-message-size", "1MiB")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def start_server() -> Iterator:
    """Factory for servers private to one test; all are stopped after it."""
    started: list[ServerProcess] = []

    def start(repo: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = ServerProcess(repo, *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
