"""Evaluation stores for the tests: a Parquet directory, a SQLite file, or a real PostgreSQL server started for the session."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_USER = "nobody"
"""PostgreSQL refuses to run as root; as root the tests run it as this unprivileged user."""


def _postgres_bin() -> Path | None:
    found = shutil.which("postgres")
    candidates = [Path(found).parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postgres:
    """A PostgreSQL server in a temporary directory; `database()` makes a fresh database and returns its URL."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="hotpath-postgres-"))
        self.as_user = ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []
        if self.as_user:
            entry = pwd.getpwnam(POSTGRES_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.port = _free_port()
        self.data = self.root / "data"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.binaries / tool), *args], check=True, capture_output=True, timeout=120)

    def database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    binaries = _postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); the PostgreSQL store tests need its server")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' for the PostgreSQL store tests")
    server = Postgres(binaries)
    yield server
    server.stop()


@pytest.fixture(params=["parquet", "sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store: a Parquet directory (the default), a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "parquet":
        pytest.importorskip("pyarrow", reason="pip install pyarrow for the Parquet store tests")
        return str(tmp_path / "store")
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return request.getfixturevalue("postgres").database()
