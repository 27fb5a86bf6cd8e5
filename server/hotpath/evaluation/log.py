"""The prediction log: a sampled share of each opted-in model's requests, written to its store off the request path.

The data plane samples a request and gives it its log id before it is queued. The model logs every batch
it runs, where it records drift: the thread that ran it copies the logged requests' bytes out of the
batch's arrays into the log's staging buffers (`staging.py`), or queues the arrays themselves when the
requests do not stack. Both are bounded: past `queue_size` requests or STAGING_BYTES the log drops and
counts it, inference never waits. One writer thread per model drains them into its store once the
store's `drain_rows` requests are waiting or its `drain_interval_s` has passed (one SQL transaction, or
the Parquet store's current segment), and runs label jobs after what was recorded before them, so a
label sent after its response always finds its prediction.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import model_config_pb2
from hotpath.errors import InferenceError
from hotpath.evaluation.staging import Staging
from hotpath.evaluation.store import LabelValue, LoggedBatch, Store, StoreError, default_store_path, open_store
from hotpath.observability.logs import ThrottledLog

if TYPE_CHECKING:
    from hotpath.serving._batcher import Pending
    from hotpath.serving.model import Model
    from hotpath.serving.repository import ModelRepository

log = logging.getLogger(__name__)
_failures = ThrottledLog(log)

DEFAULT_QUEUE_SIZE = 10_000
"""Requests waiting for the writer beyond which new ones are dropped from the log, when the config sets none."""
MAINTENANCE_PERIOD_S = 60.0
"""How often the writer merges the store's small pieces and applies the age and size limits."""
OPEN_TIMEOUT_S = 30.0
"""How long a model load waits for its store to open before logging goes without it."""
STAGING_BYTES = 64 << 20
"""Most bytes of logged requests waiting for the writer; beyond them new ones are dropped from the log."""

_LIVE: "weakref.WeakSet[PredictionLog]" = weakref.WeakSet()


class EvaluationNotEnabled(InferenceError):
    """Labels sent for a model that logs no predictions."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def sample_rate(config: model_config_pb2.ModelEvaluationConfig) -> float:
    """The config's sample rate (unset means 1); raises ValueError outside [0, 1]."""
    rate = config.sample_rate if config.HasField("sample_rate") else 1.0
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"evaluation.sample_rate must be in [0, 1], got {rate}")
    return rate


def store_location(config: model_config_pb2.ModelEvaluationConfig, model_dir: Path) -> str:
    """The store a model's config names: its `store`, else the Parquet store in the model's directory."""
    return config.store or str(default_store_path(model_dir))


class PredictionLog:
    """One model's sampled predictions on their way to its store.

    `sample` and `record_answer` run on the event loop's thread, `record` wherever the model runs a batch;
    everything that touches the store runs on the writer thread. `logged`, `dropped` and `failed` only
    grow (read by the metrics endpoint's thread).
    """

    def __init__(self, name: str, config: model_config_pb2.ModelEvaluationConfig, model_dir: Path) -> None:
        self.name = name
        self.config = config
        self.rate = sample_rate(config)
        self.location = store_location(config, model_dir)
        self.limit = config.queue_size or DEFAULT_QUEUE_SIZE
        self.logged = self.dropped = self.failed = 0
        self._staging = Staging(STAGING_BYTES)
        """The logged requests of the batches that stack, copied out of them."""
        self._pending: deque[LoggedBatch] = deque()
        """The other batches to write: only atomic values and tuples, which the garbage collector stops tracking."""
        self._queued = 0
        """Logged requests waiting for the writer, staged or in `_pending`, which `limit` bounds; changed under `_lock`."""
        self._lock = threading.Lock()
        self._drain_rows = self.limit
        """Queued requests at which the writer is woken; the store's `drain_rows` once it is open."""
        self._models: dict[int, Model] = {}
        """The served model of each version a pending batch names."""
        self._jobs: deque[tuple[Callable[[Store], object], Future]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        opened: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name=f"hotpath-evaluation-{name}", daemon=True)
        self._thread.start()
        try:
            opened.result(OPEN_TIMEOUT_S)
        except TimeoutError:
            self._closing = True
            raise StoreError(f"model '{name}': the evaluation store {self.location} did not open within {OPEN_TIMEOUT_S:g} s") from None
        _LIVE.add(self)

    def sample(self, request: pb.ModelInferRequest) -> str | None:
        """The id to log this request under when it is sampled (its own `id`, else a new one the response carries), else None."""
        if self.rate < 1.0 and random.random() >= self.rate:
            return None
        return request.id or f"{self._id_prefix}-{next(self._ids)}"

    def record(self, model: Model, batch: Sequence[Pending], inputs: Sequence[np.ndarray | None],
               outputs: Sequence[np.ndarray]) -> None:
        """Log the sampled requests of a batch `model` ran: `inputs` and `outputs` are the whole batch's, in config order."""
        ids = tuple([pending.log_id for pending in batch])
        if ids.count(None) == len(ids):
            return
        self._enqueue(model, (time.time(), model.version, ids, tuple([pending.rows for pending in batch]), tuple(inputs), tuple(outputs)))

    def record_answer(self, model: Model, log_id: str, inputs: Sequence[np.ndarray | None], rows: int,
                      outputs: Sequence[np.ndarray | None]) -> None:
        """Log a sampled request answered without running the model (from the response cache); an output
        the answer does not carry is None."""
        self._enqueue(model, (time.time(), model.version, (log_id,), (rows,), tuple(inputs), tuple(outputs)))

    def _enqueue(self, model: Model, entry: LoggedBatch) -> None:
        count = len(entry[2]) - entry[2].count(None)
        try:
            self._stage(model, entry, count)
        except Exception as exc:
            self.failed += count
            _failures.log(logging.ERROR, self.name, "model '%s': %d predictions could not be logged", self.name, count, exc_info=exc)

    def _stage(self, model: Model, entry: LoggedBatch, count: int) -> None:
        """Stage or queue one batch for the writer; whatever goes wrong here must not fail the batch's requests."""
        with self._lock:
            room = 0 if self._closing else self.limit - self._queued
            if count > room > 0:
                entry = _first_logged(entry, room)
                self.dropped += count - room
                count = room
            staged = self._staging.stage(model, entry) if room > 0 else None
            if staged is None:
                self.dropped += count
                return
            if not staged:
                self._models[model.version] = model
                self._pending.append(entry)
            self._queued += count
            wake = self._queued >= self._drain_rows or self._staging.staged_bytes >= STAGING_BYTES // 2
        if wake:
            self._wake.set()

    def submit(self, job: Callable[[Store], object]) -> Future:
        """Run `job(store)` on the writer thread after everything recorded so far is written."""
        future: Future = Future()
        self._jobs.append((job, future))
        self._wake.set()
        return future

    def close(self) -> None:
        """Write what is queued, then stop the writer; blocks until it has. Batches recorded later are dropped."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join()
        _LIVE.discard(self)

    def _run(self, opened: Future) -> None:
        try:
            store = open_store(self.location)
        except Exception as exc:
            opened.set_exception(StoreError(f"model '{self.name}': cannot open the evaluation store {self.location}: {exc}"))
            return
        self._drain_rows = store.drain_rows
        opened.set_result(None)
        next_maintenance = 0.0
        try:
            while True:
                if self._queued < self._drain_rows:
                    self._wake.wait(store.drain_interval_s)
                self._wake.clear()
                closing = self._closing
                self._write(store)
                self._flush(store, force=closing or bool(self._jobs))
                while self._jobs:
                    job, future = self._jobs.popleft()
                    try:
                        future.set_result(job(store))
                    except Exception as exc:
                        future.set_exception(exc)
                if time.monotonic() >= next_maintenance:
                    self._maintain(store)
                    next_maintenance = time.monotonic() + MAINTENANCE_PERIOD_S
                if closing and not self._queued:
                    return
        finally:
            store.close()

    def _write(self, store: Store) -> None:
        with self._lock:
            batches, self._pending = self._pending, deque()
            encoded = self._staging.take()
            count, self._queued = self._queued, 0
        if not count:
            return
        try:
            if encoded:
                store.write_encoded(self.name, encoded)
            if batches:
                store.write_batches(self.name, batches, self._models)
            self.logged += count
        except Exception:
            self.failed += count
            log.exception("model '%s': %d predictions could not be written to %s", self.name, count, self.location)
        finally:
            with self._lock:
                self._staging.release()

    def _flush(self, store: Store, force: bool) -> None:
        try:
            store.flush(force)
        except Exception:
            log.exception("model '%s': buffered predictions could not be written to %s", self.name, self.location)

    def _maintain(self, store: Store) -> None:
        try:
            store.compact(self.name)
            if self.config.max_age_seconds or self.config.max_size_bytes:
                store.retain(self.name, time.time(), self.config.max_age_seconds, self.config.max_size_bytes)
        except Exception:
            log.exception("model '%s': maintenance of %s failed", self.name, self.location)


def _first_logged(entry: LoggedBatch, kept: int) -> LoggedBatch:
    """`entry` with only its first `kept` logged requests still logged (the others' ids None)."""
    ids = list(entry[2])
    for index, log_id in enumerate(ids):
        if log_id is not None:
            if kept:
                kept -= 1
            else:
                ids[index] = None
    return (entry[0], entry[1], tuple(ids), *entry[3:])


def metric_samples() -> dict[str, list[str]]:
    """Prometheus samples of every live log: predictions logged, and dropped by reason."""
    logged, dropped = [], []
    for entry in sorted(_LIVE, key=lambda e: e.name):
        labels = f'model="{entry.name}"'
        logged.append(f"hotpath_evaluation_logged_total{{{labels}}} {entry.logged}")
        dropped.append(f'hotpath_evaluation_dropped_total{{{labels},reason="queue_full"}} {entry.dropped}')
        dropped.append(f'hotpath_evaluation_dropped_total{{{labels},reason="store_error"}} {entry.failed}')
    return {"hotpath_evaluation_logged_total": logged, "hotpath_evaluation_dropped_total": dropped}


class EvaluationLogs:
    """The prediction log of every served model whose config has `evaluation`, kept in step with the repository:
    each served version of such a model gets its log as `Model.prediction_log`. Touched only on the event loop's thread.
    """

    def __init__(self, repository: ModelRepository) -> None:
        self.logs: dict[str, PredictionLog] = {}
        self._repository = repository
        repository.on_change.append(self._on_model_change)

    def _on_model_change(self, name: str, ready: bool) -> None:
        config = self._repository.get(name).config if self._repository.versions(name) else None
        current = self.logs.get(name)
        wanted = config is not None and config.HasField("evaluation")
        if current is not None and (not wanted or current.config != config.evaluation):
            del self.logs[name]
            threading.Thread(target=current.close, name=f"hotpath-evaluation-close-{name}").start()
            current = None
        if wanted and current is None:
            try:
                if sample_rate(config.evaluation) > 0:
                    self.logs[name] = PredictionLog(name, config.evaluation, self._repository.root / name)
                    log.info("model '%s': logging %g of requests to %s", name, self.logs[name].rate, self.logs[name].location)
            except (ValueError, StoreError) as exc:
                log.error("model '%s' serves without its prediction log: %s", name, exc)
        for version in self._repository.versions(name):
            self._repository.get(name, str(version)).prediction_log = self.logs.get(name)

    async def attach(self, name: str, labels: Sequence[tuple[str, int, LabelValue]]) -> list[tuple[str, int]]:
        """Attach labels to `name`'s logged predictions after what is queued is written; returns the unknown (id, row)s."""
        entry = self.logs.get(name)
        if entry is None:
            self._repository.get(name)
            raise EvaluationNotEnabled(f"model '{name}' logs no predictions: add `evaluation {{ }}` to its config.pbtxt")
        now = time.time()
        return await asyncio.wrap_future(entry.submit(lambda store: store.attach_labels(name, labels, now)))

    async def close(self) -> None:
        """Write every queued prediction and stop the writers."""
        logs = list(self.logs.values())
        self.logs.clear()
        for entry in logs:
            await asyncio.to_thread(entry.close)
