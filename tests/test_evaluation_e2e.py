"""End to end: a scikit-learn classifier served with its prediction log on, traffic over gRPC, labels attached
later over gRPC and with `hotpath label`, `hotpath evaluate` checked against scikit-learn; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sklearn import metrics
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from evaluation_stores import postgres, store_location  # noqa: F401
from models import identity_model
from hotpath._proto import evaluation_pb2, evaluation_pb2_grpc
from hotpath._proto import grpc_service_pb2 as pb
from hotpath._proto import grpc_service_pb2_grpc
from hotpath.evaluation.store import Store, open_store

SPAN_S = 3.0
"""Each burst of traffic gets a span of its own; the bursts take well under a second."""
BURSTS = 3
SINGLE = 45
UNNAMED = 3


def classifier_repository(repo: Path, store: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """A logistic regression on scikit-learn's bundled breast cancer data, as ONNX (outputs `label`, `probabilities`),
    in `repo` as model `cancer` logging every request to `store` (empty: the default Parquet store)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[::2], y[::2])
    onnx_model = to_onnx(model, initial_types=[("features", FloatTensorType([None, x.shape[1]]))], options={"zipmap": False},
                         target_opset={"": 17, "ai.onnx.ml": 3})
    (repo / "cancer" / "1").mkdir(parents=True)
    (repo / "cancer" / "1" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    store_line = f' store: "{store}"' if store else ""
    (repo / "cancer" / "config.pbtxt").write_text(f'name: "cancer"\nmax_batch_size: 64\nevaluation {{ sample_rate: 1.0{store_line} }}\n')
    return repo / "cancer", x, y


def _request(rows: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="cancer", id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(np.ascontiguousarray(rows, np.float32).tobytes())
    return request


def _labels(response: pb.ModelInferResponse) -> list[int]:
    index = [o.name for o in response.outputs].index("label")
    return np.frombuffer(response.raw_output_contents[index], np.int64).tolist()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _hotpath(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hotpath.cli", *args], capture_output=True, text=True, timeout=120)


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def test_logged_predictions_late_labels_and_quality_per_span(tmp_path: Path, start_server, store_location: str) -> None:
    default_store = not store_location.startswith("postgresql://") and not store_location.endswith(".sqlite")
    repo = tmp_path / "repo"
    model_dir, x, y = classifier_repository(repo, "" if default_store else store_location)
    server = start_server(repo)
    channel = grpc.insecure_channel(server.url)
    infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    attach = evaluation_pb2_grpc.EvaluationStub(channel).AttachLabels

    # Each burst: single-row requests with ids, some without (the server names them), one 4-row request.
    predicted: dict[tuple[str, int], int] = {}
    truth: dict[tuple[str, int], int] = {}
    bursts: list[list[tuple[str, int]]] = []
    start = math.ceil(time.time()) + 1.0
    for burst in range(BURSTS):
        _sleep_until(start + burst * SPAN_S + 0.3)
        keys = []
        base = burst * 60
        for i in range(SINGLE + UNNAMED):
            row = base + i
            response = infer(_request(x[row:row + 1], f"s{burst}-{i}" if i < SINGLE else ""), timeout=10)
            assert response.id, "a logged request without an id gets one from the server"
            if i < SINGLE:
                assert response.id == f"s{burst}-{i}"
            keys.append((response.id, 0))
            predicted[(response.id, 0)], truth[(response.id, 0)] = _labels(response)[0], int(y[row])
        rows = x[base + 50:base + 54]
        response = infer(_request(rows, f"b{burst}"), timeout=10)
        for r, label in enumerate(_labels(response)):
            keys.append((f"b{burst}", r))
            predicted[(f"b{burst}", r)], truth[(f"b{burst}", r)] = label, int(y[base + 50 + r])
        assert time.time() < start + (burst + 1) * SPAN_S - 0.3, "a burst overran its span; the machine is too loaded"
        bursts.append(keys)
    until = start + BURSTS * SPAN_S
    _sleep_until(until)

    # Labels, late: burst 0 over gRPC, bursts 1 and 2 with `hotpath label`; the last 5 rows of each stay unlabelled.
    labelled = {key: truth[key] for keys in bursts for key in keys[:-5]}
    sent = [evaluation_pb2.Label(id=key[0], row=key[1], int_value=labelled[key]) for key in bursts[0][:-5]]
    sent += [evaluation_pb2.Label(id="nobody-sent-this", int_value=1), evaluation_pb2.Label(id="s0-0", row=3, int_value=1)]
    answer = attach(evaluation_pb2.AttachLabelsRequest(model_name="cancer", labels=sent), timeout=30)
    assert (answer.attached, answer.unknown, list(answer.unknown_ids)) == (len(sent) - 2, 2, ["nobody-sent-this", "s0-0"])
    with pytest.raises(grpc.RpcError) as missing:
        attach(evaluation_pb2.AttachLabelsRequest(model_name="no_such_model", labels=sent[:1]), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("id,row,label\n" + "".join(f"{key[0]},{key[1]},{labelled[key]}\n" for key in bursts[1][:-5]) + "ghost,0,1\n")
    jsonl_file = tmp_path / "labels.jsonl"
    jsonl_file.write_text("".join(json.dumps({"id": key[0], "row": key[1], "label": labelled[key]}) + "\n" for key in bursts[2][:-5]))
    common = ["--model", "cancer", "--model-repository", str(repo)]
    done = _hotpath("label", str(csv_file), *common)
    assert done.returncode == 1 and f"{len(bursts[1]) - 5} label(s) attached, 1 unknown id(s)" in done.stdout and "unknown: ghost" in done.stdout, done
    done = _hotpath("label", str(jsonl_file), *common)
    assert done.returncode == 0, done

    window = ["--last", f"{BURSTS * SPAN_S:g}s", "--span", f"{SPAN_S:g}s", "--until", _iso(until), "--min-labels", "20"]
    result_file = tmp_path / "result.json"
    (tmp_path / "drift.html").write_text("<html>a hotpath drift report</html>")
    done = _hotpath("evaluate", *common, *window, "--json", str(result_file), "--report", str(tmp_path / "report.html"),
                    "--drift-report", str(tmp_path / "drift.html"))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(result_file.read_text())
    assert len(result["spans"]) == BURSTS
    for keys, span in zip(bursts, result["spans"]):
        rows = [key for key in keys if key in labelled]
        assert (span["rows"], span["labelled"], span["status"]) == (len(keys), len(rows), "ok")
        assert span["metrics"]["accuracy"] == pytest.approx(metrics.accuracy_score([truth[k] for k in rows], [predicted[k] for k in rows]))
    page = (tmp_path / "report.html").read_text()
    assert "Quality report: cancer" in page and '<iframe src="drift.html"' in page

    flipped = tmp_path / "flipped.csv"
    flipped.write_text("id,row,label\n" + "".join(f"{key[0]},{key[1]},{1 - labelled[key]}\n" for key in bursts[2][:-5]))
    assert _hotpath("label", str(flipped), *common).returncode == 0
    done = _hotpath("evaluate", *common, *window, "--json", str(result_file), "--no-report")
    assert done.returncode == 1, done.stdout + done.stderr
    assert [s["status"] for s in json.loads(result_file.read_text())["spans"]] == ["ok", "ok", "alert"]
    assert "ALERT" in done.stdout

    suggestions = tmp_path / "suggest.csv"
    done = _hotpath("evaluate", *common, *window, "--suggest", "4", "--output", str(suggestions))
    assert done.returncode == 0, done.stderr
    picked = [line.split(",") for line in suggestions.read_text().splitlines()[1:]]
    unlabelled = {key for keys in bursts for key in keys[-5:]}
    assert len(picked) == 4 and all((r, int(row)) in unlabelled and reason == "margin" for r, row, reason, _ in picked)

    # A server killed mid-traffic leaves a readable store holding everything written before.
    sent_late = []

    def traffic() -> None:
        for i in range(10_000):
            try:
                infer(_request(x[i % len(x):i % len(x) + 1], f"late-{i}"), timeout=10)
            except grpc.RpcError:
                return
            sent_late.append(i)

    sender = threading.Thread(target=traffic)
    sender.start()
    while len(sent_late) < 50:
        time.sleep(0.01)
    time.sleep(Store.drain_interval_s * 3)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    sender.join()
    location = str(model_dir / "evaluation" / "store") if default_store else store_location
    if location.endswith(".sqlite"):
        with sqlite3.connect(location) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = open_store(location)
    logged, labels = store.counts("cancer")
    store.close()
    # SQL stores commit every Store.drain_interval_s; the Parquet store writes a segment file every SEGMENT_S, so a kill may lose one.
    written_before = BURSTS * (SINGLE + UNNAMED + 1) + (0 if default_store else 50)
    assert written_before <= logged <= BURSTS * (SINGLE + UNNAMED + 1) + len(sent_late)
    assert labels == len(labelled)


def test_a_full_log_drops_from_the_log_not_from_inference_and_says_so(tmp_path: Path, start_server) -> None:
    pytest.importorskip("pyarrow", reason="pip install pyarrow for the default Parquet store")
    repo = tmp_path / "repo"
    model_dir, x, _ = classifier_repository(repo, "")
    identity_model(repo)
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace("sample_rate: 1.0", "sample_rate: 1.0 queue_size: 1"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    server = start_server(repo, "--metrics-port", str(metrics_port))
    channel = grpc.insecure_channel(server.url)
    infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    sent = 300
    futures = [infer.future(_request(x[i % len(x):i % len(x) + 1], f"q{i}"), timeout=30) for i in range(sent)]
    assert all(len(_labels(f.result())) == 1 for f in futures)
    with pytest.raises(grpc.RpcError) as not_logged:
        evaluation_pb2_grpc.EvaluationStub(channel).AttachLabels(evaluation_pb2.AttachLabelsRequest(
            model_name="identity", labels=[evaluation_pb2.Label(id="q0", int_value=1)]), timeout=10)
    assert not_logged.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "evaluation" in not_logged.value.details()
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    (answer,) = reflection(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    assert "hotpath.evaluation.Evaluation" in {s.name for s in answer.list_services_response.service}

    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("hotpath_evaluation_")}
        logged = values['hotpath_evaluation_logged_total{model="cancer"}']
        dropped = values['hotpath_evaluation_dropped_total{model="cancer",reason="queue_full"}']
        if logged + dropped == sent or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert dropped > 0 and logged > 0 and logged + dropped == sent
    assert values['hotpath_evaluation_dropped_total{model="cancer",reason="store_error"}'] == 0


def test_text_inputs_and_batches_of_every_size_are_stored_whole(tmp_path: Path, start_server) -> None:
    pytest.importorskip("pyarrow", reason="pip install pyarrow for the default Parquet store")
    from drift_models import make_data, make_model
    from hotpath_client._tensors import infer_request

    repo = tmp_path / "repo"
    model_dir = make_model(repo, drift="enable: false")
    (model_dir / "config.pbtxt").write_text((model_dir / "config.pbtxt").read_text() + "evaluation { }\n")
    server = start_server(repo)
    channel = grpc.insecure_channel(server.url)
    infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    data = make_data(40, seed=3)
    sent = {}
    start = 0
    for i, rows in enumerate([1, 3, 1, 2, 5, 1, 1, 4] * 2):
        batch = {"x": data["x"][start:start + rows], "city": data["city"][start:start + rows]}
        request = pb.ModelInferRequest.FromString(infer_request("tabular", batch, None, "", f"t{i}").SerializeToString())
        response = infer(request, timeout=10)
        sent[f"t{i}"] = (batch, np.frombuffer(response.raw_output_contents[[o.name for o in response.outputs].index("score")], np.float32))
        start = (start + rows) % 30
    answer = evaluation_pb2_grpc.EvaluationStub(channel).AttachLabels(
        evaluation_pb2.AttachLabelsRequest(model_name="tabular", labels=[evaluation_pb2.Label(id="t1", row=2, number_value=0.5)]), timeout=30)
    assert answer.attached == 1
    assert server.stop() == 0
    store = open_store(model_dir / "evaluation" / "store")
    stored = {p.request_id: p for p in store.predictions("tabular")}
    store.close()
    assert sorted(stored) == sorted(sent)
    for request_id, (batch, score) in sent.items():
        prediction = stored[request_id]
        assert prediction.rows == len(batch["x"]) and prediction.version == 1
        assert np.array_equal(prediction.inputs["x"], batch["x"]) and list(prediction.inputs["city"]) == list(batch["city"])
        assert np.array_equal(prediction.outputs["score"].ravel(), score)
    assert stored["t1"].labels == [None, None, 0.5]


def test_many_servers_share_one_postgresql_store(tmp_path: Path, start_server, postgres) -> None:
    url = postgres.database()
    servers, stubs = [], []
    for name in ("a", "b"):
        _, x, y = classifier_repository(tmp_path / name, url)
        servers.append(start_server(tmp_path / name))
        channel = grpc.insecure_channel(servers[-1].url)
        stubs.append((grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer,
                      evaluation_pb2_grpc.EvaluationStub(channel).AttachLabels))
    ids = {}
    for i in range(40):
        infer = stubs[i % 2][0]
        response = infer(_request(x[i:i + 1], ""), timeout=10)
        ids[response.id] = int(y[i])
    assert len(ids) == 40
    labels = [evaluation_pb2.Label(id=request_id, int_value=label) for request_id, label in ids.items()]
    for _, attach in stubs:  # each server answers once it has written what it logged
        attach(evaluation_pb2.AttachLabelsRequest(model_name="cancer", labels=labels[:1]), timeout=30)
    answer = stubs[0][1](evaluation_pb2.AttachLabelsRequest(model_name="cancer", labels=labels), timeout=30)
    assert (answer.attached, answer.unknown) == (40, 0), "server a labels what server b logged"
    done = _hotpath("evaluate", "--model", "cancer", "--store", url, "--last", "1h", "--span", "1h", "--min-labels", "10",
                    "--json", "-", "--no-report")
    assert done.returncode == 0, done.stdout + done.stderr
    (span,) = json.loads(done.stdout[done.stdout.index("{"):])["spans"]
    assert (span["rows"], span["labelled"]) == (40, 40)
