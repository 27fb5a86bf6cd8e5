"""The gRPC servicer: one thin method per RPC over the data plane, errors mapped in one place."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc
from hotpath.dataplane import DataPlane
from hotpath.errors import InferenceError

log = logging.getLogger(__name__)

Response = TypeVar("Response")


def _deadline_ns(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    return 0 if remaining is None else time.monotonic_ns() + int(remaining * 1e9)


def grpc_errors(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Abort the call with the error's status; anything unexpected becomes INTERNAL and is logged."""

    @functools.wraps(method)
    async def wrapper(self: "InferenceServicer", request: object, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except InferenceError as exc:
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(exc).__name__}: {exc}")

    return wrapper


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a DataPlane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @grpc_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.repository.ready())

    @grpc_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return self.dataplane.server_metadata()

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return self.dataplane.model_metadata(request.name, request.version)

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        return self.dataplane.statistics(request.name, request.version)

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        return self.dataplane.index(request.ready)

    @grpc_errors
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @grpc_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.dataplane.infer(request, _deadline_ns(context))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Run the stream's requests concurrently (so they batch) and answer each as it finishes.

        A failed request is answered with `error_message` and its id; the stream goes on.
        """
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        deadline = _deadline_ns(context)

        async def run(request: pb.ModelInferRequest) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self.dataplane.infer(request, deadline))
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
        try:
            while (response := await results.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
