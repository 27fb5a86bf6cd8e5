"""ONNX Runtime sessions: their options, creation (with the CUDA fallback), and where batches run.

`create_session` builds one replica's session from its `ReplicaPlan`; `choose_execution` times a
warm-up batch on the first session to decide whether batches run inline on the event loop's thread
or on replica threads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hotpath._proto import model_config_pb2
from hotpath.errors import LoadError
from hotpath.serving.datatypes import BY_ONNX_TYPE
from hotpath.serving.replicas import CPU_DEVICE, ReplicaPlan, pinned_cores
from hotpath.settings import Settings

log = logging.getLogger(__name__)

INLINE_LIMIT_NS = 1_000_000
"""A model whose full batch runs within this long executes on the event loop's thread (see `choose_execution`).

The bench's medium model (a batch of 64 in 0.46-0.50 ms here) served 28.9k requests/s inline against
22.6k on a replica thread; at the former limit of 0.5 ms its mode flipped from one start to the next."""
EXECUTION_MODES = ("auto", "inline", "threads")
ORT_LOG_FATAL = 4
"""ONNX Runtime's log severity that lets through only fatal errors."""


def _session_options(plan: ReplicaPlan, cores: list[int]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = plan.intra_threads
    options.inter_op_num_threads = plan.inter_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT logs every failed run at ERROR itself; the scheduler reports failures once, throttled.
    options.log_severity_level = ORT_LOG_FATAL
    if not plan.spinning:
        # Idle intra-op threads spin by default, burning the CPU the front end needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if len(cores) > 1:
        # ORT pins the pool's threads (1-based CPU ids); the calling replica thread pins itself to cores[0].
        options.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in cores[1:]))
    return options


def create_session(path: Path, plan: ReplicaPlan, index: int, settings: Settings,
                   name: str) -> tuple[ort.InferenceSession, str]:
    """Open replica `index`'s session and say where it runs ("cpu" or "gpu:N").

    A KIND_GPU replica whose CUDA provider cannot start falls back to the CPU with a warning, or
    raises LoadError under --require-gpu.
    """
    options = _session_options(plan, pinned_cores(plan, index) if settings.pin_threads else [])
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


def choose_execution(config: model_config_pb2.ModelConfig, plan: ReplicaPlan, session: ort.InferenceSession) -> ReplicaPlan:
    """Decide whether batches run on the event loop's thread or on replica threads.

    Handing a batch to a thread and back costs tens of microseconds and GIL traffic: more than a
    small model's whole batch. Such a model ("auto", no instance_group, a full batch within
    INLINE_LIMIT_NS on warm-up) runs inline with one replica. Larger models, GPU models and explicit
    instance groups use replica threads.
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
        if best > INLINE_LIMIT_NS:
            return plan
    return replace(plan, count=1, devices=plan.devices[:1], inline=True)


def _timed_run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> int:
    start = time.perf_counter_ns()
    session.run(None, feeds)
    return time.perf_counter_ns() - start
