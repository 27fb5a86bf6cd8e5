"""Per-window feature counts: accumulated batch by batch with vectorised numpy, merged by addition.

Every count a window holds is a sum over values, so windows (and the reference, which is built by
the same code) merge by adding: a day of minute windows is one day-long window, exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hotpath.drift.features import TensorFeatures

SUMMED = ("count", "missing", "nan", "inf", "below", "above", "unseen", "sum", "sum_squares")
BINNED = ("bins", "counts")
SMALL_BLOCK = 1024
"""Values per batch up to which numeric binning broadcasts over all edges at once."""
MAX_BINS = 256
"""Most bins per numeric feature (bin indices are computed as uint8)."""


def text_keys(values: np.ndarray) -> np.ndarray:
    """BYTES values (an object array of str, or of bytes, taken as UTF-8) as a fixed-width str array."""
    if values.size and isinstance(values.flat[0], bytes):
        return np.char.decode(values.astype(np.bytes_), "utf-8", "surrogateescape")
    return values.astype(np.str_)


def category_keys(categories: list[Any]) -> np.ndarray:
    """Reference categories as a numpy array comparable with batch values (str or float64)."""
    if categories and isinstance(categories[0], str):
        return np.array(categories, dtype=np.str_)
    return np.asarray(categories, dtype=np.float64)


def category_label(key: str | float) -> str | float:
    """The JSON form of a category: text for BYTES, a number otherwise."""
    return key if isinstance(key, str) else float(key)


class NumericBlock:
    """Counts for the numeric features of one tensor, as arrays indexed by feature."""

    def __init__(self, plan: TensorFeatures, reference: Mapping[str, dict]) -> None:
        refs = [reference.get(name) for name in plan.names]
        self._names = plan.names
        self._binned = [ref is not None for ref in refs]
        edges = [np.asarray(ref["edges"], dtype=np.float64) if ref else np.empty(0) for ref in refs]
        self._widths = [len(e) + 1 for e in edges]
        width = max(self._widths)
        features = len(plan.names)
        self._edges = np.full((features, width - 1), np.inf)
        for j, e in enumerate(edges):
            self._edges[j, :len(e)] = e
        self._edges_by_rank = np.ascontiguousarray(self._edges.T)
        self._offsets = np.arange(features) * width
        ranges = [ref.get("range") if ref else None for ref in refs]
        self._low = np.array([r[0] if r else -np.inf for r in ranges])
        self._high = np.array([r[1] if r else np.inf for r in ranges])
        zeros = lambda: np.zeros(features, dtype=np.int64)
        self.count, self.missing, self.nan, self.inf, self.below, self.above = (zeros() for _ in range(6))
        self.min = np.full(features, np.inf)
        self.max = np.full(features, -np.inf)
        self.sum = np.zeros(features)
        self.sum_squares = np.zeros(features)
        self.bins = np.zeros((features, width), dtype=np.int64)

    def add_missing(self, rows: int) -> None:
        """Count `rows` values that were not sent at all (an optional input left out)."""
        self.count += rows
        self.missing += rows

    def add(self, values: np.ndarray) -> None:
        """Add a `[n, features]` float64 block of values."""
        n, features = values.shape
        if n == 0:
            return
        self.count += n
        finite = np.isfinite(values)
        all_finite = bool(finite.all())
        if all_finite:
            clean = zeroed = values
        else:
            nan = np.isnan(values)
            self.nan += nan.sum(axis=0)
            self.inf += (~finite & ~nan).sum(axis=0)
            clean = np.where(finite, values, np.nan)
            zeroed = np.where(finite, values, 0.0)
        self.min = np.fmin(self.min, np.fmin.reduce(clean, axis=0))
        self.max = np.fmax(self.max, np.fmax.reduce(clean, axis=0))
        self.sum += zeroed.sum(axis=0)
        self.sum_squares += np.einsum("ij,ij->j", zeroed, zeroed)
        self.below += (clean < self._low).sum(axis=0)
        self.above += (clean > self._high).sum(axis=0)
        index = self._bin_index(clean) + self._offsets
        if not all_finite:
            index = index[finite]
        self.bins += np.bincount(index.ravel(), minlength=self.bins.size).reshape(self.bins.shape)

    def _bin_index(self, values: np.ndarray) -> np.ndarray:
        """Per value, the number of its feature's edges at or below it: its bin (like searchsorted
        side="right"). Small blocks compare against every edge at once; large ones edge by edge,
        which keeps the temporaries small."""
        if values.size <= SMALL_BLOCK:
            return np.count_nonzero(values[:, :, None] >= self._edges[None], axis=2)
        index = np.zeros(values.shape, dtype=np.uint8)
        for edge in self._edges_by_rank:
            index += values >= edge
        return index

    def to_json(self) -> dict[str, dict]:
        """Per-feature counts in the window file's form."""
        result = {}
        for j, name in enumerate(self._names):
            seen = self.min[j] <= self.max[j]
            result[name] = {
                "kind": "numeric",
                "count": int(self.count[j]), "missing": int(self.missing[j]),
                "nan": int(self.nan[j]), "inf": int(self.inf[j]),
                "min": float(self.min[j]) if seen else None, "max": float(self.max[j]) if seen else None,
                "sum": float(self.sum[j]), "sum_squares": float(self.sum_squares[j]),
                "below": int(self.below[j]), "above": int(self.above[j]),
                "bins": self.bins[j, :self._widths[j]].tolist() if self._binned[j] else None,
            }
        return result


class CategoricalBlock:
    """Counts per reference category, plus unseen and missing, for the categorical features of one tensor."""

    def __init__(self, plan: TensorFeatures, reference: Mapping[str, dict]) -> None:
        self._names = plan.names
        self._sorted: list[np.ndarray | None] = []
        self._order: list[np.ndarray | None] = []
        for name in plan.names:
            ref = reference.get(name)
            if ref is None:
                self._sorted.append(None)
                self._order.append(None)
                continue
            keys = category_keys(ref["categories"])
            order = np.argsort(keys, kind="stable")
            self._sorted.append(keys[order])
            self._order.append(order)
        features = len(plan.names)
        width = max([len(k) for k in self._sorted if k is not None], default=0)
        zeros = lambda: np.zeros(features, dtype=np.int64)
        self.count, self.missing, self.nan, self.unseen = (zeros() for _ in range(4))
        self.counts = np.zeros((features, width), dtype=np.int64)

    def add_missing(self, rows: int) -> None:
        """Count `rows` values that were not sent at all (an optional input left out)."""
        self.count += rows
        self.missing += rows

    def add(self, values: np.ndarray) -> None:
        """Add a `[n, features]` block: object arrays of str or bytes, or float64 codes."""
        self.count += values.shape[0]
        for j in range(values.shape[1]):
            if values.dtype == object:
                keys = text_keys(values[:, j])
                absent = keys == ""
                self.missing[j] += int(absent.sum())
            else:
                keys = values[:, j]
                absent = np.isnan(keys)
                self.nan[j] += int(absent.sum())
            known = self._sorted[j]
            if known is None:
                continue
            present = int(absent.size - absent.sum())
            if len(known):
                position = np.minimum(np.searchsorted(known, keys), len(known) - 1)
                hit = (known[position] == keys) & ~absent
                self.counts[j, :len(known)] += np.bincount(self._order[j][position[hit]], minlength=len(known))
                present -= int(hit.sum())
            self.unseen[j] += present

    def to_json(self) -> dict[str, dict]:
        """Per-feature counts in the window file's form."""
        result = {}
        for j, name in enumerate(self._names):
            known = self._sorted[j]
            result[name] = {
                "kind": "categorical",
                "count": int(self.count[j]), "missing": int(self.missing[j]), "nan": int(self.nan[j]),
                "unseen": int(self.unseen[j]) if known is not None else None,
                "counts": self.counts[j, :len(known)].tolist() if known is not None else None,
            }
        return result


class WindowStats:
    """Everything recorded for one model version during one window (or for the reference data)."""

    def __init__(self, plans: list[TensorFeatures], reference: Mapping[str, dict]) -> None:
        self._blocks = [(plan, (CategoricalBlock if plan.categorical else NumericBlock)(plan, reference))
                        for plan in plans]
        self.batches = 0
        self.rows = 0

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], batches: int = 1) -> None:
        """Add executed batches (one, or several concatenated); a tensor absent from them counts as
        missing for every row."""
        rows = next(iter(inputs.values() or outputs.values())).shape[0]
        self.batches += batches
        self.rows += rows
        for plan, block in self._blocks:
            array = (inputs if plan.role == "input" else outputs).get(plan.tensor)
            if array is None:
                block.add_missing(rows)
            else:
                block.add(plan.extract(array))

    def features(self) -> dict[str, dict]:
        """Per-feature counts, each tagged with its tensor and role."""
        result = {}
        for plan, block in self._blocks:
            for name, counts in block.to_json().items():
                result[name] = {"tensor": plan.tensor, "role": plan.role, **counts}
        return result


def merge_feature(a: dict, b: dict) -> dict:
    """The counts of two windows (or spans) of one feature, recorded against the same reference, as one."""
    merged = dict(a)
    for key in SUMMED:
        if key in a and a[key] is not None and b.get(key) is not None:
            merged[key] = a[key] + b[key]
    for key, pick in (("min", min), ("max", max)):
        if key in a:
            present = [v for v in (a[key], b[key]) if v is not None]
            merged[key] = pick(present) if present else None
    for key in BINNED:
        if a.get(key) is not None and b.get(key) is not None:
            if len(a[key]) != len(b[key]):
                raise ValueError(f"cannot merge {key} of different lengths ({len(a[key])} and {len(b[key])})")
            merged[key] = [x + y for x, y in zip(a[key], b[key])]
    return merged
