"""The built-in demo model: a small softmax classifier, trained locally on first start.

It lets `hotpath serve` with no arguments show a working server at once, and nothing is downloaded:
the training data is drawn from three seeded Gaussian clusters, the model is fitted with numpy, and
the graph is written with the `onnx` helper API.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_MODEL = "demo"
FEATURES = 4
CLASSES = 3
CONFIG = """name: "demo"
max_batch_size: 64
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


def training_data(rows_per_class: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded points from three clusters in 4-D and their class labels."""
    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]], np.float32)
    x = np.concatenate([c + rng.normal(0, 0.35, (rows_per_class, FEATURES)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(CLASSES), rows_per_class)
    return x, y


def fit(x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression by gradient descent on standardised inputs; returns weights for raw inputs."""
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    w = np.zeros((FEATURES, CLASSES))
    b = np.zeros(CLASSES)
    onehot = np.eye(CLASSES)[y]
    for _ in range(steps):
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= lr * z.T @ grad
        b -= lr * grad.sum(0)
    return (w / std[:, None]).astype(np.float32), (b - (mean / std) @ w).astype(np.float32)


def build_model(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """The classifier graph: `features` FP32 [-1, 4] -> `probabilities` FP32 [-1, 3], `label` INT64 [-1]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)],
        "demo_classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hotpath-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def default_home() -> Path:
    """Where hotpath keeps what it creates for itself: $HOTPATH_HOME, else ~/.cache/hotpath."""
    return Path(os.environ.get("HOTPATH_HOME") or Path.home() / ".cache" / "hotpath")


def ensure_demo_repository(home: Path | None = None) -> Path:
    """Return a model repository holding the demo model, creating it on first use."""
    root = (home or default_home()) / "demo-repository"
    if (root / DEMO_MODEL / "1" / "model.onnx").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".demo-"))
    try:
        model_dir = staging / DEMO_MODEL
        (model_dir / "1").mkdir(parents=True)
        onnx.save(build_model(*fit(*training_data())), model_dir / "1" / "model.onnx")
        (model_dir / "config.pbtxt").write_text(CONFIG)
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
