"""The inference service: one thin handler per RPC over the data plane, errors mapped and calls traced in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from opentelemetry.trace import Span

from hotpath._proto import grpc_service_pb2 as pb
from hotpath.errors import InferenceError
from hotpath.observability import telemetry
from hotpath.observability.logs import ThrottledLog
from hotpath.observability.telemetry import Tracing
from hotpath.serving.dataplane import DataPlane
from hotpath.transport._frontend import ServerCall
from hotpath.transport.frontend import FrontEnd
from hotpath.transport.security import AccessPolicy, ModelControlOff, audit

log = logging.getLogger(__name__)
_failures = ThrottledLog(log)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OK = grpc.StatusCode.OK.value[0]

Handler = Callable[[Message, ServerCall, "Span | None"], Awaitable[Message]]
"""One unary RPC's meaning: its response to a request, or an InferenceError."""


class InferenceServicer:
    """`inference.GRPCInferenceService` over a DataPlane; `tracing` None traces nothing."""

    def __init__(self, dataplane: DataPlane, tracing: Tracing | None = None) -> None:
        self.dataplane = dataplane
        self.tracing = tracing
        self._model_control = False
        self._access: AccessPolicy | None = None

    def register(self, frontend: FrontEnd) -> None:
        """Serve every RPC of the service on `frontend`, with model control as its settings say."""
        self._model_control = frontend.settings.model_control == "explicit"
        self._access = frontend.access
        unary = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.repository_model_load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.repository_model_unload),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer),
        }
        for name, (request_type, handler) in unary.items():
            frontend.add_unary(f"/{SERVICE}/{name}", request_type, self._unary(name, handler))
        frontend.add_stream(f"/{SERVICE}/ModelStreamInfer", self.model_stream_infer)

    def _unary(self, name: str, handler: Handler) -> Callable[[Message, ServerCall], Awaitable[None]]:
        """Serve one unary RPC: hand the handler its server span when the call is sampled (else None),
        finish with its response or its error's status; anything unexpected becomes INTERNAL and is logged."""

        async def serve(request: Message, call: ServerCall) -> None:
            span = self.tracing.start_rpc(name, call.metadata()) if self.tracing is not None else None
            code, message = grpc.StatusCode.OK, ""
            try:
                response = await handler(request, call, span)
                call.finish(OK, "", response.SerializeToString())
                return
            except InferenceError as exc:
                code, message = exc.code, exc.message
            except asyncio.CancelledError:
                code, message = grpc.StatusCode.CANCELLED, "the call was cancelled"
            except Exception as exc:
                _failures.log(logging.ERROR, name, "%s failed", name, exc_info=exc)
                code, message = grpc.StatusCode.INTERNAL, f"{name} failed: {type(exc).__name__}: {exc}"
            finally:
                if span is not None:
                    telemetry.end_rpc(span, code, message)
            call.finish(code.value[0], message)

        return serve

    async def server_live(self, request: pb.ServerLiveRequest, call: ServerCall, span: Span | None) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, call: ServerCall, span: Span | None) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.repository.ready())

    async def model_ready(self, request: pb.ModelReadyRequest, call: ServerCall, span: Span | None) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    async def server_metadata(self, request: pb.ServerMetadataRequest, call: ServerCall, span: Span | None) -> pb.ServerMetadataResponse:
        return self.dataplane.server_metadata()

    async def model_metadata(self, request: pb.ModelMetadataRequest, call: ServerCall, span: Span | None) -> pb.ModelMetadataResponse:
        return self.dataplane.model_metadata(request.name, request.version)

    async def model_config(self, request: pb.ModelConfigRequest, call: ServerCall, span: Span | None) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))

    async def model_statistics(self, request: pb.ModelStatisticsRequest, call: ServerCall, span: Span | None) -> pb.ModelStatisticsResponse:
        return self.dataplane.statistics(request.name, request.version)

    async def repository_index(self, request: pb.RepositoryIndexRequest, call: ServerCall, span: Span | None) -> pb.RepositoryIndexResponse:
        return self.dataplane.index(request.ready)

    async def repository_model_load(self, request: pb.RepositoryModelLoadRequest, call: ServerCall, span: Span | None) -> pb.RepositoryModelLoadResponse:
        await self._control("RepositoryModelLoad", request.model_name, call,
                            lambda: self.dataplane.load(request.model_name, sorted(request.parameters)))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: pb.RepositoryModelUnloadRequest, call: ServerCall, span: Span | None) -> pb.RepositoryModelUnloadResponse:
        await self._control("RepositoryModelUnload", request.model_name, call,
                            lambda: self.dataplane.unload(request.model_name, sorted(request.parameters)))
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, action: str, model: str, call: ServerCall, run: Callable[[], Awaitable[None]]) -> None:
        """Carry out one model control action when the mode allows it, and write its one audit line."""
        header_key = self._access.header_key(call.method) if self._access is not None else None
        if not self._model_control:
            audit(call, action, model, "refused: FAILED_PRECONDITION, model control is none", header_key)
            raise ModelControlOff(f"{action} is not allowed: model control is off (mode none); start the server with "
                                  "--model-control explicit to load and unload models at run time")
        result = "failed: INTERNAL"
        try:
            await run()
            result = "OK"
        except InferenceError as exc:
            result = f"failed: {exc.code.name}: {exc.message[:200]}"
            raise
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        finally:
            audit(call, action, model, result, header_key)

    async def model_infer(self, request: pb.ModelInferRequest, call: ServerCall, span: Span | None) -> pb.ModelInferResponse:
        return await self.dataplane.infer(request, call.deadline_ns, span)

    async def model_stream_infer(self, call: ServerCall, messages: asyncio.Queue[bytes | None]) -> None:
        """Run the stream's requests concurrently (so they batch) and answer each as it finishes.

        A failed request is answered with `error_message` and its id; the stream goes on. A sampled
        stream has one server span, the parent of every request's steps.
        """
        span = self.tracing.start_rpc("ModelStreamInfer", call.metadata()) if self.tracing is not None else None
        tasks: set[asyncio.Task] = set()

        async def run(request: pb.ModelInferRequest) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self.dataplane.infer(request, call.deadline_ns, span))
            except InferenceError as exc:
                response = pb.ModelStreamInferResponse(error_message=exc.message, infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id))
            except Exception as exc:
                _failures.log(logging.ERROR, "ModelStreamInfer", "stream request failed", exc_info=exc)
                response = pb.ModelStreamInferResponse(error_message=f"internal error: {type(exc).__name__}: {exc}",
                                                       infer_response=pb.ModelInferResponse(id=request.id))
            call.write(response.SerializeToString())

        code, details = grpc.StatusCode.CANCELLED, "the call was cancelled"
        try:
            while (message := await messages.get()) is not None:
                try:
                    request = pb.ModelInferRequest.FromString(message)
                except DecodeError as exc:
                    code, details = grpc.StatusCode.INVALID_ARGUMENT, f"ModelStreamInfer: a request is not a valid ModelInferRequest: {exc}"
                    break
                task = asyncio.get_running_loop().create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                if tasks:
                    await asyncio.gather(*tasks)
                code, details = grpc.StatusCode.OK, ""
        finally:
            for task in tasks:
                task.cancel()
            if span is not None:
                telemetry.end_rpc(span, code, details)
            call.finish(code.value[0], details)
