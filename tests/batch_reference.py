"""A plain-Python reference for `hotpath.serving._batcher`: the same API and semantics, written for clarity.

The tests run one behaviour suite against both queues and compare them operation by operation, so
the compiled queue is checked against code simple enough to verify by reading. Test-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hotpath.errors import DeadlineExceeded, QueueFull

READY_FULL = "full"
READY_DELAY = "delay"
READY_IDLE = "idle"


@dataclass
class Pending:
    """One queued request, as `_batcher.Pending`."""

    future: Any
    inputs: tuple
    rows: int
    key: object
    enqueued_ns: int
    deadline_ns: int
    span: Any
    log_id: str | None


class BatchQueue:
    """A bounded FIFO that forms batches; see `hotpath.serving._batcher` for the rules it mirrors."""

    def __init__(self, max_rows: int, max_queue_size: int, max_delay_ns: int = 0, preferred_sizes=(),
                 batching: bool = True, timeout_ns: int = 0, allow_timeout_override: bool = True,
                 work_conserving: bool = True) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.items: list[Pending] = []
        self.max_rows = max_rows
        self.max_requests = max_rows if batching else 1
        self.max_queue_size = max_queue_size
        self.max_delay_ns = max_delay_ns
        self.timeout_ns = timeout_ns
        self.allow_timeout_override = allow_timeout_override
        self.work_conserving = work_conserving
        fitting = [s for s in preferred_sizes if 0 < s <= max_rows]
        self.target = max(fitting) if fitting else max_rows

    def __len__(self) -> int:
        return len(self.items)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.items)

    def push(self, future, inputs: tuple, rows: int, key, now_ns: int, deadline_ns: int = 0, span=None, log_id=None) -> None:
        if len(self.items) >= self.max_queue_size:
            raise QueueFull(f"queue is full ({self.max_queue_size} requests waiting); retry later")
        if self.timeout_ns:
            policy = now_ns + self.timeout_ns
            if deadline_ns and self.allow_timeout_override:
                deadline_ns = min(deadline_ns, policy)
            else:
                deadline_ns = policy
        self.items.append(Pending(future, inputs, rows, key, now_ns, deadline_ns, span, log_id))

    def full(self) -> bool:
        return self.max_requests == 1 or self.rows >= self.target

    def ready_in(self, now_ns: int, busy: bool = False) -> int:
        if not self.items:
            return -1
        if (self.work_conserving and not busy) or self.full():
            return 0
        return max(0, self.items[0].enqueued_ns + self.max_delay_ns - now_ns)

    def ready_reason(self, busy: bool = False) -> str:
        if self.full():
            return READY_FULL
        return READY_IDLE if self.work_conserving and not busy else READY_DELAY

    def pop_batch(self, now_ns: int) -> list[Pending]:
        batch: list[Pending] = []
        kept: list[Pending] = []
        rest = list(self.items)
        while rest and len(batch) < self.max_requests:
            p = rest[0]
            if p.future.done():
                rest.pop(0)
            elif p.deadline_ns and now_ns >= p.deadline_ns:
                rest.pop(0)
                p.future.set_exception(DeadlineExceeded(
                    f"request waited {(now_ns - p.enqueued_ns) / 1e6:.3f} ms in the queue and its deadline passed before it could run"))
            elif batch and p.key != batch[0].key:
                kept.append(rest.pop(0))
            elif batch and sum(b.rows for b in batch) + p.rows > self.max_rows:
                break
            else:
                batch.append(rest.pop(0))
        self.items = kept + rest
        return batch


def deliver(batch: list[Pending], outputs: list[np.ndarray]) -> None:
    start = 0
    for p in batch:
        if not p.future.done():
            p.future.set_result(outputs if len(batch) == 1 else [out[start:start + p.rows] for out in outputs])
        start += p.rows


def fail(batch: list[Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)
