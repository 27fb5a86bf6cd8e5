"""A short fuzz of a real server (bench/fuzz.py): no fuzzed request may make it blame itself, hang or die."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from bench.fuzz import Fuzzer, served_models
from conftest import ServerProcess
from models import add_sub_model, identity_model, matmul_model, string_cast_model

EXAMPLES = int(os.environ.get("HOTPATH_FUZZ_EXAMPLES", "500"))
"""Examples per strategy; the suite keeps it short, `python -m bench.fuzz` runs long."""


def test_fuzzed_requests_never_get_internal_unknown_or_a_hang(tmp_path: Path, start_server) -> None:
    identity_model(tmp_path)
    identity_model(tmp_path, "identity_fixed", batch=False, dims=(2, 3))
    add_sub_model(tmp_path, config='name: "add_sub"\nmax_batch_size: 8\n')
    matmul_model(tmp_path)
    string_cast_model(tmp_path, config='max_batch_size: 8\n')
    server: ServerProcess = start_server(tmp_path, "--max-message-size", "1MiB", "--model-control", "explicit")
    with grpcclient.InferenceServerClient(server.url) as client:
        text = grpcclient.InferInput("X", [1, 2], "BYTES")
        text.set_data_from_numpy(np.array([["1", "2"]], dtype=object))
        client.infer("string_cast", [text])

    fuzzer = Fuzzer(server.url, alive=lambda: server.proc.poll() is None)
    try:
        fuzzer.run(EXAMPLES, served_models(server.url))
    finally:
        fuzzer.close()
    assert sum(fuzzer.statuses.values()) >= 3 * EXAMPLES
    assert fuzzer.statuses["INVALID_ARGUMENT"] and fuzzer.statuses["NOT_FOUND"] and fuzzer.statuses["OK"] > EXAMPLES / 10, fuzzer.statuses
    print(f"fuzz: {dict(fuzzer.statuses)}, slowest {fuzzer.slowest_s * 1000:.0f} ms")
    with grpcclient.InferenceServerClient(server.url) as client:
        data = grpcclient.InferInput("X", [1, 4], "FP32")
        data.set_data_from_numpy(np.ones((1, 4), np.float32))
        np.testing.assert_array_equal(client.infer("matmul", [data]).as_numpy("Y"), np.full((1, 2), 4, np.float32))
    assert server.stop() == 0, server.output()
    assert "Traceback" not in server.output(), server.output()[-3000:]
