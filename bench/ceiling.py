"""The baselines with no server in the way: ONNX Runtime's in-process rows/s (the compute ceiling), and
the memory of a bare Python process holding one session.

    python -m bench.ceiling rss MODEL.onnx     # prints that process's VmRSS in bytes
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def bare_session_rss_bytes(model_path: Path, batch_size: int = 64) -> int:
    """VmRSS of a fresh Python process that holds one session of `model_path` (threads as the ceiling)
    and has run it once at `batch_size`: what the model costs in memory with nothing else around it."""
    probe = subprocess.run([sys.executable, "-m", "bench.ceiling", "rss", str(model_path), str(batch_size)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"measuring a bare session's memory failed:\n{probe.stderr[-2000:]}")
    return int(probe.stdout.split()[-1])


def _print_rss(model_path: Path, batch_size: int) -> None:
    session = cpu_session(model_path, intra_op_threads=os.cpu_count() or 1)
    in_features = session.get_inputs()[0].shape[1]
    session.run(None, {INPUT_NAME: np.zeros((batch_size, in_features), np.float32)})
    status = Path("/proc/self/status").read_text()
    print(next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "rss":
        sys.exit("usage: python -m bench.ceiling rss MODEL.onnx [BATCH_SIZE]")
    _print_rss(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) == 4 else 64)
