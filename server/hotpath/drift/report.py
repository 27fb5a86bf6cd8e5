"""The drift job's report for people: one self-contained HTML page (inline SVG, no scripts, no
network) that reads printed or as a screenshot: the verdict and why, a summary table of the newest
span's features, most severe first, then for each flagged feature its histogram against the reference
and its distances over the run, with the limits they were held to."""

from __future__ import annotations

import html
import time
from pathlib import Path

from hotpath.drift.files import utc_iso, write_text_atomically
from hotpath.drift.job import DriftResult, FeatureResult, drifted_counts, fired_text, shift_text
from hotpath.drift.reference import Reference

WIDTH, HEIGHT = 560, 230
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 26, 44
"""Plot margins in px: the y axis labels sit left, the bin or time labels below."""
TICKS = 4
COLORS = {"ks": "#1f77b4", "d1": "#ff7f0e", "psi": "#2ca02c", "js": "#d62728"}
REFERENCE_COLOR, CURRENT_COLOR = "#9e9e9e", "#1f77b4"
STATUS_COLORS = {"ok": "#2e7d32", "warn": "#ef6c00", "alert": "#c62828", "too_small": "#757575",
                 "no_data": "#757575", "empty": "#757575"}
MAX_CHARTED = 40
"""Most flagged features given charts (and rows in the top table); the table at the end lists every feature."""
SUMMARY_ROWS = 8
"""Fewest rows of the top table, the most severe features, flagged or not."""
MAX_REASONS = 10
UNFLAGGED_CHARTED = 3
"""When nothing is flagged, the most severe features still get charts, to show what was compared."""
STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em 2em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}td.n{text-align:right}
.feature{margin:1.2em 0;border-top:2px solid #ccc}.feature h3{margin:.5em 0 .2em}
.badge{color:#fff;padding:1px 6px;border-radius:3px;font-weight:bold;font-size:12px}svg{background:#fafafa;margin-right:1em}
.charts{display:flex;flex-wrap:wrap}small{color:#666}ul{margin:.2em 0}"""


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{STATUS_COLORS.get(status, "#555")}">{html.escape(status.upper())}</span>'


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _bin_labels(reference: dict) -> list[str]:
    if reference["kind"] == "categorical":
        return [str(c) for c in reference["categories"]] + ["(unseen)"]
    low, high = reference["range"] or (None, None)
    bounds = [low, *reference["edges"], high]
    return [f"{a:.3g}..{b:.3g}" for a, b in zip(bounds[:-1], bounds[1:])]


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 11, color: str = "#333") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}">'
            f'{html.escape(text)}</text>')


def _y_axis(top: float, percent: bool) -> str:
    """Gridlines and labels from 0 to `top` on the left of a chart."""
    parts = []
    for i in range(TICKS + 1):
        value = top * i / TICKS
        y = HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * i / TICKS
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        parts.append(_text(LEFT - 4, y + 4, f"{100 * value:.3g}%" if percent else f"{value:.3g}", "end", 10))
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="#333"/>')
    parts.append(f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" stroke="#333"/>')
    return "".join(parts)


def _labelled_bins(count: int) -> list[int]:
    """Bins that carry a value label under the x axis: first, middle and last, and every bin when few."""
    return list(range(count)) if count <= 6 else [0, count // 2, count - 1]


def _histogram(feature: FeatureResult, reference: dict) -> str:
    ref, cur = feature.reference_shares, feature.current_shares
    labels = _bin_labels(reference)
    top = max(max(ref), max(cur)) * 1.1 or 1.0
    slot = (WIDTH - LEFT - RIGHT) / len(ref)
    plot = HEIGHT - TOP - BOTTOM
    parts = [_y_axis(top, percent=True)]
    for i, (r, c) in enumerate(zip(ref, cur)):
        x = LEFT + i * slot
        for offset, share, color, who in ((0.1, r, REFERENCE_COLOR, "reference"), (0.5, c, CURRENT_COLOR, "current")):
            h = plot * share / top
            parts.append(f'<rect x="{x + offset * slot:.1f}" y="{HEIGHT - BOTTOM - h:.1f}" width="{0.4 * slot:.1f}" '
                         f'height="{h:.1f}" fill="{color}"><title>{html.escape(labels[i])}: {who} '
                         f'{100 * share:.2f}%</title></rect>')
    shown = _labelled_bins(len(ref))
    for rank, i in enumerate(shown):
        anchor = "start" if i == 0 and len(shown) > 1 else "end" if i == len(ref) - 1 and len(shown) > 1 else "middle"
        x = LEFT + (i + {"start": 0.0, "middle": 0.5, "end": 1.0}[anchor]) * slot
        parts.append(f'<line x1="{LEFT + (i + 0.5) * slot:.1f}" y1="{HEIGHT - BOTTOM}" x2="{LEFT + (i + 0.5) * slot:.1f}" '
                     f'y2="{HEIGHT - BOTTOM + 4}" stroke="#333"/>')
        parts.append(_text(x, HEIGHT - BOTTOM + 15 + 11 * (rank % 2 if len(shown) > 3 else 0), labels[i], anchor, 10))
    axis = "value range of each reference-quantile bin" if reference["kind"] == "numeric" else "category"
    parts.append(_text(LEFT, HEIGHT - 4, axis, size=10, color="#666"))
    title = (f'<text x="{LEFT}" y="16" font-size="12">share of values per bin: <tspan fill="{REFERENCE_COLOR}">'
             f'reference</tspan> vs <tspan fill="{CURRENT_COLOR}">current</tspan></text>')
    return f'<svg width="{WIDTH}" height="{HEIGHT}" role="img">{title}{"".join(parts)}</svg>'


def _over_time(name: str, result: DriftResult) -> str:
    found = [next((f for f in span.features if f.name == name), None) for span in result.spans]
    series = {metric: [(f.metrics or {}).get(metric) if f else None for f in found] for metric in COLORS}
    limits = {metric: [(f.limits or {}).get(metric) if f else None for f in found] for metric in COLORS}
    values = [v for table in (series, limits) for points in table.values() for v in points if v is not None]
    if not values:
        return ""
    top = max(values) * 1.1
    count = len(result.spans)
    x = lambda i: LEFT + (WIDTH - LEFT - RIGHT) * (i / (count - 1) if count > 1 else 0.5)
    y = lambda v: HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * v / top
    parts = [_y_axis(top, percent=False),
             f'<text x="{LEFT}" y="16" font-size="12">distance per span (dashed: its limit): '
             + " ".join(f'<tspan fill="{c}">{m.upper()}</tspan>' for m, c in COLORS.items()) + "</text>"]
    for metric, color in COLORS.items():
        for points, dash in ((limits[metric], ' stroke-dasharray="5,3"'), (series[metric], "")):
            coords = [(x(i), y(v), v) for i, v in enumerate(points) if v is not None]
            if len(coords) > 1:
                path = " ".join(f"{a:.1f},{b:.1f}" for a, b, _ in coords)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            elif coords and dash:
                a, b, _ = coords[0]
                parts.append(f'<line x1="{LEFT}" y1="{b:.1f}" x2="{WIDTH - RIGHT}" y2="{b:.1f}" stroke="{color}" '
                             f'stroke-width="1.5"{dash}/>')
            if not dash:
                parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"><title>{metric.upper()} '
                             f'{v:.3f}</title></circle>' for a, b, v in coords)
    parts.append(_text(LEFT, HEIGHT - BOTTOM + 15, result.spans[0].start, size=10))
    if count > 1:
        parts.append(_text(WIDTH - RIGHT, HEIGHT - BOTTOM + 15, result.spans[-1].start, "end", 10))
    parts.append(_text(LEFT, HEIGHT - 4, f"span start (UTC), {count} span(s)", size=10, color="#666"))
    return f'<svg width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'


def _summary_row(feature: FeatureResult) -> str:
    def moments(mean: float | None, std: float | None) -> str:
        return "-" if mean is None else f"{mean:.4g} &plusmn; {_g(std)}"
    return (f"<tr><td>{html.escape(feature.name)}</td><td>{feature.role}</td><td>{_badge(feature.status)}</td>"
            f"<td>{html.escape(fired_text(feature))}</td><td class='n'>{feature.severity:.2f}</td>"
            f"<td class='n'>{moments(feature.reference_mean, feature.reference_std)}</td>"
            f"<td class='n'>{moments(feature.current_mean, feature.current_std)}</td>"
            f"<td class='n'>{feature.count}</td><td>{html.escape(shift_text(feature))}</td></tr>")


def _feature_section(feature: FeatureResult, reference: dict, result: DriftResult) -> str:
    charts = _histogram(feature, reference) if feature.current_shares else ""
    findings = "".join(f"<li>{html.escape(text)}</li>" for text in feature.findings)
    return (f'<div class="feature"><h3>{html.escape(feature.name)} {_badge(feature.status)} '
            f'<small>{feature.role}, {feature.kind}, {feature.count} values in the newest span; smallest detectable '
            f'shift {html.escape(shift_text(feature))}</small></h3><ul>{findings}</ul>'
            f'<div class="charts">{charts}{_over_time(feature.name, result)}</div></div>')


def _feature_table(features: list[FeatureResult]) -> str:
    rows = "".join(_summary_row(f) for f in features)
    return (f"<table><tr><th>feature</th><th>role</th><th>status</th><th>distance vs limit</th><th>severity</th>"
            f"<th>reference mean &plusmn; std</th><th>current mean &plusmn; std</th><th>values</th>"
            f"<th>smallest detectable shift</th></tr>{rows}</table>")


def _newest_span(result: DriftResult, reference: Reference) -> str:
    newest = result.spans[-1]
    flagged = [f for f in newest.features if f.status in ("alert", "warn")]
    judged = [f for f in newest.features if f.metrics is not None or f.quality]
    top = newest.features[:max(len(flagged[:MAX_CHARTED]), SUMMARY_ROWS)]
    charted = flagged[:MAX_CHARTED] or [f for f in newest.features if f.metrics is not None][:UNFLAGGED_CHARTED]
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in newest.reasons[:MAX_REASONS])
    if len(newest.reasons) > MAX_REASONS:
        reasons += f"<li>and {len(newest.reasons) - MAX_REASONS} more</li>"
    heading = ("Flagged features, most severe first" if flagged
               else f"Nothing flagged; the {len(charted)} features nearest their limits")
    return (f"<h2>Newest span {newest.start} .. {newest.end} {_badge(newest.status)}</h2>"
            f"<p>Drifted: {html.escape(drifted_counts(newest))}; {len(judged)} of {len(newest.features)} features "
            f"judged.</p>" + (f"<ul>{reasons}</ul>" if reasons else "") + _feature_table(top)
            + f"<h2>{heading}</h2>" + "".join(_feature_section(f, reference.features[f.name], result) for f in charted)
            + (f"<p><small>{len(flagged) - MAX_CHARTED} more flagged features are in the table below.</small></p>"
               if len(flagged) > MAX_CHARTED else ""))


def render_report(result: DriftResult, reference: Reference) -> str:
    """The report as one HTML document."""
    spans = "".join(
        f"<tr><td>{s.start}</td><td>{s.end}</td><td class='n'>{s.windows}</td><td class='n'>{s.rows}</td>"
        f"<td>{_badge(s.status)}</td><td>{html.escape(drifted_counts(s))}</td></tr>" for s in result.spans)
    limits = ", ".join(f"{k} {v}" for k, v in result.thresholds.items())
    every = (f"<h2>Every feature of the newest span</h2>{_feature_table(result.spans[-1].features)}"
             if result.spans and len(result.spans[-1].features) > SUMMARY_ROWS else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hotpath drift: {html.escape(result.model)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Drift report: {html.escape(result.model)} "
            f"{_badge('alert' if result.alert else 'ok')}</h1>"
            f"<p>Reference {result.reference_id} ({reference.rows} rows, model version {reference.version}); "
            f"generated {utc_iso(time.time())}. A distance counts when it is over both its threshold and what "
            f"noise gives at the reference's and the span's sizes. The model alerts on a data-quality rule, a severe "
            f"drift (PSI over psi_alert), a drift of an important feature, or when at least "
            f"{100 * result.alert_share:.0f}% of the inputs or outputs drift.</p>"
            + (_newest_span(result, reference) if result.spans else "<p>No spans in this run.</p>")
            + f"<h2>Spans of the run</h2><table><tr><th>span start</th><th>end</th><th>windows</th><th>rows</th>"
              f"<th>status</th><th>drifted</th></tr>{spans}</table>{every}"
              f"<p><small>Thresholds: {html.escape(limits)}</small></p></body></html>")


def write_report(result: DriftResult, reference: Reference, path: Path) -> Path:
    """Write the HTML report to `path` and return it."""
    write_text_atomically(Path(path), render_report(result, reference))
    return Path(path)
