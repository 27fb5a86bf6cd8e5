"""Container-friendly serving: every `hotpath serve` flag from its HOTPATH_* variable, JSON log lines,
liveness apart from readiness, and `hotpath health` as a probe, on real servers."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hotpath.cli import build_parser, main
from hotpath.cli.environment import resolve_environment, variable_name
from models import add_sub_model, identity_model
from test_security import credentials, make_authority


def _serve_parser() -> argparse.ArgumentParser:
    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices["serve"]


def _parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    resolve_environment(args)
    return args


def _health(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotpath.cli", "health", "--port", str(server.port), *args],
                          capture_output=True, text=True, timeout=30)


def test_every_serve_flag_names_its_variable_derived_from_the_flag():
    options = [max(action.option_strings, key=len) for action in _serve_parser()._actions
               if action.option_strings and action.dest != "help"]
    assert len(options) >= 18
    for action in _serve_parser()._actions:
        if action.dest != "help":
            assert f"[env {variable_name(max(action.option_strings, key=len))}]" in action.help
    assert variable_name("--model-repository") == "HOTPATH_MODEL_REPOSITORY"


def test_variables_set_serve_flags_and_flags_beat_them(monkeypatch):
    for variable, value in {"HOTPATH_PORT": "9001", "HOTPATH_MODEL_REPOSITORY": "/models", "HOTPATH_GRACE_S": "30",
                            "HOTPATH_MAX_MESSAGE_SIZE": "1MiB", "HOTPATH_PIN_THREADS": "yes", "HOTPATH_NO_TRACE": "1",
                            "HOTPATH_LOG_FORMAT": "json", "HOTPATH_HOST": "0.0.0.0"}.items():
        monkeypatch.setenv(variable, value)
    args = build_parser().parse_args(["serve", "--port", "7000"])
    assert (args.port, args.model_repository, args.grace_s, args.max_message_size) == (7000, Path("/models"), 30.0, 1 << 20)
    assert (args.pin_threads, args.tracing, args.log_format, args.host, args.require_gpu) == (True, False, "json", "0.0.0.0", False)
    monkeypatch.setenv("HOTPATH_PIN_THREADS", "0")
    assert build_parser().parse_args(["serve"]).pin_threads is False
    monkeypatch.setenv("HOTPATH_MODEL_CONTROL_ALLOW_IDENTITY", "deployer 'CN=ops team'")
    assert _parse(["serve"]).allowed_identities == ["deployer", "CN=ops team"]
    assert _parse(["serve", "--model-control-allow-identity", "x", "--model-control-allow-identity", "y"]).allowed_identities == ["x", "y"]


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("HOTPATH_PORT", "80a", "expected an integer"),
    ("HOTPATH_DRAIN_S", "soon", "expected a number"),
    ("HOTPATH_PIN_THREADS", "maybe", "must be one of 1, on, true, yes or 0, false, no, off"),
    ("HOTPATH_LOG_LEVEL", "LOUD", "must be one of DEBUG, INFO, WARNING, ERROR"),
    ("HOTPATH_CACHE_SIZE", "12XB", "invalid size '12XB'"),
])
def test_a_bad_variable_fails_naming_it_unless_its_flag_is_given(monkeypatch, capsys, variable, value, reason):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    assert f"environment variable {variable}={value!r} is invalid: {reason}" in capsys.readouterr().err
    flag = "--" + variable.removeprefix("HOTPATH_").lower().replace("_", "-")
    given = {"--pin-threads": [flag], "--log-level": [flag, "INFO"]}.get(flag, [flag, "1"])
    assert build_parser().parse_args(["serve", *given]) is not None


def test_liveness_stays_serving_while_readiness_follows_models_and_the_drain(tmp_path, start_server):
    identity_model(tmp_path)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    server = start_server(tmp_path, env={"HOTPATH_LOG_FORMAT": "json", "HOTPATH_DRAIN_S": "3"})
    ready, live = _health(server), _health(server, "--service", "liveness")
    assert (ready.returncode, live.returncode) == (1, 0), (ready, live)
    assert ready.stdout.strip() == f"127.0.0.1:{server.port} readiness (''): NOT_SERVING"
    assert live.stdout.strip() == f"127.0.0.1:{server.port} 'liveness': SERVING"
    assert _health(server, "--service", "identity").returncode == 0
    assert _health(server, "--service", "broken").returncode == 1
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert _health(server, "--service", "identity").returncode == 1
    assert _health(server, "--service", "liveness").returncode == 0
    assert server.proc.wait(timeout=30) == 0
    lines = [json.loads(line) for line in server.output().splitlines()]
    assert {line["level"] for line in lines} >= {"INFO", "ERROR"}
    assert any("draining for 3 s" in line["message"] for line in lines)
    assert all(set(line) >= {"time", "level", "role", "logger", "message"} for line in lines)


def test_health_without_a_server_fails_saying_why():
    run = subprocess.run([sys.executable, "-m", "hotpath.cli", "health", "--port", "1", "--timeout-s", "1"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert run.stderr.startswith("hotpath health: 127.0.0.1:1 readiness (''): UNAVAILABLE")


def test_health_speaks_mutual_tls_which_kubernetes_grpc_probes_cannot(tmp_path, start_server):
    pki = make_authority(tmp_path / "pki", "health")
    add_sub_model(tmp_path / "models")
    server = start_server(tmp_path / "models", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                          "--tls-client-ca", str(pki.ca.cert), credentials=credentials(pki.ca, pki.admin))
    tls = ["--tls-ca", str(pki.ca.cert), "--tls-client-cert", str(pki.admin.cert), "--tls-client-key", str(pki.admin.key)]
    checked = _health(server, *tls, "--tls-server-name", "localhost", "--service", "liveness")
    assert checked.returncode == 0 and checked.stdout.strip().endswith("'liveness': SERVING"), checked
    assert _health(server, *tls).returncode == 0
    assert _health(server, "--timeout-s", "2").returncode == 1, "plaintext to a TLS port"
    assert _health(server, *tls[:2], "--timeout-s", "2").returncode == 1, "no client certificate"
    misused = _health(server, *tls[:4])
    assert (misused.returncode, misused.stderr.strip()) == (2, "hotpath health: --tls-client-cert and --tls-client-key go together")
