"""The bench's view of the load generator: requests for its MLPs, and output verification.

The load generator itself (clients, open and closed loop, streaming, input distributions) is
`bench.loadgen` and the server launcher `bench.server_process`, which `hotpath tune` uses too; this
module adds what only holds for the bench models (one FP32 input `INPUT0`, one output `OUTPUT0`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from bench import loadgen
from bench.loadgen import (
    DISTRIBUTIONS,
    MODEL_INFER_PATH,
    ZIPF_EXPONENT,
    LoadResult,
    grpc_frame,
    input_order,
    model_statistics,
    run_python,
    statistics_delta,
)
from bench.models import INPUT_NAME, OUTPUT_NAME
from bench.server_process import ServerProcess
from hotpath._proto import grpc_service_pb2 as pb
from hotpath.serving.config import TensorSpec
from hotpath.serving.datatypes import DATATYPES
from hotpath_client._proto import grpc_service_pb2 as client_pb
from hotpath_client._tensors import infer_request as client_infer_request

__all__ = [
    "DISTRIBUTIONS", "ZIPF_EXPONENT", "LoadResult", "ServerProcess", "grpc_frame", "infer_request", "input_order",
    "input_rows", "model_statistics", "run_python", "statistics_delta", "verify",
]


def infer_request(model: str, rows: np.ndarray) -> client_pb.ModelInferRequest:
    """Return a ModelInferRequest carrying `rows` (2-D fp32) as the bench models' one input."""
    return client_infer_request(model, {INPUT_NAME: np.asarray(rows, dtype=np.float32)}, None, "", "")


def input_rows(distribution: str, in_features: int, pool_size: int, seed: int, replay: Path | None = None) -> np.ndarray:
    """Return the distinct rows a run draws from, shape (n, in_features)."""
    spec = TensorSpec(INPUT_NAME, DATATYPES["FP32"], (in_features,))
    return loadgen.input_pool(distribution, [spec], pool_size, seed, replay)[INPUT_NAME]


async def verify(target: str, model: str, rows: np.ndarray, expected: np.ndarray, rtol: float = 1e-3) -> dict:
    """Send each row of `rows` as its own request, all at once, and compare outputs to `expected`.

    Requests go concurrently so a batching server mixes them; a mismatch means rows were mixed up,
    corrupted or dropped, not that the server is slow.
    """
    async with grpc.aio.insecure_channel(target) as channel:
        model_infer = channel.unary_unary(MODEL_INFER_PATH, request_serializer=client_pb.ModelInferRequest.SerializeToString,
                                          response_deserializer=pb.ModelInferResponse.FromString)
        outcomes = await asyncio.gather(
            *(model_infer(infer_request(model, row[None, :]), timeout=30) for row in rows),
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
