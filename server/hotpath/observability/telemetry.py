"""Tracing: OpenTelemetry spans for each RPC, the steps of a request, and the batches that serve them.

Sampling is decided here, before any span object exists, so an unsampled request costs one look
through its metadata for a `traceparent` and, without one, one random draw. The decision is
parent-based: a caller's sampled `traceparent` is always continued, an unsampled one never, and a
call without one starts a trace with probability `ratio`. Every step of a sampled request is a child
of its server span; each batch that serves a sampled request gets its own root span linking the
request spans it served. The SDK's batch processor exports over OTLP from its own thread.

Configuration follows the standard variables (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`,
`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`); the `--trace-*` flags win over them.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hotpath import __version__
from hotpath.serving._batcher import Pending
from hotpath.settings import Settings

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
DEFAULT_SAMPLING = 0.01
"""Fraction of calls without a caller's trace context that start a trace, unless configured."""

PROTOCOLS = ("grpc", "http/protobuf")

_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})
"""Statuses that mark a server span as an error (OpenTelemetry's gRPC conventions); the rest are the caller's."""

_SAMPLER_RATIOS = {"always_on": 1.0, "parentbased_always_on": 1.0, "always_off": 0.0, "parentbased_always_off": 0.0}
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer("hotpath", __version__)


@dataclass(frozen=True)
class TraceSettings:
    """Where and how much one server process traces."""

    endpoint: str
    """The collector's OTLP endpoint; "" lets the exporter read it from the environment."""

    protocol: str
    """One of PROTOCOLS."""

    ratio: float
    """Probability that a call without a caller's trace context starts a trace."""

    def describe(self) -> str:
        where = self.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return f"tracing to {where} over OTLP {self.protocol}, starting traces for {self.ratio:g} of calls without a sampled caller"


def trace_settings(settings: Settings, environ: Mapping[str, str] = os.environ) -> TraceSettings | None:
    """Tracing for this server from its flags, then the OTEL_* variables; None when tracing is off.

    Tracing is off with --no-trace, OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none, or when no
    endpoint is given by --trace-endpoint or OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT.
    Raises ValueError for a sampling ratio outside 0..1 or an unknown protocol.
    """
    if (not settings.tracing or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
            or environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none"):
        return None
    if not (settings.trace_endpoint or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} (from OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL) is not supported; use one of {', '.join(PROTOCOLS)}")
    ratio = settings.trace_sampling if settings.trace_sampling is not None else _environment_ratio(environ)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"trace sampling ratio must be between 0 and 1, got {ratio}")
    return TraceSettings(settings.trace_endpoint, protocol, ratio)


def _environment_ratio(environ: Mapping[str, str]) -> float:
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in _SAMPLER_RATIOS:
        return _SAMPLER_RATIOS[sampler]
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            return float(argument)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1, got {argument!r}") from None
    if sampler:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported (hotpath samples parent-based by ratio); using ratio %g", sampler, DEFAULT_SAMPLING)
    return DEFAULT_SAMPLING


def _exporter(config: TraceSettings) -> SpanExporter:
    endpoint = config.endpoint or None
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
    except ImportError:
        raise ValueError("OTLP over http/protobuf needs the HTTP exporter: pip install opentelemetry-exporter-otlp-proto-http "
                         "(or send traces over grpc)") from None
    return HTTPSpanExporter(endpoint=endpoint)


class Tracing:
    """The server's tracer provider and sampling decision for incoming calls."""

    def __init__(self, provider: TracerProvider, ratio: float) -> None:
        self.provider = provider
        self.ratio = ratio

    def start_rpc(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Span | None:
        """The server span for a call to `method` with the caller's `metadata` when it is sampled, else None
        (and nothing allocated)."""
        traceparent = tracestate = None
        for key, value in metadata:
            if key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
        parent = None
        if traceparent is not None:
            parent = _PROPAGATOR.extract({"traceparent": traceparent, "tracestate": tracestate or ""})
            caller = trace.get_current_span(parent).get_span_context()
            if not caller.is_valid:
                parent = None
            elif not caller.trace_flags.sampled:
                return None
        if parent is None and random.random() >= self.ratio:
            return None
        return _TRACER.start_span(f"{SERVICE}/{method}", context=parent or Context(), kind=SpanKind.SERVER,
                                  attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method})

    def shutdown(self) -> None:
        """Export the spans still buffered and stop exporting."""
        self.provider.shutdown()


def configure_tracing(settings: Settings) -> Tracing | None:
    """Set up this process's tracer provider (the global one) from settings; None when tracing is off."""
    config = trace_settings(settings)
    if config is None:
        return None
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "hotpath"}))
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    trace.set_tracer_provider(provider)
    log.info("%s", config.describe())
    return Tracing(provider, config.ratio)


def end_rpc(span: Span, code: grpc.StatusCode, message: str = "") -> None:
    """Finish a server span with the call's gRPC status."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, message))
    span.end()


def _wall_ns(monotonic_ns: int) -> int:
    return monotonic_ns + time.time_ns() - time.monotonic_ns()


def record_step(span: Span, name: str, start_monotonic_ns: int, attributes: Mapping[str, object] | None = None) -> None:
    """Record a finished step of a request, from `start_monotonic_ns` to now, as a child of its span."""
    end = time.time_ns()
    step = _TRACER.start_span(name, context=trace.set_span_in_context(span), attributes=attributes,
                              start_time=start_monotonic_ns + end - time.monotonic_ns())
    step.end(end_time=end)


def start_batch(model: str, version: int, replica: int, batch: Sequence[Pending], traced: Sequence[Pending],
                reason: str, now_monotonic_ns: int) -> Span:
    """Record the queue wait of each traced request and start the span of the batch that serves them.

    The batch span is a root: it belongs to no single request, and links every traced request's span.
    """
    now = _wall_ns(now_monotonic_ns)
    links = []
    for pending in traced:
        request_span = pending.span
        wait = _TRACER.start_span("hotpath.queue.wait", context=trace.set_span_in_context(request_span),
                                  start_time=now - (now_monotonic_ns - pending.enqueued_ns), attributes={"hotpath.replica": replica})
        wait.end(end_time=now)
        links.append(Link(request_span.get_span_context()))
    return _TRACER.start_span("hotpath.batch", context=Context(), kind=SpanKind.INTERNAL, links=links, start_time=now, attributes={
        "hotpath.model.name": model, "hotpath.model.version": version, "hotpath.replica": replica,
        "hotpath.batch.requests": len(batch), "hotpath.batch.size": sum(p.rows for p in batch),
        "hotpath.batch.dispatch": reason})


def end_batch(span: Span, error: BaseException | None) -> None:
    """Finish a batch span, marking it failed when the model raised."""
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()
