"""The one exception the client raises, carrying the gRPC status that describes the failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc


class HotpathError(Exception):
    """A failed call: `code` is the gRPC status (from the server, or the client's own for local errors)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise gRPC's errors as HotpathError, so callers catch one type whatever the transport said."""
    try:
        yield
    except grpc.RpcError as exc:
        if not isinstance(exc, (grpc.Call, grpc.aio.AioRpcError)):
            raise HotpathError(grpc.StatusCode.UNKNOWN, str(exc)) from None
        raise HotpathError(exc.code(), exc.details() or exc.code().name) from None
