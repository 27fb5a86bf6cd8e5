"""The HTML drift report as a person sees it: the drifted feature first, bins labelled with their values,
axes and limits on the charts; rendered by headless Chromium into a screenshot."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.drift_quality import report_scenario, screenshot

DRIFTED = "x[22]"
"""The feature report_scenario drifts."""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return report_scenario(tmp_path_factory.mktemp("report"))


def rows(html: str) -> list[str]:
    """Feature names of the first feature table, in order."""
    table = html.split("<h2>Newest span", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>([^<]+)</td><td>(?:input|output)</td>", table)


def test_the_drifted_feature_leads_the_summary_and_the_charts(page: Path) -> None:
    html = page.read_text()
    assert rows(html)[0] == DRIFTED and len(rows(html)) >= 8
    first_chart = html.split('<div class="feature">', 2)[1]
    assert first_chart.startswith(f"<h3>{DRIFTED} ") and "ALERT" in first_chart
    summary = html.split("<h2>Newest span", 1)[1].split("</tr>", 2)[1]
    assert "PSI " in summary and "&plusmn;" in summary and " sd (" in summary
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")


def test_bins_are_labelled_with_their_values_and_charts_have_axes_and_limits(page: Path) -> None:
    html = page.read_text()
    histogram, over_time = re.findall(r"<svg .*?</svg>", html.split('<div class="feature">', 2)[1])
    labels = re.findall(r'<text [^>]*font-size="10" text-anchor="(?:start|middle|end)"[^>]*>(-?[\d.e+]+\.\.-?[\d.e+]+)</text>',
                        histogram)
    assert len(labels) == 3, labels
    low, high = (float(v) for v in labels[0].split(".."))
    assert low < high < float(labels[1].split("..")[0]) < float(labels[2].split("..")[0])
    assert ">0%</text>" in histogram and "%</text>" in histogram.replace(">0%</text>", "")
    assert over_time.count('stroke-dasharray="5,3"') == 4 and ">0</text>" in over_time
    assert "span start (UTC), 4 span(s)" in over_time


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (Debian: apt-get install chromium)")
def test_headless_chromium_screenshot_shows_the_alert_and_its_histogram(page: Path, tmp_path: Path) -> None:
    from PIL import Image
    png = screenshot(page, tmp_path / "report.png")
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert image.shape == (1500, 1200, 3) and png.stat().st_size < 200_000

    def rows_with(color: str) -> np.ndarray:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        return np.flatnonzero((np.abs(image - rgb).max(axis=2) < 16).sum(axis=1) >= 3)

    red, blue, grey = rows_with("#c62828"), rows_with("#1f77b4"), rows_with("#9e9e9e")
    assert red.size and red.min() < 300, "the ALERT badges sit at the top"
    assert blue.size > 50 and grey.size > 50, "the drifted feature's histogram is in view"
