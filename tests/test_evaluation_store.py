"""The evaluation store and job on real SQLite and PostgreSQL: round trips, late labels, retention, metrics per span."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics

from evaluation_stores import postgres, store_location  # noqa: F401
from hotpath._proto import model_config_pb2
from hotpath.evaluation.job import evaluate, suggest
from hotpath.evaluation.store import decode_tensors, encode_tensors, open_store

DAY = 86_400.0
NOW = 1_800_000_000.0


def _classifier_record(request_id: str, time_s: float, probs: np.ndarray, version: int = 1) -> tuple:
    features = np.full((len(probs), 2), 0.5, np.float32)
    label = np.argmax(probs, axis=1).astype(np.int64)
    tensors, data = encode_tensors([("x", "FP32", features)], [("label", "INT64", label), ("probabilities", "FP32", probs)])
    return ("m", request_id, version, time_s, len(probs), tensors, data)


def test_tensors_round_trip_every_kind() -> None:
    text = np.array(["a", "", "héllo"], dtype=object)
    tensors, data = encode_tensors([("x", "FP32", np.arange(6, dtype=np.float32).reshape(2, 3)), ("s", "BYTES", text)],
                                   [("y", "INT64", np.array([[7], [8]], np.int64)), ("b", "BOOL", np.array([True, False]))])
    inputs, outputs = decode_tensors(tensors, data)
    assert inputs["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert list(inputs["s"]) == [b"a", b"", "héllo".encode()]
    assert outputs["y"].tolist() == [[7], [8]] and outputs["b"].tolist() == [True, False]


def test_labels_attach_by_id_and_row_and_unknown_ids_are_returned(store_location: str) -> None:
    store = open_store(store_location)
    store.write_predictions([_classifier_record("a", NOW, np.array([[0.9, 0.1]], np.float32)),
                             _classifier_record("b", NOW, np.array([[0.2, 0.8], [0.6, 0.4]], np.float32))])
    store.write_predictions([_classifier_record("a", NOW + 1, np.array([[0.1, 0.9]], np.float32))])
    store.flush(force=True)
    unknown = store.attach_labels("m", [("a", 0, 0), ("b", 1, 1), ("b", 2, 1), ("zzz", 0, 1)], NOW)
    assert unknown == [("b", 2), ("zzz", 0)]
    assert store.attach_labels("m", [("a", 0, 1)], NOW) == []
    (first, second) = store.predictions("m")
    assert (first.request_id, first.labels, first.outputs["label"].tolist()) == ("a", [1], [0])
    assert (second.request_id, second.labels, second.rows) == ("b", [None, 1], 2)
    assert store.counts("m") == (2, 2)
    store.close()


def test_retention_by_age_and_by_size(store_location: str) -> None:
    store = open_store(store_location)
    records = [_classifier_record(f"r{i}", NOW - i * 3600, np.array([[0.5, 0.5]], np.float32)) for i in range(10)]
    for record in records:
        store.write_predictions([record])
        store.flush(force=True)
    store.attach_labels("m", [(f"r{i}", 0, 1) for i in range(10)], NOW)
    assert store.retain("m", NOW, max_age_s=7.5 * 3600) == 2
    files = sorted(Path(store_location, "m").glob("*.parquet"))
    size = max(f.stat().st_size for f in files) if files else len(records[0][6])
    assert store.retain("m", NOW, max_size_bytes=5 * size) == 3
    assert [p.request_id for p in store.predictions("m")] == ["r4", "r3", "r2", "r1", "r0"]
    assert store.counts("m") == (5, 5)
    store.close()


def test_accuracy_per_day_matches_sklearn_and_a_flipped_day_alerts(store_location: str) -> None:
    rng = np.random.default_rng(0)
    store = open_store(store_location)
    truth, predicted, labelled = {}, {}, {}
    records = []
    for day in range(7):
        for i in range(60):
            p = rng.uniform(0.05, 0.95)
            probs = np.array([[1 - p, p]], np.float32)
            request_id = f"d{day}-{i}"
            records.append(_classifier_record(request_id, NOW - 7 * DAY + day * DAY + i * 60, probs, version=1 + (day >= 5)))
            predicted[request_id] = int(p > 0.5)
            truth[request_id] = predicted[request_id] if rng.uniform() < 0.85 else 1 - predicted[request_id]
    tensors, data = encode_tensors([("x", "FP32", np.full((1, 2), 0.5, np.float32))], [("label", "INT64", np.array([1]))])
    records.append(("m", "cached-label-only", 2, NOW - 1, 1, tensors, data))
    store.write_predictions(records)
    store.flush(force=True)
    for request_id in truth:
        if not request_id.endswith("-7"):
            labelled[request_id] = truth[request_id]
    store.attach_labels("m", [(r, 0, v) for r, v in labelled.items()], NOW)
    config = model_config_pb2.ModelEvaluationConfig()
    result = evaluate(store, "m", config, NOW, 7 * DAY, DAY)
    assert result.task == "classification" and result.outputs == {"task": "classification", "prediction": "label", "probabilities": "probabilities"}
    assert [(s.version, s.rows, s.labelled) for s in result.spans] == [(1, 60, 59)] * 5 + [(2, 60, 59)] * 2
    for day, span in enumerate(result.spans):
        ids = [r for r in labelled if r.startswith(f"d{day}-")]
        y, y_hat = [labelled[r] for r in ids], [predicted[r] for r in ids]
        assert span.metrics["accuracy"] == pytest.approx(metrics.accuracy_score(y, y_hat))
        assert span.metrics["f1"] == pytest.approx(metrics.f1_score(y, y_hat))
        assert span.status == "ok"
    assert not result.alert
    store.attach_labels("m", [(r, 0, 1 - v) for r, v in labelled.items() if r.startswith("d4-")], NOW)
    flipped = evaluate(store, "m", config, NOW, 7 * DAY, DAY)
    assert flipped.alert and [s.status for s in flipped.spans] == ["ok"] * 4 + ["alert"] + ["ok"] * 2
    picks = suggest(store, "m", config, NOW - 7 * DAY, NOW, 3)
    assert len(picks) == 3 and all(request_id.endswith("-7") and reason == "margin" for request_id, _, reason, _ in picks)
    assert [m for _, _, _, m in picks] == sorted(m for _, _, _, m in picks)
    store.close()


def test_regression_reports_mae_and_rmse(store_location: str) -> None:
    store = open_store(store_location)
    values = np.linspace(0, 10, 40, dtype=np.float32)
    records = []
    for i, value in enumerate(values):
        tensors, data = encode_tensors([("x", "FP32", np.array([[value]]))], [("y", "FP32", np.array([[value]], np.float32))])
        records.append(("m", f"r{i}", 1, NOW - 100 + i, 1, tensors, data))
    store.write_predictions(records)
    store.flush(force=True)
    store.attach_labels("m", [(f"r{i}", 0, float(v) + (1.0 if i % 2 else -2.0)) for i, v in enumerate(values)], NOW)
    result = evaluate(store, "m", model_config_pb2.ModelEvaluationConfig(), NOW, 200, 200)
    (span,) = result.spans
    truth = [float(v) + (1.0 if i % 2 else -2.0) for i, v in enumerate(values)]
    assert result.task == "regression"
    assert span.metrics["mae"] == pytest.approx(metrics.mean_absolute_error(truth, values))
    assert span.metrics["rmse"] == pytest.approx(metrics.root_mean_squared_error(truth, values))
    store.close()


def test_suggestions_take_turns_between_uncertain_predictions_and_drifted_regions(store_location: str) -> None:
    from hotpath.drift.features import plan_features
    from hotpath.drift.reference import reference_from_arrays
    from hotpath.serving.config import TensorSpec
    from hotpath.serving.datatypes import DATATYPES

    rng = np.random.default_rng(1)
    specs = [TensorSpec("x", DATATYPES["FP32"], (2,))]
    plans = plan_features(specs, [], model_config_pb2.ModelDriftConfig(skip_outputs=True), "m")
    reference = reference_from_arrays("m", 1, plans, {"x": rng.standard_normal((5000, 2)).astype(np.float32)}, {})
    store = open_store(store_location)
    records = []
    for i in range(60):
        x = rng.standard_normal((1, 2)).astype(np.float32) + (6.0 if i % 10 == 3 else 0.0)
        p = 0.5 + 0.4 * rng.uniform() if i != 7 else 0.51
        tensors, data = encode_tensors([("x", "FP32", x)], [("label", "INT64", np.array([int(p > 0.5)])),
                                                            ("probabilities", "FP32", np.array([[1 - p, p]], np.float32))])
        records.append(("m", f"r{i}", 1, NOW - 100 + i, 1, tensors, data))
    store.write_predictions(records)
    store.flush(force=True)
    store.attach_labels("m", [("r13", 0, 1)], NOW)
    picks = suggest(store, "m", model_config_pb2.ModelEvaluationConfig(), NOW - 200, NOW, 6, reference)
    store.close()
    assert [reason for _, _, reason, _ in picks] == ["margin", "drift"] * 3
    assert picks[0][0] == "r7"
    assert {request_id for request_id, _, reason, _ in picks if reason == "drift"} <= {"r3", "r23", "r33", "r43", "r53"}


def test_parquet_labels_read_only_the_row_groups_that_may_hold_their_ids(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pip install pyarrow for the default Parquet store")
    from hotpath.evaluation.parquet import ROW_GROUP_ROWS, ParquetStore

    store = open_store(tmp_path / "store")
    assert isinstance(store, ParquetStore)
    per_segment = 3 * ROW_GROUP_ROWS
    for segment in range(3):
        store.write_predictions([_classifier_record(f"p-{10_000 + segment * per_segment + i}", NOW + segment, np.array([[0.5, 0.5]], np.float32))
                                 for i in range(per_segment)])
        store.flush(force=True)
    wanted = ["p-10005", f"p-{10_000 + per_segment + ROW_GROUP_ROWS + 7}", f"p-{10_000 + 3 * per_segment - 1}"]
    chosen = [ParquetStore._groups_holding(pq.ParquetFile(path).metadata, sorted(wanted)) for _, _, path in store._files("m")]
    assert chosen == [[0], [1], [2]]
    unknown = store.attach_labels("m", [(request_id, 0, 1) for request_id in wanted] + [("p-9", 0, 1), ("p-10005", 1, 0)], NOW)
    assert unknown == [("p-9", 0), ("p-10005", 1)]
    assert store.counts("m") == (3 * per_segment, 3)
    store.close()


def test_parquet_small_segments_merge_and_a_killed_merge_is_finished(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="pip install pyarrow for the default Parquet store")
    store = open_store(tmp_path / "store")
    for segment in range(5):
        store.write_predictions([_classifier_record(f"s{segment}-{i}", NOW + segment * 60 + i, np.array([[0.2, 0.8]], np.float32))
                                 for i in range(3)])
        store.flush(force=True)
    store.attach_labels("m", [("s0-0", 0, 1), ("s4-2", 0, 0)], NOW)
    before = [(p.request_id, p.time_s, p.labels) for p in store.predictions("m")]
    originals = {path.name: path.read_bytes() for _, _, path in store._files("m")}
    assert len(originals) == 5

    assert store.compact("m") == 5
    assert len(store._files("m")) == 1 and store.compact("m") == 0
    assert [(p.request_id, p.time_s, p.labels) for p in store.predictions("m")] == before

    name, data = next(iter(originals.items()))
    (tmp_path / "store" / "m" / name).write_bytes(data)
    assert store.counts("m") == (15, 2), "a file a killed merge left behind is read once"
    store.compact("m")
    assert not (tmp_path / "store" / "m" / name).exists() and len(store._files("m")) == 1
    assert store.attach_labels("m", [("s2-1", 0, 1)], NOW) == []
    store.close()


def test_parquet_full_segments_are_not_merged_however_small_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyarrow", reason="pip install pyarrow for the default Parquet store")
    from hotpath.evaluation import parquet

    store = open_store(tmp_path / "store")
    tensors, data = encode_tensors([("x", "FP32", np.full((1, 256), 0.5, np.float32))], [("y", "FP32", np.ones((1, 1), np.float32))])
    for segment in range(3):
        store.write_predictions([("m", f"s{segment}-{i}", 1, NOW + segment, 1, tensors, data) for i in range(2000)])
        store.flush(force=True)
    files = [path for _, _, path in store._files("m")]
    monkeypatch.setattr(parquet, "MERGE_BELOW_BYTES", 2000 * len(data) // 2)
    assert all(path.stat().st_size < parquet.MERGE_BELOW_BYTES for path in files), "repeated inputs are dictionary-encoded on disk"
    assert store.compact("m") == 0 and [path for _, _, path in store._files("m")] == files
    store.close()
