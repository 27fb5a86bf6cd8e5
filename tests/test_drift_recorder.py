"""The drift recorder: window files, exact merging, clock-aligned rolling, thread safety, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from drift_models import make_data, make_model, predict, record, save_npz, tensor_specs
from hotpath._proto import model_config_pb2
from hotpath.drift import DriftError, DriftRecorder
from hotpath.drift.features import plan_features
from hotpath.drift.job import merge_windows, read_windows
from hotpath.drift.recorder import DriftRecorder as Recorder
from hotpath.drift.reference import build_reference, save_reference
from hotpath.serving.config import TensorSpec
from hotpath.serving.datatypes import DATATYPES


def drift_config(text: str = "enable: true") -> model_config_pb2.ModelDriftConfig:
    return text_format.Parse(text, model_config_pb2.ModelDriftConfig())


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    model_dir = make_model(tmp_path / "models")
    data = make_data(4000, seed=1)
    reference = build_reference(tmp_path / "models", "tabular", save_npz(tmp_path / "ref.npz", data))
    save_reference(reference, model_dir)
    return model_dir


def create(model_dir: Path, config: str = "enable: true") -> DriftRecorder:
    inputs, outputs = tensor_specs()
    return DriftRecorder.create("tabular", 1, model_dir, drift_config(config), inputs, outputs)


def window_files(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def test_window_file_is_self_describing(model_dir: Path) -> None:
    data = make_data(500, seed=2)
    recorder = create(model_dir)
    record(recorder, data, predict(model_dir, data))
    recorder.close()
    [window] = window_files(model_dir / "drift" / "windows")
    assert window["schema"] == "hotpath.drift.window" and window["schema_version"] == 1
    assert (window["model"], window["version"], window["rows"]) == ("tabular", 1, 500)
    assert window["reference_id"] == json.loads((model_dir / "drift" / "reference.json").read_text())["reference_id"]
    assert window["window_start"].endswith(":00Z") and window["window_end"].endswith(":00Z")
    x0 = window["features"]["x[0]"]
    assert x0["count"] == 500 and sum(x0["bins"]) == 500 and len(x0["bins"]) == 20
    assert x0["min"] == pytest.approx(float(data["x"][:, 0].min()))
    assert x0["sum"] == pytest.approx(float(data["x"][:, 0].astype(np.float64).sum()))
    city = window["features"]["city"]
    assert city["kind"] == "categorical" and sum(city["counts"]) == 500 and city["unseen"] == 0


def test_merging_windows_gives_the_counts_of_one_window(model_dir: Path, tmp_path: Path) -> None:
    data = make_data(3000, seed=3)
    data["x"][::97, 1] = np.nan
    outputs = predict(model_dir, data)
    split = create(model_dir, f'enable: true output_dir: "{tmp_path / "split"}"')
    for start in range(0, 3000, 500):
        part = slice(start, start + 500)
        record(split, {k: v[part] for k, v in data.items()}, {k: v[part] for k, v in outputs.items()})
        split.flush()
    split.close()
    whole = create(model_dir, f'enable: true output_dir: "{tmp_path / "whole"}"')
    record(whole, data, outputs)
    whole.close()
    windows, _ = read_windows(tmp_path / "split", "tabular")
    assert len(windows) == 6
    merged = merge_windows(windows)
    [single] = window_files(tmp_path / "whole")
    for name, expected in single["features"].items():
        for key, value in expected.items():
            if key in ("sum", "sum_squares"):
                assert merged[name][key] == pytest.approx(value, rel=1e-9), (name, key)
            else:
                assert merged[name][key] == value, (name, key)
    assert merged["x[1]"]["nan"] == len(range(0, 3000, 97))


def test_windows_roll_on_clock_aligned_boundaries(model_dir: Path) -> None:
    now = [1_000_000_030.0]
    inputs, outputs = tensor_specs()
    plans = plan_features(inputs, outputs, drift_config(), "tabular")
    recorder = Recorder("tabular", 1, plans, None, model_dir / "windows", 60, clock=lambda: now[0])
    data = make_data(10, seed=4)
    out = predict(model_dir, data)
    recorder.record(data, out)
    now[0] += 60
    recorder.record(data, out)
    recorder.record(data, out)
    recorder.close()
    windows = window_files(model_dir / "windows")
    assert [(w["window_start"], w["rows"]) for w in windows] == [
        ("2001-09-09T01:47:00Z", 10), ("2001-09-09T01:48:00Z", 20)]
    assert windows[0]["window_end"] == windows[1]["window_start"]


def test_without_reference_counts_are_recorded_but_no_histograms(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path / "models")
    data = make_data(200, seed=5)
    data["x"][:3, 2] = [np.nan, np.inf, -np.inf]
    recorder = create(model_dir)
    record(recorder, data, predict(model_dir, data))
    recorder.close()
    [window] = window_files(model_dir / "drift" / "windows")
    x2 = window["features"]["x[2]"]
    assert window["reference_id"] is None and x2["bins"] is None
    assert (x2["count"], x2["nan"], x2["inf"]) == (200, 1, 2)
    assert x2["max"] == pytest.approx(float(np.nanmax(np.where(np.isinf(data["x"][:, 2]), np.nan, data["x"][:, 2]))))
    assert window["features"]["city"]["counts"] is None


def test_concurrent_recording_loses_nothing(model_dir: Path) -> None:
    data = make_data(640, seed=6)
    outputs = predict(model_dir, data)
    recorder = create(model_dir)
    threads = [threading.Thread(target=record, args=(recorder, data, outputs, 32)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    merged = merge_windows(window_files(model_dir / "drift" / "windows"))
    assert merged["x[0]"]["count"] == 4 * 640 and sum(merged["x[0]"]["bins"]) == 4 * 640
    categories = json.loads((model_dir / "drift" / "reference.json").read_text())["features"]["city"]["categories"]
    assert merged["city"]["counts"] == [4 * int((data["city"] == c.encode()).sum()) for c in categories]


def test_missing_inputs_and_rank3_projections(tmp_path: Path) -> None:
    config = drift_config('enable: true projections: ["mean", "max"]')
    inputs = [TensorSpec("image", DATATYPES["FP32"], (2, 3)), TensorSpec("flag", DATATYPES["FP32"], ())]
    recorder = DriftRecorder.create("vision", 1, tmp_path, config, inputs, [])
    image = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    recorder.record({"image": image}, {})
    recorder.close()
    [window] = window_files(tmp_path / "drift" / "windows")
    features = window["features"]
    assert sorted(features) == ["flag", "image.max", "image.mean"]
    assert features["flag"]["missing"] == 4
    assert (features["image.max"]["min"], features["image.max"]["max"]) == (5.0, 23.0)


def test_config_mistakes_are_reported_clearly(tmp_path: Path) -> None:
    inputs, outputs = tensor_specs()
    with pytest.raises(DriftError, match="categorical_inputs names \\['colour'\\]"):
        DriftRecorder.create("tabular", 1, tmp_path, drift_config('enable: true categorical_inputs: "colour"'), inputs, outputs)
    with pytest.raises(DriftError, match="projections has \\['median'\\]"):
        DriftRecorder.create("tabular", 1, tmp_path, drift_config('enable: true projections: "median"'), inputs, outputs)


def test_killed_process_leaves_only_whole_window_files(model_dir: Path, tmp_path: Path) -> None:
    windows = tmp_path / "windows"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from drift_models import make_data, predict, record, tensor_specs
        from google.protobuf import text_format
        from hotpath._proto import model_config_pb2
        from hotpath.drift import DriftRecorder
        model_dir = Path({str(model_dir)!r})
        config = text_format.Parse('enable: true window_seconds: 1 output_dir: "{windows}"', model_config_pb2.ModelDriftConfig())
        recorder = DriftRecorder.create("tabular", 1, model_dir, config, *tensor_specs())
        data = make_data(256, seed=7)
        outputs = predict(model_dir, data)
        while True:
            record(recorder, data, outputs)
            recorder.flush()
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while len(list(windows.glob("*.json"))) < 20 and time.monotonic() < deadline:
            assert process.poll() is None, "recording subprocess died on its own"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    files = [p for p in windows.iterdir() if p.is_file()]
    assert len(files) >= 20
    for path in files:
        assert path.suffix == ".json"
        window = json.loads(path.read_text())
        assert window["schema"] == "hotpath.drift.window" and window["features"]["x[0]"]["count"] == window["rows"]
        assert sum(window["features"]["x[0]"]["bins"]) == window["features"]["x[0]"]["count"]
