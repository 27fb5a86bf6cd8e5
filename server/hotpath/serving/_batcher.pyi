from typing import Any, Iterable, Sequence

import asyncio
import numpy as np

READY_FULL: str
READY_DELAY: str
READY_IDLE: str

class Pending:
    future: asyncio.Future[list[np.ndarray]]
    inputs: tuple[np.ndarray, ...]
    rows: int
    key: object
    enqueued_ns: int
    deadline_ns: int
    span: Any
    log_id: str | None

class BatchQueue:
    max_rows: int
    max_requests: int
    max_queue_size: int
    max_delay_ns: int
    timeout_ns: int
    allow_timeout_override: bool
    work_conserving: bool
    def __init__(self, max_rows: int, max_queue_size: int, max_delay_ns: int = ..., preferred_sizes: Iterable[int] = ...,
                 batching: bool = ..., timeout_ns: int = ..., allow_timeout_override: bool = ...,
                 work_conserving: bool = ...) -> None: ...
    def __len__(self) -> int: ...
    @property
    def rows(self) -> int: ...
    def push(self, future: asyncio.Future[list[np.ndarray]], inputs: tuple[np.ndarray, ...], rows: int, key: object,
             now_ns: int, deadline_ns: int = ..., span: Any = ..., log_id: str | None = ...) -> None: ...
    def ready_in(self, now_ns: int, busy: bool = False) -> int: ...
    def ready_reason(self, busy: bool = False) -> str: ...
    def pop_batch(self, now_ns: int) -> list[Pending]: ...

def deliver(batch: list[Pending], outputs: list[np.ndarray]) -> None: ...
def fail(batch: list[Pending], exc: BaseException) -> None: ...

class DeadlineTimer:
    def fileno(self) -> int: ...
    def arm(self, deadline_ns: int) -> None: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...
