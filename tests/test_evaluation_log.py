"""The prediction log's paths through a real server: batches that stack (wholly or partly sampled), batches of
requests with unequal rows, BYTES tensors, a model without a batch dimension, and answers from the response
cache; each logged request must read back from the store as it was sent and answered."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from models import _model, _save, add_sub_model, string_cast_model
from hotpath.evaluation.store import default_store_path, open_store

pytest.importorskip("pyarrow", reason="pip install pyarrow for the default Parquet store")

BATCHED = 'name: "{name}"\nmax_batch_size: 8\ndynamic_batching {{ max_queue_delay_microseconds: 20000 }}\n' \
          'evaluation {{ sample_rate: {rate} }}\n{extra}'


def _add_sub_inputs(x: np.ndarray, y: np.ndarray) -> list:
    inputs = [grpcclient.InferInput(n, list(x.shape), "FP32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    return inputs


def _send_together(url: str, model: str, requests: list[tuple[str, list]]) -> dict[str, grpcclient.InferResult]:
    """Send (id, inputs) requests at once, so that the server batches them; returns each answer by id."""
    def send(item: tuple[str, list]) -> tuple[str, grpcclient.InferResult]:
        with grpcclient.InferenceServerClient(url) as client:
            return item[0], client.infer(model, item[1], request_id=item[0])

    with ThreadPoolExecutor(len(requests)) as pool:
        return dict(pool.map(send, requests))


def _logged(repo: Path, model: str) -> dict:
    store = open_store(default_store_path(repo / model))
    try:
        return {p.request_id: p for p in store.predictions(model)}
    finally:
        store.close()


def test_every_logging_path_stores_what_was_sent_and_answered(tmp_path: Path, start_server) -> None:
    add_sub_model(tmp_path, "halves", config=BATCHED.format(name="halves", rate=0.5, extra=""))
    add_sub_model(tmp_path, "cached", config=BATCHED.format(name="cached", rate=1.0, extra="response_cache { enable: true }\n"))
    string_cast_model(tmp_path, "texts", config=BATCHED.format(name="texts", rate=1.0, extra=""))
    _save(_model([helper.make_node("Identity", ["X"], ["Y"])], [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])]),
          tmp_path, "whole", config='name: "whole"\nmax_batch_size: 0\nevaluation { }\n')
    server = start_server(tmp_path, "--cache-size", "1MiB")
    rng = np.random.default_rng(7)

    sent = {}
    one_row = [(f"one-{i}", rng.random((1, 16), np.float32), rng.random((1, 16), np.float32)) for i in range(48)]
    mixed = [(f"mixed-{i}", rng.random((1 + i % 3, 16), np.float32), rng.random((1 + i % 3, 16), np.float32)) for i in range(24)]
    for wave in (one_row, mixed):
        answers = _send_together(server.url, "halves", [(rid, _add_sub_inputs(x, y)) for rid, x, y in wave])
        sent.update({rid: (x, y, answers[rid]) for rid, x, y in wave})

    x, y = rng.random((1, 16), np.float32), rng.random((1, 16), np.float32)
    with grpcclient.InferenceServerClient(server.url) as client:
        cached = {rid: client.infer("cached", _add_sub_inputs(x, y), request_id=rid) for rid in ("first", "from-cache")}
        partial = [client.infer("cached", _add_sub_inputs(x, y), request_id=rid, outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
                   for rid in ("sum", "sum-from-cache")][1]
        texts = np.array([[b"1.5", b"2"], [b"-3", b"4e2"]], dtype=object)
        text_inputs = [grpcclient.InferInput("X", [2, 2], "BYTES")]
        text_inputs[0].set_data_from_numpy(texts)
        text_answer = client.infer("texts", text_inputs, request_id="texts-1")
        whole_inputs = [grpcclient.InferInput("X", [2, 3], "FP32")]
        whole_inputs[0].set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
        whole_answer = client.infer("whole", whole_inputs, request_id="whole-1")
        cache_hits = client.get_inference_statistics("cached").model_stats[0].inference_stats.cache_hit.count
    assert server.stop() == 0, server.output()

    halves = _logged(tmp_path, "halves")
    assert set(halves) <= set(sent) and 10 < len([r for r in halves if r.startswith("one-")]) < 38, sorted(halves)
    assert any(r.startswith("mixed-") for r in halves)
    for rid, prediction in halves.items():
        x_sent, y_sent, answer = sent[rid]
        assert prediction.rows == len(x_sent)
        np.testing.assert_array_equal(prediction.inputs["INPUT0"], x_sent)
        np.testing.assert_array_equal(prediction.inputs["INPUT1"], y_sent)
        np.testing.assert_array_equal(prediction.outputs["OUTPUT0"], answer.as_numpy("OUTPUT0"))
        np.testing.assert_array_equal(prediction.outputs["OUTPUT1"], answer.as_numpy("OUTPUT1"))

    assert cache_hits == 2
    logged_cached = _logged(tmp_path, "cached")
    assert set(logged_cached) == {"first", "from-cache", "sum", "sum-from-cache"}
    for rid, answer in cached.items():
        np.testing.assert_array_equal(logged_cached[rid].inputs["INPUT0"], x)
        np.testing.assert_array_equal(logged_cached[rid].outputs["OUTPUT1"], answer.as_numpy("OUTPUT1"))
    assert set(logged_cached["sum"].outputs) == {"OUTPUT0", "OUTPUT1"}, "a run logs every output the model computed"
    assert set(logged_cached["sum-from-cache"].outputs) == {"OUTPUT0"}, "a cached answer logs the outputs it carries"
    np.testing.assert_array_equal(logged_cached["sum-from-cache"].outputs["OUTPUT0"], partial.as_numpy("OUTPUT0"))

    logged_texts = _logged(tmp_path, "texts")["texts-1"]
    assert logged_texts.inputs["X"].tolist() == texts.tolist()
    np.testing.assert_array_equal(logged_texts.outputs["Y"], text_answer.as_numpy("Y"))

    logged_whole = _logged(tmp_path, "whole")["whole-1"]
    assert logged_whole.rows == 1
    np.testing.assert_array_equal(logged_whole.outputs["Y"], whole_answer.as_numpy("Y"))
