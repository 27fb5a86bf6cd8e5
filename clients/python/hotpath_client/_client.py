"""`Client` (blocking) and `AsyncClient` (asyncio): one method per Open Inference Protocol RPC.

Both speak to the server through the stubs generated from hotpath's `proto/`, send tensors as raw
contents, and raise only HotpathError.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np

from hotpath_client._errors import translated
from hotpath_client._proto import grpc_service_pb2 as pb
from hotpath_client._proto import grpc_service_pb2_grpc, model_config_pb2
from hotpath_client._tensors import StreamResult, infer_outputs, infer_request, stream_result

Inputs = Mapping[str, np.ndarray]
Pem = bytes | str | os.PathLike
"""PEM data: bytes are the PEM itself, a str or path names a file holding it."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _credentials(ssl: bool, root_certificates: Pem | None, private_key: Pem | None,
                 certificate_chain: Pem | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS option is set, else None for a plaintext channel."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("client TLS needs both private_key and certificate_chain (or neither)")
    if not (ssl or root_certificates or private_key):
        return None
    return grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


class _Requests:
    """A stream's requests, built as gRPC pulls them; a failure stops the stream and is kept to raise after it.

    Raising inside the request iterator would make gRPC cancel the call and hide the cause.
    """

    def __init__(self, model: str, items: Iterable[Inputs], outputs: Sequence[str] | None, version: str) -> None:
        self.model, self.items, self.outputs, self.version = model, items, outputs, version
        self.error: Exception | None = None

    def _build(self, index: int, inputs: Inputs) -> pb.ModelInferRequest:
        return infer_request(self.model, inputs, self.outputs, self.version, str(index))

    def __iter__(self) -> Iterator[pb.ModelInferRequest]:
        try:
            for index, inputs in enumerate(self.items):
                yield self._build(index, inputs)
        except Exception as exc:
            self.error = exc

    async def __aiter__(self) -> AsyncIterator[pb.ModelInferRequest]:
        if not isinstance(self.items, AsyncIterable):
            for request in self:
                yield request
            return
        index = 0
        try:
            async for inputs in self.items:
                yield self._build(index, inputs)
                index += 1
        except Exception as exc:
            self.error = exc


class Client:
    """A blocking client for one server.

    `url` is host:port. TLS is on when `ssl` is true or any certificate is given: `root_certificates`
    to trust (default: the system's), `certificate_chain` and `private_key` for mutual TLS. `timeout`
    is the default deadline in seconds for every call (None: no deadline); each call may override it.
    `headers` go with every call, e.g. the key and value a server restricts model control to
    (`--grpc-restricted-protocol model-repository:KEY=VALUE`).
    """

    def __init__(self, url: str = "localhost:8001", *, ssl: bool = False, root_certificates: Pem | None = None,
                 certificate_chain: Pem | None = None, private_key: Pem | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, headers: Mapping[str, str] | None = None) -> None:
        credentials = _credentials(ssl, root_certificates, private_key, certificate_chain)
        options = _options(max_message_bytes)
        self._channel = (grpc.secure_channel(url, credentials, options) if credentials
                         else grpc.insecure_channel(url, options))
        self.headers = tuple(headers.items()) if headers else None
        self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.url = url
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls after this fail."""
        self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def live(self, *, timeout: float | None = None) -> bool:
        """Whether the server process is up."""
        with translated():
            return self._stub.ServerLive(pb.ServerLiveRequest(), timeout=self._deadline(timeout), metadata=self.headers).live

    def ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready to serve inferences (its models loaded)."""
        with translated():
            return self._stub.ServerReady(pb.ServerReadyRequest(), timeout=self._deadline(timeout), metadata=self.headers).ready

    def model_ready(self, name: str, version: str = "", *, timeout: float | None = None) -> bool:
        """Whether a model (a version of it; the latest when empty) can serve now."""
        with translated():
            request = pb.ModelReadyRequest(name=name, version=version)
            return self._stub.ModelReady(request, timeout=self._deadline(timeout), metadata=self.headers).ready

    def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions."""
        with translated():
            return self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self._deadline(timeout), metadata=self.headers)

    def metadata(self, name: str, version: str = "", *, timeout: float | None = None) -> pb.ModelMetadataResponse:
        """A model's versions and its inputs' and outputs' names, datatypes and shapes."""
        with translated():
            request = pb.ModelMetadataRequest(name=name, version=version)
            return self._stub.ModelMetadata(request, timeout=self._deadline(timeout), metadata=self.headers)

    def config(self, name: str, version: str = "", *, timeout: float | None = None) -> model_config_pb2.ModelConfig:
        """A model's configuration as the server applies it (Triton's `ModelConfig` schema)."""
        with translated():
            request = pb.ModelConfigRequest(name=name, version=version)
            return self._stub.ModelConfig(request, timeout=self._deadline(timeout), metadata=self.headers).config

    def statistics(self, name: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelStatisticsResponse:
        """Inference counts and cumulative timings, for one model or (empty name) all of them."""
        with translated():
            request = pb.ModelStatisticsRequest(name=name, version=version)
            return self._stub.ModelStatistics(request, timeout=self._deadline(timeout), metadata=self.headers)

    def repository_index(self, ready: bool = False, *, timeout: float | None = None) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """The repository's models with their state; only the ready ones when `ready`."""
        with translated():
            request = pb.RepositoryIndexRequest(ready=ready)
            return list(self._stub.RepositoryIndex(request, timeout=self._deadline(timeout), metadata=self.headers).models)

    def load(self, name: str, *, timeout: float | None = None) -> None:
        """Load a model from the repository, or reload it to pick up new versions or configuration."""
        with translated():
            self._stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=self._deadline(timeout), metadata=self.headers)

    def unload(self, name: str, *, timeout: float | None = None) -> None:
        """Unload a model; its in-flight requests finish first."""
        with translated():
            self._stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=self._deadline(timeout), metadata=self.headers)

    def infer(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None, version: str = "",
              request_id: str = "", *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one inference: the datatype of each input comes from its dtype; returns the outputs by name.

        `outputs` names the outputs to return (default all). Numeric outputs are read-only arrays;
        BYTES outputs are object arrays of bytes.
        """
        request = infer_request(model, inputs, outputs, version, request_id)
        with translated():
            return infer_outputs(self._stub.ModelInfer(request, timeout=self._deadline(timeout), metadata=self.headers))

    def stream_infer(self, model: str, requests: Iterable[Inputs], outputs: Sequence[str] | None = None,
                     version: str = "", *, timeout: float | None = None) -> Iterator[StreamResult]:
        """Send each input dict on one stream and yield the answers as they complete (not in request order).

        The server runs a stream's requests concurrently, so they batch. Each result's `id` is its
        request's position in `requests`; `timeout` bounds the whole stream, and leaving the loop
        early cancels it. If building a request fails, no more are sent, and the error is raised once
        the answers to those sent are yielded.
        """
        pending = _Requests(model, requests, outputs, version)
        call = self._stub.ModelStreamInfer(iter(pending), timeout=self._deadline(timeout), metadata=self.headers)
        try:
            with translated():
                for response in call:
                    yield stream_result(response)
        finally:
            call.cancel()
        if pending.error is not None:
            raise pending.error


class AsyncClient:
    """The asyncio twin of `Client`: the same constructor, the same methods, awaited.

    Create and use it inside one running event loop.
    """

    def __init__(self, url: str = "localhost:8001", *, ssl: bool = False, root_certificates: Pem | None = None,
                 certificate_chain: Pem | None = None, private_key: Pem | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, headers: Mapping[str, str] | None = None) -> None:
        credentials = _credentials(ssl, root_certificates, private_key, certificate_chain)
        options = _options(max_message_bytes)
        self._channel = (grpc.aio.secure_channel(url, credentials, options) if credentials
                         else grpc.aio.insecure_channel(url, options))
        self.headers = tuple(headers.items()) if headers else None
        self._stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self.url = url
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def live(self, *, timeout: float | None = None) -> bool:
        """Whether the server process is up."""
        with translated():
            return (await self._stub.ServerLive(pb.ServerLiveRequest(), timeout=self._deadline(timeout), metadata=self.headers)).live

    async def ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready to serve inferences (its models loaded)."""
        with translated():
            return (await self._stub.ServerReady(pb.ServerReadyRequest(), timeout=self._deadline(timeout), metadata=self.headers)).ready

    async def model_ready(self, name: str, version: str = "", *, timeout: float | None = None) -> bool:
        """Whether a model (a version of it; the latest when empty) can serve now."""
        with translated():
            request = pb.ModelReadyRequest(name=name, version=version)
            return (await self._stub.ModelReady(request, timeout=self._deadline(timeout), metadata=self.headers)).ready

    async def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions."""
        with translated():
            return await self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self._deadline(timeout), metadata=self.headers)

    async def metadata(self, name: str, version: str = "", *, timeout: float | None = None) -> pb.ModelMetadataResponse:
        """A model's versions and its inputs' and outputs' names, datatypes and shapes."""
        with translated():
            request = pb.ModelMetadataRequest(name=name, version=version)
            return await self._stub.ModelMetadata(request, timeout=self._deadline(timeout), metadata=self.headers)

    async def config(self, name: str, version: str = "", *, timeout: float | None = None) -> model_config_pb2.ModelConfig:
        """A model's configuration as the server applies it (Triton's `ModelConfig` schema)."""
        with translated():
            request = pb.ModelConfigRequest(name=name, version=version)
            return (await self._stub.ModelConfig(request, timeout=self._deadline(timeout), metadata=self.headers)).config

    async def statistics(self, name: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelStatisticsResponse:
        """Inference counts and cumulative timings, for one model or (empty name) all of them."""
        with translated():
            request = pb.ModelStatisticsRequest(name=name, version=version)
            return await self._stub.ModelStatistics(request, timeout=self._deadline(timeout), metadata=self.headers)

    async def repository_index(self, ready: bool = False, *, timeout: float | None = None) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """The repository's models with their state; only the ready ones when `ready`."""
        with translated():
            request = pb.RepositoryIndexRequest(ready=ready)
            return list((await self._stub.RepositoryIndex(request, timeout=self._deadline(timeout), metadata=self.headers)).models)

    async def load(self, name: str, *, timeout: float | None = None) -> None:
        """Load a model from the repository, or reload it to pick up new versions or configuration."""
        with translated():
            await self._stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=self._deadline(timeout), metadata=self.headers)

    async def unload(self, name: str, *, timeout: float | None = None) -> None:
        """Unload a model; its in-flight requests finish first."""
        with translated():
            await self._stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=self._deadline(timeout), metadata=self.headers)

    async def infer(self, model: str, inputs: Inputs, outputs: Sequence[str] | None = None, version: str = "",
                    request_id: str = "", *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one inference; see `Client.infer`."""
        request = infer_request(model, inputs, outputs, version, request_id)
        with translated():
            return infer_outputs(await self._stub.ModelInfer(request, timeout=self._deadline(timeout), metadata=self.headers))

    async def stream_infer(self, model: str, requests: Iterable[Inputs] | AsyncIterable[Inputs],
                           outputs: Sequence[str] | None = None, version: str = "", *,
                           timeout: float | None = None) -> AsyncIterator[StreamResult]:
        """Stream inferences and yield answers as they complete; see `Client.stream_infer`.

        `requests` may be a plain or an async iterable.
        """
        pending = _Requests(model, requests, outputs, version)
        call = self._stub.ModelStreamInfer(pending.__aiter__(), timeout=self._deadline(timeout), metadata=self.headers)
        try:
            with translated():
                async for response in call:
                    yield stream_result(response)
        finally:
            call.cancel()
        if pending.error is not None:
            raise pending.error
