"""Drift verdicts a person can trust: no false alarms from small references, small shifts found in large
spans, one severe or important feature fails the job, many mild ones fail it by their share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from bench.drift_quality import flagged, judge, record, reference_of
from hotpath.drift.cli import main
from hotpath.drift.files import write_json_atomically
from hotpath.drift.job import Thresholds, ThresholdSet
from hotpath.drift.reference import load_reference


def test_held_out_real_rows_do_not_alert_against_a_small_reference() -> None:
    x = load_breast_cancer(return_X_y=True)[0]
    order = np.random.default_rng(0).permutation(len(x))
    span = judge(reference_of(x[order[:300]]), x[order[300:]], ThresholdSet(Thresholds(min_count=100)))
    judged = [f for f in span.features if f.metrics is not None]
    assert len(judged) == 30 and flagged(span) == [] and span.status == "ok"
    over_effect_size = [f.name for f in judged if f.metrics["ks"] > Thresholds().ks or f.metrics["js"] > Thresholds().js]
    assert len(over_effect_size) >= 20, "fixed thresholds alone would flag most of these features"


def test_a_quarter_sigma_shift_is_found_in_large_spans_and_nothing_else() -> None:
    rng = np.random.default_rng(1)
    reference = reference_of(rng.standard_normal((20_000, 16)))
    current = rng.standard_normal((20_000, 16))
    current[:, 5] += 0.25
    span = judge(reference, current)
    assert flagged(span) == ["x[5]"] and span.features[0].name == "x[5]"
    assert span.features[0].status == "warn" and span.status == "warn"
    assert span.drifted == {"input": [1, 16], "output": [0, 0]}


def test_the_detectable_shift_is_what_gets_flagged() -> None:
    rng = np.random.default_rng(2)
    detectable = {}
    for rows in (300, 30_000):
        span = judge(reference_of(rng.standard_normal((rows, 4))), rng.standard_normal((10_000, 4)))
        detectable[rows] = np.mean([f.detectable_shift["sigma"] for f in span.features])
    assert 0.2 < detectable[300] < 0.6 and detectable[30_000] < 0.15
    reference = reference_of(rng.standard_normal((300, 8)))
    shifts = np.array([f.detectable_shift["sigma"] for f in
                       sorted(judge(reference, rng.standard_normal((10_000, 8))).features, key=lambda f: f.name)])
    for factor, expected in ((0.25, 0), (2.0, 8)):
        assert len(flagged(judge(reference, rng.standard_normal((10_000, 8)) + factor * shifts))) == expected


def saved_reference(directory: Path, rng: np.random.Generator, features: int) -> Path:
    """A saved reference for `features` standard-normal features of 3000 rows."""
    write_json_atomically(directory / "reference.json", reference_of(rng.standard_normal((3000, features))).document)
    return directory


def drift_job(directory: Path, traffic: np.ndarray, *extra: str) -> tuple[int, dict]:
    """`hotpath drift` on `traffic` recorded as one span: its exit code and that span's JSON."""
    windows = directory / f"windows-{len(list(directory.glob('windows-*')))}"
    record(windows, load_reference(directory / "reference.json"), [traffic])
    out = directory / "result.json"
    code = main(["drift", "--reference", str(directory / "reference.json"), "--windows", str(windows),
                 "--json", str(out), "--no-report", *extra])
    [span] = json.loads(out.read_text())["spans"]
    return code, span


def test_one_severe_feature_among_256_fails_the_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(3)
    directory = saved_reference(tmp_path, rng, 256)
    traffic = rng.standard_normal((5000, 256))
    traffic[:, 17] += 1.0
    code, span = drift_job(directory, traffic)
    top = span["features"][0]
    assert code == 1 and span["status"] == "alert"
    assert top["name"] == "x[17]" and top["metrics"]["psi"] > 0.5 and top["severe"]
    assert span["drifted"]["input"] == [1, 256] and "1 of 256 inputs" in capsys.readouterr().out


def test_mild_drift_fails_the_job_only_on_an_important_feature_or_by_share(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    directory = saved_reference(tmp_path, rng, 40)
    traffic = rng.standard_normal((5000, 40))
    traffic[:, 3] += 0.3
    code, span = drift_job(directory, traffic)
    assert code == 0 and span["status"] == "warn" and span["drifted"]["input"] == [1, 40]
    assert span["features"][0]["name"] == "x[3]" and span["features"][0]["status"] == "warn"
    important = tmp_path / "thresholds.json"
    important.write_text(json.dumps({"features": {"x[3]": {"important": True}}}))
    code, span = drift_job(directory, traffic, "--thresholds", str(important))
    assert code == 1 and span["features"][0]["name"] == "x[3]" and span["features"][0]["status"] == "alert"
    traffic[:, 20:24] += 0.3
    code, span = drift_job(directory, traffic)
    assert code == 1 and span["drifted"]["input"] == [5, 40]
    assert span["reasons"] == ["5 of 40 inputs drift (at least 10%)"]
