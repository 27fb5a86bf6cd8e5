"""A loaded model version: its ONNX Runtime replicas and the dynamic batcher that feeds them.

Requests queue in the native `BatchQueue` on the event loop's thread. Whenever a replica is idle and
a batch is ready, the batch goes to that replica's own thread (one cross-thread hand-off per batch);
ONNX Runtime releases the GIL while it computes, so replicas run in parallel with the front end.
The finished batch comes back to the loop in one callback, which hands every caller its own rows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from opentelemetry.trace import Span

from hotpath import _batcher, telemetry
from hotpath._proto import model_config_pb2
from hotpath.config import TensorSpec, complete_config, parameter, tensor_specs
from hotpath.datatypes import BY_ONNX_TYPE
from hotpath.drift import DriftError, DriftRecorder
from hotpath.drift import TensorSpec as DriftTensor
from hotpath.errors import LoadError, ModelExecutionError, ModelUnavailable
from hotpath.settings import Settings, available_cpus
from hotpath.stats import ModelStats, StatsStore

log = logging.getLogger(__name__)

KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
CPU_DEVICE = -1
DEFAULT_MAX_QUEUE_SIZE = 4096
"""Requests a model's queue holds when its config sets no `max_queue_size`."""
INLINE_LIMIT_NS = 500_000
"""A model whose full batch runs within this long executes on the event loop's thread (see `choose_execution`)."""
SHARED_PORT_INLINE_LIMIT_NS = 5_000_000
"""The same limit when other workers share the port and keep accepting while this one computes."""
EXECUTION_MODES = ("auto", "inline", "threads")


@dataclass(frozen=True)
class ReplicaPlan:
    """How many sessions a model gets, where, with how many threads each, and who runs its batches."""

    count: int
    intra_threads: int
    inter_threads: int
    devices: tuple[int, ...]
    """Per replica: the GPU it runs on, or CPU_DEVICE."""
    inline: bool = False
    spinning: bool = False
    """Whether idle ONNX Runtime pool threads spin-wait (lower latency, but they burn CPU)."""

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPU of every replica placed on one."""
        return tuple(d for d in self.devices if d != CPU_DEVICE)

    def describe(self) -> str:
        on_cpu = CPU_DEVICE in self.devices
        where = " and ".join((["CPU"] if on_cpu else []) + ([f"GPU {list(self.gpus)}"] if self.gpus else []))
        runner = "on the event loop's thread" if self.inline else "each on its own thread"
        return f"{self.count} replica(s) on {where} x {self.intra_threads} intra-op thread(s), batches run {runner}"


def plan_replicas(config: model_config_pb2.ModelConfig, settings: Settings) -> ReplicaPlan:
    """Choose replicas x threads so that, over every server process, they fit the usable CPUs."""
    cpus = settings.cpus or available_cpus()
    budget = max(1, cpus // max(1, settings.workers))
    devices: tuple[int, ...] = ()
    for group in config.instance_group:
        per_device = max(1, group.count)
        if group.kind == KIND_GPU:
            devices += tuple(gpu for gpu in (tuple(group.gpus) or (0,)) for _ in range(per_device))
        else:
            devices += (CPU_DEVICE,) * per_device
    if not devices:
        devices = (CPU_DEVICE,) * min(2, budget)
    count = len(devices)
    default_threads = max(1, budget // count)
    intra = parameter(config, "intra_op_thread_count", default_threads)
    inter = parameter(config, "inter_op_thread_count", 1)
    if intra < 1 or inter < 1:
        raise LoadError(f"model '{config.name}': thread counts must be >= 1 (intra_op_thread_count={intra}, inter_op_thread_count={inter})")
    spinning = parameter(config, "allow_spinning", 0)
    return ReplicaPlan(count, intra, inter, devices, spinning=bool(spinning))


class Replica:
    """One ONNX Runtime session with the thread that runs its batches, fed through an inbox."""

    def __init__(self, index: int, session: ort.InferenceSession, device: str) -> None:
        self.index = index
        self.session = session
        self.device = device
        self.inbox: queue.SimpleQueue[list | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.span: Span | None = None
        """The trace span of the batch it runs, when that batch serves a sampled request."""
        self.cores: list[int] = []
        """With --pin-threads, the CPUs this replica's threads are pinned to (its own thread to the first)."""


def pinned_cores(plan: ReplicaPlan, index: int, settings: Settings) -> list[int]:
    """The CPUs for replica `index` of this worker: its own slice of the process's affinity mask."""
    usable = sorted(os.sched_getaffinity(0))
    first = (settings.worker_index * plan.count + index) * plan.intra_threads
    return [usable[(first + i) % len(usable)] for i in range(plan.intra_threads)]


def _session_options(plan: ReplicaPlan, cores: list[int]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = plan.intra_threads
    options.inter_op_num_threads = plan.inter_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not plan.spinning:
        # Idle intra-op threads spin by default, burning the CPU the front end needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if len(cores) > 1:
        # ORT pins the pool's threads (1-based CPU ids); the calling replica thread pins itself to cores[0].
        options.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in cores[1:]))
    return options


def _create_session(path: Path, plan: ReplicaPlan, index: int, settings: Settings, name: str) -> tuple[ort.InferenceSession, str]:
    options = _session_options(plan, pinned_cores(plan, index, settings) if settings.pin_threads else [])
    device = plan.devices[index]
    if device == CPU_DEVICE:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), "cpu"
    providers: list = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        session, cause = None, str(exc)
    else:
        cause = "ONNX Runtime could not start CUDA (no GPU, driver, or CUDA libraries)"
        if "CUDAExecutionProvider" in session.get_providers():
            return session, f"gpu:{device}"
    if settings.require_gpu:
        raise LoadError(f"model '{name}': KIND_GPU on device {device} asked for, but {cause}; --require-gpu forbids falling back to CPU")
    log.warning("model '%s' replica %d: KIND_GPU on device %d unavailable (%s); running on CPU", name, index, device, cause)
    return session or ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), "cpu"


def _warmup_feeds(session: ort.InferenceSession, rows: int) -> dict[str, np.ndarray]:
    feeds = {}
    for arg in session.get_inputs():
        dims = [d if isinstance(d, int) and d >= 0 else 1 for d in arg.shape]
        if dims and not (isinstance(arg.shape[0], int) and arg.shape[0] >= 0):
            dims[0] = rows
        datatype = BY_ONNX_TYPE[arg.type]
        feeds[arg.name] = np.full(dims, "", dtype=object) if datatype.name == "BYTES" else np.zeros(dims, datatype.dtype)
    return feeds


def choose_execution(config: model_config_pb2.ModelConfig, plan: ReplicaPlan, session: ort.InferenceSession,
                     workers: int = 1) -> ReplicaPlan:
    """Decide whether batches run on the event loop's thread or on replica threads.

    Handing a batch to a thread and back costs tens of microseconds and GIL traffic: more than a
    small model's whole batch. Such a model ("auto", no instance_group, a full batch within
    INLINE_LIMIT_NS on warm-up) runs inline with one replica. With several workers on the port the
    others keep accepting while one computes, so the limit rises to SHARED_PORT_INLINE_LIMIT_NS
    (measured on 2 cores: the medium model served 1.19x inline, the large one 0.78x). Larger models,
    GPU models and explicit instance groups use replica threads.
    """
    mode = config.parameters["execution"].string_value if "execution" in config.parameters else "auto"
    if mode not in EXECUTION_MODES:
        raise LoadError(f"model '{config.name}': parameter 'execution' must be one of {list(EXECUTION_MODES)}, got '{mode}'")
    if mode == "threads" or (mode == "auto" and (plan.gpus or config.instance_group)):
        return plan
    if mode == "auto":
        try:
            feeds = _warmup_feeds(session, max(1, config.max_batch_size))
            best = min(_timed_run(session, feeds) for _ in range(3))
        except Exception as exc:
            log.debug("model '%s': warm-up run failed (%s); using replica threads", config.name, exc)
            return plan
        if best > (INLINE_LIMIT_NS if workers == 1 else SHARED_PORT_INLINE_LIMIT_NS):
            return plan
    return replace(plan, count=1, devices=plan.devices[:1], inline=True)


def _timed_run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> int:
    start = time.perf_counter_ns()
    session.run(None, feeds)
    return time.perf_counter_ns() - start


def _batching_policy(config: model_config_pb2.ModelConfig) -> _batcher.BatchQueue:
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
    )


class Model:
    """One servable model version: checks nothing about requests (the codec does), runs batches."""

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
        self.stats = stats
        stats.set_gauge("replicas", len(replicas))
        self._input_names = [spec.name for spec in self.inputs]
        self._output_names = [spec.name for spec in self.outputs]
        self._replicas = replicas
        self._idle = list(reversed(replicas))
        self._queue = _batching_policy(config)
        self._running = 0
        self.inline = plan.inline
        self._timer: _batcher.DeadlineTimer | None = None
        self._armed_ns = 0
        self._dispatch_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.drift: DriftRecorder | None = None
        if config.drift.enable:
            try:
                self.drift = DriftRecorder.create(
                    name, version, path.parent.parent, config.drift,
                    [DriftTensor(s.name, s.datatype.name, s.dims) for s in self.inputs],
                    [DriftTensor(s.name, s.datatype.name, s.dims) for s in self.outputs])
            except DriftError as exc:
                raise LoadError(f"model '{name}' version {version}: {exc}") from None

    @classmethod
    def load(cls, name: str, version: int, path: Path, config: model_config_pb2.ModelConfig, settings: Settings,
             store: StatsStore) -> "Model":
        """Create the replicas for `path` and complete `config` from the graph; raises LoadError."""
        config = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
        plan = plan_replicas(config, settings)
        try:
            first, device = _create_session(path, plan, 0, settings, name)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"model '{name}' version {version}: ONNX Runtime cannot load {path}: {exc}") from exc
        complete_config(config, first)
        plan = choose_execution(config, plan, first, settings.workers)
        replicas = [Replica(0, first, device)]
        for index in range(1, plan.count):
            session, device = _create_session(path, plan, index, settings, name)
            replicas.append(Replica(index, session, device))
        if settings.pin_threads:
            for replica in replicas:
                replica.cores = pinned_cores(plan, replica.index, settings)
        return cls(name, version, path, config, replicas, plan, store.create(name, version, config.max_batch_size))

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a replica."""
        return len(self._queue)

    async def infer(self, inputs: tuple[np.ndarray, ...], rows: int, key: object, deadline_ns: int = 0,
                    context: object = None) -> list[np.ndarray]:
        """Queue one request's inputs (in config order) and return its rows of every output."""
        if self._closing:
            raise ModelUnavailable(f"model '{self.name}' version {self.version} is unloading")
        loop = self._loop or self._start(asyncio.get_running_loop())
        future = loop.create_future()
        self._queue.push(future, inputs, rows, key, time.monotonic_ns(), deadline_ns, context)
        self.stats.set_load(len(self._queue), self._running)
        if self._idle and not self._dispatch_scheduled:
            if len(self._queue) == 1 and self._running == 0:
                # Alone, with nothing running: start it (or its delay) now, not after another loop pass.
                self._dispatch()
            else:
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
            wait = queue.ready_in(now)
            if wait < 0:
                return
            if wait > 0:
                if self._armed_ns != now + wait:
                    self._armed_ns = now + wait
                    self._timer.arm(self._armed_ns)
                return
            reason = queue.ready_reason()
            batch = queue.pop_batch(now)
            if not batch:
                continue
            self.stats.queued([now - pending.enqueued_ns for pending in batch])
            self._running += len(batch)
            self.stats.set_load(len(queue), self._running)
            replica = self._idle[-1] if self.inline else self._idle.pop()
            traced = [pending for pending in batch if pending.context is not None]
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

    def _execute(self, replica: Replica, batch: list) -> tuple[list[np.ndarray], int, int, int]:
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
        if self.drift is not None:
            self.drift.record(feeds, dict(zip(self._output_names, outputs)))
        return outputs, rows, ready - start, infer_ns

    def _on_done(self, replica: Replica, batch: list, result: tuple | None, error: Exception | None) -> None:
        self._idle.append(replica)
        self._complete(replica, batch, result, error)
        self._dispatch()

    def _complete(self, replica: Replica, batch: list, result: tuple | None, error: Exception | None) -> None:
        """Hand every request of a finished batch its rows, or fail them all with the replica's error."""
        failure = None
        try:
            if error is not None:
                raise error
            outputs, rows, input_ns, infer_ns = result
            if self.batched:
                for name, out in zip(self._output_names, outputs):
                    if out.ndim == 0 or out.shape[0] != rows:
                        raise RuntimeError(f"output '{name}' has shape {list(out.shape)}, expected first dim {rows} (the batch's rows)")
        except Exception as exc:
            failure = exc
            rows = sum(p.rows for p in batch)
            log.error("model '%s' version %d replica %d failed a batch of %d request(s): %s",
                      self.name, self.version, replica.index, len(batch), exc)
            _batcher.fail(batch, ModelExecutionError(
                f"model '{self.name}' version {self.version} failed while running a batch of {rows} row(s) on replica {replica.index}: {exc}"))
        else:
            start = time.perf_counter_ns()
            _batcher.deliver(batch, outputs)
            self.stats.batch_done(rows, input_ns, infer_ns, time.perf_counter_ns() - start)
        self._running -= len(batch)
        self.stats.set_load(len(self._queue), self._running)
        if replica.span is not None:
            telemetry.end_batch(replica.span, failure)
            replica.span = None

    async def close(self) -> None:
        """Stop taking requests, let queued and running ones finish, then release the replicas."""
        self._closing = True
        while len(self._queue) or len(self._idle) < len(self._replicas):
            await asyncio.sleep(0.005)
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
