"""hotpath-client (clients/python) against live servers: every datatype, streaming, deadlines, errors, TLS, asyncio."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from hotpath_client import AsyncClient, Client, HotpathError
from hotpath_client._proto import grpc_service_pb2 as pb
from hotpath_client._proto import grpc_service_pb2_grpc

from models import IDENTITY_TYPES, add_sub_model, identity_model

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64}


def sample(dt: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded values spanning each type's range; BYTES holds empty, NUL and non-ASCII (UTF-8) elements."""
    rng = np.random.default_rng(seed)
    if dt == "BYTES":
        return np.array([f"{i}-é\x00✓".encode() * (i % 3) for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if dt == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.startswith("FP"):
        values = rng.normal(scale=1e3, size=shape).astype(NUMPY[dt])
        values.flat[0], values.flat[1] = np.nan, -np.inf
        return values
    info = np.iinfo(NUMPY[dt])
    return rng.integers(info.min, info.max, shape, dtype=NUMPY[dt], endpoint=True)


def identity_inputs(rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    return {f"IN_{dt}": sample(dt, (rows, 4), seed) for dt in IDENTITY_TYPES}


@pytest.fixture
def client(server):
    with Client(server.url, timeout=30) as c:
        yield c


@pytest.fixture
def slow_server(tmp_path, start_server):
    """A private server whose add_sub holds a lone request in its batch queue for 5 s."""
    add_sub_model(tmp_path, config='name: "add_sub"\nmax_batch_size: 8\n'
                                   'dynamic_batching { max_queue_delay_microseconds: 5000000 }\n'
                                   'parameters [{ key: "batch_policy", value: { string_value: "delay" } }]\n')
    identity_model(tmp_path)
    return start_server(tmp_path, "--model-control", "explicit")


def test_every_datatype_round_trips(client):
    inputs = identity_inputs()
    outputs = client.infer("identity", inputs, request_id="all-types")
    assert sorted(outputs) == sorted(f"OUT_{dt}" for dt in IDENTITY_TYPES)
    for dt in IDENTITY_TYPES:
        got, sent = outputs[f"OUT_{dt}"], inputs[f"IN_{dt}"]
        assert got.shape == sent.shape, dt
        if dt == "BYTES":
            assert got.dtype == object and got.tolist() == sent.tolist()
        else:
            assert got.dtype == NUMPY[dt], dt
            np.testing.assert_array_equal(got, sent)


def test_array_forms_and_chosen_outputs(client):
    """str and fixed-width bytes arrays travel as BYTES; non-contiguous and big-endian arrays as their values."""
    inputs = identity_inputs(rows=2)
    inputs["IN_BYTES"] = np.array([["a", "bé", "", "✓"], ["x", "y", "z", "w"]])
    inputs["IN_FP32"] = np.arange(16, dtype=">f4").reshape(4, 4)[::2]
    inputs["IN_INT64"] = np.asfortranarray(np.arange(8, dtype=np.int64).reshape(2, 4))
    outputs = client.infer("identity", inputs, outputs=["OUT_BYTES", "OUT_FP32", "OUT_INT64"])
    assert list(outputs) == ["OUT_BYTES", "OUT_FP32", "OUT_INT64"]
    assert outputs["OUT_BYTES"].tolist() == [[b"a", "bé".encode(), b"", "✓".encode()], [b"x", b"y", b"z", b"w"]]
    np.testing.assert_array_equal(outputs["OUT_FP32"], [[0, 1, 2, 3], [8, 9, 10, 11]])
    np.testing.assert_array_equal(outputs["OUT_INT64"], np.arange(8).reshape(2, 4))
    inputs["IN_BYTES"] = np.array([[b"s1", b"s2", b"", b"s4"]] * 2, dtype="S2")
    assert client.infer("identity", inputs, outputs=["OUT_BYTES"])["OUT_BYTES"][0].tolist() == [b"s1", b"s2", b"", b"s4"]


def test_server_model_and_repository_calls(client):
    assert client.live() and client.ready()
    assert client.model_ready("add_sub") and client.model_ready("add_sub", "1") and not client.model_ready("no_such_model")
    assert client.server_metadata().name == "hotpath"
    meta = client.metadata("add_sub")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    config = client.config("add_sub")
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 2000
    before = {s.name: s.inference_stats.success.count for s in client.statistics().model_stats}
    client.infer("add_sub", {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)})
    after = client.statistics("add_sub").model_stats
    assert [s.name for s in after] == ["add_sub"] and after[0].inference_stats.success.count == before["add_sub"] + 1
    index = {m.name: m.state for m in client.repository_index()}
    assert {"identity", "identity_fixed", "add_sub", "matmul"} <= set(index) and index["add_sub"] == "READY"


def test_stream_answers_every_request_with_its_id(client):
    rng = np.random.default_rng(7)
    requests = [{"INPUT0": rng.normal(size=(1 + i % 3, 16)).astype(np.float32),
                 "INPUT1": rng.normal(size=(1 + i % 3, 16)).astype(np.float32)} for i in range(24)]
    requests[5] = {"INPUT0": np.ones((1, 15), np.float32), "INPUT1": np.ones((1, 15), np.float32)}
    results = list(client.stream_infer("add_sub", iter(requests), outputs=["OUTPUT0"]))
    assert sorted(int(r.id) for r in results) == list(range(24))
    for result in results:
        sent = requests[int(result.id)]
        if result.id == "5":
            assert result.outputs == {} and "expected shape [-1, 16]" in result.error
            continue
        assert result.error is None and list(result.outputs) == ["OUTPUT0"]
        np.testing.assert_allclose(result.outputs["OUTPUT0"], sent["INPUT0"] + sent["INPUT1"], rtol=1e-6)


def test_stream_stops_at_a_request_that_cannot_be_built(client):
    good = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}
    bad = {"INPUT0": np.ones((1, 16), np.complex64), "INPUT1": np.ones((1, 16), np.float32)}
    seen = []
    with pytest.raises(HotpathError) as raised:
        for result in client.stream_infer("add_sub", [good, good, bad, good]):
            seen.append(result.id)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "complex64" in raised.value.message
    assert sorted(seen) == ["0", "1"]


def test_leaving_a_stream_early_cancels_it(client):
    endless = ({"INPUT0": np.full((1, 16), i, np.float32), "INPUT1": np.ones((1, 16), np.float32)} for i in range(10**9))
    for result in client.stream_infer("add_sub", endless):
        assert result.error is None
        break
    assert client.live()


def test_errors_carry_the_status_code(client, server):
    with pytest.raises(HotpathError) as raised:
        client.infer("no_such_model", {"x": np.zeros(1, np.float32)})
    assert raised.value.code == grpc.StatusCode.NOT_FOUND and "no_such_model" in str(raised.value)
    with pytest.raises(HotpathError) as raised:
        client.infer("add_sub", {"INPUT0": np.ones((1, 16), np.float64), "INPUT1": np.ones((1, 16), np.float64)})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "expected datatype FP32, got FP64" in raised.value.message
    with pytest.raises(HotpathError) as raised:
        client.infer("identity", {"IN_BYTES": np.array([[1, 2, 3, 4]], dtype=object)})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "must be bytes or str, got int" in raised.value.message
    with pytest.raises(HotpathError) as raised:
        client.metadata("no_such_model")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(HotpathError) as raised:
        client.infer("add_sub", {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)},
                     outputs=["NOPE"])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no output 'NOPE'" in raised.value.message
    with Client(server.url, ssl=True, timeout=5) as tls_to_plaintext:
        with pytest.raises(HotpathError) as raised:
            tls_to_plaintext.live()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_unreachable_server_is_unavailable(server, start_server, tmp_path):
    identity_model(tmp_path)
    gone = start_server(tmp_path)
    gone.stop()
    with Client(gone.url, timeout=5) as client, pytest.raises(HotpathError) as raised:
        client.live()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_deadlines_per_client_and_per_call(slow_server):
    inputs = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}
    with Client(slow_server.url, timeout=0.3) as client:
        assert client.live()
        started = time.monotonic()
        with pytest.raises(HotpathError) as raised:
            client.infer("add_sub", inputs)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
        started = time.monotonic()
        with pytest.raises(HotpathError) as raised:
            list(client.stream_infer("add_sub", [inputs]))
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 3
        outputs = client.infer("add_sub", inputs, timeout=20)
        np.testing.assert_array_equal(outputs["OUTPUT0"], np.full((1, 16), 2, np.float32))


def test_unload_and_load(slow_server):
    inputs = identity_inputs(rows=1)
    with Client(slow_server.url, timeout=30) as client:
        client.unload("identity")
        assert not client.model_ready("identity")
        assert {m.name: m.state for m in client.repository_index()}["identity"] != "READY"
        with pytest.raises(HotpathError) as raised:
            client.infer("identity", inputs)
        assert raised.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        client.load("identity")
        assert client.model_ready("identity")
        np.testing.assert_array_equal(client.infer("identity", inputs)["OUT_INT32"], inputs["IN_INT32"])
        with pytest.raises(HotpathError) as raised:
            client.load("no_such_model")
        assert raised.value.code != grpc.StatusCode.OK and "no_such_model" in raised.value.message


def test_async_client(server):
    async def requests():
        for i in range(8):
            yield {"INPUT0": np.full((1, 16), i, np.float32), "INPUT1": np.ones((1, 16), np.float32)}
            await asyncio.sleep(0)

    async def main() -> None:
        async with AsyncClient(server.url, timeout=30) as client:
            assert await client.live() and await client.ready() and await client.model_ready("add_sub")
            assert (await client.metadata("identity")).name == "identity"
            assert (await client.config("add_sub")).max_batch_size == 8
            assert {m.name for m in await client.repository_index(ready=True)} >= {"add_sub", "identity"}
            inputs = [identity_inputs(rows=1 + i % 2, seed=i) for i in range(6)]
            answers = await asyncio.gather(*(client.infer("identity", x, outputs=["OUT_FP16", "OUT_BYTES"]) for x in inputs))
            for sent, got in zip(inputs, answers):
                np.testing.assert_array_equal(got["OUT_FP16"], sent["IN_FP16"])
                assert got["OUT_BYTES"].tolist() == sent["IN_BYTES"].tolist()
            results = [r async for r in client.stream_infer("add_sub", requests())]
            assert sorted(int(r.id) for r in results) == list(range(8))
            for r in results:
                np.testing.assert_array_equal(r.outputs["OUTPUT1"], np.full((1, 16), int(r.id) - 1, np.float32))
            with pytest.raises(HotpathError) as raised:
                await client.statistics("no_such_model")
            assert raised.value.code == grpc.StatusCode.NOT_FOUND
            bad = {"INPUT0": np.ones((1, 16), np.complex128), "INPUT1": np.ones((1, 16), np.float32)}
            with pytest.raises(HotpathError) as raised:
                [r async for r in client.stream_infer("add_sub", [bad])]
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_client_imports_without_the_server_or_onnxruntime():
    """The client package installs and imports alone: onnxruntime and the server package are blocked."""
    code = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None\n"
        "sys.modules['hotpath'] = None\n"
        "import hotpath_client\n"
        "from hotpath_client import Client, AsyncClient, HotpathError\n"
        "loaded = [m for m, module in sys.modules.items() if module is not None and m.split('.')[0] in ('onnx', 'onnxruntime', 'hotpath')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    client_source = Path(__file__).resolve().parents[1] / "clients" / "python"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(client_source)})
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


def test_coexists_with_server_stubs_and_tritonclient(server):
    """Three copies of the `inference` protocol in one process: each keeps its own descriptor pool."""
    import tritonclient.grpc as triton
    from hotpath._proto import grpc_service_pb2 as server_pb

    assert server_pb.ModelInferRequest is not pb.ModelInferRequest
    with Client(server.url) as client, triton.InferenceServerClient(server.url) as other:
        assert client.model_ready("identity") and other.is_model_ready("identity")


def _certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


class _Live(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)


def test_mutual_tls(tmp_path):
    """Root certificates, client certificate and key, given as paths or as PEM bytes, reach a mutual-TLS server."""
    from concurrent import futures

    certs = _certificates(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Live(), server)
    credentials = grpc.ssl_server_credentials([(certs["server_key"].read_bytes(), certs["server_pem"].read_bytes())],
                                              root_certificates=certs["ca_pem"].read_bytes(), require_client_auth=True)
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        url = f"localhost:{port}"
        with Client(url, root_certificates=certs["ca_pem"], certificate_chain=str(certs["client_pem"]),
                    private_key=certs["client_key"].read_bytes(), timeout=10) as client:
            assert client.live()
        with Client(url, root_certificates=certs["ca_pem"], timeout=10) as anonymous, pytest.raises(HotpathError) as raised:
            anonymous.live()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError, match="both private_key and certificate_chain"):
            Client(url, private_key=certs["client_key"])
    finally:
        server.stop(None)


def test_documented_python_examples_run(tmp_path, start_server, capsys):
    """The Python examples in clients/README.md, as written, against the demo model."""
    from hotpath.cli.demo import ensure_demo_repository

    server = start_server(ensure_demo_repository(tmp_path))
    doc = (Path(__file__).resolve().parents[1] / "clients" / "README.md").read_text()
    basic, stream, aio = [textwrap.dedent(b).replace("localhost:8001", server.url)
                          for b in re.findall(r"^ *```python\n(.*?)^ *```", doc, re.S | re.M)]
    namespace: dict = {}
    exec(basic, namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == ["[0 2]", "StatusCode.INVALID_ARGUMENT model 'demo' input 'features': expected datatype FP32, got FP64"]
    with Client(server.url) as namespace["client"]:
        exec(stream, namespace)
    assert sorted(capsys.readouterr().out.splitlines()) == ["0 [0]", "1 [2]"]
    exec("async def main():\n" + textwrap.indent(aio, "    ") + "    return outputs\n", namespace)
    np.testing.assert_array_equal(asyncio.run(namespace["main"]())["label"], [0, 2])
