"""Smoke test of the prediction log's bench: one short round of each setting runs, logs, and reports ratios."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import evaluation_overhead


def test_the_bench_measures_every_setting_and_logs_at_100_percent(tmp_path: Path) -> None:
    if shutil.which("h2load") is None:
        pytest.skip("h2load is not installed (apt-get install nghttp2-client)")
    pytest.importorskip("pyarrow", reason="pip install pyarrow for the default Parquet store")
    result_file = tmp_path / "result.json"
    assert evaluation_overhead.main(["--rounds", "1", "--duration", "1", "--json", str(result_file)]) in (0, 1)
    result = json.loads(result_file.read_text())
    assert set(result["ratios"]) == {"off", "1%", "100%"} and result["ratios"]["off"] == 1.0
    assert result["logged"]["100%"] > 1000 and all(len(v) == 1 and v[0] > 0 for v in result["throughput_rps"].values())
