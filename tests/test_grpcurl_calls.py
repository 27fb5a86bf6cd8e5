"""Every grpcurl command in clients/README.md, performed the way grpcurl does it, against a live server.

grpcurl knows no `.proto`: it resolves services and messages through the server's reflection API,
parses the `-d` JSON into the request type it found, and prints the response as JSON. This test does
the same with `ProtoReflectionDescriptorDatabase` and `json_format`, on the documented commands as
written, and checks the documented outputs; a shell pipeline after a command gets the JSON as its input.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from hotpath.cli.demo import ensure_demo_repository
from hotpath_client import Client

DOC = Path(__file__).resolve().parents[1] / "clients" / "README.md"
DOCUMENTED_ADDRESS = "localhost:8001"


@dataclass
class Command:
    """One documented grpcurl command, the shell pipeline after it, and the output shown below it."""

    args: list[str]
    pipeline: str
    output: str | None
    output_kind: str | None


def documented_commands() -> list[Command]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.S | re.M)
    commands = []
    for i, (kind, body) in enumerate(blocks):
        if kind != "sh" or not body.startswith("grpcurl "):
            continue
        line = body.replace("\\\n", " ").strip()
        grpcurl, _, pipeline = line.partition(" | ")
        following = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1][0] in ("json", "text") else (None, None)
        commands.append(Command(shlex.split(grpcurl)[1:], pipeline, following[1], following[0]))
    return commands


COMMANDS = documented_commands()


class Grpcurl:
    """grpcurl's `list`, `describe` and unary calls, over reflection only."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def run(self, args: list[str], url: str) -> str:
        assert args[0] == "-plaintext", "hotpath listens without TLS: every command needs -plaintext"
        args = args[1:]
        data = "{}"
        if args[0] == "-d":
            data, args = args[1], args[2:]
        assert args[0] == DOCUMENTED_ADDRESS, f"commands address {DOCUMENTED_ADDRESS}, got {args[0]}"
        verb, *rest = args[1:]
        if verb == "list":
            return self.list(*rest)
        if verb == "describe":
            return self.describe(*rest)
        return self.call(verb, data)

    def list(self, service: str | None = None) -> str:
        if service is None:
            return "\n".join(sorted(self.database.get_services()))
        return "\n".join(sorted(m.full_name for m in self.pool.FindServiceByName(service).methods))

    def describe(self, symbol: str) -> str:
        for find, kind in ((self.pool.FindServiceByName, "service"), (self.pool.FindMessageTypeByName, "message")):
            try:
                descriptor = find(symbol)
            except KeyError:
                continue
            members = descriptor.methods if kind == "service" else descriptor.fields
            return f"{symbol} is a {kind}:\n" + "\n".join(m.name for m in members)
        raise AssertionError(f"reflection does not know {symbol}")

    def call(self, target: str, data: str) -> str:
        service, method = target.split("/")
        descriptor = self.pool.FindServiceByName(service).FindMethodByName(method)
        assert not descriptor.client_streaming and not descriptor.server_streaming
        request = json_format.Parse(data, message_factory.GetMessageClass(descriptor.input_type)())
        response_type = message_factory.GetMessageClass(descriptor.output_type)
        invoke = self.channel.unary_unary(f"/{service}/{method}", request_serializer=type(request).SerializeToString,
                                          response_deserializer=response_type.FromString)
        return json_format.MessageToJson(invoke(request, timeout=10), indent=2)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The demo model, served as `hotpath serve` serves it with no arguments."""
    from conftest import ServerProcess

    server = ServerProcess(ensure_demo_repository(tmp_path_factory.mktemp("home")))
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def grpcurl(demo_server):
    with grpc.insecure_channel(demo_server.url) as channel:
        yield Grpcurl(channel)


def test_the_guide_covers_the_calls_it_promises():
    verbs = [c.args[-1] if c.args[-2] == DOCUMENTED_ADDRESS else c.args[-2] for c in COMMANDS]
    assert {"list", "describe", "grpc.health.v1.Health/Check", "inference.GRPCInferenceService/ModelMetadata",
            "inference.GRPCInferenceService/ModelInfer"} <= set(verbs)
    assert any('"contents":{"fp32_contents"' in arg for c in COMMANDS for arg in c.args)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.args[-2:])[:60] for c in COMMANDS])
def test_documented_command(grpcurl, demo_server, command):
    printed = grpcurl.run(command.args, demo_server.url)
    if command.pipeline:
        if not all(shutil.which(tool) for tool in re.findall(r"(?:^|\| )(\w+)", command.pipeline)):
            pytest.skip(f"a tool of `{command.pipeline}` is not installed")
        piped = subprocess.run(["bash", "-o", "pipefail", "-c", command.pipeline], input=printed.encode(),
                               capture_output=True, timeout=30)
        assert piped.returncode == 0, piped.stderr
        printed = piped.stdout.decode()
    if command.output is None:
        assert printed
    elif command.output_kind == "text":
        assert printed.split() == command.output.split()
    else:
        got, shown = json.loads(printed), json.loads(command.output)
        if "rawOutputContents" in shown:  # float bits may differ in the last place between machines
            assert len(got.pop("rawOutputContents")) == len(shown.pop("rawOutputContents"))
        assert got == shown


def test_typed_contents_infer_matches_the_raw_answer(grpcurl, demo_server):
    """The documented typed-contents request answers what the same features sent as raw bytes do."""
    infer = next(c for c in COMMANDS if c.args[-1].endswith("/ModelInfer") and not c.pipeline)
    response = json.loads(grpcurl.run(infer.args, demo_server.url))
    request = json.loads(infer.args[infer.args.index("-d") + 1])
    features = np.array(request["inputs"][0]["contents"]["fp32_contents"], np.float32).reshape(request["inputs"][0]["shape"])
    with Client(demo_server.url, timeout=10) as client:
        expected = client.infer("demo", {"features": features})
    raw = [base64.b64decode(r) for r in response["rawOutputContents"]]
    np.testing.assert_array_equal(np.frombuffer(raw[0], np.float32).reshape(1, 3), expected["probabilities"])
    np.testing.assert_array_equal(np.frombuffer(raw[1], np.int64), expected["label"])
