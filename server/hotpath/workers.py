"""Several server processes on one port, seen by users as one server.

A Python process runs one GIL, so `--workers N` starts N processes that each accept connections on
the same port (SO_REUSEPORT lets the kernel spread connections over them). The supervisor that
starts them keeps them in agreement: a model load or unload that reaches any worker is carried out
by every worker before it is answered, statistics live in shared memory that any worker sums, and a
worker that dies is restarted with the same models (only its own in-flight requests fail).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from hotpath.errors import InferenceError, LoadError, ModelNotFound
from hotpath.repository import ModelRepository
from hotpath.settings import Settings

log = logging.getLogger(__name__)

_ERRORS = {cls.__name__: cls for cls in (LoadError, ModelNotFound, InferenceError)}


class Coordinator(Protocol):
    """Carries out model loads and unloads on every process of the server."""

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...


class LocalCoordinator:
    """The single-process server: loads and unloads go straight to its repository."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def load(self, name: str) -> None:
        await self.repository.load(name)

    async def unload(self, name: str) -> None:
        await self.repository.unload(name)


class WorkerLink:
    """A worker's end of its pipe to the supervisor: asks for loads, and carries them out when told."""

    def __init__(self, conn: Connection, repository: ModelRepository) -> None:
        self.conn = conn
        self.repository = repository
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.conn.fileno(), self._on_message)

    def send(self, *message: object) -> None:
        self.conn.send(message)

    async def _ask(self, op: str, name: str) -> None:
        request = next(self._ids)
        future = self._waiting[request] = asyncio.get_running_loop().create_future()
        self.send("request", request, op, name)
        error = await future
        if error is not None:
            kind, message = error
            raise _ERRORS.get(kind, InferenceError)(message)

    async def load(self, name: str) -> None:
        await self._ask("load", name)

    async def unload(self, name: str) -> None:
        await self._ask("unload", name)

    def _on_message(self) -> None:
        try:
            message = self.conn.recv()
        except EOFError:
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if message[0] == "reply":
            future = self._waiting.pop(message[1])
            if not future.done():
                future.set_result(message[2])
        elif message[0] == "do":
            asyncio.get_running_loop().create_task(self._carry_out(*message[1:]))

    async def _carry_out(self, job: int, op: str, name: str) -> None:
        try:
            await (self.repository.load(name) if op == "load" else self.repository.unload(name))
        except InferenceError as exc:
            self.send("done", job, (type(exc).__name__, exc.message))
        else:
            self.send("done", job, None)


def _worker_main(settings: Settings, repository_path: Path, conn: Connection, replay: list[tuple[str, str]]) -> None:
    from hotpath.logs import configure_logging
    from hotpath.server import run_worker

    configure_logging(settings.log_level, f"worker-{settings.worker_index}")
    asyncio.run(run_worker(settings, repository_path, conn, replay))


class _Job:
    """One load or unload that every worker must carry out; `done` holds the first error, or None."""

    def __init__(self, done: asyncio.Future, pending: set[int]) -> None:
        self.done = done
        self.pending = pending
        self.error: tuple[str, str] | None = None

    def finish(self, worker: int, error: tuple[str, str] | None) -> None:
        self.pending.discard(worker)
        self.error = self.error or error
        if not self.pending and not self.done.done():
            self.done.set_result(self.error)


class Supervisor:
    """Starts the workers, relays loads and unloads to all of them, restarts any that die."""

    def __init__(self, settings: Settings, repository_path: Path) -> None:
        self.settings = settings
        self.repository_path = repository_path
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, tuple[multiprocessing.Process, Connection]] = {}
        self._history: list[tuple[str, str]] = []
        self._jobs: dict[int, _Job] = {}
        self._job_ids = itertools.count()
        self._lock = asyncio.Lock()
        self._ready: dict[int, asyncio.Future] = {}
        self._stopping = False
        self._reservation: socket.socket | None = None

    def _reserve_port(self) -> int:
        """Bind (without listening) to learn the port when 0 was asked for, so every worker shares it."""
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        self._reservation = socket.socket(family, socket.SOCK_STREAM)
        self._reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._reservation.bind((self.settings.host, self.settings.port))
        return self._reservation.getsockname()[1]

    async def start(self) -> int:
        """Start every worker and wait until all listen; returns the port."""
        port = self._reserve_port()
        self.settings = replace(self.settings, port=port)
        await asyncio.gather(*(self._spawn(i) for i in range(self.settings.workers)))
        return port

    async def _spawn(self, index: int) -> None:
        parent, child = self._context.Pipe()
        settings = replace(self.settings, worker_index=index)
        process = self._context.Process(target=_worker_main, args=(settings, self.repository_path, child, list(self._history)),
                                        name=f"hotpath-worker-{index}", daemon=True)
        process.start()
        child.close()
        self._workers[index] = (process, parent)
        self._ready[index] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._on_message, index, parent)
        loop.add_reader(process.sentinel, self._on_exit, index)
        await self._ready[index]

    def _on_exit(self, index: int) -> None:
        process, conn = self._workers[index]
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        loop.remove_reader(conn.fileno())
        for job in self._jobs.values():
            job.finish(index, None)
        if not self._ready[index].done():
            self._ready[index].set_exception(RuntimeError(f"worker {index} exited with code {process.exitcode} while starting"))
            return
        if not self._stopping:
            log.error("worker %d exited with code %s; restarting it", index, process.exitcode)
            loop.create_task(self._spawn(index))

    def _on_message(self, index: int, conn: Connection) -> None:
        try:
            message = conn.recv()
        except EOFError:
            asyncio.get_running_loop().remove_reader(conn.fileno())
            return
        kind = message[0]
        if kind == "ready":
            self._ready[index].set_result(None)
        elif kind == "request":
            asyncio.get_running_loop().create_task(self._relay(conn, *message[1:]))
        elif kind == "done":
            self._jobs[message[1]].finish(index, message[2])

    async def _relay(self, origin: Connection, request: int, op: str, name: str) -> None:
        async with self._lock:
            job_id = next(self._job_ids)
            job = self._jobs[job_id] = _Job(asyncio.get_running_loop().create_future(), set(self._workers))
            for process, conn in self._workers.values():
                conn.send(("do", job_id, op, name))
            error = await job.done
            del self._jobs[job_id]
            if error is None:
                self._history.append((op, name))
        origin.send(("reply", request, error))

    async def stop(self) -> None:
        """Ask every worker to shut down gracefully and wait for them."""
        self._stopping = True
        for process, _ in self._workers.values():
            if process.is_alive():
                process.terminate()
        for process, _ in self._workers.values():
            await asyncio.to_thread(process.join, self.settings.grace_seconds + 10)
            if process.is_alive():
                process.kill()
        if self._reservation is not None:
            self._reservation.close()
