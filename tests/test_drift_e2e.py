"""End to end: a server with drift recording on gets shifted traffic over gRPC; the drift job flags it."""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as grpcclient

from drift_models import make_data, make_model, save_npz
from hotpath.drift.cli import main


def test_server_records_shifted_traffic_and_the_job_flags_it(tmp_path: Path, start_server, capsys) -> None:
    repository = tmp_path / "models"
    make_model(repository)
    reference = save_npz(tmp_path / "reference.npz", make_data(5000, seed=1))
    assert main(["reference", "--model-repository", str(repository), "--model", "tabular", "--data", str(reference)]) == 0
    server = start_server(repository)
    traffic = make_data(2048, seed=2, shift=0.5, shifted_feature=2)
    client = grpcclient.InferenceServerClient(server.url)
    for start in range(0, 2048, 32):
        x = grpcclient.InferInput("x", [32, 4], "FP32")
        x.set_data_from_numpy(traffic["x"][start:start + 32])
        city = grpcclient.InferInput("city", [32], "BYTES")
        city.set_data_from_numpy(traffic["city"][start:start + 32])
        result = client.infer("tabular", [x, city])
        assert result.as_numpy("score").shape == (32, 1)
    client.close()
    assert server.stop() == 0, server.output()
    windows = list((repository / "tabular" / "drift" / "windows").glob("*.json"))
    assert windows, server.output()
    capsys.readouterr()
    code = main(["drift", "--model-repository", str(repository), "--model", "tabular", "--no-report"])
    out = capsys.readouterr().out
    assert code == 1, out
    flagged = [line.split()[0] for line in out.splitlines()
               if len(line.split()) > 2 and line.split()[1] in ("input", "output") and line.split()[2] in ("alert", "warn")]
    assert flagged == ["x[2]"], out
