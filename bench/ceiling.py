"""The compute ceiling: rows/s that ONNX Runtime reaches in-process, with no server in the way."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.models import INPUT_NAME


def cpu_session(model_path: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    """Return a CPU-provider session; `intra_op_threads=0` lets ORT use one thread per core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def rows_per_second(model_path: Path, batch_size: int, seconds: float, seed: int = 0, windows: int = 3) -> float:
    """Run `model_path` back to back at `batch_size` for about `seconds` using every core; return rows/s.

    The time is split into `windows` and the best window counts: a ceiling is what the hardware can
    do, and on a shared machine a slower window measures a neighbour, not ONNX Runtime.
    """
    session = cpu_session(model_path, intra_op_threads=os.cpu_count() or 1)
    in_features = session.get_inputs()[0].shape[1]
    batch = np.random.default_rng(seed).standard_normal((batch_size, in_features), dtype=np.float32)
    feeds = {INPUT_NAME: batch}
    session.run(None, feeds)
    best = 0.0
    for _ in range(windows):
        runs = 0
        start = time.perf_counter()
        deadline = start + seconds / windows
        while True:
            session.run(None, feeds)
            runs += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, runs * batch_size / (now - start))
    return best
