"""What a drift feature is, and how a batch's tensors become feature values.

A 2-D input `[batch, features]` gives one feature per column (`x[0]`, `x[1]`, ...), a per-row scalar
gives one feature named after the tensor, and anything of higher or variable rank (images,
sequences) gives per-sample projections (`x.mean`, `x.std`, ...). Categorical tensors (BYTES and
BOOL always, integer outputs such as class labels, and whatever `drift.categorical_inputs` names)
are counted per category; a categorical tensor of higher rank pools all its elements into one
feature. The recorder and the reference builder both go through `plan_features`, so their features
line up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hotpath._proto import model_config_pb2
from hotpath.serving.config import TensorSpec

PROJECTIONS = {
    "mean": lambda x: x.mean(axis=1),
    "std": lambda x: x.std(axis=1),
    "min": lambda x: x.min(axis=1),
    "max": lambda x: x.max(axis=1),
}
DEFAULT_PROJECTIONS = ("mean", "std")
ALWAYS_CATEGORICAL = {"BYTES", "BOOL"}
INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class DriftError(Exception):
    """A problem the user can fix (bad data, config or files); the message says what and where."""


@dataclass(frozen=True)
class TensorFeatures:
    """The features one tensor contributes, and how to compute them from a batch of it."""

    tensor: str
    role: str
    """"input" or "output"."""
    categorical: bool
    layout: str
    """"columns" (one feature per column), "projections" (per-sample summaries) or "pooled" (every element)."""
    names: tuple[str, ...]
    projections: tuple[str, ...] = ()

    def extract(self, array: np.ndarray) -> np.ndarray:
        """The feature values of one batch as a 2-D array, one column per feature.

        Numeric features come back as float64; categorical BYTES stay object arrays (of str or bytes).
        """
        rows = array.shape[0]
        if self.layout == "pooled":
            values = array.reshape(-1, 1)
        elif self.layout == "columns":
            values = array.reshape(rows, len(self.names))
        else:
            flat = np.asarray(array, dtype=np.float64).reshape(rows, -1)
            return np.stack([PROJECTIONS[p](flat) for p in self.projections], axis=1)
        if values.dtype == object:
            return values
        return np.asarray(values, dtype=np.float64)


def plan_features(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                  config: model_config_pb2.ModelDriftConfig, model_name: str) -> list[TensorFeatures]:
    """The features recorded for a model, from its tensors and its `drift` config section."""
    names = {t.name for t in inputs} | {t.name for t in outputs}
    unknown = sorted(set(config.categorical_inputs) - names)
    if unknown:
        raise DriftError(f"model '{model_name}': drift.categorical_inputs names {unknown}, which are not "
                         f"tensors of the model; its tensors are {sorted(names)}")
    projections = tuple(config.projections) or DEFAULT_PROJECTIONS
    bad = sorted(set(projections) - set(PROJECTIONS))
    if bad:
        raise DriftError(f"model '{model_name}': drift.projections has {bad}; choose from {sorted(PROJECTIONS)}")
    plans = []
    tensors = [("input", t) for t in inputs] + ([] if config.skip_outputs else [("output", t) for t in outputs])
    for role, tensor in tensors:
        datatype = tensor.datatype.name
        categorical = (datatype in ALWAYS_CATEGORICAL or tensor.name in config.categorical_inputs
                       or (role == "output" and datatype in INTEGER_TYPES))
        shape = tensor.dims
        if shape == ():
            plans.append(TensorFeatures(tensor.name, role, categorical, "columns", (tensor.name,)))
        elif len(shape) == 1 and shape[0] > 0:
            columns = tuple(f"{tensor.name}[{j}]" for j in range(shape[0]))
            plans.append(TensorFeatures(tensor.name, role, categorical, "columns", columns))
        elif categorical:
            plans.append(TensorFeatures(tensor.name, role, categorical, "pooled", (tensor.name,)))
        else:
            plans.append(TensorFeatures(tensor.name, role, categorical, "projections",
                                        tuple(f"{tensor.name}.{p}" for p in projections), projections))
    return plans
