"""The evaluation job: logged predictions joined with their labels, model quality per time span and version.

Metrics come from scikit-learn (the `hotpath[evaluate]` extra): accuracy, precision, recall, F1, ROC
AUC and log loss for classifiers, MAE and RMSE for regressors. Each span is compared with a reference
window (the oldest span, unless one is given); a span alerts when its primary metric (accuracy, or
RMSE) is worse than the reference's by more than `max_drop`, relatively.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from hotpath._proto import model_config_pb2
from hotpath.drift.files import utc_iso
from hotpath.drift.reference import Reference
from hotpath.evaluation.store import Prediction, Store

CLASSIFICATION, REGRESSION = "classification", "regression"
PRIMARY = {CLASSIFICATION: ("accuracy", 1.0), REGRESSION: ("rmse", -1.0)}
"""Each task's primary metric and its direction (1: higher is better)."""
DEFAULT_MAX_DROP = 0.05
DEFAULT_MIN_LABELS = 30


class EvaluationError(Exception):
    """The evaluation cannot run: missing library, unknown outputs, no data; the message says what to do."""


def _metrics_module():
    try:
        from sklearn import metrics
    except ImportError:
        raise EvaluationError("hotpath evaluate computes its metrics with scikit-learn: pip install 'hotpath[evaluate]'") from None
    return metrics


@dataclass(frozen=True)
class Outputs:
    """Which outputs the job reads: the task, the prediction output and the probability output (or None)."""

    task: str
    prediction: str | None
    probabilities: str | None


def fullest(predictions: list[Prediction]) -> Prediction:
    """The latest of the logged predictions that carry the most outputs (a cached answer may carry only those asked for)."""
    return max(reversed(predictions), key=lambda prediction: len(prediction.outputs))


def carries(prediction: Prediction, outputs: Outputs) -> bool:
    """Whether a logged prediction holds the outputs its quality is computed from."""
    return all(name is None or name in prediction.outputs for name in (outputs.prediction, outputs.probabilities))


def choose_outputs(config: model_config_pb2.ModelEvaluationConfig, sample: Prediction) -> Outputs:
    """The outputs named in `config`, else chosen by type from a logged prediction: an integer, bool or BYTES
    output is the predicted class, a float output with several values per row holds probabilities, a float
    output with one value per row (and no class output) is a regressor's prediction."""
    outputs = sample.outputs
    for name in (config.prediction_output, config.probability_output):
        if name and name not in outputs:
            raise EvaluationError(f"the evaluation config names output '{name}', but the logged outputs are {sorted(outputs)}")
    per_row = {name: array.reshape(sample.rows, -1) if array.size else array for name, array in outputs.items()}
    classes = [n for n, a in per_row.items() if a.dtype.kind in "iubO" and a.shape[-1] == 1]
    floats = [n for n, a in per_row.items() if a.dtype.kind == "f"]
    probabilities = config.probability_output or next((n for n in floats if per_row[n].shape[-1] > 1), None)
    task = config.task or (CLASSIFICATION if classes or probabilities else REGRESSION)
    if task not in PRIMARY:
        raise EvaluationError(f"evaluation.task must be {CLASSIFICATION} or {REGRESSION}, got '{task}'")
    if task == CLASSIFICATION:
        prediction = config.prediction_output or (classes[0] if classes else None)
        if prediction is None and probabilities is None:
            raise EvaluationError(f"no class or probability output among {sorted(outputs)}; set evaluation.prediction_output")
        return Outputs(task, prediction, probabilities)
    prediction = config.prediction_output or next((n for n in floats if per_row[n].shape[-1] == 1), None)
    if prediction is None:
        raise EvaluationError(f"no output with one float per row among {sorted(outputs)}; set evaluation.prediction_output")
    return Outputs(task, prediction, None)


@dataclass
class Rows:
    """The rows of a span and version: predictions, probabilities, labels (None where unlabelled)."""

    predicted: list = field(default_factory=list)
    probabilities: list = field(default_factory=list)
    labels: list = field(default_factory=list)


def _python(value):
    value = value.item() if isinstance(value, np.generic) else value
    return value.decode() if isinstance(value, bytes) else value


def _rows_of(prediction: Prediction, outputs: Outputs) -> tuple[list, list | None]:
    probs = prediction.outputs[outputs.probabilities].reshape(prediction.rows, -1) if outputs.probabilities else None
    if outputs.prediction is not None:
        predicted = [_python(v) for v in prediction.outputs[outputs.prediction].reshape(prediction.rows, -1)[:, 0]]
    else:
        predicted = [int(i) for i in np.argmax(probs, axis=1)]
    return predicted, (list(probs) if probs is not None else None)


def compute_metrics(task: str, rows: Rows) -> dict[str, float | None]:
    """scikit-learn's metrics over the labelled rows; None where a metric is undefined (one class, no probabilities)."""
    metrics = _metrics_module()
    keep = [i for i, label in enumerate(rows.labels) if label is not None]
    y = [rows.labels[i] for i in keep]
    predicted = [rows.predicted[i] for i in keep]
    if not y:
        return {}
    if task == REGRESSION:
        y_true, y_pred = np.asarray(y, float), np.asarray(predicted, float)
        return {"mae": float(metrics.mean_absolute_error(y_true, y_pred)),
                "rmse": float(math.sqrt(metrics.mean_squared_error(y_true, y_pred)))}
    result: dict[str, float | None] = {"accuracy": float(metrics.accuracy_score(y, predicted))}
    classes = sorted(set(y) | set(predicted), key=str)
    binary = len(classes) <= 2
    average = {"average": "binary", "pos_label": classes[-1]} if binary and len(classes) == 2 else {"average": "macro"}
    for name, function in (("precision", metrics.precision_score), ("recall", metrics.recall_score), ("f1", metrics.f1_score)):
        result[name] = float(function(y, predicted, zero_division=0, **average))
    result["roc_auc"] = result["log_loss"] = None
    if rows.probabilities:
        probs = np.asarray([rows.probabilities[i] for i in keep], float)
        probs = probs / probs.sum(axis=1, keepdims=True)
        columns = list(range(probs.shape[1]))
        if all(isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(columns) for label in y):
            result["log_loss"] = float(metrics.log_loss(y, probs, labels=columns))
            if len(set(y)) > 1:
                if len(columns) == 2:
                    result["roc_auc"] = float(metrics.roc_auc_score(y, probs[:, 1]))
                elif len(set(y)) == len(columns):
                    result["roc_auc"] = float(metrics.roc_auc_score(y, probs, multi_class="ovr", labels=columns))
    return result


@dataclass
class SpanResult:
    """One span and model version: rows logged and labelled, metrics, change against the reference, status."""

    start: str
    end: str
    version: int
    rows: int
    labelled: int
    coverage: float
    metrics: dict[str, float | None]
    change: dict[str, float | None]
    status: str


@dataclass
class EvaluationResult:
    """The job's answer: spans oldest first, the reference window, and whether any span alerts."""

    model: str
    task: str
    outputs: dict
    reference: dict
    spans: list[SpanResult]
    max_drop: float
    min_labels: int
    alert: bool

    def to_json(self) -> dict:
        return asdict(self)


def span_bounds(since_s: float, until_s: float, span_s: float) -> list[tuple[float, float]]:
    """Spans of `span_s` ending at `until_s`, covering [since_s, until_s), oldest first."""
    count = max(1, math.ceil((until_s - since_s) / span_s - 1e-9))
    return [(until_s - (count - i) * span_s, until_s - (count - i - 1) * span_s) for i in range(count)]


def _worse(task: str, current: float | None, reference: float | None) -> float | None:
    """How much worse `current` is than `reference`, relative (positive is worse)."""
    if current is None or reference is None or reference == 0:
        return None
    _, direction = PRIMARY[task]
    return direction * (reference - current) / abs(reference)


def evaluate(store: Store, model: str, config: model_config_pb2.ModelEvaluationConfig, until_s: float, last_s: float,
             span_s: float, reference: tuple[float, float] | None = None, max_drop: float = DEFAULT_MAX_DROP,
             min_labels: int = DEFAULT_MIN_LABELS) -> EvaluationResult:
    """Evaluate `model` over the `last_s` seconds before `until_s` in spans of `span_s`; see the module docstring."""
    bounds = span_bounds(until_s - last_s, until_s, span_s)
    since = min(bounds[0][0], reference[0]) if reference else bounds[0][0]
    predictions = list(store.predictions(model, since, max(until_s, reference[1]) if reference else until_s))
    if not predictions:
        raise EvaluationError(f"no logged predictions of model '{model}' in {store.location} between {utc_iso(since)} and {utc_iso(until_s)}")
    outputs = choose_outputs(config, fullest(predictions))
    predictions = [prediction for prediction in predictions if carries(prediction, outputs)]
    grouped: dict[tuple[int, int], Rows] = {}
    reference_rows = Rows()
    ref_start, ref_end = reference or bounds[0]
    for prediction in predictions:
        predicted, probs = _rows_of(prediction, outputs)
        targets = []
        index = next((i for i, (a, b) in enumerate(bounds) if a <= prediction.time_s < b), None)
        if index is not None:
            targets.append(grouped.setdefault((index, prediction.version), Rows()))
        if ref_start <= prediction.time_s < ref_end:
            targets.append(reference_rows)
        for rows in targets:
            rows.predicted += predicted
            rows.labels += prediction.labels
            if probs is not None:
                rows.probabilities += probs
    primary, _ = PRIMARY[outputs.task]
    reference_metrics = compute_metrics(outputs.task, reference_rows)
    reference_labelled = sum(label is not None for label in reference_rows.labels)
    spans = []
    for (index, version), rows in sorted(grouped.items()):
        labelled = sum(label is not None for label in rows.labels)
        values = compute_metrics(outputs.task, rows)
        change = {name: (None if value is None or reference_metrics.get(name) is None else value - reference_metrics[name])
                  for name, value in values.items()}
        if labelled < min_labels or reference_labelled < min_labels:
            status = "too_few_labels"
        else:
            worse = _worse(outputs.task, values.get(primary), reference_metrics.get(primary))
            status = "alert" if worse is not None and worse > max_drop else "ok"
        start, end = bounds[index]
        spans.append(SpanResult(utc_iso(start), utc_iso(end), version, len(rows.labels), labelled,
                                labelled / len(rows.labels), values, change, status))
    return EvaluationResult(
        model, outputs.task, asdict(outputs),
        {"start": utc_iso(ref_start), "end": utc_iso(ref_end), "rows": len(reference_rows.labels), "labelled": reference_labelled,
         "metrics": reference_metrics},
        spans, max_drop, min_labels, any(s.status == "alert" for s in spans))


def drift_scores(predictions: list[Prediction], reference: Reference) -> list[np.ndarray]:
    """Per prediction, per row: how far its inputs sit in drifted regions, the largest log ratio, over the
    reference's numeric input features, of its bin's share among `predictions` to that bin's share in the
    reference; values outside the reference's range have bins of their own, which the reference never
    filled. 0 where the reference names no feature of the logged inputs."""
    ratios = []
    for name, feature in reference.features.items():
        tensor = feature.get("tensor", "")
        if feature.get("role") != "input" or feature.get("kind") != "numeric" or not feature.get("edges"):
            continue
        column = 0 if name == tensor else int(name[len(tensor) + 1:-1]) if name.startswith(f"{tensor}[") else None
        if column is None or any(tensor not in p.inputs or p.inputs[tensor].reshape(p.rows, -1).shape[1] <= column
                                 for p in predictions):
            continue
        values = np.concatenate([p.inputs[tensor].reshape(p.rows, -1)[:, column] for p in predictions]).astype(np.float64)
        bins = np.searchsorted(np.asarray(feature["edges"], np.float64), values, side="right") + 1
        low, high = feature.get("range") or (-np.inf, np.inf)
        expected = np.asarray([0, *feature["bins"], 0], np.float64)
        bins[values < low] = 0
        bins[values > high] = len(expected) - 1
        seen = np.bincount(bins, minlength=len(expected)).astype(np.float64)
        share = lambda counts: (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
        ratios.append(np.log(share(seen) / share(expected))[bins])
    total = sum(p.rows for p in predictions)
    score = np.max(np.stack(ratios), axis=0) if ratios else np.zeros(total)
    return np.split(score, np.cumsum([p.rows for p in predictions])[:-1]) if predictions else []


def suggest(store: Store, model: str, config: model_config_pb2.ModelEvaluationConfig, since_s: float, until_s: float,
            count: int, reference: Reference | None = None) -> list[tuple[str, int, str, float]]:
    """The `count` unlabelled logged rows most worth labelling, as (request id, row, reason, score): by turns the
    least certain ("margin": the top probability minus the second, lowest first) and, given a drift reference,
    those in the most drifted regions ("drift": see `drift_scores`, highest first)."""
    predictions = list(store.predictions(model, since_s, until_s))
    if not predictions:
        return []
    outputs = choose_outputs(config, fullest(predictions))
    predictions = [prediction for prediction in predictions if carries(prediction, outputs)]
    if outputs.probabilities is None and reference is None:
        raise EvaluationError(f"model '{model}' logs no probability output to rank by and has no drift reference; "
                              "set evaluation.probability_output or build one with `hotpath reference`")
    rankings = []
    if outputs.probabilities is not None:
        margins = []
        for prediction in predictions:
            probs = np.sort(prediction.outputs[outputs.probabilities].reshape(prediction.rows, -1), axis=1)
            top = probs[:, -1] - (probs[:, -2] if probs.shape[1] > 1 else 0.0)
            margins += [(prediction.request_id, row, "margin", float(top[row])) for row in range(prediction.rows)
                        if prediction.labels[row] is None]
        rankings.append(sorted(margins, key=lambda c: c[3]))
    if reference is not None:
        drifted = [(prediction.request_id, row, "drift", float(scores[row]))
                   for prediction, scores in zip(predictions, drift_scores(predictions, reference))
                   for row in range(prediction.rows) if prediction.labels[row] is None]
        rankings.append(sorted(drifted, key=lambda c: -c[3]))
    chosen, seen = [], set()
    for turn in itertools.zip_longest(*rankings):
        for candidate in turn:
            if candidate is not None and candidate[:2] not in seen and len(chosen) < count:
                seen.add(candidate[:2])
                chosen.append(candidate)
    return chosen


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(result: EvaluationResult) -> str:
    """The terminal report: one line per span and version, in the style of `hotpath drift`."""
    primary, _ = PRIMARY[result.task]
    ref = result.reference
    lines = [f"model '{result.model}' ({result.task}): {'ALERT' if result.alert else 'no alert'} over {len(result.spans)} span(s); "
             f"reference {ref['start']} .. {ref['end']}, {ref['labelled']} labelled rows, {primary} "
             f"{_number(ref['metrics'].get(primary))}"]
    names = ["accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"] if result.task == CLASSIFICATION else ["mae", "rmse"]
    header = (f"{'span start':20s} {'end':20s} {'ver':>4s} {'rows':>7s} {'labelled':>8s} {'coverage':>8s} {'status':14s} "
              + " ".join(f"{n:>9s}" for n in names) + f" {'change':>8s}")
    lines += [header, "-" * len(header)]
    for s in result.spans:
        lines.append(f"{s.start:20s} {s.end:20s} {s.version:4d} {s.rows:7d} {s.labelled:8d} {100 * s.coverage:7.1f}% "
                     f"{s.status.upper():14s} " + " ".join(f"{_number(s.metrics.get(n)):>9s}" for n in names)
                     + f" {_number(s.change.get(primary)):>8s}")
    return "\n".join(lines)
