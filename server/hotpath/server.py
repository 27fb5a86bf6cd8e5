"""Assemble and run one hotpath server process: inference service, health, reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hotpath._proto import grpc_service_pb2, grpc_service_pb2_grpc
from hotpath._proto._pool import POOL
from hotpath.dataplane import DataPlane
from hotpath.repository import ModelRepository
from hotpath.servicer import InferenceServicer
from hotpath.settings import Settings

log = logging.getLogger(__name__)

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

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

    def __init__(self, settings: Settings, repository_path: Path) -> None:
        self.settings = settings
        self.repository = ModelRepository(repository_path, settings)
        self.dataplane = DataPlane(self.repository)
        self.health = HealthServicer()
        self.repository.on_change.append(self._on_model_change)
        self._server = grpc.aio.server(options=grpc_options(settings))
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server, pool=POOL)
        self.port = 0

    def _on_model_change(self, name: str, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(name, status))
        asyncio.get_running_loop().create_task(self._set_overall())

    async def _set_overall(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.repository.ready() else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(INFERENCE_SERVICE, status)

    async def start(self) -> None:
        """Load the repository's models, then listen."""
        await self.repository.load_all()
        await self._set_overall()
        self.port = self._server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.host}:{self.settings.port}")
        await self._server.start()
        log.info("hotpath serving %d model version(s) from %s on %s:%d (max message %d bytes)",
                 len(self.repository.served()), self.repository.root, self.settings.host, self.port,
                 self.settings.max_message_bytes)

    async def stop(self) -> None:
        """Stop taking calls, let in-flight ones finish within the grace period, unload models."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.settings.grace_seconds)
        await self.repository.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(settings: Settings, repository_path: Path) -> None:
    """Run a server until SIGINT or SIGTERM, then shut it down gracefully."""
    server = Server(settings, repository_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
