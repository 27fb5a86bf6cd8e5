"""Assemble and run one hotpath server process: inference service, health, reflection."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hotpath._proto import grpc_service_pb2, grpc_service_pb2_grpc
from hotpath._proto._pool import POOL
from hotpath.cache import ResponseCache
from hotpath.dataplane import DataPlane
from hotpath.errors import InferenceError
from hotpath.metrics import MetricsEndpoint
from hotpath.repository import ModelRepository
from hotpath.servicer import InferenceServicer
from hotpath.settings import Settings, default_workers
from hotpath.stats import StatsStore
from hotpath.telemetry import configure_tracing
from hotpath.workers import LocalCoordinator, Supervisor, WorkerLink

log = logging.getLogger(__name__)

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CACHE_STATS_PERIOD_S = 1.0
"""How often each process copies its response cache's numbers into the statistics the metrics endpoint reads."""

for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    POOL.AddSerializedFile(_file.serialized_pb)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options every server process uses (message limits; several processes may share the port)."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1),
    ]


class Server:
    """A running hotpath gRPC server over one model repository."""

    def __init__(self, settings: Settings, repository_path: Path, link: Connection | None = None) -> None:
        self.settings = settings
        self.repository = ModelRepository(repository_path, settings, StatsStore(settings.run_dir, settings.worker_index))
        self.link = WorkerLink(link, self.repository) if link is not None else None
        self.cache = ResponseCache(settings.cache_bytes // max(1, settings.workers)) if settings.cache_bytes else None
        self.dataplane = DataPlane(self.repository, self.link or LocalCoordinator(self.repository), self.cache)
        self.tracing = configure_tracing(settings)
        self.health = HealthServicer()
        self.repository.on_change.append(self._on_model_change)
        self._server = grpc.aio.server(options=grpc_options(settings))
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane, self.tracing), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server, pool=POOL)
        self.port = 0
        self._cache_stats: asyncio.Task | None = None

    def _on_model_change(self, name: str, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(name, status))
        asyncio.get_running_loop().create_task(self._set_overall())

    async def _set_overall(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.repository.ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(INFERENCE_SERVICE, status)

    async def start(self, replay: list[tuple[str, str]] = ()) -> None:
        """Load the repository's models, repeat the loads and unloads done since the server started, then listen."""
        if self.link is not None:
            self.link.attach(asyncio.get_running_loop())
        await self.repository.load_all()
        for op, name in replay:
            try:
                await (self.repository.load(name) if op == "load" else self.repository.unload(name))
            except InferenceError as exc:
                log.error("repeating %s of model '%s' failed: %s", op, name, exc.message)
        await self._set_overall()
        self.port = self._server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.host}:{self.settings.port}")
        await self._server.start()
        if self.cache is not None:
            self._cache_stats = asyncio.get_running_loop().create_task(self._publish_cache_stats())
        log.info("listening on %s:%d with %d model version(s), pid %d",
                 self.settings.host, self.port, len(self.repository.served()), os.getpid())

    async def stop(self) -> None:
        """Stop taking calls, let in-flight ones finish within the grace period, unload models."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.settings.grace_seconds)
        await self.repository.close()
        if self._cache_stats is not None:
            self._cache_stats.cancel()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)

    async def _publish_cache_stats(self) -> None:
        """Every CACHE_STATS_PERIOD_S, record each model's cache entries, bytes and evictions on its latest version."""
        while True:
            latest = {}
            for model in self.repository.served():
                if model.version > getattr(latest.get(model.name), "version", -1):
                    latest[model.name] = model
            for name, model in latest.items():
                numbers = self.cache.stats(name)
                model.stats.set_cache(numbers.entries, numbers.bytes, numbers.evictions)
            await asyncio.sleep(CACHE_STATS_PERIOD_S)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_worker(settings: Settings, repository_path: Path, link: Connection, replay: list[tuple[str, str]]) -> None:
    """One worker process of a multi-process server: serve until told to stop."""
    stop = _stop_on_signals()
    server = Server(settings, repository_path, link)
    await server.start(replay)
    link.send(("ready",))
    await stop.wait()
    await server.stop()


def run_dir_parent() -> Path:
    """Where servers keep their shared counters: /dev/shm (memory) when writable, else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _run_dir() -> Path:
    """A fresh directory for this server's shared counters, after removing those of servers that died.

    Named after the top-level process's pid, so a server killed before it could clean up is found
    by the next one to start.
    """
    parent = run_dir_parent()
    for stale in parent.glob("hotpath-*-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"hotpath-{os.getpid()}-", dir=parent))


async def serve(settings: Settings, repository_path: Path) -> None:
    """Run the server (one process, or a supervisor and its workers) until SIGINT or SIGTERM."""
    stop = _stop_on_signals()
    settings = replace(settings, run_dir=_run_dir(), workers=settings.workers or default_workers(settings.cpus))
    single = settings.workers == 1
    metrics = None
    try:
        if settings.metrics_port:
            metrics = MetricsEndpoint(StatsStore(settings.run_dir, 0), settings.host, settings.metrics_port)
            metrics.start()
            log.info("Prometheus metrics at http://%s:%d/metrics", settings.host, metrics.port)
        if single:
            server = Server(settings, repository_path)
            await server.start()
            port = server.port
        else:
            supervisor = Supervisor(settings, repository_path)
            port = await supervisor.start()
        log.info("hotpath serving models from %s on %s:%d with %d worker process(es)",
                 repository_path, settings.host, port, settings.workers)
        await stop.wait()
        log.info("shutting down")
        await (server.stop() if single else supervisor.stop())
    finally:
        if metrics is not None:
            metrics.stop()
        shutil.rmtree(settings.run_dir, ignore_errors=True)
