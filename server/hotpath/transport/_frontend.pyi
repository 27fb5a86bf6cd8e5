"""Type stub for the native front end (`csrc/hotpath/_frontend.pyx`)."""

from collections.abc import Callable, Iterable

EVENT_MESSAGE: int
EVENT_HALF_CLOSE: int
EVENT_CANCELLED: int

class ServerCall:
    method: str
    deadline_ns: int
    streaming: bool
    cancelled: bool
    finished: bool
    on_cancel: Callable[[], object] | None
    on_message: Callable[[bytes | None], object] | None
    def metadata(self) -> list[tuple[str, str | bytes]]: ...
    def write(self, message: bytes) -> None: ...
    def finish(self, code: int, details: str = "", response: bytes | None = None) -> None: ...

class NativeServer:
    port: int
    def start(self, address: str, *, max_message_bytes: int, threads: int, streaming_methods: Iterable[str],
              keepalive_time_ms: int, keepalive_timeout_ms: int, keepalive_min_ping_interval_ms: int,
              max_connection_age_ms: int = 0) -> int: ...
    def fileno(self) -> int: ...
    def drain(self) -> list[tuple[int, ServerCall, bytes | None]]: ...
    def shutdown(self, grace_s: float) -> None: ...
    def close(self) -> None: ...
