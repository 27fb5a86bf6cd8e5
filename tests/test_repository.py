"""The model repository at run time: several models, index states, load / reload / unload, version
policies, failed loads that leave the previous version serving, reloads under traffic, and health.

Every test has its own repository and server. `add_sub` models are built with `offset` equal to their
version, so the answer to zeros tells which version served a request.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from models import add_sub_model, identity_model, matmul_model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def versioned_add_sub(repo: Path, name: str, versions: list[int], config: str | None = None) -> None:
    for version in versions:
        add_sub_model(repo, name, version=version, offset=float(version), config=config)


def zeros(module=grpcclient, rows: int = 1) -> list:
    inputs = [module.InferInput(n, [rows, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.zeros((rows, 16), np.float32))
    return inputs


def served_version(client: grpcclient.InferenceServerClient, name: str, version: str = "") -> int:
    """Which add_sub version answered: OUTPUT0 of zeros is the model's offset, its version."""
    result = client.infer(name, zeros(), model_version=version)
    out = result.as_numpy("OUTPUT0")
    assert (out == out.flat[0]).all() and result.get_response().model_version == str(int(out.flat[0]))
    return int(out.flat[0])


def failure(call, *args: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args)
    return info.value


def index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    """(name, version) -> (state, reason) for every model the repository index lists."""
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


class Health:
    """`grpc.health.v1` Check against one server."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.insecure_channel(url)
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    def __call__(self, service: str = "") -> int:
        return self.stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def test_several_models_index_load_unload_and_health(tmp_path, start_server):
    versioned_add_sub(tmp_path, "add_sub", [1])
    identity_model(tmp_path)
    matmul_model(tmp_path)
    server = start_server(tmp_path, "--model-control", "explicit")
    health = Health(server.url)
    with grpcclient.InferenceServerClient(server.url) as client:
        assert index(client) == {(name, "1"): ("READY", "") for name in ("add_sub", "identity", "matmul")}
        assert served_version(client, "add_sub") == 1
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        tensor = grpcclient.InferInput("X", x.shape, "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("matmul", [tensor]).as_numpy("Y"), x @ np.ones((4, 2), np.float32))
        assert health() == SERVING and health("add_sub") == SERVING and health("inference.GRPCInferenceService") == SERVING

        versioned_add_sub(tmp_path, "added", [1])
        assert index(client)[("added", "")] == ("UNAVAILABLE", "")
        assert not client.is_model_ready("added")
        client.load_model("added")
        assert index(client)[("added", "1")] == ("READY", "") and served_version(client, "added") == 1
        assert health("added") == SERVING

        client.unload_model("add_sub")
        assert not client.is_model_ready("add_sub") and not client.is_model_ready("add_sub", "1")
        error = failure(client.infer, "add_sub", zeros())
        assert error.status() == "StatusCode.NOT_FOUND" and "model 'add_sub' is not loaded (unloaded)" in error.message()
        assert index(client)[("add_sub", "")] == ("UNAVAILABLE", "unloaded")
        assert health("add_sub") == NOT_SERVING and health() == SERVING and client.is_server_ready()
        assert served_version(client, "added") == 1
        error = failure(client.unload_model, "add_sub")
        assert error.status() == "StatusCode.NOT_FOUND" and "'add_sub' is not loaded" in error.message()

        error = failure(client.load_model, "not_on_disk")
        assert error.status() == "StatusCode.NOT_FOUND" and "no model 'not_on_disk' in the model repository" in error.message()

        client.load_model("add_sub")
        assert client.is_model_ready("add_sub") and served_version(client, "add_sub") == 1 and health("add_sub") == SERVING
    health.channel.close()


def test_reload_switches_version_and_failed_loads_keep_it_serving(tmp_path, start_server):
    versioned_add_sub(tmp_path, "add_sub", [1])
    server = start_server(tmp_path, "--model-control", "explicit")
    model_dir = tmp_path / "add_sub"
    with grpcclient.InferenceServerClient(server.url) as client:
        assert served_version(client, "add_sub") == 1
        versioned_add_sub(tmp_path, "add_sub", [2])
        assert served_version(client, "add_sub") == 1, "a new version directory is served only once loaded"
        client.load_model("add_sub")
        assert served_version(client, "add_sub") == 2 and client.get_model_metadata("add_sub").versions == ["2"]
        assert client.is_model_ready("add_sub", "2") and not client.is_model_ready("add_sub", "1")
        assert failure(client.infer, "add_sub", zeros(), "1").status() == "StatusCode.NOT_FOUND"

        (model_dir / "3").mkdir()
        (model_dir / "3" / "model.onnx").write_bytes(b"this is not an ONNX model")
        error = failure(client.load_model, "add_sub")
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "cannot load add_sub/3/model.onnx" in error.message()
        assert str(tmp_path) not in error.message(), "the repository's location stays out of client messages"
        assert served_version(client, "add_sub") == 2 and client.get_model_metadata("add_sub").versions == ["2"]
        shutil.rmtree(model_dir / "3")

        config = model_dir / "config.pbtxt"
        for text, fragment in (
            (b"max_batch_size: 8\ninput [ { name: ", "add_sub/config.pbtxt"),
            (b"name: \"add_sub\"\nmax_batch_size: \xff\xfe\n", "add_sub/config.pbtxt"),
            (b"name: \"other\"\n", "add_sub/config.pbtxt: name 'other' does not match"),
            (b"max_batch_size: 8\ninput [ { name: \"INPUT9\" data_type: TYPE_FP32 dims: [ 16 ] } ]\n", "config lists input 'INPUT9'"),
        ):
            config.write_bytes(text)
            error = failure(client.load_model, "add_sub")
            assert error.status() == "StatusCode.INVALID_ARGUMENT" and fragment in error.message(), error
            assert served_version(client, "add_sub") == 2 and client.is_model_ready("add_sub")
        config.unlink()
        client.load_model("add_sub")
        assert served_version(client, "add_sub") == 2 and client.is_server_ready()
    assert "Traceback" not in server.output(), server.output()


def test_version_policies(tmp_path, start_server):
    policies = {
        "latest_1": (None, [3]),
        "latest_2": ("version_policy { latest { num_versions: 2 } }", [2, 3]),
        "all": ("version_policy { all { } }", [1, 2, 3]),
        "specific": ("version_policy { specific { versions: [1, 3] } }", [1, 3]),
    }
    for name, (policy, _) in policies.items():
        versioned_add_sub(tmp_path, name, [1, 2, 3], config=policy and f'name: "{name}"\n{policy}\n')
    versioned_add_sub(tmp_path, "missing", [1], config="version_policy { specific { versions: [1, 4] } }\n")
    server = start_server(tmp_path)
    with grpcclient.InferenceServerClient(server.url) as client:
        for name, (_, versions) in policies.items():
            assert client.get_model_metadata(name).versions == [str(v) for v in versions], name
            for version in (1, 2, 3):
                assert client.is_model_ready(name, str(version)) == (version in versions), (name, version)
                if version in versions:
                    assert served_version(client, name, str(version)) == version
                else:
                    error = failure(client.infer, name, zeros(), str(version))
                    assert error.status() == "StatusCode.NOT_FOUND" and f"loaded versions are {versions}" in error.message()
            assert served_version(client, name) == max(versions)
            assert sorted(v for (n, v) in index(client) if n == name) == [str(v) for v in versions]
        state, reason = index(client)[("missing", "")]
        assert state == "UNAVAILABLE" and "versions [4]" in reason and "model.onnx in missing" in reason and str(tmp_path) not in reason


def test_broken_models_at_start_leave_the_server_up(tmp_path, start_server):
    versioned_add_sub(tmp_path, "good", [1])
    (tmp_path / "corrupt" / "1").mkdir(parents=True)
    (tmp_path / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage")
    versioned_add_sub(tmp_path, "bad_config", [1])
    (tmp_path / "bad_config" / "config.pbtxt").write_bytes(b"max_batch_size: \xff\n")
    server = start_server(tmp_path, "--model-control", "explicit")
    health = Health(server.url)
    with grpcclient.InferenceServerClient(server.url) as client:
        rows = index(client)
        assert rows[("good", "1")] == ("READY", "")
        assert rows[("corrupt", "")][0] == "UNAVAILABLE" and "corrupt/1/model.onnx" in rows[("corrupt", "")][1]
        assert rows[("bad_config", "")][0] == "UNAVAILABLE" and "bad_config/config.pbtxt" in rows[("bad_config", "")][1]
        assert not any(str(tmp_path) in reason for _, reason in rows.values()), rows
        assert served_version(client, "good") == 1
        assert not client.is_server_ready() and health() == NOT_SERVING and client.is_server_live()
        error = failure(client.infer, "corrupt", zeros())
        assert error.status() == "StatusCode.NOT_FOUND" and "model.onnx" in error.message()

        versioned_add_sub(tmp_path, "corrupt", [1])
        client.load_model("corrupt")
        (tmp_path / "bad_config" / "config.pbtxt").unlink()
        client.load_model("bad_config")
        assert served_version(client, "corrupt") == 1 and served_version(client, "bad_config") == 1
        assert client.is_server_ready() and health() == SERVING
    health.channel.close()


def test_reload_under_traffic_drops_nothing(tmp_path, start_server):
    versioned_add_sub(tmp_path, "reloaded", [1])
    versioned_add_sub(tmp_path, "steady", [1])
    server = start_server(tmp_path, "--model-control", "explicit")

    async def main() -> None:
        answered = {"reloaded": [], "steady": []}
        errors: list[str] = []
        stop = asyncio.Event()

        async def send(client: aioclient.InferenceServerClient, name: str) -> None:
            while not stop.is_set():
                try:
                    result = await client.infer(name, zeros(aioclient, rows=2))
                except InferenceServerException as exc:
                    errors.append(f"{name}: {exc}")
                else:
                    out = result.as_numpy("OUTPUT0")
                    assert (out == out.flat[0]).all()
                    answered[name].append(int(out.flat[0]))

        async def traffic_flows() -> None:
            """Return once every model has answered 20 more requests; fail at the first error or after 10 s."""
            seen = {name: len(values) for name, values in answered.items()}

            async def more_answers() -> None:
                while any(len(answered[name]) < seen[name] + 20 for name in answered):
                    assert errors == []
                    await asyncio.sleep(0.005)

            await asyncio.wait_for(more_answers(), 10)

        async with aioclient.InferenceServerClient(server.url) as client:
            senders = [asyncio.create_task(send(client, name)) for name in answered for _ in range(4)]
            await traffic_flows()
            answered_during_loads = 0
            for version in (2, 3, 3):
                versioned_add_sub(tmp_path, "reloaded", [version])
                before = len(answered["steady"]) + len(answered["reloaded"])
                await client.load_model("reloaded")
                answered_during_loads += len(answered["steady"]) + len(answered["reloaded"]) - before
                await traffic_flows()
            stop.set()
            await asyncio.gather(*senders)
        assert errors == [] and answered_during_loads > 0
        assert set(answered["steady"]) == {1}
        assert set(answered["reloaded"]) == {1, 2, 3} and answered["reloaded"][-1] == 3

    asyncio.run(main())
    assert "Traceback" not in server.output(), server.output()


def test_load_with_a_config_override_is_refused_not_ignored(tmp_path, start_server):
    from tritonclient.utils import InferenceServerException

    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--model-control", "explicit")
    with grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException, match="parameters \\['config'\\] are not supported"):
            client.load_model("add_sub", config='{"max_batch_size": 4}')
        client.unload_model("add_sub", unload_dependents=True)
        assert not client.is_model_ready("add_sub")


def test_broken_drift_setups_fail_their_load_and_nothing_else(tmp_path, start_server):
    """A reference.json holding [] and a drift output_dir that cannot be created used to raise
    something other than a LoadError: the server did not start, or a RepositoryModelLoad of them
    never answered. Now each model fails alone, with the reason, and the server goes on."""
    add_sub_model(tmp_path, "fine")
    add_sub_model(tmp_path, "bad_reference", config='name: "bad_reference"\nmax_batch_size: 8\ndrift { enable: true }\n')
    (tmp_path / "bad_reference" / "drift").mkdir()
    (tmp_path / "bad_reference" / "drift" / "reference.json").write_text("[]")
    (tmp_path / "a_file").write_text("not a directory")
    add_sub_model(tmp_path, "bad_output", config=f'name: "bad_output"\nmax_batch_size: 8\n'
                                                 f'drift {{ enable: true output_dir: "{tmp_path / "a_file" / "windows"}" }}\n')
    server = start_server(tmp_path, "--model-control", "explicit")
    with grpcclient.InferenceServerClient(server.url) as client:
        states = {m.name: m.state for m in client.get_model_repository_index().models}
        assert states == {"fine": "READY", "bad_reference": "UNAVAILABLE", "bad_output": "UNAVAILABLE"}, states
        for name in ("bad_reference", "bad_output", "x" * 300):
            with pytest.raises(InferenceServerException) as raised:
                client.load_model(name, client_timeout=10)
            assert raised.value.status() in ("StatusCode.INTERNAL", "StatusCode.INVALID_ARGUMENT"), raised.value
            assert "x" * 60 not in raised.value.message(), "a long name is not echoed whole"
        client.unload_model("fine", client_timeout=10)
        client.load_model("fine", client_timeout=10)
        assert client.is_model_ready("fine")
