"""`hotpath tune`: candidates never oversubscribe the CPUs, and a short run writes a config a server loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from bench import loadgen
from bench.ceiling import cpu_session
from bench.models import INPUT_NAME, MODELS, write_repository
from bench.server_process import ServerProcess
from hotpath._proto import model_config_pb2
from hotpath.cli.tune import Candidate, Trial, Tuner, placements, threads_used
from hotpath.settings import available_cpus
from hotpath_client import Client


def _tune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotpath.cli", "tune", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _without_matplotlib(folder: Path) -> dict[str, str]:
    """An environment in which `import matplotlib` fails as it does where the package is not installed."""
    (folder / "matplotlib").mkdir(parents=True)
    (folder / "matplotlib" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("cpus", range(1, 34))
def test_placements_use_at_most_the_cpus(cpus: int) -> None:
    found = placements(cpus)
    assert len(found) == len(set(found))
    for replicas, threads, execution in found:
        assert min(replicas, threads) >= 1
        assert replicas * threads <= cpus
        assert execution in ("inline", "threads") and (execution == "threads" or replicas == 1)
        assert threads_used(Candidate(replicas, threads, execution), cpus) <= cpus
    assert (1, 1, "inline") in found and (1, cpus, "inline") in found
    assert (1, cpus, "threads") in found and (cpus, 1, "threads") in found


def test_candidate_apply_overrides_only_what_it_sets() -> None:
    config = model_config_pb2.ModelConfig(name="m", max_batch_size=16)
    config.instance_group.add(count=3)
    config.dynamic_batching.max_queue_delay_microseconds = 50
    config.parameters["custom"].string_value = "kept"

    as_configured = Candidate().apply(config)
    assert as_configured.instance_group[0].count == 3 and as_configured.max_batch_size == 16
    assert as_configured.dynamic_batching.max_queue_delay_microseconds == 50
    assert "execution" not in as_configured.parameters and "batch_policy" not in as_configured.parameters

    threads = Candidate(2, 1, "threads", 32, 500, True).apply(config)
    assert [(group.count, group.kind) for group in threads.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert threads.parameters["intra_op_thread_count"].string_value == "1"
    assert threads.parameters["execution"].string_value == "threads"
    assert (threads.max_batch_size, threads.dynamic_batching.max_queue_delay_microseconds) == (32, 500)
    assert threads.parameters["batch_policy"].string_value == "delay", "a queue delay is only waited out under the delay policy"
    assert threads.response_cache.enable and threads.parameters["custom"].string_value == "kept"

    inline = Candidate(1, 2, "inline", 8, 0).apply(config)
    assert not inline.instance_group and inline.parameters["execution"].string_value == "inline"
    assert inline.parameters["batch_policy"].string_value == "work_conserving"
    assert config.instance_group[0].count == 3 and "execution" not in config.parameters
    assert Candidate(2, 1, "threads").server_flags(4) == ["--cpus", "4"]
    assert "--cache-size" in Candidate(cache=True).server_flags(4)


def test_a_trial_must_be_clearly_faster_to_win() -> None:
    def trial(score: float | None) -> Trial:
        return Trial(1, "start", Candidate(), [], score, 1.0 if score else None, 64 if score else None)

    assert trial(110).beats(trial(100)) and not trial(102).beats(trial(100))
    assert trial(1).beats(trial(None)) and not trial(None).beats(trial(100))
    assert Tuner.vary(Candidate(), "placement", (1, 2, "inline")) == Candidate(1, 2, "inline")
    assert Tuner.vary(Candidate(max_batch_size=8), "delay", 250).queue_delay_us == 250


def test_tune_rejects_bad_arguments_before_starting_anything(tmp_path: Path) -> None:
    write_repository(tmp_path, ["tiny"])
    missing = _tune("nope", "--model-repository", str(tmp_path))
    assert missing.returncode == 2 and "no model 'nope'" in missing.stderr
    own = _tune("tiny", "--model-repository", str(tmp_path), "--output", str(tmp_path / "tiny" / "config.pbtxt"))
    assert own.returncode == 2 and "add --write" in own.stderr
    zipf = _tune("tiny", "--model-repository", str(tmp_path), "--distribution", "zipf", "--client", "h2load")
    assert zipf.returncode == 2 and "--client python" in zipf.stderr
    too_many = _tune("tiny", "--model-repository", str(tmp_path), "--cpus", str(available_cpus() + 1))
    assert too_many.returncode == 2 and "CPUs this process may use" in too_many.stderr


@pytest.mark.parametrize("matplotlib", [True, False], ids=["with-matplotlib", "without-matplotlib"])
def test_short_tune_writes_a_config_that_a_server_loads(tmp_path: Path, matplotlib: bool) -> None:
    repository = write_repository(tmp_path / "repo", ["tiny"])
    original = (repository / "tiny" / "config.pbtxt").read_text()
    done = _tune("tiny", "--model-repository", str(repository), "--time-budget", "20", "--duration", "0.3",
                 "--warmup", "0.1", "--confirm-rounds", "1", "--concurrency", "8", "--latency-budget-ms", "500",
                 env=None if matplotlib else _without_matplotlib(tmp_path / "blocked"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("plot skipped: matplotlib is not installed" in done.stdout) is not matplotlib, done.stdout
    assert (repository / "tiny" / "config.pbtxt").read_text() == original
    tuned_path = repository / "tiny" / "config.tuned.pbtxt"
    tuned = text_format.Parse(tuned_path.read_text(), model_config_pb2.ModelConfig())
    assert tuned.name == "tiny" and list(tuned.input[0].dims) == [16]

    report = json.loads((repository / "tiny" / "tune-report.json").read_text())
    assert len(report["trials"]) >= 3 and report["trials"][0]["stage"] == "start"
    assert report["elapsed_s"] < 40
    cpus = available_cpus()
    for trial in report["trials"]:
        assert threads_used(Candidate(**trial["candidate"]), cpus) <= cpus
        assert trial["note"] == "" and trial["score_rps"] > 0 and trial["p99_ms"] <= 500
    assert report["confirmation"]["start"]["throughput_rps"] > 0
    assert "| # | stage |" in (repository / "tiny" / "tune-report.md").read_text()
    png = repository / "tiny" / "tune-report.png"
    assert png.read_bytes().startswith(b"\x89PNG") if matplotlib else not png.exists()

    served = loadgen.overlay_repository(repository, tmp_path / "served", ["tiny"], {"tiny": tuned_path.read_text()})
    flags = report["chosen"]["serve_flags"][2:]
    assert "--workers" not in flags
    command = [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(served), "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "0", *flags]
    rows = np.random.default_rng(0).standard_normal((3, MODELS["tiny"].in_features), dtype=np.float32)
    with ServerProcess("tuned", command, tmp_path / "tuned.log") as server, Client(server.target) as client:
        (got,) = client.infer("tiny", {INPUT_NAME: rows}, timeout=10).values()
    want = cpu_session(repository / "tiny" / "1" / "model.onnx").run(None, {INPUT_NAME: rows})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
