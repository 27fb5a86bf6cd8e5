"""Assemble and run the hotpath server: one process, the native front end, every service on one port."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import tempfile
from pathlib import Path

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hotpath._proto._pool import POOL
from hotpath.evaluation.log import EvaluationLogs
from hotpath.evaluation.service import SERVICE as EVALUATION_SERVICE, EvaluationService
from hotpath.observability.metrics import MetricsEndpoint
from hotpath.observability.stats import StatsStore
from hotpath.observability.telemetry import configure_tracing
from hotpath.serving.cache import ResponseCache
from hotpath.serving.dataplane import DataPlane
from hotpath.serving.repository import ModelRepository
from hotpath.settings import Settings, grpc_threads
from hotpath.transport._frontend import ServerCall
from hotpath.transport.frontend import OK, FrontEnd
from hotpath.transport.health import NOT_SERVING, SERVICE as HEALTH_SERVICE, SERVING, Health
from hotpath.transport.servicer import SERVICE, InferenceServicer

log = logging.getLogger(__name__)

CACHE_STATS_PERIOD_S = 1.0
"""How often the response cache's numbers are copied into the statistics the metrics endpoint reads."""
REFLECTION = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"

for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    POOL.AddSerializedFile(_file.serialized_pb)


class Server:
    """A running hotpath server over one model repository: one copy of each model, one cache, one port."""

    def __init__(self, settings: Settings, repository_path: Path) -> None:
        self.settings = settings
        self.stats = StatsStore()
        self.repository = ModelRepository(repository_path, settings, self.stats)
        self.cache = ResponseCache(settings.cache_bytes) if settings.cache_bytes else None
        self.evaluation = EvaluationLogs(self.repository)
        self.dataplane = DataPlane(self.repository, self.cache)
        self.tracing = configure_tracing(settings)
        self.health = Health()
        self.repository.on_change.append(self._on_model_change)
        self.frontend = FrontEnd(settings)
        InferenceServicer(self.dataplane, self.tracing).register(self.frontend)
        self.health.register(self.frontend)
        EvaluationService(self.evaluation).register(self.frontend)
        self._reflection = reflection.ReflectionServicer((SERVICE, HEALTH_SERVICE, EVALUATION_SERVICE, reflection.SERVICE_NAME), pool=POOL)
        self.frontend.add_stream(REFLECTION, self._reflect)
        self.port = 0
        self._cache_stats: asyncio.Task | None = None

    async def _reflect(self, call: ServerCall, messages: asyncio.Queue[bytes | None]) -> None:
        """Server reflection: answer each request of the stream as it comes (grpcurl, Postman, Kreya)."""
        while (message := await messages.get()) is not None:
            request = reflection_pb2.ServerReflectionRequest.FromString(message)
            for response in self._reflection.ServerReflectionInfo(iter((request,)), None):
                call.write(response.SerializeToString())
        call.finish(OK)

    def _on_model_change(self, name: str, ready: bool) -> None:
        self.health.set(name, SERVING if ready else NOT_SERVING)
        self._set_overall()

    def _set_overall(self) -> None:
        status = SERVING if self.repository.ready() else NOT_SERVING
        self.health.set("", status)
        self.health.set(SERVICE, status)

    async def start(self) -> None:
        """Load the repository's models, then listen."""
        await self.repository.load_all()
        # What is loaded now (modules, sessions, models) lives as long as the server: the collector need not walk it again.
        gc.collect()
        gc.freeze()
        self._set_overall()
        threads = grpc_threads(self.settings)
        self.port = self.frontend.start(threads)
        if self.cache is not None:
            self._cache_stats = asyncio.get_running_loop().create_task(self._publish_cache_stats())
        security = "mutual TLS" if self.settings.tls_client_ca else "TLS" if self.settings.tls_cert else "plaintext"
        log.info("listening on %s:%d (%s, model control %s) with %d model version(s), pid %d, native front end with %d gRPC thread(s)",
                 self.settings.host, self.port, security, self.settings.model_control, len(self.repository.served()),
                 os.getpid(), threads)

    async def stop(self) -> None:
        """Drain as Kubernetes expects: report NOT_SERVING and keep serving for the drain period, then
        stop accepting, let accepted calls finish within the grace period, unload models (flushing
        their drift windows) and export the last traces."""
        self.health.enter_graceful_shutdown()
        if self.settings.drain_s > 0:
            log.info("draining for %g s: health reports NOT_SERVING, calls are still served", self.settings.drain_s)
            await asyncio.sleep(self.settings.drain_s)
        self.health.end_watches()
        await self.frontend.stop(self.settings.grace_s)
        await self.repository.close()
        await self.evaluation.close()
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


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def write_port_file(path: Path, port: int) -> None:
    """Write `port` (decimal, newline) to `path` atomically: a reader sees no file or the whole port."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(f"{port}\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


async def serve(settings: Settings, repository_path: Path, port_file: Path | None = None) -> None:
    """Run the server until SIGINT or SIGTERM; once it listens, write its port to `port_file` if given."""
    stop = _stop_on_signals()
    server = Server(settings, repository_path)
    metrics = None
    try:
        if settings.metrics_port:
            metrics_host = settings.metrics_host or settings.host
            metrics = MetricsEndpoint(server.stats, metrics_host, settings.metrics_port, index=server.repository.index)
            metrics.start()
            log.info("Prometheus metrics at http://%s:%d/metrics", metrics_host, metrics.port)
        await server.start()
        log.info("hotpath serving models from %s on %s:%d", repository_path, settings.host, server.port)
        if port_file is not None:
            write_port_file(port_file, server.port)
        await stop.wait()
        log.info("shutting down")
        await server.stop()
    finally:
        if metrics is not None:
            metrics.stop()
