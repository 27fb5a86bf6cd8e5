"""The bench's view of the load generator: requests for its MLPs, and output verification.

The load generator itself (clients, open and closed loop, streaming, input distributions, server
processes) is `hotpath.loadgen`, which `hotpath tune` uses too; this module adds what only holds for
the bench models (one FP32 input `INPUT0`, one output `OUTPUT0`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from bench.models import INPUT_NAME, OUTPUT_NAME
from hotpath import loadgen
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc
from hotpath.loadgen import (
    DISTRIBUTIONS,
    ZIPF_EXPONENT,
    LoadResult,
    ServerProcess,
    grpc_frame,
    input_order,
    model_statistics,
    run_h2load,
    run_python,
    statistics_delta,
)

__all__ = [
    "DISTRIBUTIONS", "ZIPF_EXPONENT", "LoadResult", "ServerProcess", "grpc_frame", "infer_request", "input_order",
    "input_rows", "model_statistics", "run_h2load", "run_python", "statistics_delta", "verify",
]


def infer_request(model: str, rows: np.ndarray) -> pb.ModelInferRequest:
    """Return a ModelInferRequest carrying `rows` (2-D fp32) as the bench models' one input."""
    return loadgen.infer_request(model, {INPUT_NAME: np.asarray(rows, dtype=np.float32)})


def input_rows(distribution: str, in_features: int, pool_size: int, seed: int, replay: Path | None = None) -> np.ndarray:
    """Return the distinct rows a run draws from, shape (n, in_features)."""
    spec = loadgen.InputSpec(INPUT_NAME, "FP32", (in_features,))
    return loadgen.input_pool(distribution, [spec], pool_size, seed, replay)[INPUT_NAME]


async def verify(target: str, model: str, rows: np.ndarray, expected: np.ndarray, rtol: float = 1e-3) -> dict:
    """Send each row of `rows` as its own request, all at once, and compare outputs to `expected`.

    Requests go concurrently so a batching server mixes them; a mismatch means rows were mixed up,
    corrupted or dropped, not that the server is slow.
    """
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        outcomes = await asyncio.gather(
            *(stub.ModelInfer(infer_request(model, row[None, :]), timeout=30) for row in rows),
            return_exceptions=True,
        )
    errors: Counter = Counter()
    mismatched = 0
    for outcome, want in zip(outcomes, expected):
        if isinstance(outcome, grpc.aio.AioRpcError):
            errors[outcome.code().name] += 1
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        output = outcome.outputs[0] if outcome.outputs else None
        if (
            output is None
            or output.name != OUTPUT_NAME
            or output.datatype != "FP32"
            or list(output.shape) != [1, want.size]
            or not np.allclose(np.frombuffer(outcome.raw_output_contents[0], np.float32), want, rtol=rtol, atol=1e-4)
        ):
            mismatched += 1
    return {"checked": len(rows), "mismatched": mismatched, "errors": dict(errors)}
