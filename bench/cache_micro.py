"""Per-operation cost of the response cache, in nanoseconds, for a 1-row fp32 request.

A hit costs `request_key` + `get`; a miss costs `request_key` + `get` + `put` (the put evicts,
as it does once the cache is full). Run: python -m bench.cache_micro
"""

import argparse
import time
from collections.abc import Callable

import numpy as np

from hotpath.serving.cache import ResponseCache, request_key

MODEL = "large"
OUTPUTS = ["OUTPUT0"]


def best_ns(operation: Callable[[int], object], count: int, repeats: int = 7) -> float:
    """The fastest of `repeats` runs of operation(0..count-1), per call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for i in range(count):
            operation(i)
        best = min(best, (time.perf_counter_ns() - start) / count)
    return best


def measure(features: int, distinct: int, count: int) -> dict[str, float]:
    rng = np.random.default_rng(features)
    bodies = [rng.standard_normal((1, features), dtype=np.float32).tobytes() for _ in range(distinct)]
    requests = [[("INPUT0", "FP32", [1, features], body)] for body in bodies]
    response = rng.standard_normal(features, dtype=np.float32).tobytes()

    def key(i: int) -> bytes:
        return request_key(MODEL, 1, requests[i % distinct], OUTPUTS)

    keys = [key(i) for i in range(distinct)]
    hot = ResponseCache(1 << 30)
    for k in keys:
        hot.put(MODEL, k, response)
    full = ResponseCache(64 * (len(keys[0]) + len(response) + 256))

    def hit(i: int) -> object:
        return hot.get(MODEL, key(i))

    def miss_and_put(i: int) -> None:
        k = key(i)
        if full.get(MODEL, k) is None:
            full.put(MODEL, k, response)

    results = {
        "request_key": best_ns(key, count),
        "get (hit)": best_ns(lambda i: hot.get(MODEL, keys[i % distinct]), count),
        "request_key + get (hit)": best_ns(hit, count),
        "request_key + get (miss) + put (evicts)": best_ns(miss_and_put, count),
    }
    assert hot.stats(MODEL).misses == 0 and full.stats(MODEL).hits == 0
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="calls per timed run")
    args = parser.parse_args()
    for features in (16, 1024):
        print(f"1 x {features} fp32 ({features * 4} bytes of input):")
        for name, ns in measure(features, distinct=4096, count=args.count).items():
            print(f"  {name:<42} {ns:8.0f} ns")


if __name__ == "__main__":
    main()
