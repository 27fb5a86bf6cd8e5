"""Shared fixtures: real hotpath servers in subprocesses on 127.0.0.1, over generated repositories."""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bench import server_process  # noqa: E402
from models import add_sub_model, identity_model, matmul_model  # noqa: E402

_LOG_DIR = Path(tempfile.mkdtemp(prefix="hotpath-test-servers-"))
_numbers = itertools.count(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_LOG_DIR, ignore_errors=True)


class ServerProcess(server_process.ServerProcess):
    """A started `hotpath serve --port 0` on 127.0.0.1; `url` is its host:port.

    Ready once its health service answers, SERVING or NOT_SERVING: tests that break models want a
    server that runs without them. A TLS server is probed with `credentials`.
    """

    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.repo = repo
        command = [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                   "--port", "0", "--metrics-port", "0", *args]
        super().__init__("hotpath", command, _LOG_DIR / f"server-{next(_numbers)}.log", ready_timeout_s=60, env=env,
                         require_serving=False, credentials=credentials)
        self.start()
        self.proc = self.process
        self.url = self.target

    def output(self) -> str:
        return self.log_text()


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

    def start(repo: Path, *args: str, env: dict[str, str] | None = None,
              credentials: grpc.ChannelCredentials | None = None) -> ServerProcess:
        proc = ServerProcess(repo, *args, env=env, credentials=credentials)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
