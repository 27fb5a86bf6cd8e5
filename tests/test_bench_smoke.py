"""The benchmark harness still works: models, naive server, both load clients, JSON and plot."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from bench import compare, load
from bench.ceiling import cpu_session
from bench.models import INPUT_NAME, MODELS, write_repository
from bench.run import ServerProcess, free_port, main, server_command, start_server
from hotpath._proto import model_config_pb2

requires_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None, reason="h2load not installed: apt-get install -y nghttp2-client"
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("models"), ["tiny", "medium"])


@pytest.fixture(scope="module")
def naive_server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "naive.log"
    with start_server("naive", server_command("naive", repository, port), log_path, port) as server:
        yield server


@pytest.fixture(scope="module")
def hotpath_server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "hotpath.log"
    with start_server("hotpath", server_command("hotpath", repository, port), log_path, port) as server:
        yield server


@pytest.mark.parametrize("name", ["tiny", "medium"])
def test_models_have_the_declared_shapes_and_config(repository: Path, name: str) -> None:
    spec = MODELS[name]
    session = cpu_session(repository / name / "1" / "model.onnx")
    batch = np.random.default_rng(0).standard_normal((5, spec.in_features), dtype=np.float32)
    (output,) = session.run(None, {INPUT_NAME: batch})
    assert output.shape == (5, spec.out_features) and output.dtype == np.float32
    config = text_format.Parse((repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds == spec.max_queue_delay_us
    assert list(config.input[0].dims) == [spec.in_features] and list(config.output[0].dims) == [spec.out_features]
    assert not config.instance_group


def test_grpc_frame_prefixes_flag_and_big_endian_length() -> None:
    assert load.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_zipf_order_is_seeded_and_skewed_toward_the_first_inputs() -> None:
    order = load.input_order("zipf", 10_000, 100_000, seed=3)
    assert np.array_equal(order, load.input_order("zipf", 10_000, 100_000, seed=3))
    counts = np.bincount(order, minlength=10_000)
    harmonic = (np.arange(1, 10_001) ** -load.ZIPF_EXPONENT).sum()
    assert counts[0] / order.size == pytest.approx(1 / harmonic, rel=0.05)
    assert counts[0] > counts[1] > counts[9]


def test_verify_catches_wrong_outputs(naive_server: ServerProcess, repository: Path) -> None:
    rows = np.random.default_rng(1).standard_normal((16, 16), dtype=np.float32)
    expected = cpu_session(repository / "tiny" / "1" / "model.onnx").run(None, {INPUT_NAME: rows})[0]
    assert asyncio.run(load.verify(naive_server.target, "tiny", rows, expected)) == {
        "checked": 16, "mismatched": 0, "errors": {}
    }
    assert asyncio.run(load.verify(naive_server.target, "tiny", rows, expected + 0.5))["mismatched"] == 16


@requires_h2load
def test_h2load_counts_grpc_errors_it_cannot_see(naive_server: ServerProcess) -> None:
    wrong_width = load.infer_request("tiny", np.zeros((1, 3), np.float32)).SerializeToString()
    before = load.model_statistics(naive_server.target, "tiny")
    result = load.run_h2load(naive_server.target, "tiny", wrong_width, 40, 4, 0.5, naive_server.process.pid)
    delta = load.statistics_delta(before, load.model_statistics(naive_server.target, "tiny"))
    assert result.requests == 0
    in_flight_at_stop = 4
    assert delta["fail"] - in_flight_at_stop <= result.errors["no_response_body"] <= delta["fail"]


def _run_bench(tmp_path: Path, *extra: str) -> dict:
    json_path = main(
        ["--servers", "naive", "--models", "tiny", "--concurrency", "1,4", "--duration", "1", "--warmup", "0.2",
         "--ceiling-seconds", "0.3", "--out", str(tmp_path), *extra]
    )
    assert json_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    return json.loads(json_path.read_text())


def _check_runs(results: dict, client: str, distribution: str) -> None:
    assert results["ceiling"]["tiny"]["batch_64_rows_per_s"] > results["ceiling"]["tiny"]["batch_1_rows_per_s"] > 0
    naive = results["servers"]["naive"]
    assert naive["status"] == "ran"
    assert [(run["model"], run["concurrency"]) for run in naive["runs"]] == [("tiny", 1), ("tiny", 4)]
    for run in naive["runs"]:
        assert (run["client"], run["distribution"]) == (client, distribution)
        assert run["requests"] > 50 and run["errors"] == {}
        assert run["throughput_rps"] == pytest.approx(run["requests"] / run["duration_s"])
        latency = run["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"]
        assert run["cpu_us_per_request"] > 0 and run["client_cpu_s"] > 0
        assert run["server_stats"]["fail"] == 0
        assert run["requests"] <= run["server_stats"]["success"] <= run["requests"] + run["concurrency"]
        assert run["verification"] == {"checked": 64, "mismatched": 0, "errors": {}}
    assert results["targets"] == []


def test_bench_python_client_zipf_writes_json_and_plot(tmp_path: Path) -> None:
    results = _run_bench(tmp_path, "--client", "python", "--distribution", "zipf")
    _check_runs(results, "python", "zipf")


@requires_h2load
def test_bench_h2load_client_writes_json_and_plot(tmp_path: Path) -> None:
    results = _run_bench(tmp_path, "--client", "h2load")
    _check_runs(results, "h2load", "fixed")


@pytest.mark.parametrize("streaming", [False, True])
def test_python_client_counts_errors_by_status_unary_and_streaming(hotpath_server: ServerProcess, streaming: bool) -> None:
    bodies = [load.infer_request("tiny", np.zeros((1, 3), np.float32)).SerializeToString()]
    result = load.run_python(hotpath_server.target, "tiny", bodies, np.arange(1), "fixed", 4, 0.3,
                             hotpath_server.process.pid, streaming=streaming)
    assert result.requests == 0 and result.streaming is streaming
    assert list(result.errors) == ["STREAM_ERROR" if streaming else "INVALID_ARGUMENT"]
    assert result.errors[list(result.errors)[0]] > 4


def test_open_loop_offers_the_poisson_rate(hotpath_server: ServerProcess) -> None:
    rows = load.input_rows("random", 16, 50, seed=0)
    bodies = [load.infer_request("tiny", row[None, :]).SerializeToString() for row in rows]
    result = load.run_python(hotpath_server.target, "tiny", bodies, np.arange(50), "random", 64, 2.0,
                             hotpath_server.process.pid, rate_rps=200, streaming=True, seed=1)
    assert result.errors == {} and result.rate_rps == 200
    assert 300 <= result.requests <= 500
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p99.9"]


def test_server_config_specs_parse_and_bad_ones_say_why(tmp_path: Path) -> None:
    config_path = tmp_path / "config.pbtxt"
    config_path.write_text("max_batch_size: 8")
    parsed = compare.ServerConfig.parse(f"t=--workers 2 --model-config tiny={config_path} --cache-size 1MiB")
    assert (parsed.name, parsed.server, parsed.flags) == ("t", "hotpath", ["--workers", "2", "--cache-size", "1MiB"])
    assert parsed.model_configs == {"tiny": config_path}
    assert compare.ServerConfig.parse("default=") == compare.ServerConfig("default")
    assert compare.ServerConfig.parse("n=@naive").server == "naive"
    for bad, why in (("--workers 2", "NAME=SPEC"), ("n=@naive --workers 2", "no hotpath flags"),
                     ("t=--model-config tiny=/nonexistent", "MODEL=PATH")):
        with pytest.raises(ValueError, match=why):
            compare.ServerConfig.parse(bad)


def test_compare_interleaves_configurations_and_reports_ratios(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small_batches = tmp_path / "small.pbtxt"
    config = text_format.Parse((write_repository(tmp_path / "repo", ["tiny"]) / "tiny" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    config.max_batch_size = 4
    small_batches.write_text(text_format.MessageToString(config))
    json_path = compare.main(
        ["--config", "one=", "--config", f"small=--model-config tiny={small_batches}", "--config", "naive=@naive",
         "--models", "tiny", "--concurrency", "8", "--rounds", "2", "--duration", "0.4", "--warmup", "0.1",
         "--ceiling-seconds", "0.2", "--out", str(tmp_path / "out")])
    results = json.loads(json_path.read_text())
    assert compare.failures(results) == []
    assert {name: len(runs) for name, runs in results["runs"].items()} == {"one": 2, "small": 2, "naive": 2}
    small_batch_sizes = {int(size) for run in results["runs"]["small"]
                         for size in run["server_stats"]["batch_size_executions"]}
    assert max(small_batch_sizes) <= 4
    rows = {row["config"]: row for row in results["summary"]}
    assert rows["one"]["vs_first"] == 1.0
    assert rows["naive"]["vs_first"] == pytest.approx(rows["naive"]["throughput_rps"] / rows["one"]["throughput_rps"])
    assert 0 < rows["small"]["of_ceiling"] < 1
    assert json_path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "vs one" in capsys.readouterr().out
