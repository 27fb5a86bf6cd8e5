"""Staging for the prediction log: each logged batch's rows copied out of its arrays into reused buffers.

A batch's input and output arrays are the model's working memory: held until the writer drains them,
they make every new batch land in fresh memory (in a VM, a page fault per 4 KiB). So the thread that
ran the batch copies its logged requests' bytes, while they are still in cache, into chunks that the
writer hands back once it has written them; the arrays are freed at once, as without logging. A
batch whose requests do not stack (BYTES, a missing tensor, requests of unequal rows) is not staged;
the log queues its arrays as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hotpath.evaluation.store import EncodedRequests, LoggedBatch, add_encoded, encoder_of

if TYPE_CHECKING:
    from hotpath.serving.model import Model

CHUNK_BYTES = 4 << 20
"""Size of each reused buffer; a batch larger than this gets a buffer of its own, not reused."""


@dataclass
class _Chunk:
    """One buffer and the encoded runs of requests it holds, in the order they were copied in."""

    buffer: np.ndarray
    used: int = 0
    runs: list[tuple[int, EncodedRequests]] = field(default_factory=list)
    """Each run with where it begins in `buffer`."""


class Staging:
    """Chunks of logged requests' bytes between the threads that run batches and the log's writer.

    Not thread-safe: the log calls `stage` and `take` under its lock, and `release` only from the writer
    between two `take`s.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.staged_bytes = 0
        """Bytes copied in since the last `take`."""
        self._free: list[np.ndarray] = []
        self._filling: _Chunk | None = None
        self._full: list[_Chunk] = []
        self._lent: list[_Chunk] = []
        self._allocated = 0

    def stage(self, model: Model, batch: LoggedBatch) -> bool | None:
        """Copy the logged requests of `batch` in: True when staged, None when there is no room (the caller
        drops them), False when they do not stack (the caller queues the batch as it is)."""
        tensors = (*batch[4], *batch[5])
        rows, requests = batch[3][0], len(batch[3])
        if any(a is None or a.dtype == object for a in tensors) or batch[3].count(rows) != requests:
            return False
        if model.batched and any(a.ndim == 0 or a.shape[0] != requests * rows for a in tensors):
            return False
        ids = batch[2]
        chosen = [i for i, log_id in enumerate(ids) if log_id is not None] if None in ids else None
        logged = list(ids) if chosen is None else [ids[i] for i in chosen]
        first = [a[:rows] if model.batched else a for a in tensors]
        widths = [a.nbytes for a in first]
        count, width = len(logged), sum(widths)
        chunk = self._room(count * width)
        if chunk is None:
            return None
        start = chunk.used
        matrix = chunk.buffer[start:start + count * width].reshape(count, width)
        column = 0
        for tensor, size in zip(tensors, widths):
            by_request = np.ascontiguousarray(tensor).reshape(requests, -1).view(np.uint8)
            matrix[:, column:column + size] = by_request if chosen is None else by_request[chosen]
            column += size
        chunk.used += count * width
        self.staged_bytes += count * width
        described = encoder_of(model).describe(first[:len(batch[4])], first[len(batch[4]):])
        add_encoded(chunk.runs, chunk.buffer, start, width, model.version, rows, described, logged, [(batch[0], count)])
        return True

    def take(self) -> list[EncodedRequests]:
        """Everything staged so far; its chunks stay lent to the caller until `release`."""
        if self._filling is not None and self._filling.used:
            self._full.append(self._filling)
            self._filling = None
        taken, self._full = self._full, []
        self._lent += taken
        self.staged_bytes = 0
        return [run for chunk in taken for _, run in chunk.runs]

    def release(self) -> None:
        """The writer is done with what `take` returned: its buffers are reused."""
        for chunk in self._lent:
            self._give_back(chunk.buffer)
        self._lent = []

    def _give_back(self, buffer: np.ndarray) -> None:
        if len(buffer) == CHUNK_BYTES:
            self._free.append(buffer)
        else:
            self._allocated -= len(buffer)

    def _room(self, size: int) -> _Chunk | None:
        """The chunk to copy `size` bytes into, or None when staging would exceed `max_bytes`."""
        chunk = self._filling
        if chunk is not None and chunk.used + size <= len(chunk.buffer):
            return chunk
        if chunk is not None:
            if chunk.used:
                self._full.append(chunk)
            else:
                self._give_back(chunk.buffer)
            self._filling = None
        if size <= CHUNK_BYTES and self._free:
            self._filling = _Chunk(self._free.pop())
            return self._filling
        length = max(size, CHUNK_BYTES)
        if self._allocated + length > self.max_bytes:
            return None
        self._allocated += length
        self._filling = _Chunk(np.empty(length, np.uint8))
        return self._filling
