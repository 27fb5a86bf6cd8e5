"""The transport-free data plane: every RPC's meaning, in terms of protocol messages.

The gRPC servicer converts nothing and decides nothing; it calls one method here per RPC.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry.trace import Span

from hotpath import __version__
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import model_config_pb2
from hotpath.errors import InferenceError, InvalidArgument, ResponseTooLarge
from hotpath.observability import telemetry
from hotpath.observability.stats import to_proto
from hotpath.serving._codec import join_bytes
from hotpath.serving.cache import ResponseCache, request_key
from hotpath.serving.model import Model
from hotpath.serving.repository import ModelRepository, check_model_name

EXTENSIONS = ("model_repository", "statistics", "model_configuration", "schedule_policy")
"""The protocol extensions ServerMetadata reports."""

STREAM_ENVELOPE_BYTES = 6
"""What ModelStreamInferResponse adds around a response: a field tag and a length of up to 5 bytes."""


class DataPlane:
    """What the server does, independent of how requests arrive."""

    def __init__(self, repository: ModelRepository, cache: ResponseCache | None = None) -> None:
        self.repository = repository
        self.cache = cache
        self._message_limit = repository.settings.max_message_bytes
        repository.on_change.append(self._on_model_change)

    def _on_model_change(self, name: str, ready: bool) -> None:
        if self.cache is not None:
            self.cache.drop_model(name)

    @staticmethod
    def _cache_key(model: Model, request: pb.ModelInferRequest, inputs: tuple) -> bytes:
        """The exact key of a request: model, version, every input's name, datatype, shape and bytes, outputs.

        The bytes come from the decoded arrays (views of the raw contents, or the typed contents
        converted once), so raw and typed forms of the same tensor share an entry.
        """
        parts = []
        for tensor in request.inputs:
            array = inputs[model.codec.inputs[tensor.name][0]]
            parts.append((tensor.name, tensor.datatype, tensor.shape,
                          join_bytes(array.ravel()) if array.dtype == object else array))
        return request_key(model.name, model.version, parts, sorted(o.name for o in request.outputs))

    async def infer(self, request: pb.ModelInferRequest, deadline_ns: int = 0, span: Span | None = None) -> pb.ModelInferResponse:
        """Run one inference request; raises InferenceError with the status to report.

        `span` is the call's trace span when it is sampled; the request's steps are recorded under it.
        """
        start = time.monotonic_ns()
        model = self.repository.get(request.model_name, request.model_version)
        if span is not None:
            span.set_attributes({"hotpath.model.name": model.name, "hotpath.model.version": model.version})
        codec = model.codec
        prediction_log = model.prediction_log
        log_id = prediction_log.sample(request) if prediction_log is not None else None
        response_id = request.id if log_id is None else log_id
        try:
            inputs, rows, batch_key = codec.decode(request)
            chosen = codec.requested(request)
            cache_key = None
            if self.cache is not None and codec.cached:
                lookup_start_ns = time.monotonic_ns()
                cache_key = self._cache_key(model, request, inputs)
                body = self.cache.get(model.name, cache_key)
                if span is not None:
                    telemetry.record_step(span, "hotpath.cache.lookup", lookup_start_ns, {"hotpath.cache.hit": body is not None})
                if body is not None:
                    response = pb.ModelInferResponse.FromString(body)
                    response.id = response_id
                    model.stats.add("cache_hit", time.monotonic_ns() - lookup_start_ns)
                    model.stats.request_done(True, time.monotonic_ns() - start, rows)
                    if log_id is not None:
                        prediction_log.record_answer(model, log_id, inputs, rows, codec.outputs_of(response))
                    return response
                lookup_ns = time.monotonic_ns() - lookup_start_ns
            outputs = await model.infer(inputs, rows, batch_key, deadline_ns, span, log_id)
            encoding = time.monotonic_ns()
            response = codec.encode(response_id, outputs, chosen)
            if span is not None:
                telemetry.record_step(span, "hotpath.response.encode", encoding)
            size = response.ByteSize() + STREAM_ENVELOPE_BYTES
            if size > self._message_limit:
                raise ResponseTooLarge(f"model '{model.name}': the response would be {size} bytes, over the server's message limit of "
                                       f"{self._message_limit} bytes (--max-message-size); ask for fewer rows or outputs, or raise the limit")
            if cache_key is not None and self.repository.serves(model):
                insert = time.monotonic_ns()
                response.id = ""
                self.cache.put(model.name, cache_key, response.SerializeToString())
                response.id = response_id
                model.stats.add("cache_miss", lookup_ns + time.monotonic_ns() - insert)
        except InferenceError as exc:
            model.stats.request_done(False, time.monotonic_ns() - start, 0, exc.code)
            raise
        model.stats.request_done(True, time.monotonic_ns() - start, rows)
        return response

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="hotpath", version=__version__, extensions=EXTENSIONS)

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether that model version serves; an invalid name raises, an unknown one is just not ready."""
        check_model_name(name)
        try:
            self.repository.get(name, version)
        except InferenceError:
            return False
        return True

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self.repository.get(name, version)
        response = pb.ModelMetadataResponse(name=name, versions=[str(v) for v in self.repository.versions(name)],
                                            platform=model.config.platform)
        for specs, target in ((model.inputs, response.inputs), (model.outputs, response.outputs)):
            for spec in specs:
                target.add(name=spec.name, datatype=spec.datatype.name, shape=spec.shape(model.batched))
        return response

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        return self.repository.get(name, version).config

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        models = [self.repository.get(name, version)] if name else self.repository.served()
        if name and not version:
            models = [self.repository.get(name, str(v)) for v in self.repository.versions(name)]
        response = pb.ModelStatisticsResponse()
        for model in models:
            counters = self.repository.store.total(model.name, model.version, model.config.max_batch_size)
            response.model_stats.append(to_proto(model.name, model.version, counters, model.config.max_batch_size))
        return response

    async def load(self, name: str, parameters: Sequence[str] = ()) -> None:
        """Load or reload a model; a config or files sent with the request are refused."""
        check_model_name(name)
        if parameters:
            raise InvalidArgument(f"RepositoryModelLoad parameters {list(parameters)} are not supported: hotpath loads what is in "
                                  "the model repository; change the files there and load again")
        await self.repository.load(name)

    async def unload(self, name: str, parameters: Sequence[str] = ()) -> None:
        """Unload a model (hotpath has no ensembles, so there are no dependents to unload)."""
        check_model_name(name)
        unsupported = [p for p in parameters if p != "unload_dependents"]
        if unsupported:
            raise InvalidArgument(f"RepositoryModelUnload parameters {unsupported} are not supported")
        await self.repository.unload(name)

    def index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repository.index():
            if not ready_only or state == "READY":
                response.models.add(name=name, version=version, state=state, reason=reason)
        return response
