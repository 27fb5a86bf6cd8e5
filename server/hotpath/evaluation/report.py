"""The evaluation job's report for people: one self-contained HTML page in the style of the drift report,
with the span table, the primary metric over time per model version, and the drift report beside it when given."""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

from hotpath.drift.files import utc_iso, write_text_atomically
from hotpath.evaluation.job import CLASSIFICATION, PRIMARY, EvaluationResult

WIDTH, HEIGHT, PAD = 640, 220, 40
STATUS_COLORS = {"ok": "#2e7d32", "alert": "#c62828", "too_few_labels": "#757575"}
VERSION_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}.badge{color:#fff;padding:1px 6px;border-radius:3px;
font-weight:bold}svg{background:#fafafa}iframe{width:100%;height:70em;border:1px solid #ccc}small{color:#666}"""


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{STATUS_COLORS.get(status, "#555")}">{html.escape(status.upper())}</span>'


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _chart(result: EvaluationResult) -> str:
    primary, _ = PRIMARY[result.task]
    starts = sorted({s.start for s in result.spans})
    points = [(starts.index(s.start), s.metrics.get(primary), s.version) for s in result.spans]
    values = [v for _, v, _ in points if v is not None]
    if not values:
        return ""
    reference = result.reference["metrics"].get(primary)
    top = max(values + ([reference] if reference is not None else [])) or 1.0
    x = lambda i: PAD + (WIDTH - 2 * PAD) * (i / (len(starts) - 1) if len(starts) > 1 else 0.5)
    y = lambda v: HEIGHT - PAD - (HEIGHT - 2 * PAD) * v / top
    parts = [f'<text x="{PAD}" y="16">{primary} per span and version (dashed: reference)</text>']
    if reference is not None:
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(reference):.1f}" y2="{y(reference):.1f}" stroke="#999" stroke-dasharray="4"/>')
    for n, version in enumerate(sorted({v for _, _, v in points})):
        color = VERSION_COLORS[n % len(VERSION_COLORS)]
        coords = [(x(i), y(v), v) for i, v, ver in points if ver == version and v is not None]
        if len(coords) > 1:
            parts.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b, _ in coords)}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"><title>version {version}: {v:.4f}</title></circle>'
                  for a, b, v in coords]
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 10}" font-size="11">{html.escape(starts[0])} .. {html.escape(result.spans[-1].end)}; '
                 f'top of chart = {top:.3f}</text>')
    return f'<svg width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'


def render_report(result: EvaluationResult, drift_report: Path | None = None, location: Path | None = None) -> str:
    """The report as one HTML document; `drift_report` is embedded (by relative link from `location`) beside it."""
    names = ["accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"] if result.task == CLASSIFICATION else ["mae", "rmse"]
    primary, _ = PRIMARY[result.task]
    head = "".join(f"<th>{n}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{s.start}</td><td>{s.end}</td><td>{s.version}</td><td>{s.rows}</td><td>{s.labelled}</td>"
        f"<td>{100 * s.coverage:.1f}%</td><td>{_badge(s.status)}</td>"
        + "".join(f"<td>{_number(s.metrics.get(n))}</td>" for n in names) + f"<td>{_number(s.change.get(primary))}</td></tr>"
        for s in result.spans)
    ref = result.reference
    drift = ""
    if drift_report is not None:
        link = html.escape(os.path.relpath(drift_report, location.parent) if location else str(drift_report))
        drift = f'<h2>Drift</h2><p><a href="{link}">{link}</a></p><iframe src="{link}" title="drift report"></iframe>'
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hotpath evaluate: {html.escape(result.model)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Quality report: {html.escape(result.model)} "
            f"{_badge('alert' if result.alert else 'ok')}</h1>"
            f"<p>{result.task}; outputs {html.escape(str(result.outputs))}; generated {utc_iso(time.time())}.<br>"
            f"Reference {ref['start']} .. {ref['end']}: {ref['labelled']} labelled of {ref['rows']} rows, {primary} "
            f"{_number(ref['metrics'].get(primary))}. A span alerts when its {primary} is more than "
            f"{100 * result.max_drop:.0f}% worse than the reference's (with at least {result.min_labels} labels).</p>"
            f"<table><tr><th>span start</th><th>end</th><th>version</th><th>rows</th><th>labelled</th><th>coverage</th>"
            f"<th>status</th>{head}<th>{primary} change</th></tr>{rows}</table><p>{_chart(result)}</p>{drift}</body></html>")


def write_report(result: EvaluationResult, path: Path, drift_report: Path | None = None) -> Path:
    """Write the HTML report to `path` and return it."""
    write_text_atomically(Path(path), render_report(result, drift_report, Path(path)))
    return Path(path)
