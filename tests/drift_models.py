"""Seeded synthetic models and data for the drift tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CITIES = ["paris", "lima", "oslo", "kyoto"]
FEATURES = 4


def make_model(repository: Path, name: str = "tabular", drift: str = "enable: true") -> Path:
    """A model with a numeric input `x` [batch, 4] and a BYTES input `city` [batch]; it predicts
    `score` = x @ w [batch, 1] and `city_code` (INT64, a categorical output)."""
    weights = numpy_helper.from_array(np.array([[1.0], [-0.5], [0.25], [2.0]], dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["score"]),
         helper.make_node("LabelEncoder", ["city"], ["city_code"], domain="ai.onnx.ml",
                          keys_strings=CITIES, values_int64s=list(range(len(CITIES))), default_int64=-1)],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, FEATURES]),
         helper.make_tensor_value_info("city", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1]),
         helper.make_tensor_value_info("city_code", TensorProto.INT64, [None])],
        initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 9
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.pbtxt").write_text(f'name: "{name}"\nmax_batch_size: 256\ndrift {{ {drift} }}\n')
    return model_dir


def make_data(rows: int, seed: int, shift: float = 0.0, shifted_feature: int = 0,
              cities: list[str] = CITIES[:3]) -> dict[str, np.ndarray]:
    """Rows of `x` ~ N(0, 1) per feature (one feature shifted by `shift` sigma) and `city` drawn from `cities`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    x[:, shifted_feature] += shift
    city = np.array([c.encode() for c in rng.choice(cities, size=rows)], dtype=object)
    return {"x": x, "city": city}


def tensor_specs():
    """The model's inputs and outputs as the server describes them to the recorder."""
    from hotpath.serving.config import TensorSpec
    from hotpath.serving.datatypes import DATATYPES
    inputs = [TensorSpec("x", DATATYPES["FP32"], (FEATURES,)), TensorSpec("city", DATATYPES["BYTES"], ())]
    outputs = [TensorSpec("score", DATATYPES["FP32"], (1,)), TensorSpec("city_code", DATATYPES["INT64"], ())]
    return inputs, outputs


def predict(model_dir: Path, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the model the way the server does (BYTES as str), for outputs to record."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    text = np.array([c.decode() for c in data["city"]], dtype=object)
    score, code = session.run(None, {"x": data["x"], "city": text})
    return {"score": score, "city_code": code}


def record(recorder, data: dict[str, np.ndarray], outputs: dict[str, np.ndarray], batch: int = 64) -> None:
    """Send `data` and its predictions to `recorder` in batches, as the server's workers do."""
    rows = len(data["x"])
    for start in range(0, rows, batch):
        recorder.record({k: v[start:start + batch] for k, v in data.items()},
                        {k: v[start:start + batch] for k, v in outputs.items()})


def save_npz(path: Path, data: dict[str, np.ndarray]) -> Path:
    """Reference data as a .npz, text as fixed-width bytes."""
    np.savez(path, x=data["x"], city=data["city"].astype(np.bytes_))
    return path

