"""The offline drift job on windows recorded from seeded synthetic traffic: metrics, rules, spans, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from drift_models import CITIES, make_data, make_model, predict, record, save_npz, tensor_specs
from hotpath._proto import model_config_pb2
from hotpath.drift import DriftRecorder
from hotpath.drift.cli import main
from hotpath.drift.features import plan_features
from hotpath.drift.distances import distances
from hotpath.drift.job import load_thresholds, run_job
from hotpath.drift.recorder import DriftRecorder as Recorder
from hotpath.drift.reference import build_reference, load_reference, save_reference

REFERENCE_ROWS = 5000
TRAFFIC_ROWS = 3000


@pytest.fixture()
def repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    model_dir = make_model(repository)
    data = save_npz(tmp_path / "reference.npz", make_data(REFERENCE_ROWS, seed=1))
    save_reference(build_reference(repository, "tabular", data), model_dir)
    return repository


def serve(repository: Path, data: dict[str, np.ndarray]) -> Path:
    """Record `data` (and the model's predictions on it) as the server would; return the window dir."""
    model_dir = repository / "tabular"
    config = text_format.Parse("enable: true", model_config_pb2.ModelDriftConfig())
    recorder = DriftRecorder.create("tabular", 1, model_dir, config, *tensor_specs())
    record(recorder, data, predict(model_dir, data))
    recorder.close()
    return model_dir / "drift" / "windows"


def job(repository: Path, **options):
    model_dir = repository / "tabular"
    return run_job(load_reference(model_dir / "drift" / "reference.json"), model_dir / "drift" / "windows", **options)


def flagged(result) -> set[str]:
    return {f.name for f in result.spans[-1].features if f.status in ("alert", "warn")}


def test_same_distribution_raises_nothing(repository: Path) -> None:
    serve(repository, make_data(TRAFFIC_ROWS, seed=2))
    result = job(repository)
    [span] = result.spans
    assert span.status == "ok" and not result.alert
    assert {f.status for f in span.features} == {"ok"}
    assert all(f.metrics is not None for f in span.features)


def test_half_sigma_shift_is_flagged_on_that_feature_only(repository: Path) -> None:
    serve(repository, make_data(TRAFFIC_ROWS, seed=2, shift=0.5, shifted_feature=2))
    result = job(repository)
    assert flagged(result) == {"x[2]"} and result.alert
    shifted = result.spans[-1].features[0]
    assert shifted.name == "x[2]" and shifted.drifted and not shifted.quality
    assert shifted.metrics["ks"] > shifted.limits["ks"] and shifted.metrics["ks"] <= shifted.metrics["ks_bound"]
    assert result.spans[-1].drifted == {"input": [1, 5], "output": [0, 2]}
    assert result.spans[-1].reasons[-1] == "1 of 5 inputs drift (at least 10%)"


def test_alert_share_decides_whether_one_drifting_feature_alerts_the_model(repository: Path) -> None:
    serve(repository, make_data(TRAFFIC_ROWS, seed=2, shift=0.4, shifted_feature=2))
    result = job(repository, alert_share=0.5)
    shifted = result.spans[-1].features[0]
    assert flagged(result) == {"x[2]"} and shifted.status == "warn" and not shifted.severe
    assert result.spans[-1].status == "warn" and not result.alert


def test_nan_in_one_feature_trips_the_data_quality_rule(repository: Path) -> None:
    data = make_data(TRAFFIC_ROWS, seed=2)
    data["x"][::300, 1] = np.nan
    serve(repository, data)
    result = job(repository, alert_share=1.0)
    feature = next(f for f in result.spans[-1].features if f.name == "x[1]")
    assert {f.name for f in result.spans[-1].features if f.quality} == {"x[1]", "score[0]"}
    assert feature.quality == ["nan"] and feature.status == "alert"
    assert "10 of 3000 values" in feature.findings[0] and result.alert


def test_unseen_category_is_reported(repository: Path) -> None:
    serve(repository, make_data(TRAFFIC_ROWS, seed=2, cities=CITIES))
    result = job(repository)
    city = next(f for f in result.spans[-1].features if f.name == "city")
    assert city.quality == ["unseen"] and "not among the reference's categories" in city.findings[0]
    assert "city" in flagged(result)


def test_small_span_is_too_small_not_drift(repository: Path) -> None:
    serve(repository, make_data(200, seed=2, shift=3.0, shifted_feature=0))
    result = job(repository)
    x0 = next(f for f in result.spans[-1].features if f.name == "x[0]")
    assert x0.status == "alert" and x0.quality == ["out_of_range"] and x0.metrics is None
    x1 = next(f for f in result.spans[-1].features if f.name == "x[1]")
    assert x1.status == "too_small" and "fewer than min_count 1000" in x1.findings[0]


def test_per_feature_threshold_override(repository: Path, tmp_path: Path) -> None:
    serve(repository, make_data(TRAFFIC_ROWS, seed=2, shift=0.5, shifted_feature=2))
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"features": {"x[2]": {"ks": 0.5, "d1": 1.0, "psi_alert": 1.0, "psi_warn": 1.0, "js": 0.5}}}))
    result = job(repository, thresholds=load_thresholds(path))
    assert flagged(result) == set() and result.spans[-1].status == "ok"


def test_sliding_spans_follow_drift_over_time(repository: Path) -> None:
    model_dir = repository / "tabular"
    reference = load_reference(model_dir / "drift" / "reference.json")
    now = [1_700_000_000.0 - 1_700_000_000.0 % 3600]
    plans = plan_features(*tensor_specs(), text_format.Parse("enable: true", model_config_pb2.ModelDriftConfig()), "tabular")
    recorder = Recorder("tabular", 1, plans, reference, model_dir / "drift" / "windows", 600, clock=lambda: now[0])
    for hour, shift in enumerate((0.0, 0.0, 1.0)):
        for quarter in range(6):
            now[0] = 1_700_000_000.0 - 1_700_000_000.0 % 3600 + hour * 3600 + quarter * 600
            data = make_data(400, seed=10 * hour + quarter, shift=shift, shifted_feature=3)
            record(recorder, data, predict(model_dir, data))
            recorder.flush()
    recorder.close()
    result = job(repository, span=3600, step=1800, last=3 * 3600)
    assert [s.rows for s in result.spans] == [2400] * 5
    assert [s.status for s in result.spans] == ["ok", "ok", "ok", "alert", "alert"]
    assert result.spans[-1].drifted["input"][0] >= 1


def test_distances_of_identical_and_disjoint_histograms() -> None:
    same = distances(np.array([10.0, 20, 30]), np.array([1.0, 2, 3]), ordered=True)
    assert same == pytest.approx({"d1": 0, "psi": 0, "js": 0, "ks": 0, "ks_bound": 0.5})
    apart = distances(np.array([1.0, 0]), np.array([0.0, 1]), ordered=True)
    assert (apart["d1"], apart["js"], apart["ks"]) == pytest.approx((2.0, 1.0, 1.0))


def test_cli_exit_codes_json_and_report(repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    serve(repository, make_data(TRAFFIC_ROWS, seed=2, shift=0.4, shifted_feature=2))
    out = tmp_path / "result.json"
    report = tmp_path / "report.html"
    args = ["drift", "--model-repository", str(repository), "--model", "tabular", "--json", str(out), "--report", str(report)]
    assert main(args) == 1
    assert "x[2]" in capsys.readouterr().out
    assert json.loads(out.read_text())["alert"] is True
    page = report.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "x[2]" in page and "<script" not in page
    assert main([*args, "--alert-share", "0.5", "--no-report"]) == 0
    assert main(["drift", "--model-repository", str(repository), "--model", "nope"]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
