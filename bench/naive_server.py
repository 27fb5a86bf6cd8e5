"""The reference point: a hand-written grpcio server that calls ONNX Runtime once per request.

This is what a user writes in an afternoon from the Open Inference Protocol stubs: a sync
`grpc.server` on a thread pool, one default-threaded ORT session per model, raw tensor bytes in and
out. It is meant to be an honest baseline, so it does nothing slow on purpose; it only lacks what
hotpath adds (batching, a compiled codec, a multi-core front end).

Run: python -m bench.naive_server --model-repository DIR --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from bench.ceiling import cpu_session
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc

_NUMPY_DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
_DATATYPE_NAMES = {np.dtype(value): name for name, value in _NUMPY_DATATYPES.items()}


class NaiveInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ServerReady, ModelReady, ModelInfer, and success/failure counts in ModelStatistics so the bench
    can see failures h2load cannot (gRPC status travels in trailers); nothing else."""

    def __init__(self, repository: Path) -> None:
        self.sessions = {
            model_dir.name: cpu_session(model_dir / "1" / "model.onnx")
            for model_dir in sorted(repository.iterdir())
            if (model_dir / "1" / "model.onnx").exists()
        }
        if not self.sessions:
            raise SystemExit(f"no models found: expected {repository}/<name>/1/model.onnx")
        self.outcomes = {name: {"success": 0, "fail": 0} for name in self.sessions}
        self.outcomes_lock = threading.Lock()

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.sessions)

    def ModelInfer(self, request, context):
        session = self.sessions.get(request.model_name)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        try:
            feeds = {
                tensor.name: np.frombuffer(raw, dtype=_NUMPY_DATATYPES[tensor.datatype]).reshape(tensor.shape)
                for tensor, raw in zip(request.inputs, request.raw_input_contents)
            }
            names = [output.name for output in request.outputs] or [o.name for o in session.get_outputs()]
            results = session.run(names, feeds)
        except Exception as error:
            self._count(request.model_name, "fail")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for name, result in zip(names, results):
            response.outputs.add(name=name, datatype=_DATATYPE_NAMES[result.dtype], shape=result.shape)
            response.raw_output_contents.append(result.tobytes())
        self._count(request.model_name, "success")
        return response

    def _count(self, model_name: str, outcome: str) -> None:
        with self.outcomes_lock:
            self.outcomes[model_name][outcome] += 1

    def ModelStatistics(self, request, context):
        names = [request.name] if request.name else list(self.sessions)
        response = pb.ModelStatisticsResponse()
        for name in names:
            outcomes = self.outcomes.get(name)
            if outcomes is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")
            stats = response.model_stats.add(name=name, version="1", inference_count=outcomes["success"])
            stats.inference_stats.success.count = outcomes["success"]
            stats.inference_stats.fail.count = outcomes["fail"]
        return response


def serve(repository: Path, host: str, port: int, threads: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NaiveInferenceServicer(repository), server)
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=4 * (os.cpu_count() or 1), help="gRPC handler threads")
    args = parser.parse_args(argv)
    serve(args.model_repository, args.host, args.port, args.threads)


if __name__ == "__main__":
    main()
