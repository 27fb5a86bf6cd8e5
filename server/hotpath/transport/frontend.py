"""The front end: the native gRPC server's calls, routed on the event loop to the services that answer them.

gRPC's own threads (C++, `_frontend`) accept calls and read their messages without the GIL; the
loop wakes once per burst and drains every new event in one call. Each call then becomes one task
of its service: unary RPCs are answered with one `finish`, streams `write` as they go.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from hotpath.observability.logs import ThrottledLog
from hotpath.settings import Settings
from hotpath.transport._frontend import EVENT_MESSAGE, NativeServer, ServerCall
from hotpath.transport.security import AccessPolicy

log = logging.getLogger(__name__)
_failures = ThrottledLog(log)

UnaryHandler = Callable[[Message, ServerCall], Awaitable[None]]
"""Answers one parsed request on its call (and finishes the call)."""
StreamHandler = Callable[[ServerCall, "asyncio.Queue[bytes | None]"], Awaitable[None]]
"""Serves a streaming call from the queue of its messages, which ends with None when the client half-closes."""

KEEPALIVE_TIME_MS = 2 * 60 * 60 * 1000
"""How often the server pings an idle connection (gRPC's default)."""
KEEPALIVE_TIMEOUT_MS = 20_000
"""How long a keepalive ping may go unanswered before the connection is closed."""
MIN_CLIENT_PING_INTERVAL_MS = 10_000
"""The most often a client may send keepalive pings without being told off (Kubernetes probes and most
clients ping far less often)."""

OK = grpc.StatusCode.OK.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
SHUTDOWN_MARGIN_S = 1.0
"""How long past the grace period gRPC waits for the UNAVAILABLE answers to go out before it cancels."""


class FrontEnd:
    """Routes every call of the native server to its handler: unary by request type, streams by method.

    Handlers of restricted methods (`--grpc-restricted-protocol`, `--model-control-allow-identity`) are
    wrapped when added, so they first check the caller against `access`, the server's AccessPolicy;
    every other method is routed as it is.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._native = NativeServer()
        self._unary: dict[str, tuple[Callable[[bytes], Message], UnaryHandler]] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[asyncio.Task, ServerCall] = {}
        self.access = AccessPolicy(settings.restricted_protocols, settings.model_control_allow_identities)

    def add_unary(self, method: str, request_type: type[Message], handler: UnaryHandler) -> None:
        """Serve `method` ("/package.Service/Method") by parsing its one message as `request_type`."""
        self._unary[method] = (request_type.FromString, self.access.guard_unary(method, handler))

    def add_stream(self, method: str, handler: StreamHandler) -> None:
        """Serve `method` as a stream: the handler reads the call's messages from a queue."""
        self._streams[method] = self.access.guard_stream(method, handler)

    @property
    def port(self) -> int:
        return self._native.port

    def start(self, threads: int) -> int:
        """Listen and start `threads` gRPC threads; returns the port (raises OSError when it cannot listen)."""
        self._loop = asyncio.get_running_loop()
        address = f"[{self.settings.host}]:{self.settings.port}" if ":" in self.settings.host else f"{self.settings.host}:{self.settings.port}"
        port = self._native.start(
            address, max_message_bytes=self.settings.max_message_bytes, threads=threads, streaming_methods=list(self._streams),
            keepalive_time_ms=KEEPALIVE_TIME_MS, keepalive_timeout_ms=KEEPALIVE_TIMEOUT_MS,
            keepalive_min_ping_interval_ms=MIN_CLIENT_PING_INTERVAL_MS, call_soon=self._loop.call_soon,
            tls_cert_path=str(self.settings.tls_cert or ""), tls_key_path=str(self.settings.tls_key or ""),
            tls_client_ca_path=str(self.settings.tls_client_ca or ""), tls_reload_s=self.settings.tls_reload_s)
        self._loop.add_reader(self._native.fileno(), self._on_events)
        return port

    def _on_events(self) -> None:
        for kind, call, message in self._native.drain():
            if call.on_message is not None:
                call.on_message(message)
            elif kind == EVENT_MESSAGE or call.streaming:
                self._open(call, message)
            else:
                call.finish(grpc.StatusCode.INTERNAL.value[0], f"{call.method}: the client sent no request message")

    def _open(self, call: ServerCall, message: bytes | None) -> None:
        route = self._unary.get(call.method)
        if route is not None:
            parse, handler = route
            try:
                request = parse(message)
            except DecodeError as exc:
                call.finish(grpc.StatusCode.INVALID_ARGUMENT.value[0], f"{call.method}: the request is not a valid protobuf message: {exc}")
                return
            coroutine = handler(request, call)
        elif call.method in self._streams:
            messages: asyncio.Queue[bytes | None] = asyncio.Queue()
            messages.put_nowait(message)
            call.on_message = messages.put_nowait
            coroutine = self._streams[call.method](call, messages)
        else:
            call.finish(grpc.StatusCode.UNIMPLEMENTED.value[0], f"method {call.method} is not served here")
            return
        task = self._loop.create_task(coroutine)
        call.on_cancel = task.cancel
        self._tasks[task] = call
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task) -> None:
        """A handler ended: a call it left open (it raised) fails with INTERNAL rather than hanging."""
        call = self._tasks.pop(task)
        if call.finished:
            return
        error = None if task.cancelled() else task.exception()
        if error is not None:
            _failures.log(logging.ERROR, call.method, "%s failed", call.method, exc_info=error)
            call.finish(grpc.StatusCode.INTERNAL.value[0], f"{call.method} failed: {type(error).__name__}: {error}")
        else:
            call.finish(grpc.StatusCode.CANCELLED.value[0], "the server is shutting down")

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let those accepted finish within `grace_s`, then stop gRPC's threads.

        A call still unanswered when the grace period ends is answered UNAVAILABLE, which clients
        and retry policies treat as "try again elsewhere", never CANCELLED.
        """
        loop = asyncio.get_running_loop()
        shutdown = loop.run_in_executor(None, self._native.shutdown, grace_s + SHUTDOWN_MARGIN_S)
        deadline = loop.time() + grace_s
        while self._tasks and (remaining := deadline - loop.time()) > 0:
            # Calls gRPC matched just before it stopped accepting arrive while this waits: they get the grace period too.
            await asyncio.wait(list(self._tasks), timeout=remaining)
        for task, call in list(self._tasks.items()):
            call.finish(UNAVAILABLE, "the server is shutting down before it could answer; retry the call")
            task.cancel()
        await shutdown
        self._on_events()
        self._loop.remove_reader(self._native.fileno())
        self._native.close()
