"""The benchmark harness still works: models, naive server, the floor, both load clients, h2load parsing,
target ratios, JSON and plot. Nothing here needs PyTriton: its end-to-end check runs only where it is installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import text_format

from bench import compare, floor, h2load, load, procfs, pytriton_server, targets
from bench import run as bench_run
from bench.ceiling import bare_session_rss_bytes, cpu_session
from bench.models import INPUT_NAME, MODELS, write_repository
from bench.run import ServerProcess, free_port, main, server_command, start_server
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc as pb_grpc
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
    assert config.max_batch_size == 64 == pytriton_server.MAX_BATCH_SIZE
    assert config.dynamic_batching.max_queue_delay_microseconds == spec.max_queue_delay_us
    assert spec.max_queue_delay_us == pytriton_server.MAX_QUEUE_DELAY_US, "hotpath is compared at PyTriton's config"
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
    result = h2load.run(naive_server.target, "tiny", wrong_width, 40, 4, 4, 0.5, naive_server.process.pid)
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
        assert run["connections"] == run["concurrency"]
        assert run["requests"] > 50 and run["errors"] == {}
        assert run["throughput_rps"] == pytest.approx(run["requests"] / run["duration_s"])
        latency = run["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"]
        assert run["cpu_us_per_request"] > 0 and run["client_cpu_s"] > 0
        assert run["server_stats"]["fail"] == 0
        assert run["requests"] <= run["server_stats"]["success"] <= run["requests"] + run["concurrency"]
        assert run["verification"] == {"checked": 64, "mismatched": 0, "errors": {}}
    assert [target["skipped"] for target in results["targets"]] == ["hotpath not in --servers"] * len(targets.TARGETS)


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
    parsed = compare.ServerConfig.parse(f"t=--pin-threads --model-config tiny={config_path} --cache-size 1MiB")
    assert (parsed.name, parsed.server, parsed.flags) == ("t", "hotpath", ["--pin-threads", "--cache-size", "1MiB"])
    assert parsed.model_configs == {"tiny": config_path}
    assert compare.ServerConfig.parse("default=") == compare.ServerConfig("default")
    assert compare.ServerConfig.parse("n=@naive").server == "naive"
    for bad, why in (("--pin-threads", "NAME=SPEC"), ("n=@naive --pin-threads", "no hotpath flags"),
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


requires_floor_build = pytest.mark.skipif(
    floor.find_source()[0] is None or floor.compile_flags()[0] is None or shutil.which("h2load") is None,
    reason="the floor needs shared/floor/canned_server.cc, g++, pkg-config, libgrpc++-dev and h2load",
)

H2LOAD_OUTPUT = """starting benchmark...
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 4.00s, 135221.25 req/s, 10.95MB/s
requests: 540885 total, 540949 started, 540885 done, 540880 succeeded, 5 failed, 0 errored, 0 timeout
status codes: 540885 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 43.80MB (45929520) total, 5.16MB (5408850) headers (space savings 96.28%), 28.37MB (29747675) data
"""


def test_h2load_summary_is_parsed_and_a_missing_one_says_what_is_missing() -> None:
    summary = h2load.parse_summary(H2LOAD_OUTPUT)
    assert summary == {"total": 540885, "started": 540949, "done": 540885, "succeeded": 540880, "failed": 5,
                       "errored": 0, "timeout": 0, "elapsed_s": 4.0, "data_bytes": 29747675}
    assert h2load.parse_summary(H2LOAD_OUTPUT.replace("4.00s,", "750.5ms,"))["elapsed_s"] == pytest.approx(0.7505)
    with pytest.raises(ValueError, match="no requests, finished in, traffic"):
        h2load.parse_summary("connect to 127.0.0.1 port 1 failed")


def test_h2load_layout_spreads_in_flight_over_the_connections_asked_for() -> None:
    assert h2load.layout(64, 4) == (4, 16) and h2load.layout(64, 1) == (1, 64) and h2load.layout(1, 4) == (1, 1)
    with pytest.raises(ValueError, match="multiple of connections, got 6 over 4"):
        h2load.layout(6, 4)
    line = h2load.command("http://h/p", Path("b"), Path("l"), 4, 16, 2.5, rate_rps=1000)
    assert {"--clients=4", "--max-concurrent-streams=16", "--duration=2500ms", "--rps=250"} <= set(line)


def _results(**servers: list[dict]) -> dict:
    def runs(entries: list[dict]) -> list[dict]:
        return [{"client": "h2load", "rate_rps": None, "requests": 100, "cpu_us_per_request": 10.0,
                 "latency_ms": {"p50": entry.get("p50", 1.0)}, **entry} for entry in entries]

    found = {"ceiling": {"tiny": {"batch_64_rows_per_s": 1e6}, "large": {"batch_64_rows_per_s": 1000.0}},
             "servers": {name: {"status": "ran", "runs": runs(entries)} for name, entries in servers.items()}}
    found["servers"]["pytriton"] = {"status": "not run: nvidia-pytriton is not installed", "runs": []}
    return found


def test_targets_compare_runs_of_one_layout_and_say_why_one_was_skipped() -> None:
    tiny64 = {"model": "tiny", "concurrency": 64}
    results = _results(
        hotpath=[{**tiny64, "connections": 4, "throughput_rps": 30_000.0},
                 {**tiny64, "connections": 1, "throughput_rps": 20_000.0},
                 {"model": "tiny", "concurrency": 1, "connections": 1, "throughput_rps": 5000.0, "p50": 0.12},
                 {"model": "large", "concurrency": 64, "connections": 4, "throughput_rps": 900.0}],
        floor=[{**tiny64, "connections": 4, "throughput_rps": 100_000.0},
               {**tiny64, "connections": 1, "throughput_rps": 80_000.0}],
        naive=[{"model": "tiny", "concurrency": 1, "connections": 1, "throughput_rps": 4000.0, "p50": 0.2}],
    )
    rows = {(row["model"], row["connections"], row["peer"]): row for row in targets.evaluate(results)}
    assert len(rows) == len(targets.TARGETS)
    assert rows["tiny", 4, "floor"]["ratio"] == pytest.approx(0.30) and rows["tiny", 4, "floor"]["met"]
    assert rows["tiny", 1, "floor"]["ratio"] == pytest.approx(0.25) and rows["tiny", 1, "floor"]["met"] is False
    assert rows["tiny", 1, "naive"]["ratio"] == pytest.approx(0.6) and rows["tiny", 1, "naive"]["met"]
    assert rows["large", 4, "ceiling"]["ratio"] == pytest.approx(0.9) and rows["large", 4, "ceiling"]["met"]
    assert rows["tiny", 4, "pytriton"]["skipped"] == "pytriton not run: nvidia-pytriton is not installed"
    assert rows["medium", 4, "pytriton"]["ratio"] is None
    table = targets.format_targets(targets.evaluate(results))
    assert "NOT MET" in table and "skipped: pytriton not run" in table and "30,000/s" in table
    assert targets.cpu_per_request(results, 4) == {"hotpath": {"tiny": 10.0, "large": 10.0}, "floor": {"tiny": 10.0}}


def test_quick_plans_each_peer_only_what_a_target_compares() -> None:
    args = bench_run.parse_args(["--quick"])
    sweep = bench_run.scenario_list(args)
    extra = bench_run.layout_scenarios(args, sweep)
    plans = {name: [tuple(s) for s in bench_run.peer_scenarios(name, sweep, extra, quick=True)]
             for name in bench_run.SERVERS}
    assert plans["floor"] == [("tiny", 64, 4), ("tiny", 64, 1)]
    assert plans["pytriton"] == [("tiny", 64, 4), ("medium", 64, 4)]
    assert plans["naive"] == [("tiny", 1, 1)]
    assert plans["hotpath"] == [("tiny", 1, 1), ("tiny", 4, 4), ("tiny", 16, 4), ("tiny", 64, 4),
                                ("medium", 64, 4), ("large", 64, 4), ("tiny", 64, 1)]
    full = bench_run.parse_args(["--models", "tiny,medium"])
    sweep = bench_run.scenario_list(full)
    assert [tuple(s) for s in bench_run.peer_scenarios("floor", sweep, bench_run.layout_scenarios(full, sweep), False)] == [
        ("tiny", 1, 1), ("tiny", 4, 4), ("tiny", 16, 4), ("tiny", 64, 4), ("tiny", 64, 1)]


def test_procfs_reads_cpu_and_memory_of_a_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in procfs.process_tree(os.getpid())
        assert procfs.cpu_seconds(os.getpid()) >= procfs.cpu_seconds(os.getpid(), descendants=False) > 0
        found = procfs.memory(os.getpid())
        assert found["processes"] >= 2 and found["tree_rss_mib"] > found["rss_mib"] > 10
    finally:
        child.kill()
        child.wait()


def test_bare_session_memory_is_measured_in_its_own_process(repository: Path) -> None:
    assert 10 * 2**20 < bare_session_rss_bytes(repository / "medium" / "1" / "model.onnx") < 2**30


def test_a_server_that_dies_is_restarted_once_and_the_crash_recorded(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure, killed = bench_run.measure, []

    def dies_once_at_4(server, scenario, *rest, **options):
        if scenario.level == 4 and not killed:
            killed.append(server.process.pid)
            server.process.kill()
            server.process.wait()
            server.check_alive("during the test")
        return measure(server, scenario, *rest, **options)

    monkeypatch.setattr(bench_run, "measure", dies_once_at_4)
    args = bench_run.parse_args(["--duration", "0.2", "--warmup", "0"])
    plan = [bench_run.Scenario("tiny", 1, 1), bench_run.Scenario("tiny", 4, 4), bench_run.Scenario("tiny", 16, 4)]
    record = {"status": "ran", "runs": [], "crashes": []}
    bench_run.run_peer("naive", args, repository, tmp_path, plan, tmp_path / "naive", record)
    assert [run["concurrency"] for run in record["runs"]] == [1, 4, 16]
    assert [crash["scenario"] for crash in record["crashes"]] == [["tiny", 4, 4]]
    assert (tmp_path / "naive-restart1.log").exists()
    results = {"servers": {"naive": record, "hotpath": {**record, "runs": []}}}
    assert bench_run.failures(results) == ["hotpath crashed during ['tiny', 4, 4]"], "only hotpath's crash fails a run"


def test_pytriton_missing_is_named_with_its_install_command() -> None:
    python, why = pytriton_server.interpreter(Path("/nonexistent/python"))
    assert python is None and "nvidia-pytriton==0.7.0" in why and "/nonexistent/python" in why
    env = pytriton_server.interpreter_libdir_env({"LD_LIBRARY_PATH": "/elsewhere"})
    assert env["LD_LIBRARY_PATH"] == f"{sysconfig.get_config_var('LIBDIR')}:/elsewhere"


@requires_floor_build
def test_floor_answers_with_the_real_response_and_is_measured_without_checks(
    naive_server: ServerProcess, repository: Path, tmp_path: Path
) -> None:
    request = load.infer_request("tiny", load.input_rows("fixed", 16, 1, seed=0)[:1])
    canned = floor.canned_response("tiny", repository / "tiny" / "1" / "model.onnx", request)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_run, "FLOOR_CACHE", tmp_path / "cache")
        json_path = main(["--servers", "floor,pytriton", "--pytriton-python", "/nonexistent/python",
                          "--models", "tiny", "--concurrency", "1,64", "--duration", "0.5", "--warmup", "0.1",
                          "--ceiling-seconds", "0.1", "--out", str(tmp_path)])
        assert len(list((tmp_path / "cache").glob("canned_server-*"))) == 1
    with grpc.insecure_channel(naive_server.target) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert answer.SerializeToString() == canned, "the floor sends what a real server answers"
    results = json.loads(json_path.read_text())
    assert results["servers"]["pytriton"]["status"].startswith("not run: nvidia-pytriton")
    runs = results["servers"]["floor"]["runs"]
    assert [(run["concurrency"], run["connections"]) for run in runs] == [(1, 1), (64, 4), (64, 1)]
    for run in runs:
        assert run["requests"] > 100 and run["errors"] == {} and run["cpu_us_per_request"] > 0
        assert "skipped" in run["verification"] and run["server_stats"] == {}
    assert bench_run.failures(results) == []
    assert results["cpu_us_per_request_at_64"]["servers"]["floor"]["tiny"] > 0


@pytest.mark.skipif(pytriton_server.interpreter()[0] is None, reason="nvidia-pytriton not installed (optional)")
def test_pytriton_serves_the_bench_models_at_hotpaths_batching(repository: Path, tmp_path: Path) -> None:
    python, _ = pytriton_server.interpreter()
    port = free_port()
    command = bench_run.pytriton_command(python, repository, ["tiny"], port)
    with start_server("pytriton", command, tmp_path / "pytriton.log", port) as server:
        bench_run.wait_models_ready(server.target, ["tiny"])
        args = bench_run.parse_args(["--duration", "0.5", "--warmup", "0.2"])
        measured = bench_run.measure(server, bench_run.Scenario("tiny", 64, 4), args,
                                     cpu_session(repository / "tiny" / "1" / "model.onnx"))
    assert measured["requests"] > 100 and measured["errors"] == {}
    assert measured["server_stats"]["fail"] <= measured["cancelled_at_stop_max"] == 128, "Triton counts cancellations"
    assert measured["verification"] == {"checked": 64, "mismatched": 0, "errors": {}}
    assert max(int(size) for size in measured["server_stats"]["batch_size_executions"]) > 1


def test_server_process_reads_the_port_file_and_refuses_a_server_that_is_not_serving(
    repository: Path, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(repository), "--host",
               "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    with ServerProcess("hotpath", command, tmp_path / "good.log") as server:
        assert server.port_file.read_text() == f"{server.port}\n" and server.port > 0
        with grpc.insecure_channel(server.target) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    broken = tmp_path / "broken"
    (broken / "bad" / "1").mkdir(parents=True)
    (broken / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    command[command.index(str(repository))] = str(broken)
    with pytest.raises(RuntimeError, match="NOT_SERVING") as failure:
        ServerProcess("hotpath", command, tmp_path / "broken.log").start()
    assert "bad" in str(failure.value), "the error carries the server's log"
    with ServerProcess("hotpath", command, tmp_path / "tolerant.log", require_serving=False) as server:
        assert server.process.poll() is None


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench_run.plot({}, tmp_path / "run.png") is False
    assert compare.plot({}, tmp_path / "compare.png") is False
    assert not list(tmp_path.iterdir())
    assert capsys.readouterr().out.count("plot skipped: matplotlib is not installed") == 2
