"""Building the drift reference from .npz, .npy and .csv data, and its errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from drift_models import make_data, make_model, save_npz
from hotpath.drift import DriftError
from hotpath.drift.cli import main
from hotpath.drift.reference import build_reference, load_reference, reference_path


def test_quantile_bins_split_the_reference_evenly(tmp_path: Path) -> None:
    make_model(tmp_path / "models")
    reference = build_reference(tmp_path / "models", "tabular", save_npz(tmp_path / "d.npz", make_data(4000, seed=1)))
    x0 = reference.features["x[0]"]
    assert len(x0["edges"]) == 19 and x0["bins"] == [200] * 20
    assert x0["range"][0] < x0["edges"][0] and x0["edges"][-1] < x0["range"][1]
    assert reference.features["city"]["categories"][0] in ("paris", "lima", "oslo")
    assert reference.features["score[0]"]["role"] == "output" and sum(reference.features["score[0]"]["bins"]) == 4000
    assert reference.rows == 4000 and len(reference.reference_id) == 16


def test_cli_writes_the_reference_beside_the_model(tmp_path: Path) -> None:
    make_model(tmp_path / "models")
    data = save_npz(tmp_path / "d.npz", make_data(1000, seed=1))
    assert main(["reference", "--model-repository", str(tmp_path / "models"), "--model", "tabular",
                 "--data", str(data), "--bins", "8", "--no-predictions"]) == 0
    reference = load_reference(reference_path(tmp_path / "models" / "tabular"))
    assert len(reference.features["x[3]"]["bins"]) == 8 and "score[0]" not in reference.features


def single_input_model(repository: Path) -> None:
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1)], "sum",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("total", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (repository / "sum" / "1").mkdir(parents=True)
    onnx.save(model, str(repository / "sum" / "1" / "model.onnx"))


def test_npy_and_csv_give_the_same_reference(tmp_path: Path) -> None:
    single_input_model(tmp_path / "models")
    x = np.random.default_rng(3).standard_normal((600, 3)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "c"])
        writer.writerows(x.tolist())
    from_npy = build_reference(tmp_path / "models", "sum", tmp_path / "d.npy")
    from_csv = build_reference(tmp_path / "models", "sum", tmp_path / "d.csv")
    assert from_npy.features == from_csv.features
    assert from_npy.features["total[0]"]["sum"] == pytest.approx(float(x.sum()), rel=1e-5)


def test_data_errors_say_what_to_do(tmp_path: Path) -> None:
    make_model(tmp_path / "models")
    np.save(tmp_path / "d.npy", np.zeros((5, 4), np.float32))
    with pytest.raises(DriftError, match="use a .npz with one array per input"):
        build_reference(tmp_path / "models", "tabular", tmp_path / "d.npy")
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4), np.float32))
    with pytest.raises(DriftError, match="inputs \\['city'\\] are not among them"):
        build_reference(tmp_path / "models", "tabular", tmp_path / "d.npz")
    with pytest.raises(DriftError, match="must be one of .npy, .npz, .csv"):
        build_reference(tmp_path / "models", "tabular", tmp_path / "d.parquet")
    with pytest.raises(DriftError, match="no drift reference at"):
        load_reference(tmp_path / "missing.json")
