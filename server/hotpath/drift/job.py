"""The offline drift job: merge window files into spans and compare each span with the reference.

Data-quality rules run first (missing values, NaN/inf, out-of-range values, unseen categories);
then, for features with enough values, four distances between the reference and span histograms:
KS (on the binned CDFs, with an upper bound on the unbinned statistic), D1 (L1 distance of the
normalised histograms, 0..2), PSI and Jensen-Shannon distance (base 2, 0..1). A distance counts
only above both its effect-size threshold and what sampling noise gives at the reference's and the
span's sizes (see `distances`), so a small reference raises no false alarms. A feature drifts when
any distance does; the model alerts on a data-quality rule, on a severe drift (PSI over psi_alert),
on any drift of a feature marked important, or when at least `alert_share` of the inputs (or of the
outputs) with enough data drift.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from hotpath.drift.distances import (METRICS, NoiseModel, categorical_detectable_shift, distances,
                                     numeric_detectable_shift)
from hotpath.drift.features import DriftError
from hotpath.drift.files import parse_utc, utc_iso
from hotpath.drift.recorder import WINDOW_SCHEMA
from hotpath.drift.reference import Reference
from hotpath.drift.stats import merge_feature

DEFAULT_SPAN_SECONDS = 3600
DEFAULT_ALERT_SHARE = 0.1
STATUS_ORDER = ("alert", "warn", "ok", "too_small", "no_data")
"""Feature statuses, most severe first: the order of the terminal table and the report."""
MAX_REASONS = 10
"""Most alert reasons the terminal summary lists; the JSON has them all."""
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Thresholds:
    """When a feature is flagged. A distance drifts above its effect-size threshold here and above
    its noise threshold (what no-drift spans of that size stay under); rule tolerances are shares
    (0.01 = one percentage point) allowed above what the reference shows."""

    ks: float = 0.05
    """About a 0.13 sigma mean shift of a normal feature."""
    d1: float = 0.1
    psi_warn: float = 0.1
    """PSI above this (and above noise) is drift."""
    psi_alert: float = 0.25
    """PSI above this (and above noise) is a severe drift: it alerts the model on its own."""
    js: float = 0.05
    out_of_range: float = 0.05
    """Share of values outside the reference's [min, max]."""
    missing: float = 0.01
    nan: float = 0.0
    unseen: float = 0.0
    min_count: int = 1000
    """Fewer values than this in a span: the feature is reported as too small, not as drifting."""
    important: bool = False
    """Any drift of this feature alerts the model, however mild."""


@dataclass(frozen=True)
class ThresholdSet:
    """Default thresholds and per-feature overrides."""

    defaults: Thresholds = Thresholds()
    features: dict[str, Thresholds] = field(default_factory=dict)

    def for_feature(self, name: str) -> Thresholds:
        """The thresholds that apply to one feature."""
        return self.features.get(name, self.defaults)


def _overrides(base: Thresholds, values: dict, where: str) -> Thresholds:
    known = {f.name for f in fields(Thresholds)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DriftError(f"{where}: unknown thresholds {unknown}; known ones are {sorted(known)}")
    return replace(base, **values)


def load_thresholds(path: Path | None = None, min_count: int | None = None) -> ThresholdSet:
    """Thresholds from a JSON file `{"defaults": {...}, "features": {"x[3]": {...}}}` (both optional);
    per-feature entries override the defaults, which override the built-in values."""
    defaults = Thresholds() if min_count is None else Thresholds(min_count=min_count)
    if path is None:
        return ThresholdSet(defaults)
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DriftError(f"cannot read thresholds from {path}: {exc}") from None
    defaults = _overrides(defaults, document.get("defaults", {}), f"{path} defaults")
    features = {name: _overrides(defaults, values, f"{path} feature '{name}'")
                for name, values in document.get("features", {}).items()}
    return ThresholdSet(defaults, features)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `90s`, `10m`, `1h` or `7d`."""
    match = _DURATION.match(text.strip())
    if not match:
        raise DriftError(f"'{text}' is not a duration; write a number and a unit, like 90s, 10m, 1h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class FeatureResult:
    """One feature in one span: its status, what was found, the distances and what they were held to."""

    name: str
    role: str
    kind: str
    status: str
    """"ok", "warn" (drift), "alert" (severe drift, drift of an important feature or a data-quality
    rule), "too_small" or "no_data"."""
    count: int
    drifted: bool = False
    severe: bool = False
    findings: list[str] = field(default_factory=list)
    quality: list[str] = field(default_factory=list)
    """The data-quality rules that fired (a subset of the findings' topics)."""
    metrics: dict[str, float] | None = None
    limits: dict[str, float] | None = None
    """Per distance, the threshold it was held to: the larger of the effect size and the noise threshold."""
    noise: dict[str, float] | None = None
    """Per distance, what NOISE_QUANTILE of no-drift spans of this size stay under."""
    fired: str | None = None
    """The distance furthest over its limit (or nearest to it), as in "KS 0.214 > 0.05"."""
    severity: float = 0.0
    """The largest distance-to-limit ratio; over 1 is drift."""
    detectable_shift: dict[str, float] | None = None
    """The smallest shift these sizes can tell from noise: for numeric features `sigma` (a mean shift
    in reference standard deviations) and `value` (in the feature's units); for categorical ones
    `share` (values moved from the most frequent category to the next)."""
    reference_mean: float | None = None
    reference_std: float | None = None
    current_mean: float | None = None
    current_std: float | None = None
    reference_shares: list[float] | None = None
    current_shares: list[float] | None = None


@dataclass
class SpanResult:
    """One span: the windows merged into it and the verdict for each feature and the model."""

    start: str
    end: str
    windows: int
    rows: int
    dropped_rows: int
    status: str
    """"ok", "warn", "alert", "too_small" or "empty"."""
    drifted: dict[str, list[int]]
    """Per role ("input", "output"): [features that drift, features with enough values to judge]."""
    reasons: list[str]
    """Why the span alerts, in words; empty unless it does."""
    features: list[FeatureResult]
    """Most severe first."""


@dataclass
class DriftResult:
    """Everything one run of the job found."""

    model: str
    reference_id: str
    alert_share: float
    thresholds: dict
    spans: list[SpanResult]
    skipped_windows: int
    """Windows recorded against another reference (or none), which cannot be compared bin for bin."""
    unreadable: list[str]

    @property
    def alert(self) -> bool:
        """Whether any span alerts; the job's exit code is 1 when it does."""
        return any(span.status == "alert" for span in self.spans)

    def to_json(self) -> dict:
        """The machine-readable report."""
        return {"schema": "hotpath.drift.result", "alert": self.alert, **asdict(self)}


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _percent(x: float) -> str:
    return f"{100 * x:.3g}%"


def moments(counts: dict) -> tuple[float | None, float | None]:
    """Mean and standard deviation of a numeric feature's finite values, from a window's sums."""
    finite = counts["count"] - counts["missing"] - counts["nan"] - counts.get("inf", 0)
    if finite <= 0:
        return None, None
    mean = counts["sum"] / finite
    return mean, math.sqrt(max(counts["sum_squares"] / finite - mean * mean, 0.0))


def _judge_distances(result: FeatureResult, reference: dict, ref_hist: np.ndarray, cur_hist: np.ndarray,
                     limits: Thresholds, noise_model: NoiseModel) -> None:
    ordered = result.kind == "numeric"
    values = int(cur_hist.sum())
    result.metrics = distances(ref_hist, cur_hist, ordered)
    result.noise = noise_model.thresholds(result.name, ref_hist, values, ordered)
    effect = {"ks": limits.ks, "d1": limits.d1, "psi": limits.psi_warn, "js": limits.js}
    result.limits = {metric: max(effect[metric], result.noise[metric]) for metric in METRICS if metric in result.noise}
    ratios = {metric: result.metrics[metric] / limit if limit > 0 else 0.0 for metric, limit in result.limits.items()}
    result.fired = max(ratios, key=ratios.get)
    result.severity = ratios[result.fired]
    result.drifted = result.severity > 1.0
    result.severe = result.metrics["psi"] > max(limits.psi_alert, result.noise["psi"])
    result.findings.extend(f"{metric.upper()} {result.metrics[metric]:.3f} > {limit:.3g}"
                           f"{' (noise)' if limit == result.noise[metric] else ''}"
                           for metric, limit in result.limits.items() if ratios[metric] > 1.0)
    if result.severe:
        result.findings.append(f"severe: PSI {result.metrics['psi']:.3f} > psi_alert {limits.psi_alert}")
    if ordered:
        shift = numeric_detectable_shift(reference, result.limits, result.reference_std or 0.0)
        if shift is not None:
            result.detectable_shift = {"sigma": shift, "value": shift * result.reference_std}
    else:
        shift = categorical_detectable_shift(ref_hist[:-1], result.limits)
        if shift is not None:
            result.detectable_shift = {"share": shift}
    result.reference_shares = (ref_hist / ref_hist.sum()).tolist()
    result.current_shares = (cur_hist / values).tolist()


def evaluate_feature(name: str, reference: dict, current: dict | None, limits: Thresholds,
                     noise_model: NoiseModel) -> FeatureResult:
    """Compare one feature's span counts with its reference counts."""
    kind = reference["kind"]
    if current is None:
        return FeatureResult(name, reference["role"], kind, "no_data", 0, findings=["no values recorded in this span"])
    result = FeatureResult(name, reference["role"], kind, "ok", current["count"])
    rules = [("missing", "missing", current["missing"], current["count"], reference["missing"], reference["count"]),
             ("nan", "NaN or inf", current["nan"] + current.get("inf", 0), current["count"],
              reference["nan"] + reference.get("inf", 0), reference["count"])]
    if kind == "numeric":
        result.reference_mean, result.reference_std = moments(reference)
        result.current_mean, result.current_std = moments(current)
        ref_hist = np.asarray(reference["bins"], dtype=np.float64)
        cur_hist = np.asarray(current["bins"], dtype=np.float64)
    else:
        ref_hist = np.asarray(reference["counts"] + [reference["unseen"]], dtype=np.float64)
        cur_hist = np.asarray(current["counts"] + [current["unseen"]], dtype=np.float64)
        rules.append(("unseen", "not among the reference's categories", current["unseen"], cur_hist.sum(),
                      reference["unseen"], ref_hist.sum()))
    for rule, what, part, whole, ref_part, ref_whole in rules:
        share, ref_share = _share(part, whole), _share(ref_part, ref_whole)
        noise = noise_model.share_limit(ref_part, ref_whole - ref_part, int(whole)) if whole else 0.0
        if part and share > max(ref_share + getattr(limits, rule), noise):
            result.quality.append(rule)
            result.findings.append(f"{rule}: {part} of {int(whole)} values ({_percent(share)}) {what}; "
                                   f"reference {_percent(ref_share)}")
    outside = current["below"] + current["above"] if kind == "numeric" else 0
    if outside and reference["range"]:
        share = _share(outside, cur_hist.sum())
        limit = max(limits.out_of_range, noise_model.share_limit(2, ref_hist.sum() - 1, int(cur_hist.sum())))
        if share > limit:
            result.quality.append("out_of_range")
            result.findings.append(f"out_of_range: {outside} of {int(cur_hist.sum())} values ({_percent(share)}) "
                                   f"outside the reference range [{reference['range'][0]:.4g}, "
                                   f"{reference['range'][1]:.4g}] ({current['below']} below, {current['above']} "
                                   f"above); at most {_percent(limit)} expected")
    values = int(cur_hist.sum())
    if values < limits.min_count or not ref_hist.sum():
        result.status = "alert" if result.quality else "too_small"
        result.findings.append(f"{values} values, fewer than min_count {limits.min_count}: distances not computed")
        return result
    _judge_distances(result, reference, ref_hist, cur_hist, limits, noise_model)
    if result.drifted and limits.important:
        result.findings.append("important feature: any drift alerts")
    if result.quality or result.severe or (result.drifted and limits.important):
        result.status = "alert"
    elif result.drifted:
        result.status = "warn"
    return result


def severity_order(feature: FeatureResult) -> tuple[int, float, str]:
    """Sort key putting the most severe features first: by status, then distance-to-limit ratio."""
    return STATUS_ORDER.index(feature.status), -(math.inf if feature.quality else feature.severity), feature.name


def read_windows(directory: Path, model: str, version: int | None = None) -> tuple[list[dict], list[str]]:
    """The model's window files in `directory` (optionally one version), and files that could not be read."""
    windows, unreadable = [], []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            unreadable.append(str(path))
            continue
        if (document.get("schema") == WINDOW_SCHEMA and document.get("model") == model
                and (version is None or document.get("version") == version)):
            windows.append(document)
    return windows, unreadable


def merge_windows(windows: Iterable[dict]) -> dict[str, dict]:
    """The per-feature counts of several windows recorded against one reference, added up."""
    merged: dict[str, dict] = {}
    for window in windows:
        for name, counts in window["features"].items():
            merged[name] = merge_feature(merged[name], counts) if name in merged else counts
    return merged


def span_bounds(windows: list[dict], span: float, step: float, last: float, until: float | None,
                now: float) -> list[tuple[float, float]]:
    """Spans of length `span`, `step` apart, covering the `last` seconds before `until` (default:
    the end of the newest window, or now when there is none)."""
    if until is None:
        until = max((parse_utc(w["window_end"]) for w in windows), default=now)
    since = until - max(last, span)
    bounds = []
    start = since
    while start + span <= until + 1e-6:
        bounds.append((start, start + span))
        start += step
    return bounds


ROLES = ("input", "output")


def _span_verdict(features: list[FeatureResult], rows: int, alert_share: float) -> tuple[str, dict[str, list[int]], list[str]]:
    drifted = {role: [sum(f.drifted for f in features if f.role == role and f.metrics is not None),
                      sum(f.metrics is not None for f in features if f.role == role)] for role in ROLES}
    reasons = [f"{f.name}: {'; '.join(f.findings)}" for f in features if f.status == "alert"]
    reasons += [f"{count} of {judged} {role}s drift (at least {_percent(alert_share)})"
                for role, (count, judged) in drifted.items() if count and _share(count, judged) >= alert_share]
    if rows == 0:
        return "empty", drifted, []
    if reasons:
        return "alert", drifted, reasons
    if not any(judged for _, judged in drifted.values()):
        return "too_small", drifted, []
    return ("warn" if any(f.drifted for f in features) else "ok"), drifted, []


def evaluate_span(reference: Reference, windows: list[dict], start: float, end: float,
                  thresholds: ThresholdSet, alert_share: float, noise_model: NoiseModel) -> SpanResult:
    """Merge the windows that start inside [start, end) and judge every reference feature."""
    inside = [w for w in windows if start <= parse_utc(w["window_start"]) < end]
    merged = merge_windows(inside)
    features = sorted((evaluate_feature(name, ref, merged.get(name), thresholds.for_feature(name), noise_model)
                       for name, ref in reference.features.items()), key=severity_order)
    rows = sum(w["rows"] for w in inside)
    status, drifted, reasons = _span_verdict(features, rows, alert_share)
    return SpanResult(utc_iso(start), utc_iso(end), len(inside), rows, sum(w.get("dropped_rows", 0) for w in inside),
                      status, drifted, reasons, features)


def run_job(reference: Reference, windows_dir: Path, *, version: int | None = None,
            span: float = DEFAULT_SPAN_SECONDS, step: float | None = None, last: float | None = None,
            until: float | None = None, thresholds: ThresholdSet = ThresholdSet(),
            alert_share: float = DEFAULT_ALERT_SHARE, now: float | None = None) -> DriftResult:
    """Evaluate the spans over the `last` seconds (default one span) of a model's windows."""
    if not Path(windows_dir).is_dir():
        raise DriftError(f"no window directory {windows_dir}; is drift recording on (`drift {{ enable: true }}` "
                         f"in the model's config.pbtxt) and has the server run?")
    windows, unreadable = read_windows(windows_dir, reference.model, version)
    usable = [w for w in windows if w.get("reference_id") == reference.reference_id]
    bounds = span_bounds(usable, span, step or span, last or span, until, time.time() if now is None else now)
    noise_model = NoiseModel()
    spans = [evaluate_span(reference, usable, start, end, thresholds, alert_share, noise_model)
             for start, end in bounds]
    return DriftResult(reference.model, reference.reference_id, alert_share, asdict(thresholds.defaults), spans,
                       len(windows) - len(usable), unreadable)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _first(names: list[str], limit: int) -> str:
    """Up to `limit` names, then how many more: a summary line stays one line."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def drifted_counts(span: SpanResult) -> str:
    """How many inputs and outputs drift, as "3 of 256 inputs, 1 of 10 outputs"."""
    return ", ".join(f"{count} of {judged} {role}s" for role, (count, judged) in span.drifted.items() if judged) or "-"


def fired_text(feature: FeatureResult) -> str:
    """The distance nearest to or furthest over its limit, as "KS 0.214 > 0.05" (or "<=")."""
    if feature.fired is None:
        return "-"
    value, limit = feature.metrics[feature.fired], feature.limits[feature.fired]
    return f"{feature.fired.upper()} {value:.3f} {'>' if value > limit else '<='} {limit:.3g}"


def shift_text(feature: FeatureResult) -> str:
    """The smallest detectable shift in words: "0.12 sd (0.57)" or "2.1% of values"."""
    shift = feature.detectable_shift
    if shift is None:
        return "-"
    if "sigma" in shift:
        return f"{shift['sigma']:.2g} sd ({shift['value']:.3g})"
    return f"{_percent(shift['share'])} of values"


def summary(result: DriftResult) -> str:
    """The terminal report: a line per span, then a table of the newest span's features, most severe first."""
    lines = [f"model '{result.model}', reference {result.reference_id}: "
             f"{'ALERT' if result.alert else 'no alert'} over {len(result.spans)} span(s)"]
    if result.skipped_windows:
        lines.append(f"skipped {result.skipped_windows} window(s) recorded against another reference (or none); "
                     f"restart the server after rebuilding a reference")
    lines.extend(f"unreadable window file: {path}" for path in result.unreadable)
    for span in result.spans:
        flagged = [f.name for f in span.features if f.status in ("alert", "warn")]
        lines.append(f"{span.start} .. {span.end}  {span.windows:4d} windows {span.rows:9d} rows  "
                     f"{span.status.upper():9s} drifted: {drifted_counts(span)}"
                     + (f"  flagged: {_first(flagged, 8)}" if flagged else ""))
    if not result.spans:
        return "\n".join(lines)
    newest = result.spans[-1]
    header = (f"{'feature':24s} {'role':6s} {'status':9s} {'values':>9s} {'fired':>22s} {'KS (<= bound)':>15s} "
              f"{'D1':>6s} {'PSI':>6s} {'JS':>6s} {'detectable':>16s}  findings")
    lines += ["", f"newest span {newest.start} .. {newest.end}: {newest.status.upper()}"]
    lines += [f"  {reason}" for reason in newest.reasons[:MAX_REASONS]]
    if len(newest.reasons) > MAX_REASONS:
        lines.append(f"  and {len(newest.reasons) - MAX_REASONS} more")
    lines += [header, "-" * len(header)]
    for f in newest.features:
        m = f.metrics or {}
        ks = f"{_number(m.get('ks'))} (<={_number(m.get('ks_bound'), 2)})" if "ks" in m else "-"
        lines.append(f"{f.name[:24]:24s} {f.role:6s} {f.status:9s} {f.count:9d} {fired_text(f):>22s} {ks:>15s} "
                     f"{_number(m.get('d1')):>6s} {_number(m.get('psi')):>6s} {_number(m.get('js')):>6s} "
                     f"{shift_text(f):>16s}  {'; '.join(f.findings)}")
    return "\n".join(lines)
