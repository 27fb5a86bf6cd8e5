"""Replica planning: how many ONNX Runtime sessions a model gets, on which device and CPUs.

One server process serves the whole machine, so a model's replicas x intra-op threads are budgeted
against every CPU the process may use.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

import onnxruntime as ort
from opentelemetry.trace import Span

from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.serving.config import parameter
from hotpath.settings import Settings, available_cpus

KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
CPU_DEVICE = -1


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
        """The plan in one line, for the load log."""
        on_cpu = CPU_DEVICE in self.devices
        where = " and ".join((["CPU"] if on_cpu else []) + ([f"GPU {list(self.gpus)}"] if self.gpus else []))
        runner = "on the event loop's thread" if self.inline else "each on its own thread"
        return f"{self.count} replica(s) on {where} x {self.intra_threads} intra-op thread(s), batches run {runner}"


def plan_replicas(config: model_config_pb2.ModelConfig, settings: Settings) -> ReplicaPlan:
    """Choose replicas x threads so that they fit the usable CPUs (or `settings.cpus`).

    Without an instance_group a model gets one replica with every CPU as an intra-op thread: one
    queue then fills one batch, and a memory-bound model reads its weights once per batch rather
    than once per replica (measured on 2 cores, the large bench model served 1.3x the rows of two
    single-threaded replicas; the medium one the same).
    """
    budget = max(1, settings.cpus or available_cpus())
    devices: tuple[int, ...] = ()
    for group in config.instance_group:
        per_device = max(1, group.count)
        if group.kind == KIND_GPU:
            devices += tuple(gpu for gpu in (tuple(group.gpus) or (0,)) for _ in range(per_device))
        else:
            devices += (CPU_DEVICE,) * per_device
    if not devices:
        devices = (CPU_DEVICE,)
    count = len(devices)
    default_threads = max(1, budget // count)
    intra = parameter(config, "intra_op_thread_count", default_threads)
    inter = parameter(config, "inter_op_thread_count", 1)
    if intra < 1 or inter < 1:
        raise LoadError(f"model '{config.name}': thread counts must be >= 1 (intra_op_thread_count={intra}, inter_op_thread_count={inter})")
    spinning = parameter(config, "allow_spinning", 0)
    return ReplicaPlan(count, intra, inter, devices, spinning=bool(spinning))


def pinned_cores(plan: ReplicaPlan, index: int) -> list[int]:
    """The CPUs for replica `index` (with --pin-threads): its own slice of the process's affinity mask."""
    usable = sorted(os.sched_getaffinity(0))
    first = index * plan.intra_threads
    return [usable[(first + i) % len(usable)] for i in range(plan.intra_threads)]


class Replica:
    """One ONNX Runtime session with the thread that runs its batches, fed through an inbox.

    The event loop's thread puts batches in `inbox`; only the replica's own thread runs `session`
    (an inline replica has no thread: the loop runs it).
    """

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
