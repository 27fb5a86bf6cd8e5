"""grpc.health.v1: the serving status of the server ("") and of each model, for Check and Watch.

Kubernetes' gRPC probes, grpc-health-probe and load balancers call Check; Watch streams each change.
Readiness is "" (every model loaded and serving) and each model's name; liveness is LIVENESS, which is
SERVING for as long as the process runs, so a model that fails to load never restart-loops a pod.
Touched only on the event loop's thread.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2

from hotpath.transport._frontend import ServerCall
from hotpath.transport.frontend import FrontEnd

SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
LIVENESS = "liveness"
"""The service name of liveness: SERVING while the process runs, draining included."""


class Health:
    """Statuses by service name, and the Watch streams waiting for their changes; LIVENESS is always SERVING."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {LIVENESS: SERVING}
        self._watchers: dict[str, set[ServerCall]] = {}
        self._shutting_down = False

    def register(self, frontend: FrontEnd) -> None:
        """Serve Check and Watch on `frontend`."""
        frontend.add_unary(f"/{SERVICE}/Check", health_pb2.HealthCheckRequest, self.check)
        frontend.add_stream(f"/{SERVICE}/Watch", self.watch)

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers when it changed; ignored once shutting down."""
        if self._shutting_down or service == LIVENESS or self._status.get(service) == status:
            return
        self._status[service] = status
        self._notify(service)

    def enter_graceful_shutdown(self) -> None:
        """Report every service but LIVENESS NOT_SERVING from now on, so balancers and readiness probes
        stop sending calls while the process, still live, finishes what it accepted."""
        for service in self._status.keys() - {LIVENESS}:
            self._status[service] = NOT_SERVING
            self._notify(service)
        self._shutting_down = True

    def end_watches(self) -> None:
        """End every Watch stream (UNAVAILABLE: the client should watch another server)."""
        for watchers in list(self._watchers.values()):
            for call in list(watchers):
                call.finish(grpc.StatusCode.UNAVAILABLE.value[0], "the server is shutting down")
                if call.on_cancel is not None:
                    call.on_cancel()

    def _notify(self, service: str) -> None:
        message = health_pb2.HealthCheckResponse(status=self._status[service]).SerializeToString()
        for call in self._watchers.get(service, ()):
            call.write(message)

    async def check(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> None:
        status = self._status.get(request.service)
        if status is None:
            call.finish(grpc.StatusCode.NOT_FOUND.value[0], f"unknown service '{request.service}'")
        else:
            call.finish(grpc.StatusCode.OK.value[0], "", health_pb2.HealthCheckResponse(status=status).SerializeToString())

    async def watch(self, call: ServerCall, messages: asyncio.Queue[bytes | None]) -> None:
        """Send the service's status now and on every change, until the client goes away."""
        request = health_pb2.HealthCheckRequest.FromString(await messages.get() or b"")
        status = self._status.get(request.service, SERVICE_UNKNOWN)
        call.write(health_pb2.HealthCheckResponse(status=status).SerializeToString())
        watchers = self._watchers.setdefault(request.service, set())
        watchers.add(call)
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            watchers.discard(call)
            if not watchers:
                del self._watchers[request.service]
            call.finish(grpc.StatusCode.CANCELLED.value[0], "the server is shutting down")

