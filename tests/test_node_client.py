"""The Node.js example (clients/node) loads proto/ with @grpc/proto-loader and calls a live server."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hotpath.cli.demo import ensure_demo_repository

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="Node.js and npm are not installed")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The example's dependencies, installed from its package-lock.json when missing."""
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr
    return NODE_DIR / "node_modules"


def run_example(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(NODE_DIR / "infer.js"), url], capture_output=True, text=True, timeout=60)


def test_node_example_calls_the_demo_model(node_modules, tmp_path, start_server):
    server = start_server(ensure_demo_repository(tmp_path))
    out = run_example(server.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "server ready: true"
    assert lines[1] == ("model demo (versions 1): inputs features FP32 [-1,4]; "
                        "outputs probabilities FP32 [-1,3], label INT64 [-1]")
    assert lines[2] == "response id node-example from demo version 1"
    rows = [re.fullmatch(r"row (\d): label (\d), probabilities \[(.*)\]", line) for line in lines[3:]]
    assert len(rows) == 2 and all(rows), out.stdout
    for row, expected_label in zip(rows, (0, 2)):
        probabilities = np.array([float(p) for p in row.group(3).split(", ")])
        assert int(row.group(2)) == expected_label == probabilities.argmax()
        assert abs(probabilities.sum() - 1) < 1e-3


def test_node_example_reports_an_unreachable_server(node_modules, tmp_path, start_server):
    server = start_server(ensure_demo_repository(tmp_path))
    server.stop()
    out = run_example(server.url)
    assert out.returncode == 1
    assert out.stderr.startswith("error: UNAVAILABLE: "), out.stderr
