"""Soak and overload: a hotpath server under long load keeps its memory and descriptors flat, and sheds
a load it cannot carry with RESOURCE_EXHAUSTED while what it accepts stays fast.

    python -m bench.soak --minutes 3

prints, and writes as JSON beside the bench's other results:
- soak: the medium model at 64 in flight for `--minutes`; RSS and open descriptors every `--every` s,
  and their growth from the first sample (after a warm-up round) to the last;
- overload: the large model with `max_queue_size` 64 under 512 callers; the shed share (every
  failure's status), the accepted requests' latency quantiles, and the latency of lone requests
  right after the burst (recovery).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from google.protobuf import text_format

from bench import loadgen, procfs
from bench.models import MODELS, model_config, write_repository
from bench.server_process import ServerProcess

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OVERLOAD_QUEUE = 64
OVERLOAD_CALLERS = 512


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _server(repository: Path, log: Path) -> ServerProcess:
    return ServerProcess("hotpath", [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository", str(repository),
                                     "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], log)


def _bodies(server: ServerProcess, model: str) -> list[bytes]:
    """1,000 requests of random rows for `model`, built once per server."""
    specs, batched = loadgen.model_inputs(server.target, model)
    return loadgen.request_bodies(model, loadgen.input_pool("random", specs, 1000, 0), batched)


def _load(server: ServerProcess, model: str, bodies: list[bytes], concurrency: int, seconds: float) -> loadgen.LoadResult:
    return loadgen.run_python(server.target, model, bodies, loadgen.input_order("random", len(bodies), len(bodies), 0),
                              "random", concurrency, seconds, server.process.pid)


def soak(scratch: Path, minutes: float, every_s: float) -> dict:
    """RSS and descriptors of a server kept at 64 in flight for `minutes`."""
    repository = write_repository(scratch / "soak", ["medium"])
    with _server(repository, scratch / "soak.log") as server:
        bodies = _bodies(server, "medium")
        _load(server, "medium", bodies, 64, 5)
        samples, requests, errors = [], 0, {}
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            result = _load(server, "medium", bodies, 64, every_s)
            requests += result.requests
            for code, count in result.errors.items():
                errors[code] = errors.get(code, 0) + count
            samples.append({"t_s": round(minutes * 60 - (end - time.monotonic()), 1),
                            "rss_mib": procfs.rss_bytes(server.process.pid) / 2**20,
                            "fds": open_descriptors(server.process.pid), "rps": round(result.throughput_rps)})
    first, last = samples[0], samples[-1]
    return {"minutes": minutes, "requests": requests, "errors": errors, "samples": samples,
            "rss_growth_pct": 100 * (last["rss_mib"] / first["rss_mib"] - 1), "fds_first": first["fds"], "fds_last": last["fds"]}


def overload(scratch: Path, seconds: float) -> dict:
    """The large model, queue bounded at OVERLOAD_QUEUE, under OVERLOAD_CALLERS closed-loop callers."""
    repository = write_repository(scratch / "overload", ["large"])
    config = model_config(MODELS["large"])
    config.dynamic_batching.default_queue_policy.max_queue_size = OVERLOAD_QUEUE
    (repository / "large" / "config.pbtxt").write_text(text_format.MessageToString(config))
    with _server(repository, scratch / "overload.log") as server:
        bodies = _bodies(server, "large")
        _load(server, "large", bodies, 8, 3)
        baseline = _load(server, "large", bodies, 1, 3)
        burst = _load(server, "large", bodies, OVERLOAD_CALLERS, seconds)
        after = _load(server, "large", bodies, 1, 3)
    shed = sum(burst.errors.values())
    return {"callers": OVERLOAD_CALLERS, "max_queue_size": OVERLOAD_QUEUE, "accepted": burst.requests, "errors": burst.errors,
            "shed_share": shed / max(shed + burst.requests, 1), "accepted_latency_ms": burst.latency_ms,
            "lone_before_ms": baseline.latency_ms, "lone_after_ms": after.latency_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="soak duration (default 3)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--overload-seconds", type=float, default=20.0, help="length of the overload burst (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotpath-soak-") as scratch:
        report = {"overload": overload(Path(scratch), args.overload_seconds), "soak": soak(Path(scratch), args.minutes, args.every)}
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    s, o = report["soak"], report["overload"]
    print(f"soak: {s['requests']} requests in {s['minutes']:g} min, errors {s['errors'] or 'none'}; RSS {s['samples'][0]['rss_mib']:.1f} -> "
          f"{s['samples'][-1]['rss_mib']:.1f} MiB ({s['rss_growth_pct']:+.2f}%), fds {s['fds_first']} -> {s['fds_last']}")
    print(f"overload: {o['callers']} callers, queue {o['max_queue_size']}: shed {100 * o['shed_share']:.1f}% ({o['errors']}), "
          f"accepted p50 {o['accepted_latency_ms']['p50']:.1f} ms p99 {o['accepted_latency_ms']['p99']:.1f} ms; lone request "
          f"p50 {o['lone_before_ms']['p50']:.1f} ms before, {o['lone_after_ms']['p50']:.1f} ms after")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
