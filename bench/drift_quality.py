"""Whether drift alerts can be trusted: false alarms on held-out data from the training distribution,
detection of a small shift, and the exit code on one severe feature among many, on generated data and
on the real tabular sets scikit-learn ships inside its package (nothing is downloaded).

    python -m bench.drift_quality                      # the full measurement, about 8 minutes on 2 cores
    python -m bench.drift_quality --quick              # fewer trials, under 3 minutes
    python -m bench.drift_quality --report-png docs/drift-report.png   # also redraw the README's screenshot

"Held-out data from the training distribution": for generated data, fresh draws; for a real set, its
rows are the distribution, and reference and span are drawn from them with replacement (the sizes
asked for exceed the sets), besides a plain split of the set's own rows into reference and traffic.
Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hotpath._proto import model_config_pb2
from hotpath.drift.cli import main as drift_main
from hotpath.drift.distances import NoiseModel
from hotpath.drift.features import TensorFeatures, plan_features
from hotpath.drift.files import utc_iso, write_json_atomically
from hotpath.drift.job import SpanResult, ThresholdSet, Thresholds, evaluate_span, run_job
from hotpath.drift.recorder import DriftRecorder
from hotpath.drift.reference import Reference, reference_from_arrays
from hotpath.drift.report import write_report
from hotpath.drift.stats import WindowStats
from hotpath.serving.config import TensorSpec
from hotpath.serving.datatypes import DATATYPES

REFERENCE_ROWS = (300, 3_000, 30_000)
SPAN_ROWS = (1_000, 10_000, 100_000)
MAX_FALSE_ALARM_SHARE = 0.01
MIN_DETECTION_RATE = 0.95
SHIFT_SIGMA = 0.25
DETECTION_ROWS = 20_000
WIDE_FEATURES = 256
GENERATED_FEATURES = 64
HOUR_S = 3600
EPOCH_S = 1_700_000_000 - 1_700_000_000 % HOUR_S
"""Where recorded demo traffic starts: a fixed, hour-aligned moment, so runs are comparable."""

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def wide_plans(features: int) -> list[TensorFeatures]:
    """The features of a model with one numeric input `x` [batch, features], outputs not recorded."""
    config = model_config_pb2.ModelDriftConfig(enable=True, skip_outputs=True)
    return plan_features([TensorSpec("x", DATATYPES["FP32"], (features,))], [], config, "wide")


def reference_of(x: np.ndarray) -> Reference:
    """The drift reference `hotpath reference` would build from `x` [rows, features]."""
    return reference_from_arrays("wide", 1, wide_plans(x.shape[1]), {"x": x.astype(np.float32)}, {})


def judge(reference: Reference, x: np.ndarray, thresholds: ThresholdSet = ThresholdSet()) -> SpanResult:
    """The drift job's verdict on one span holding the rows `x`, counted as the recorder counts them."""
    stats = WindowStats(wide_plans(x.shape[1]), reference.features)
    stats.add({"x": x.astype(np.float32)}, {})
    window = {"window_start": utc_iso(EPOCH_S), "rows": stats.rows, "features": stats.features()}
    return evaluate_span(reference, [window], EPOCH_S, EPOCH_S + HOUR_S, thresholds, 0.1, NoiseModel())


def flagged(span: SpanResult) -> list[str]:
    """The features the job flags (drift or alert)."""
    return [f.name for f in span.features if f.status in ("warn", "alert")]


def generated(rng: np.random.Generator, rows: int, features: int = GENERATED_FEATURES) -> np.ndarray:
    """Rows of features of varied shapes: normal, skewed, heavy-tailed, bounded, discrete with ties,
    bimodal and rounded."""
    shapes = [lambda n: rng.standard_normal(n), lambda n: rng.lognormal(0.0, 1.0, n),
              lambda n: rng.standard_t(3, n), lambda n: rng.uniform(-1.0, 1.0, n),
              lambda n: rng.poisson(3.0, n).astype(float), lambda n: rng.exponential(2.0, n),
              lambda n: np.where(rng.random(n) < 0.3, rng.normal(-2, 0.5, n), rng.normal(1, 1, n)),
              lambda n: np.round(rng.normal(10, 2, n))]
    return np.stack([shapes[j % len(shapes)](rows) for j in range(features)], axis=1)


REAL_SETS = ("breast_cancer", "wine", "diabetes", "digits")


def real_set(name: str) -> np.ndarray:
    """One of scikit-learn's bundled tabular sets, as rows (read from the installed package, never downloaded)."""
    from sklearn import datasets
    return getattr(datasets, f"load_{name}")(return_X_y=True)[0].astype(np.float64)


def resampled(rows_of: np.ndarray) -> Sampler:
    """Draws with replacement from a real set's rows: that set taken as the training distribution."""
    return lambda rng, rows: rows_of[rng.integers(0, len(rows_of), rows)]


@dataclass
class FalseAlarms:
    source: str
    reference_rows: int
    span_rows: int
    trials: int
    judged: int
    flagged: int
    alerting_spans: int

    @property
    def share(self) -> float:
        return self.flagged / self.judged if self.judged else 0.0


def false_alarms(source: str, sample: Sampler, reference_rows: int, span_rows: int, trials: int,
                 seed: int) -> FalseAlarms:
    """Features flagged when reference and span come from the same distribution."""
    rng = np.random.default_rng(seed)
    judged = hits = alerting = 0
    for _ in range(trials):
        span = judge(reference_of(sample(rng, reference_rows)), sample(rng, span_rows))
        judged += sum(f.metrics is not None for f in span.features)
        hits += len(flagged(span))
        alerting += span.status == "alert"
    return FalseAlarms(source, reference_rows, span_rows, trials, judged, hits, alerting)


def split_false_alarms(name: str, x: np.ndarray, trials: int, seed: int) -> FalseAlarms:
    """A real set's own rows split at random: a reference of half of them, the rest as one span."""
    rng = np.random.default_rng(seed)
    limits = ThresholdSet(Thresholds(min_count=50))
    judged = hits = alerting = 0
    half = len(x) // 2
    for _ in range(trials):
        order = rng.permutation(len(x))
        span = judge(reference_of(x[order[:half]]), x[order[half:]], limits)
        judged += sum(f.metrics is not None for f in span.features)
        hits += len(flagged(span))
        alerting += span.status == "alert"
    return FalseAlarms(f"{name} split", half, len(x) - half, trials, judged, hits, alerting)


def detection(source: str, sample: Sampler, feature: int, trials: int, seed: int) -> dict:
    """How often a SHIFT_SIGMA mean shift of one feature is flagged, and how often the others are."""
    rng = np.random.default_rng(seed)
    found = others = judged_others = 0
    for _ in range(trials):
        reference_x = sample(rng, DETECTION_ROWS)
        current = sample(rng, DETECTION_ROWS)
        current[:, feature] += SHIFT_SIGMA * reference_x[:, feature].std()
        span = judge(reference_of(reference_x), current)
        names = set(flagged(span))
        found += f"x[{feature}]" in names
        others += len(names - {f"x[{feature}]"})
        judged_others += sum(f.metrics is not None for f in span.features) - 1
    return {"source": source, "trials": trials, "detected": found / trials,
            "false_alarm_share": others / judged_others if judged_others else 0.0}


def severe_exit_code(directory: Path, seed: int) -> dict:
    """`hotpath drift` on a 256-wide input where one feature moved by one sigma: its exit code."""
    rng = np.random.default_rng(seed)
    reference = reference_of(rng.standard_normal((3000, WIDE_FEATURES)))
    write_json_atomically(directory / "reference.json", reference.document)
    traffic = rng.standard_normal((5000, WIDE_FEATURES))
    traffic[:, 17] += 1.0
    record(directory / "windows", reference, [traffic])
    with contextlib.redirect_stdout(io.StringIO()):
        code = drift_main(["drift", "--reference", str(directory / "reference.json"), "--windows",
                           str(directory / "windows"), "--json", str(directory / "result.json"), "--no-report"])
    [span] = json.loads((directory / "result.json").read_text())["spans"]
    top = span["features"][0]
    return {"exit_code": code, "feature": top["name"], "psi": top["metrics"]["psi"], "drifted": span["drifted"]}


def record(directory: Path, reference: Reference, hours: list[np.ndarray]) -> None:
    """Record each array as the `wide` model's traffic of one hour, through the server's recorder."""
    for hour, x in enumerate(hours):
        recorder = DriftRecorder("wide", 1, wide_plans(x.shape[1]), reference, directory, HOUR_S,
                                 clock=lambda hour=hour: EPOCH_S + hour * HOUR_S)
        for start in range(0, len(x), 4096):
            recorder.record({"x": x[start:start + 4096].astype(np.float32)}, {})
        recorder.close()


def report_scenario(directory: Path, seed: int = 7) -> Path:
    """A report a person would get: breast-cancer rows as the reference (500 of them) and four hours
    of traffic drawn from the same rows, where one feature's unit changes in the last two hours."""
    x = real_set("breast_cancer")
    rng = np.random.default_rng(seed)
    reference = reference_of(x[rng.permutation(len(x))[:500]])
    hours = [resampled(x)(rng, 4000) for _ in range(4)]
    for drifted in hours[2:]:
        drifted[:, 22] *= 1.25
    record(directory / "windows", reference, hours)
    result = run_job(reference, directory / "windows", span=HOUR_S, last=4 * HOUR_S)
    return write_report(result, reference, directory / "report.html")


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1500) -> Path:
    """Headless Chromium's picture of the top of an HTML page, as a small palette PNG."""
    from PIL import Image
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium is not on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    Image.open(png).convert("RGB").quantize(64).save(png, optimize=True)
    return png


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the figures and the targets, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.drift_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials")
    parser.add_argument("--json", type=Path, help="write the figures here (default bench/results/drift-quality-<time>.json)")
    parser.add_argument("--report-png", type=Path, help="also screenshot the demo report to this PNG")
    args = parser.parse_args(argv)
    judged_per_cell, detections, splits = (200, 30, 10) if args.quick else (1000, 100, 40)
    began = time.monotonic()
    sets = {name: real_set(name) for name in REAL_SETS}
    widths = {"generated": GENERATED_FEATURES, **{name: x.shape[1] for name, x in sets.items()}}
    sources: dict[str, Sampler] = {"generated": generated, **{name: resampled(x) for name, x in sets.items()}}
    cells = [(source, n, m) for source in sources for n in REFERENCE_ROWS for m in SPAN_ROWS]
    alarms = [false_alarms(source, sources[source], n, m, -(-judged_per_cell // widths[source]), seed)
              for seed, (source, n, m) in enumerate(cells)]
    alarms += [split_false_alarms(name, x, splits, 100 + i) for i, (name, x) in enumerate(sets.items())]
    print(f"{'held-out data':22s} {'reference':>9s} {'span':>7s} {'trials':>6s} {'judged':>7s} {'flagged':>7s} "
          f"{'share':>7s} {'spans alerting':>14s}")
    for a in alarms:
        print(f"{a.source:22s} {a.reference_rows:9d} {a.span_rows:7d} {a.trials:6d} {a.judged:7d} {a.flagged:7d} "
              f"{100 * a.share:6.2f}% {a.alerting_spans:8d} of {a.trials}")
    found = [detection("generated normal", lambda rng, n: rng.standard_normal((n, 16)), 3, detections, 1000),
             detection("breast_cancer", resampled(sets["breast_cancer"]), 0, max(10, detections // 3), 1001)]
    for d in found:
        print(f"{SHIFT_SIGMA} sigma shift of one feature, {d['source']}, reference and span {DETECTION_ROWS} rows: "
              f"detected in {100 * d['detected']:.1f}% of {d['trials']} trials; other features flagged "
              f"{100 * d['false_alarm_share']:.2f}%")
    with tempfile.TemporaryDirectory() as tmp:
        severe = severe_exit_code(Path(tmp), 2000)
        print(f"one feature ({severe['feature']}, PSI {severe['psi']:.3f}) among {WIDE_FEATURES}: "
              f"exit code {severe['exit_code']}, drifted {severe['drifted']}")
        if args.report_png:
            args.report_png.parent.mkdir(parents=True, exist_ok=True)
            screenshot(report_scenario(Path(tmp)), args.report_png)
            print(f"screenshot: {args.report_png} ({args.report_png.stat().st_size} bytes)")
    worst = max(a.share for a in alarms)
    targets = {
        f"false alarms <= {100 * MAX_FALSE_ALARM_SHARE:g}% of features (worst cell {100 * worst:.2f}%)":
            worst <= MAX_FALSE_ALARM_SHARE,
        f"{SHIFT_SIGMA} sigma shift detected in >= {100 * MIN_DETECTION_RATE:g}% of trials":
            all(d["detected"] >= MIN_DETECTION_RATE for d in found),
        "one severe feature among 256 exits 1": severe["exit_code"] == 1,
    }
    for text, met in targets.items():
        print(f"{'MET' if met else 'MISSED'}: {text}")
    print(f"took {time.monotonic() - began:.0f} s")
    path = args.json or Path("bench/results") / f"drift-quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"false_alarms": [{**a.__dict__, "share": a.share} for a in alarms],
                                "detection": found, "severe": severe,
                                "targets": targets}, indent=2))
    print(f"figures: {path}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
