"""The drift job's report for people: one self-contained HTML page (inline SVG, no scripts, no
network), with a span table and, per feature, reference-vs-current histograms and distances over time."""

from __future__ import annotations

import html
import time
from pathlib import Path

from hotpath.drift.files import utc_iso, write_text_atomically
from hotpath.drift.job import DriftResult, FeatureResult
from hotpath.drift.reference import Reference

WIDTH, HEIGHT, PAD = 560, 200, 36
COLORS = {"ks": "#1f77b4", "d1": "#ff7f0e", "psi": "#2ca02c", "js": "#d62728"}
STATUS_COLORS = {"ok": "#2e7d32", "warn": "#ef6c00", "alert": "#c62828", "too_small": "#757575",
                 "no_data": "#757575", "empty": "#757575"}
STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}.feature{margin:2em 0;border-top:2px solid #ccc}
.badge{color:#fff;padding:1px 6px;border-radius:3px;font-weight:bold}svg{background:#fafafa;margin-right:1em}
.charts{display:flex;flex-wrap:wrap}small{color:#666}"""


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{STATUS_COLORS.get(status, "#555")}">{html.escape(status.upper())}</span>'


def _bin_labels(reference: dict) -> list[str]:
    if reference["kind"] == "categorical":
        return [str(c) for c in reference["categories"]] + ["(unseen)"]
    low, high = reference["range"] or (None, None)
    bounds = [low, *reference["edges"], high]
    return [f"{a:.4g} .. {b:.4g}" for a, b in zip(bounds[:-1], bounds[1:])]


def _histogram(feature: FeatureResult, reference: dict) -> str:
    ref, cur = feature.reference_shares, feature.current_shares
    labels = _bin_labels(reference)
    top = max(max(ref), max(cur)) or 1.0
    slot = (WIDTH - 2 * PAD) / len(ref)
    bars = []
    for i, (r, c) in enumerate(zip(ref, cur)):
        x = PAD + i * slot
        for offset, share, color, who in ((0.1, r, "#9e9e9e", "reference"), (0.5, c, "#1f77b4", "current")):
            h = (HEIGHT - 2 * PAD) * share / top
            bars.append(f'<rect x="{x + offset * slot:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{0.4 * slot:.1f}" '
                        f'height="{h:.1f}" fill="{color}"><title>{html.escape(labels[i])}: {who} '
                        f'{100 * share:.2f}%</title></rect>')
    axis = ("ordered reference quantile bins (hover for ranges)" if reference["kind"] == "numeric"
            else "categories (hover for names)")
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" role="img"><text x="{PAD}" y="16">share per bin: '
            f'<tspan fill="#9e9e9e">reference</tspan> vs <tspan fill="#1f77b4">current</tspan></text>'
            f'{"".join(bars)}<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#333"/>'
            f'<text x="{PAD}" y="{HEIGHT - 10}" font-size="11">{axis}</text></svg>')


def _over_time(name: str, result: DriftResult) -> str:
    series = {metric: [next((f.metrics or {}).get(metric) for f in span.features if f.name == name)
                       for span in result.spans] for metric in COLORS}
    values = [v for points in series.values() for v in points if v is not None]
    if not values:
        return ""
    top = max(max(values), 0.3)
    count = len(result.spans)
    x = lambda i: PAD + (WIDTH - 2 * PAD) * (i / (count - 1) if count > 1 else 0.5)
    y = lambda v: HEIGHT - PAD - (HEIGHT - 2 * PAD) * v / top
    parts = [f'<text x="{PAD}" y="16">distances per span: '
             + " ".join(f'<tspan fill="{c}">{m.upper()}</tspan>' for m, c in COLORS.items()) + "</text>"]
    for metric, points in series.items():
        coords = [(x(i), y(v)) for i, v in enumerate(points) if v is not None]
        if len(coords) > 1:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[metric]}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{COLORS[metric]}"><title>{metric.upper()} '
                     f'{v:.3f}</title></circle>' for (a, b), v in zip(coords, [v for v in points if v is not None]))
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 10}" font-size="11">{html.escape(result.spans[0].start)} .. '
                 f'{html.escape(result.spans[-1].end)}; top of chart = {top:.2f}</text>')
    return f'<svg width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'


def render_report(result: DriftResult, reference: Reference) -> str:
    """The report as one HTML document."""
    rows = "".join(
        f"<tr><td>{s.start}</td><td>{s.end}</td><td>{s.windows}</td><td>{s.rows}</td><td>{_badge(s.status)}</td>"
        f"<td>{100 * s.drifted_share:.0f}%</td><td>{html.escape(', '.join(f.name for f in s.features if f.status == 'alert'))}</td></tr>"
        for s in result.spans)
    limits = ", ".join(f"{k} {v}" for k, v in result.thresholds.items())
    sections = []
    newest = result.spans[-1] if result.spans else None
    for feature in newest.features if newest else []:
        ref = reference.features[feature.name]
        charts = _histogram(feature, ref) if feature.current_shares else ""
        findings = "".join(f"<li>{html.escape(text)}</li>" for text in feature.findings)
        sections.append(f'<div class="feature"><h3>{html.escape(feature.name)} {_badge(feature.status)} '
                        f'<small>{feature.role}, {feature.kind}, {feature.count} values in the newest span</small></h3>'
                        f'<ul>{findings}</ul><div class="charts">{charts}{_over_time(feature.name, result)}</div></div>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hotpath drift: {html.escape(result.model)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Drift report: {html.escape(result.model)} "
            f"{_badge('alert' if result.alert else 'ok')}</h1>"
            f"<p>Reference {result.reference_id} ({reference.rows} rows, model version {reference.version}); "
            f"generated {utc_iso(time.time())}. Model alerts on any data-quality rule or when at least "
            f"{100 * result.alert_share:.0f}% of features drift.<br><small>Thresholds: {html.escape(limits)}</small></p>"
            f"<table><tr><th>span start</th><th>end</th><th>windows</th><th>rows</th><th>status</th>"
            f"<th>drifted</th><th>flagged</th></tr>{rows}</table>"
            f"<h2>Features in the newest span</h2>{''.join(sections)}</body></html>")


def write_report(result: DriftResult, reference: Reference, path: Path) -> Path:
    """Write the HTML report to `path` and return it."""
    write_text_atomically(Path(path), render_report(result, reference))
    return Path(path)
