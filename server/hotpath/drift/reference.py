"""The drift reference: bin edges, categories and counts of the data a model was trained or evaluated on.

`hotpath reference` builds it from a data file and, for the prediction features, from running the
model on that data; it lives at `<model dir>/drift/reference.json`. Numeric features get bins at
quantiles of the reference data, so every bin holds a similar share of it; categorical features keep
their most frequent categories. The reference's counts come from the same code that records windows,
so reference and windows compare bin for bin.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from hotpath._proto import model_config_pb2
from hotpath.drift.features import DriftError, TensorFeatures, plan_features
from hotpath.drift.files import utc_iso, write_json_atomically
from hotpath.drift.stats import MAX_BINS, WindowStats, category_label, text_keys
from hotpath.errors import LoadError
from hotpath.serving.config import DEFAULT_MODEL_FILE, TensorSpec, complete_config, read_config, tensor_specs

REFERENCE_SCHEMA = "hotpath.drift.reference"
SCHEMA_VERSION = 1
DEFAULT_BINS = 20
DEFAULT_MAX_CATEGORIES = 256
PREDICT_CHUNK_ROWS = 1024
DATA_SUFFIXES = (".npy", ".npz", ".csv")


@dataclass(frozen=True)
class Reference:
    """A loaded reference: its id (which window files cite) and per-feature edges, categories and counts."""

    reference_id: str
    model: str
    version: int
    rows: int
    features: dict[str, dict]
    document: dict


def reference_path(model_dir: Path) -> Path:
    """Where a model's reference lives."""
    return Path(model_dir) / "drift" / "reference.json"


def load_reference(path: Path) -> Reference:
    """Read a reference written by `hotpath reference`."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DriftError(f"no drift reference at {path}; build one with `hotpath reference --model-repository "
                         f"DIR --model NAME --data FILE`") from None
    except json.JSONDecodeError as exc:
        raise DriftError(f"{path} is not valid JSON ({exc}); rebuild it with `hotpath reference`") from None
    if document.get("schema") != REFERENCE_SCHEMA or document.get("schema_version") != SCHEMA_VERSION:
        raise DriftError(f"{path} is not a version-{SCHEMA_VERSION} hotpath drift reference; rebuild it with "
                         f"`hotpath reference`")
    return Reference(document["reference_id"], document["model"], document["version"], document["rows"],
                     document["features"], document)


def _as_tensor(values: np.ndarray, spec: TensorSpec, source: str) -> np.ndarray:
    if spec.datatype.name == "BYTES":
        text = np.empty(values.size, dtype=object)
        text[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel()]
        return text.reshape(values.shape)
    try:
        return np.asarray(values, dtype=spec.datatype.dtype)
    except ValueError as exc:
        raise DriftError(f"{source}: values for input '{spec.name}' are not {spec.datatype.name}: {exc}") from None


def _read_csv(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DriftError(f"{path}: a CSV reference needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    table = np.array(body, dtype=object)
    names = [spec.name for spec in inputs]
    if set(names) <= set(header):
        columns = {spec.name: table[:, header.index(spec.name)] for spec in inputs}
    elif len(inputs) == 1:
        columns = {inputs[0].name: table}
    else:
        raise DriftError(f"{path}: with several inputs, the CSV header must name each of them ({names}); "
                         f"it has {header}")
    result = {}
    for spec in inputs:
        column = columns[spec.name]
        if spec.datatype.name != "BYTES":
            column = np.where(column == "", "nan", column)
            if spec.datatype.dtype.kind != "f":
                column = column.astype(np.float64)
        result[spec.name] = _as_tensor(column, spec, str(path))
    return result


def load_data(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Reference data for a model's inputs from `.npy` (single-input models), `.npz` (one array per
    input, keyed by input name) or `.csv` (a header row; columns named after inputs, or all columns
    forming a single-input model's rows)."""
    path = Path(path)
    if path.suffix not in DATA_SUFFIXES:
        raise DriftError(f"{path}: reference data must be one of {', '.join(DATA_SUFFIXES)}")
    if not path.exists():
        raise DriftError(f"{path}: no such file")
    names = [spec.name for spec in inputs]
    if path.suffix == ".csv":
        data = _read_csv(path, inputs)
    elif path.suffix == ".npy":
        if len(inputs) != 1:
            raise DriftError(f"{path}: a .npy file holds one array but the model has inputs {names}; use a .npz "
                             f"with one array per input")
        data = {inputs[0].name: _as_tensor(np.load(path, allow_pickle=False), inputs[0], str(path))}
    else:
        with np.load(path, allow_pickle=False) as archive:
            absent = [name for name in names if name not in archive.files]
            if absent:
                raise DriftError(f"{path}: has arrays {archive.files} but the model's inputs {absent} are not among them")
            try:
                data = {spec.name: _as_tensor(archive[spec.name], spec, str(path)) for spec in inputs}
            except ValueError as exc:
                raise DriftError(f"{path}: {exc}; save text as fixed-width arrays (numpy dtype 'U' or 'S'), "
                                 f"not object arrays") from None
    lengths = {name: array.shape[0] for name, array in data.items()}
    if len(set(lengths.values())) != 1:
        raise DriftError(f"{path}: inputs have different numbers of rows: {lengths}")
    for spec in inputs:
        if all(d > 0 for d in spec.dims):
            data[spec.name] = data[spec.name].reshape(-1, *spec.dims)
    return data


def _top_categories(values: np.ndarray, limit: int) -> list:
    if values.dtype == object:
        keys = text_keys(values)
        keys = keys[keys != ""]
    else:
        keys = values[~np.isnan(values)]
    unique, counts = np.unique(keys, return_counts=True)
    top = np.argsort(-counts, kind="stable")[:limit]
    return [category_label(k) for k in unique[top].tolist()]


def _bins_and_categories(plans: list[TensorFeatures], arrays: dict[str, dict[str, np.ndarray]], bins: int,
                         max_categories: int) -> dict[str, dict]:
    result = {}
    for plan in plans:
        values = plan.extract(arrays[plan.role][plan.tensor])
        for j, name in enumerate(plan.names):
            column = values[:, j]
            if plan.categorical:
                result[name] = {"categories": _top_categories(column, max_categories)}
                continue
            finite = column[np.isfinite(column)]
            if finite.size == 0:
                result[name] = {"edges": [], "range": None}
                continue
            quantiles = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1))
            result[name] = {"edges": np.unique(quantiles[1:-1]).tolist(),
                            "range": [float(finite.min()), float(finite.max())]}
    return result


def _predict(session: ort.InferenceSession, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    rows = next(iter(inputs.values())).shape[0]
    chunks = []
    for start in range(0, rows, PREDICT_CHUNK_ROWS):
        feed = {name: array[start:start + PREDICT_CHUNK_ROWS] for name, array in inputs.items()}
        chunks.append(session.run(list(outputs), feed))
    return {name: np.concatenate([chunk[i] for chunk in chunks]) for i, name in enumerate(outputs)}


def _model_file(model_dir: Path, filename: str, version: int | None) -> tuple[int, Path]:
    if version is not None:
        path = model_dir / str(version) / filename
        if not path.exists():
            raise DriftError(f"model '{model_dir.name}' has no version {version} (no {path})")
        return version, path
    versions = sorted(int(d.name) for d in model_dir.iterdir() if d.name.isdigit() and (d / filename).exists())
    if not versions:
        raise DriftError(f"model '{model_dir.name}': no version directory in {model_dir} holds {filename}")
    return versions[-1], model_dir / str(versions[-1]) / filename


def build_reference(model_repository: Path, model: str, data: Path, version: int | None = None,
                    bins: int = DEFAULT_BINS, max_categories: int = DEFAULT_MAX_CATEGORIES,
                    predictions: bool = True) -> Reference:
    """Build a model's reference from a data file, running the model on it for the prediction features."""
    model_dir = Path(model_repository) / model
    if not model_dir.is_dir():
        raise DriftError(f"no model '{model}' in {model_repository}")
    if not 2 <= bins <= MAX_BINS:
        raise DriftError(f"--bins must be between 2 and {MAX_BINS}, got {bins}")
    try:
        config = read_config(model_dir)
        version, model_file = _model_file(model_dir, config.default_model_filename or DEFAULT_MODEL_FILE, version)
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        config = complete_config(config, session)
    except LoadError as exc:
        raise DriftError(exc.message) from None
    if config.max_batch_size == 0:
        raise DriftError(f"model '{model}' has no batch dimension (max_batch_size 0); drift recording needs one")
    specs = {"input": tensor_specs(config.input), "output": tensor_specs(config.output)}
    drift_config = model_config_pb2.ModelDriftConfig()
    drift_config.CopyFrom(config.drift)
    if not predictions:
        drift_config.skip_outputs = True
    plans = plan_features(specs["input"], specs["output"], drift_config, model)
    inputs = load_data(data, specs["input"])
    output_names = [p.tensor for p in plans if p.role == "output"]
    outputs = _predict(session, inputs, output_names) if output_names else {}
    return reference_from_arrays(model, version, plans, inputs, outputs, bins=bins, max_categories=max_categories,
                                 source=str(Path(data).resolve()))


def reference_from_arrays(model: str, version: int, plans: list[TensorFeatures], inputs: dict[str, np.ndarray],
                          outputs: dict[str, np.ndarray], *, bins: int = DEFAULT_BINS,
                          max_categories: int = DEFAULT_MAX_CATEGORIES, source: str = "") -> Reference:
    """A reference from tensors already in memory (the model's inputs and its outputs on them), binned
    and counted by the code that records windows."""
    shape = _bins_and_categories(plans, {"input": inputs, "output": outputs}, bins, max_categories)
    stats = WindowStats(plans, shape)
    stats.add(inputs, outputs)
    features = {name: {**counts, **shape[name]} for name, counts in stats.features().items()}
    reference_id = hashlib.sha256(json.dumps(features, sort_keys=True).encode()).hexdigest()[:16]
    document = {
        "schema": REFERENCE_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "reference_id": reference_id,
        "model": model,
        "version": version,
        "created": utc_iso(time.time()),
        "source": source,
        "rows": stats.rows,
        "bins": bins,
        "max_categories": max_categories,
        "features": features,
    }
    return Reference(reference_id, model, version, stats.rows, features, document)


def save_reference(reference: Reference, model_dir: Path) -> Path:
    """Store a reference beside its model, atomically, and return where."""
    path = reference_path(model_dir)
    write_json_atomically(path, reference.document)
    return path
