"""The gRPC servicer: one thin method per RPC over the data plane, errors mapped and calls traced in one place."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from opentelemetry.trace import Span

from hotpath import telemetry
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc
from hotpath.dataplane import DataPlane
from hotpath.errors import InferenceError
from hotpath.telemetry import Tracing

log = logging.getLogger(__name__)

Response = TypeVar("Response")


def _deadline_ns(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    return 0 if remaining is None else time.monotonic_ns() + int(remaining * 1e9)


def grpc_errors(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Serve a unary RPC: hand the method its server span when the call is sampled (else None), and
    abort with the error's status; anything unexpected becomes INTERNAL and is logged."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: "InferenceServicer", request: object, context: grpc.aio.ServicerContext) -> Response:
        span = self.tracing.start_rpc(name, context) if self.tracing is not None else None
        code, message = grpc.StatusCode.OK, ""
        try:
            return await method(self, request, context, span)
        except InferenceError as exc:
            code, message = exc.code, exc.message
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            log.exception("%s failed", name)
            code, message = grpc.StatusCode.INTERNAL, f"{name} failed: {type(exc).__name__}: {exc}"
        finally:
            if span is not None:
                telemetry.end_rpc(span, code, message)
        await context.abort(code, message)

    return wrapper


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a DataPlane; `tracing` None traces nothing."""

    def __init__(self, dataplane: DataPlane, tracing: Tracing | None = None) -> None:
        self.dataplane = dataplane
        self.tracing = tracing

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.repository.ready())

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ServerMetadataResponse:
        return self.dataplane.server_metadata()

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ModelMetadataResponse:
        return self.dataplane.model_metadata(request.name, request.version)

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ModelStatisticsResponse:
        return self.dataplane.statistics(request.name, request.version)

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.RepositoryIndexResponse:
        return self.dataplane.index(request.ready)

    @grpc_errors
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.RepositoryModelLoadResponse:
        await self.dataplane.load(request.model_name, sorted(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload(request.model_name, sorted(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, span: Span | None) -> pb.ModelInferResponse:
        return await self.dataplane.infer(request, _deadline_ns(context), span)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Run the stream's requests concurrently (so they batch) and answer each as it finishes.

        A failed request is answered with `error_message` and its id; the stream goes on. A sampled
        stream has one server span, the parent of every request's steps.
        """
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        deadline = _deadline_ns(context)
        span = self.tracing.start_rpc("ModelStreamInfer", context) if self.tracing is not None else None

        async def run(request: pb.ModelInferRequest) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self.dataplane.infer(request, deadline, span))
            except InferenceError as exc:
                response = pb.ModelStreamInferResponse(error_message=exc.message, infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id))
            except Exception as exc:
                log.exception("stream request failed")
                response = pb.ModelStreamInferResponse(error_message=f"internal error: {type(exc).__name__}: {exc}",
                                                       infer_response=pb.ModelInferResponse(id=request.id))
            results.put_nowait(response)

        async def read() -> None:
            tasks = set()
            async for request in requests:
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            results.put_nowait(None)

        reader = asyncio.create_task(read())
        code = grpc.StatusCode.CANCELLED
        try:
            while (response := await results.get()) is not None:
                yield response
            await reader
            code = grpc.StatusCode.OK
        finally:
            reader.cancel()
            if span is not None:
                telemetry.end_rpc(span, code)
