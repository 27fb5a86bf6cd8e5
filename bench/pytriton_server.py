"""The PyTriton peer: the bench models served by NVIDIA PyTriton (Triton 2.51 inside) with ONNX Runtime.

Each model's ONNX file from a bench repository (see `bench.models`) runs in one ORT session under
PyTriton's `@batch`, one instance, `max_batch_size` 64 and a 500 us dynamic-batcher queue delay: the
configuration hotpath is benchmarked with. Input and output names, dtypes and shapes are read from
the ONNX file, so the bench's requests (and its h2load body) work unchanged.

PyTriton pins numpy<2 and protobuf<7, which hotpath cannot run with, so it lives in its own virtual
environment (see bench/README.md); the bench finds that interpreter with `interpreter()`. This
module imports nothing from hotpath, and pytriton only inside `serve()`.

Run: bench/.venv-pytriton/bin/python -m bench.pytriton_server --model-repository DIR --port 8001
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

MAX_BATCH_SIZE = 64
MAX_QUEUE_DELAY_US = 500
DEFAULT_VENV = Path(__file__).resolve().parent / ".venv-pytriton"
INSTALL_HINT = ("python -m venv bench/.venv-pytriton && "
                "bench/.venv-pytriton/bin/pip install nvidia-pytriton==0.7.0 onnxruntime")
_NUMPY_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int32)": "int32",
                "tensor(int64)": "int64"}


def interpreter(explicit: Path | None = None) -> tuple[Path | None, str]:
    """The Python that can run this server, and what was found: `explicit`, else the bench's venv, else
    this interpreter. Returns (None, why not) when none of them has pytriton."""
    candidates = [explicit] if explicit else [DEFAULT_VENV / "bin" / "python", Path(sys.executable)]
    for python in candidates:
        if not python.exists():
            continue
        probe = subprocess.run([str(python), "-c", "import pytriton, onnxruntime; print(pytriton.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return python, f"pytriton {probe.stdout.strip()} in {python}"
    where = explicit or f"{DEFAULT_VENV} or this interpreter"
    return None, f"nvidia-pytriton (with onnxruntime) is not installed in {where}; install: {INSTALL_HINT}"


def interpreter_libdir_env(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with this interpreter's LIBDIR first on LD_LIBRARY_PATH.

    Triton's Python-backend stub links libpython dynamically; without this it finds the system's
    libpython (another build, or another version) and the model fails to load.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [libdir, *filter(None, environ.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
    return {**environ, "LD_LIBRARY_PATH": os.pathsep.join(dict.fromkeys(paths))}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(repository: Path, models: list[str], host: str, port: int, max_batch_size: int,
          max_queue_delay_us: int, intra_op_threads: int) -> None:
    """Bind every model and serve until SIGTERM or SIGINT."""
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    config = TritonConfig(grpc_address=host, grpc_port=port, http_address=host, http_port=free_port(),
                          metrics_port=free_port(), allow_metrics=False, log_verbose=0)
    # ModelStatistics stays open (PyTriton puts it behind a token by default): the bench reads failures there.
    security = TritonSecurityConfig(
        restricted_endpoints=[name for name in DEFAULT_PROTECTED_ENDPOINTS if name != "statistics"])
    with Triton(config=config, security_config=security) as triton:
        for name in models:
            options = ort.SessionOptions()
            options.intra_op_num_threads = intra_op_threads
            session = ort.InferenceSession(str(repository / name / "1" / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
            inputs = [Tensor(name=arg.name, dtype=np.dtype(_NUMPY_TYPES[arg.type]), shape=tuple(arg.shape[1:]))
                      for arg in session.get_inputs()]
            outputs = [Tensor(name=arg.name, dtype=np.dtype(_NUMPY_TYPES[arg.type]), shape=tuple(arg.shape[1:]))
                       for arg in session.get_outputs()]
            output_names = [arg.name for arg in session.get_outputs()]

            @batch
            def infer(session=session, output_names=output_names, **feeds):
                return dict(zip(output_names, session.run(output_names, feeds)))

            triton.bind(
                model_name=name,
                infer_func=infer,
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(max_batch_size=max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us)),
                strict=False,
            )
        print(f"pytriton serving {', '.join(models)} on {host}:{port}", flush=True)
        triton.serve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--models", help="comma-separated models to serve (default: every one in the repository)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--max-queue-delay-us", type=int, default=MAX_QUEUE_DELAY_US)
    parser.add_argument("--intra-op-threads", type=int, default=os.cpu_count() or 1,
                        help="ONNX Runtime threads per session (default: one per core, as bench.ceiling)")
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else sorted(
        entry.name for entry in args.model_repository.iterdir() if (entry / "1" / "model.onnx").exists())
    # Triton starts the stub later, from this process's environment: set it before anything starts.
    os.environ.update(interpreter_libdir_env(dict(os.environ)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.model_repository, models, args.host, args.port, args.max_batch_size, args.max_queue_delay_us,
          args.intra_op_threads)


if __name__ == "__main__":
    main()
