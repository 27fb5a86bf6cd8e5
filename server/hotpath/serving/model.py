"""A loaded model version: the scheduler that feeds its replicas batches from the native queue.

Requests queue in the native `BatchQueue` on the event loop's thread. Whenever a replica is idle and
a batch is ready, the batch goes to that replica's own thread (one cross-thread hand-off per batch);
ONNX Runtime releases the GIL while it computes, so replicas run in parallel with the front end.
The finished batch comes back to the loop in one callback, which hands every caller its own rows.
Under the default work-conserving policy a model with nothing running starts what is queued at once,
so a lone request never waits out the queue delay; while a batch runs, requests gather (up to the
delay, or a full batch) so that the next one is fuller. Replica planning lives in `replicas.py`,
sessions and the inline-or-threads choice in `sessions.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument as OrtInvalidArgument, RuntimeException
from opentelemetry.trace import Span

from hotpath._proto import model_config_pb2
from hotpath.drift import DriftError, DriftRecorder
from hotpath.errors import InvalidArgument, LoadError, ModelExecutionError, ModelUnavailable
from hotpath.observability import telemetry
from hotpath.observability.logs import ThrottledLog
from hotpath.observability.stats import ModelStats, StatsStore
from hotpath.serving import _batcher
from hotpath.serving.codec import ModelCodec
from hotpath.serving.config import BATCH_POLICY_WORK_CONSERVING, TensorSpec, batch_policy, complete_config, parameter, tensor_specs
from hotpath.serving.replicas import Replica, ReplicaPlan, pinned_cores, plan_replicas
from hotpath.serving.sessions import choose_execution, create_session
from hotpath.settings import Settings

if TYPE_CHECKING:
    from hotpath.evaluation.log import PredictionLog

log = logging.getLogger(__name__)
_failures = ThrottledLog(log)

ORT_INPUT_ERRORS = (Fail, OrtInvalidArgument, RuntimeException)
"""What ONNX Runtime raises when a run cannot use the inputs it was given (a dimension mismatch, text that
is not a number); other errors (out of memory, a failing execution provider) are not the request's doing."""
DEFAULT_MAX_QUEUE_SIZE = 4096
"""Requests a model's queue holds when its config sets no `max_queue_size`."""


def _batch_queue(config: model_config_pb2.ModelConfig) -> _batcher.BatchQueue:
    """The queue `config` asks for: its batch size, batch policy, queue policy and delay."""
    batching = config.max_batch_size > 0 and parameter(config, "dynamic_batching", 1) != 0
    db = config.dynamic_batching
    policy = db.default_queue_policy
    return _batcher.BatchQueue(
        max_rows=max(1, config.max_batch_size),
        max_queue_size=policy.max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
        max_delay_ns=db.max_queue_delay_microseconds * 1000,
        preferred_sizes=tuple(db.preferred_batch_size),
        batching=batching,
        timeout_ns=policy.default_timeout_microseconds * 1000,
        allow_timeout_override=policy.allow_timeout_override or not db.HasField("default_queue_policy"),
        work_conserving=batch_policy(config) == BATCH_POLICY_WORK_CONSERVING,
    )


class ModelOutputError(RuntimeError):
    """The model returned an output that does not fit the batch: its own fault, whatever the inputs."""


class Model:
    """One servable model version: checks nothing about requests (the codec does), runs batches.

    Everything but `_serve_replica` (each replica's own thread) runs on the event loop's thread.
    """

    def __init__(self, name: str, version: int, path: Path, config: model_config_pb2.ModelConfig,
                 replicas: list[Replica], plan: ReplicaPlan, stats: ModelStats) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.config = config
        self.plan = plan
        self.inputs: tuple[TensorSpec, ...] = tensor_specs(config.input)
        self.outputs: tuple[TensorSpec, ...] = tensor_specs(config.output)
        self.batched = config.max_batch_size > 0
        self.codec = ModelCodec(name, version, config, self.inputs, self.outputs)
        self.stats = stats
        stats.set_gauge("replicas", len(replicas))
        self._input_names = [spec.name for spec in self.inputs]
        self._output_names = [spec.name for spec in self.outputs]
        self._replicas = replicas
        self._idle = list(reversed(replicas))
        self._queue = _batch_queue(config)
        self._running = 0
        self.inline = plan.inline
        self._timer: _batcher.DeadlineTimer | None = None
        self._armed_ns = 0
        self._dispatch_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._drained: asyncio.Future[None] | None = None
        self.drift: DriftRecorder | None = None
        if config.drift.enable:
            try:
                self.drift = DriftRecorder.create(
                    name, version, path.parent.parent, config.drift, self.inputs, self.outputs)
            except DriftError as exc:
                raise LoadError(f"model '{name}' version {version}: {exc}") from None
        self.prediction_log: PredictionLog | None = None
        """Where this model's sampled requests are logged, when its config has `evaluation`; set by the log's owner."""

    @classmethod
    def load(cls, name: str, version: int, path: Path, config: model_config_pb2.ModelConfig, settings: Settings,
             store: StatsStore) -> "Model":
        """Create the replicas for `path` and complete `config` from the graph; raises LoadError."""
        config = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
        plan = plan_replicas(config, settings)
        try:
            first, device = create_session(path, plan, 0, settings, name)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"model '{name}' version {version}: ONNX Runtime cannot load {path}: {exc}") from exc
        complete_config(config, first)
        plan = choose_execution(config, plan, first)
        replicas = [Replica(0, first, device)]
        for index in range(1, plan.count):
            session, device = create_session(path, plan, index, settings, name)
            replicas.append(Replica(index, session, device))
        if settings.pin_threads:
            for replica in replicas:
                replica.cores = pinned_cores(plan, replica.index)
        return cls(name, version, path, config, replicas, plan, store.create(name, version, config.max_batch_size))

    async def infer(self, inputs: tuple[np.ndarray, ...], rows: int, key: object, deadline_ns: int = 0,
                    span: Span | None = None, log_id: str | None = None) -> list[np.ndarray]:
        """Queue one request's inputs (in config order) and return its rows of every output.

        `key` is the batching key (requests batch together only when theirs are equal); `span` is the
        request's trace span when it is sampled; `log_id` the id its batch logs it under, when it is logged.
        """
        if self._closing:
            raise ModelUnavailable(f"model '{self.name}' version {self.version} is unloading")
        loop = self._loop or self._start(asyncio.get_running_loop())
        future = loop.create_future()
        self._queue.push(future, inputs, rows, key, time.monotonic_ns(), deadline_ns, span, log_id)
        self.stats.set_load(len(self._queue), self._running)
        if self._idle and not self._dispatch_scheduled:
            # Not at once: the front end pushes a burst in one loop pass, and all of it should join the batch.
            self._dispatch_scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        self._loop = loop
        self._timer = _batcher.DeadlineTimer()
        loop.add_reader(self._timer.fileno(), self._on_timer)
        if not self.inline:
            for replica in self._replicas:
                replica.thread = threading.Thread(target=self._serve_replica, args=(replica,),
                                                  name=f"{self.name}-{self.version}-replica-{replica.index}", daemon=True)
                replica.thread.start()
        return loop

    def _on_timer(self) -> None:
        self._timer.clear()
        self._armed_ns = 0
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches on idle replicas; runs once per loop iteration so that a burst of arrivals batches."""
        self._dispatch_scheduled = False
        queue = self._queue
        while self._idle:
            now = time.monotonic_ns()
            busy = self._running > 0
            wait = queue.ready_in(now, busy)
            if wait < 0:
                return
            if self._closing:
                wait = 0  # nothing more will join: run (or drop, when cancelled) what is queued now
            if wait > 0:
                if self._armed_ns != now + wait:
                    self._armed_ns = now + wait
                    self._timer.arm(self._armed_ns)
                return
            reason = queue.ready_reason(busy)
            batch = queue.pop_batch(now)
            if not batch:
                # Every request at the head was cancelled or expired; that may have emptied the queue.
                self._settle()
                continue
            self.stats.queued([now - pending.enqueued_ns for pending in batch])
            self._running += len(batch)
            self.stats.set_load(len(queue), self._running)
            replica = self._idle[-1] if self.inline else self._idle.pop()
            traced = [pending for pending in batch if pending.span is not None]
            if traced:
                replica.span = telemetry.start_batch(self.name, self.version, replica.index, batch, traced,
                                                     reason, now)
            if self.inline:
                try:
                    result, error = self._execute(replica, batch), None
                except Exception as exc:
                    result, error = None, exc
                self._complete(replica, batch, result, error)
            else:
                replica.inbox.put(batch)

    def _serve_replica(self, replica: Replica) -> None:
        """The replica's thread: run each batch, then hand it back to the loop in one callback."""
        if replica.cores:
            os.sched_setaffinity(0, {replica.cores[0]})
        get = replica.inbox.get
        while (batch := get()) is not None:
            try:
                result, error = self._execute(replica, batch), None
            except Exception as exc:
                result, error = None, exc
            try:
                self._loop.call_soon_threadsafe(self._on_done, replica, batch, result, error)
            except RuntimeError:
                return

    def _execute(self, replica: Replica, batch: list) -> tuple[list[tuple[list, list[np.ndarray] | Exception]], int, int]:
        """Run a batch; when it fails, find the requests that fail on their own (see `_isolate`).

        Returns each part of the batch with its outputs or its error, and the time spent preparing
        inputs and running the model. An output of the wrong shape is the model's fault and raises.
        """
        try:
            outputs, input_ns, infer_ns = self._run(replica, batch)
            return [(batch, outputs)], input_ns, infer_ns
        except ModelOutputError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                return [(batch, exc)], 0, 0
            return self._isolate(replica, batch)

    def _run(self, replica: Replica, batch: list) -> tuple[list[np.ndarray], int, int]:
        start = time.perf_counter_ns()
        if len(batch) == 1:
            feeds = dict(zip(self._input_names, batch[0].inputs))
            rows = batch[0].rows
        else:
            feeds = {name: np.concatenate([p.inputs[i] for p in batch]) for i, name in enumerate(self._input_names)}
            rows = sum(p.rows for p in batch)
        ready = time.perf_counter_ns()
        outputs = replica.session.run(self._output_names, feeds)
        infer_ns = time.perf_counter_ns() - ready
        if self.batched:
            for name, out in zip(self._output_names, outputs):
                if out.ndim == 0 or out.shape[0] != rows:
                    raise ModelOutputError(f"output '{name}' has shape {list(out.shape)}, expected first dim {rows} (the batch's rows)")
        if self.drift is not None:
            self.drift.record(feeds, dict(zip(self._output_names, outputs)))
        if self.prediction_log is not None:
            self.prediction_log.record(self, batch, tuple(feeds.values()), outputs)
        return outputs, ready - start, infer_ns

    def _isolate(self, replica: Replica, batch: list) -> tuple[list[tuple[list, list[np.ndarray] | Exception]], int, int]:
        """Split a failed batch in halves until each part runs or is one request that fails alone.

        One client's bad data then fails only that client's requests, at the cost of about two runs
        per culprit and halving step.
        """
        parts: list[tuple[list, list[np.ndarray] | Exception]] = []
        input_ns = infer_ns = 0
        failing = [batch]
        while failing:
            group = failing.pop()
            half = len(group) // 2
            for part in (group[:half], group[half:]):
                try:
                    outputs, part_input_ns, part_infer_ns = self._run(replica, part)
                except ModelOutputError:
                    raise
                except Exception as exc:
                    if len(part) == 1:
                        parts.append((part, exc))
                    else:
                        failing.append(part)
                else:
                    parts.append((part, outputs))
                    input_ns += part_input_ns
                    infer_ns += part_infer_ns
        return parts, input_ns, infer_ns

    def _on_done(self, replica: Replica, batch: list, result: tuple | None, error: Exception | None) -> None:
        self._idle.append(replica)
        self._complete(replica, batch, result, error)
        self._dispatch()

    def _complete(self, replica: Replica, batch: list, result: tuple | None, error: Exception | None) -> None:
        """Hand every request of a finished batch its rows, or its error."""
        if error is not None:
            rows = sum(p.rows for p in batch)
            _failures.log(logging.ERROR, (self.name, self.version, "batch"),
                          "model '%s' version %d replica %d failed a batch of %d request(s): %s",
                          self.name, self.version, replica.index, len(batch), error)
            _batcher.fail(batch, ModelExecutionError(
                f"model '{self.name}' version {self.version} failed while running a batch of {rows} row(s) on replica {replica.index}: {error}"))
            failure = error
        else:
            parts, input_ns, infer_ns = result
            failure = self._deliver(replica, parts, input_ns, infer_ns)
        self._running -= len(batch)
        self.stats.set_load(len(self._queue), self._running)
        if replica.span is not None:
            telemetry.end_batch(replica.span, failure)
            replica.span = None
        self._settle()

    def _deliver(self, replica: Replica, parts: list, input_ns: int, infer_ns: int) -> Exception | None:
        """Give each part its outputs or error; returns the first error, if any.

        A request that fails alone with one of ONNX Runtime's errors about what it was given failed
        on its own data: INVALID_ARGUMENT. Any other failure is the model's or the machine's: INTERNAL.
        """
        start = time.perf_counter_ns()
        served = [(part, outputs) for part, outputs in parts if not isinstance(outputs, Exception)]
        failed = [(part, exc) for part, exc in parts if isinstance(exc, Exception)]
        for part, outputs in served:
            _batcher.deliver(part, outputs)
        for part, exc in failed:
            if isinstance(exc, ORT_INPUT_ERRORS):
                _batcher.fail(part, InvalidArgument(
                    f"model '{self.name}' version {self.version} cannot run this request's inputs: {exc}"))
            else:
                _batcher.fail(part, ModelExecutionError(
                    f"model '{self.name}' version {self.version} failed on replica {replica.index}: {exc}"))
        if served:
            rows = sum(p.rows for part, _ in served for p in part)
            self.stats.batch_done(rows, input_ns, infer_ns, time.perf_counter_ns() - start)
        if not failed:
            return None
        _failures.log(logging.WARNING, (self.name, self.version, "request"),
                      "model '%s' version %d: %d of %d request(s) in a batch failed on their own and were refused: %s",
                      self.name, self.version, len(failed), len(failed) + sum(len(part) for part, _ in served), failed[0][1])
        return failed[0][1]

    def _settle(self) -> None:
        """While closing, wake `close` once nothing is queued or running (it stays so: no request joins)."""
        drained = self._drained
        if drained is not None and not drained.done() and not len(self._queue) and not self._running:
            drained.set_result(None)

    async def close(self) -> None:
        """Stop taking requests, run what is queued at once and let it finish, then release the replicas."""
        self._closing = True
        if self._loop is not None:
            self._dispatch()
        if len(self._queue) or self._running:
            if self._drained is None or self._drained.done():
                self._drained = self._loop.create_future()
            await self._drained
        self.stats.set_gauge("replicas", 0)
        if self._timer is not None:
            self._loop.remove_reader(self._timer.fileno())
            self._timer.close()
        for replica in self._replicas:
            replica.inbox.put(None)
        for replica in self._replicas:
            if replica.thread is not None:
                await asyncio.to_thread(replica.thread.join)
        if self.drift is not None:
            self.drift.close()
