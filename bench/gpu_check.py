"""Prove the KIND_GPU path on a machine with a GPU: one prepared run, one verdict.

Serves the bench's medium model twice from one repository, once as KIND_GPU and once as KIND_CPU,
with `--require-gpu` (so a silent CPU fallback fails the run), sends the same rows to both through
the real gRPC API, and checks that the GPU answers match the CPU's and that the GPU replica is
faster per batch. Prints one JSON line; exits non-zero when anything is off.

    python -m bench.gpu_check            # on the GPU machine, from the repository root
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from bench.models import MODELS, write_repository
from bench.server_process import ServerProcess

CONFIG = """name: "{name}"
max_batch_size: 64
instance_group [{{ count: 1, kind: {kind}{gpus} }}]
"""


def main() -> int:
    spec = MODELS["medium"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp), ["medium"])
        (repo / "medium_gpu").mkdir()
        (repo / "medium_gpu" / "1").symlink_to(repo / "medium" / "1")
        (repo / "medium_gpu" / "config.pbtxt").write_text(CONFIG.format(name="medium_gpu", kind="KIND_GPU", gpus=", gpus: [0]"))
        (repo / "medium" / "config.pbtxt").write_text(CONFIG.format(name="medium", kind="KIND_CPU", gpus=""))
        command = [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                   "--port", "0", "--metrics-port", "0", "--require-gpu"]
        # Not require_serving: a GPU model that failed to load is reported below, with the reason.
        with ServerProcess("hotpath", command, Path(tmp) / "server.log", require_serving=False) as server:
            rows = np.random.default_rng(0).normal(size=(64, spec.widths[0])).astype(np.float32)
            results, timings = {}, {}
            with grpcclient.InferenceServerClient(server.target) as client:
                if not client.is_model_ready("medium_gpu"):
                    print(json.dumps({"ok": False, "error": client.get_model_repository_index().models[1].reason}))
                    return 1
                for name in ("medium", "medium_gpu"):
                    tensor = grpcclient.InferInput("INPUT0", list(rows.shape), "FP32")
                    tensor.set_data_from_numpy(rows)
                    for _ in range(5):
                        client.infer(name, [tensor])
                    start = time.perf_counter()
                    for _ in range(50):
                        results[name] = client.infer(name, [tensor]).as_numpy("OUTPUT0")
                    timings[name] = (time.perf_counter() - start) / 50
                    stats = client.get_inference_statistics(name).model_stats[0]
                    timings[name + "_infer_ms"] = stats.inference_stats.compute_infer.ns / stats.inference_stats.compute_infer.count / 1e6
        log = server.log_text().splitlines()
    gpu_lines = [line.strip() for line in log if "medium_gpu" in line and "loaded" in line]
    verdict = {
        "gpu_replica_logged": bool(gpu_lines and "GPU" in gpu_lines[0]),
        "max_abs_diff": float(np.max(np.abs(results["medium"] - results["medium_gpu"]))),
        "cpu_ms_per_request": round(timings["medium"] * 1e3, 3),
        "gpu_ms_per_request": round(timings["medium_gpu"] * 1e3, 3),
        "cpu_infer_ms_per_batch": round(timings["medium_infer_ms"], 3),
        "gpu_infer_ms_per_batch": round(timings["medium_gpu_infer_ms"], 3),
        "load_log": gpu_lines,
    }
    verdict["ok"] = verdict["gpu_replica_logged"] and verdict["max_abs_diff"] < 1e-3
    print(json.dumps(verdict))
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
