"""Several worker processes on one port behave as one server."""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from models import add_sub_model, identity_model


def _infer(url: str, value: float) -> np.ndarray:
    # A fresh channel per call lets the kernel spread connections over the workers.
    with grpcclient.InferenceServerClient(url) as client:
        x = np.full((1, 16), value, np.float32)
        inputs = [grpcclient.InferInput(n, x.shape, "FP32") for n in ("INPUT0", "INPUT1")]
        for t in inputs:
            t.set_data_from_numpy(x)
        return client.infer("add_sub", inputs).as_numpy("OUTPUT0")


def _worker_pids(server) -> list[int]:
    """Pids of the workers that ever listened, in order, from the server's log."""
    return [int(p) for p in re.findall(r"listening on .* pid (\d+)", server.output())]


def test_workers_share_statistics_models_and_readiness(tmp_path, start_server):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--workers", "2")
    for i in range(40):
        np.testing.assert_array_equal(_infer(server.url, i), np.full((1, 16), 2 * i, np.float32))
    with grpcclient.InferenceServerClient(server.url) as client:
        stats = client.get_inference_statistics("add_sub").model_stats[0]
        assert stats.inference_stats.success.count == 40 and stats.inference_count == 40
    assert server.output().count("listening on") == 2
    assert "worker-0" in server.output() and "worker-1" in server.output()

    identity_model(tmp_path)
    with grpcclient.InferenceServerClient(server.url) as client:
        client.load_model("identity")
        client.unload_model("add_sub")
    for _ in range(10):
        with grpcclient.InferenceServerClient(server.url) as client:
            assert client.is_model_ready("identity") and not client.is_model_ready("add_sub")


def test_dead_worker_is_restarted_with_current_models(tmp_path, start_server):
    add_sub_model(tmp_path)
    identity_model(tmp_path)
    server = start_server(tmp_path, "--workers", "2")
    with grpcclient.InferenceServerClient(server.url) as client:
        client.unload_model("identity")
    victim = _worker_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.output().count("listening on") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.output().count("listening on") == 3, server.output()
    os.kill(_worker_pids(server)[-1], 0)
    for i in range(10):
        np.testing.assert_array_equal(_infer(server.url, i), np.full((1, 16), 2 * i, np.float32))
        with grpcclient.InferenceServerClient(server.url) as client:
            assert not client.is_model_ready("identity")


def test_failed_load_reported_from_any_worker(tmp_path, start_server):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--workers", "2")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    with grpc.insecure_channel(server.url) as channel:
        from hotpath._proto import grpc_service_pb2 as pb
        from hotpath._proto import grpc_service_pb2_grpc as rpc
        stub = rpc.GRPCInferenceServiceStub(channel)
        try:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "broken" in exc.details() and "model.onnx" in exc.details()
        else:
            raise AssertionError("loading a corrupt model must fail")
    np.testing.assert_array_equal(_infer(server.url, 1), np.full((1, 16), 2, np.float32))


def test_default_worker_count_is_one_per_usable_cpu_at_most_four(tmp_path, start_server):
    from hotpath.settings import MAX_AUTO_WORKERS, available_cpus, default_workers

    assert [default_workers(n) for n in (1, 2, 3, 64)] == [1, 2, 3, MAX_AUTO_WORKERS]
    assert default_workers() == min(available_cpus(), MAX_AUTO_WORKERS)
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--workers", "0")
    assert server.output().count("listening on") == default_workers()
    assert f"with {default_workers()} worker process(es)" in server.output()


def test_a_killed_server_leaves_shared_counters_that_the_next_start_removes(tmp_path, start_server):
    from hotpath.server import run_dir_parent

    add_sub_model(tmp_path)
    first = start_server(tmp_path, "--workers", "2")
    run_dirs = lambda: set(run_dir_parent().glob(f"hotpath-{first.proc.pid}-*"))  # noqa: E731
    assert run_dirs(), "the server keeps its counters in a directory named after its pid"
    first.stop(signal.SIGKILL)
    left = run_dirs()
    assert left, "SIGKILL gives the server no chance to clean up"
    start_server(tmp_path)
    assert not any(p.exists() for p in left)
