"""The response cache: exact keys, true LRU under a byte budget, per-model stats, `--cache-size` parsing."""

import asyncio
import random
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest

from hotpath.serving.cache import ENTRY_OVERHEAD, CacheStats, ResponseCache, request_key
from hotpath.settings import parse_size


class ReferenceLRU:
    """The cache's contract, written plainly: one OrderedDict of (model, key) -> value, LRU first."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()
        self.counters: dict[str, list[int]] = {}

    @staticmethod
    def size(key: bytes, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    @property
    def total(self) -> int:
        return sum(self.size(key, value) for (_, key), value in self.entries.items())

    def get(self, model: str, key: bytes) -> bytes | None:
        counters = self.counters.setdefault(model, [0, 0, 0])
        if (model, key) not in self.entries:
            counters[1] += 1
            return None
        counters[0] += 1
        self.entries.move_to_end((model, key))
        return self.entries[(model, key)]

    def put(self, model: str, key: bytes, value: bytes) -> None:
        self.counters.setdefault(model, [0, 0, 0])
        self.entries.pop((model, key), None)
        if self.size(key, value) > self.budget:
            return
        while self.total + self.size(key, value) > self.budget:
            (evicted_model, _), _ = self.entries.popitem(last=False)
            self.counters[evicted_model][2] += 1
        self.entries[(model, key)] = value

    def drop_model(self, model: str) -> int:
        doomed = [entry for entry in self.entries if entry[0] == model]
        for entry in doomed:
            del self.entries[entry]
        return len(doomed)

    def stats(self, model: str) -> CacheStats:
        hits, misses, evictions = self.counters.get(model, [0, 0, 0])
        mine = [(key, value) for (owner, key), value in self.entries.items() if owner == model]
        return CacheStats(hits, misses, evictions, len(mine), sum(self.size(k, v) for k, v in mine))


def fp32_request(features: int = 16, seed: int = 0) -> list[tuple[str, str, list[int], bytes]]:
    data = np.random.default_rng(seed).standard_normal((1, features), dtype=np.float32)
    return [("INPUT0", "FP32", [1, features], data.tobytes())]


def entry_size(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


# --- keys -------------------------------------------------------------------------------------


def test_identical_requests_share_a_key_and_hit_bit_identical_bytes():
    inputs = fp32_request()
    key = request_key("m", 1, inputs, ["OUTPUT0"])
    assert len(key) == 32
    assert request_key("m", 1, fp32_request(), ["OUTPUT0"]) == key

    response = np.random.default_rng(1).standard_normal(4, dtype=np.float32).tobytes()
    cache = ResponseCache(1 << 20)
    assert cache.get("m", key) is None
    cache.put("m", key, response)
    assert cache.get("m", request_key("m", 1, fp32_request(), ["OUTPUT0"])) == response


def test_buffer_kinds_of_the_same_bytes_give_the_same_key():
    (name, datatype, shape, data), = fp32_request()
    array = np.frombuffer(data, dtype=np.float32)
    expected = request_key("m", 1, [(name, datatype, shape, data)], ["OUTPUT0"])
    for view in (memoryview(data), bytearray(data), array, memoryview(array).cast("B")):
        assert request_key("m", 1, [(name, datatype, tuple(shape), view)], ("OUTPUT0",)) == expected


BASE = dict(model="m", version=1, inputs=[("INPUT0", "FP32", [1, 4], bytes(range(16)))], outputs=["OUTPUT0"])
VARIANTS = {
    "model name": dict(BASE, model="m2"),
    "model version": dict(BASE, version=2),
    "input name": dict(BASE, inputs=[("INPUT1", "FP32", [1, 4], bytes(range(16)))]),
    "input datatype": dict(BASE, inputs=[("INPUT0", "INT32", [1, 4], bytes(range(16)))]),
    "input shape": dict(BASE, inputs=[("INPUT0", "FP32", [4, 1], bytes(range(16)))]),
    "input rank": dict(BASE, inputs=[("INPUT0", "FP32", [1, 1, 4], bytes(range(16)))]),
    "one input byte": dict(BASE, inputs=[("INPUT0", "FP32", [1, 4], bytes(range(15)) + b"\x10")]),
    "input length": dict(BASE, inputs=[("INPUT0", "FP32", [1, 4], bytes(range(17)))]),
    "extra input": dict(BASE, inputs=BASE["inputs"] + [("INPUT1", "FP32", [1, 0], b"")]),
    "requested outputs": dict(BASE, outputs=["OUTPUT1"]),
    "more requested outputs": dict(BASE, outputs=["OUTPUT0", "OUTPUT1"]),
    "no requested outputs": dict(BASE, outputs=[]),
    # Fields that run together when concatenated must still differ: framing, not luck.
    "name/datatype boundary": dict(BASE, inputs=[("INPUT0F", "P32", [1, 4], bytes(range(16)))]),
    "datatype/shape boundary": dict(BASE, inputs=[("INPUT0", "FP32\x01", [4], bytes(range(16)))]),
    "model/output boundary": dict(BASE, model="mO", outputs=["UTPUT0"]),
}


def variant_key(spec: dict) -> bytes:
    return request_key(spec["model"], spec["version"], spec["inputs"], spec["outputs"])


@pytest.mark.parametrize("field", VARIANTS)
def test_any_difference_in_the_request_misses(field):
    cache = ResponseCache(1 << 20)
    cache.put("m", variant_key(BASE), b"base answer")
    assert variant_key(VARIANTS[field]) != variant_key(BASE)
    assert cache.get("m", variant_key(VARIANTS[field])) is None
    assert cache.get("m", variant_key(BASE)) == b"base answer"


def test_bytes_split_differently_across_inputs_differ():
    whole = [("A", "UINT8", [4], b"abcd"), ("B", "UINT8", [0], b"")]
    split = [("A", "UINT8", [4], b"ab"), ("B", "UINT8", [0], b"cd")]
    assert request_key("m", 1, whole, []) != request_key("m", 1, split, [])


def test_shape_and_data_length_cannot_run_together():
    """Without a rank prefix, a longer shape could swallow the data's length prefix."""
    data = np.int64(8).tobytes() + b"ABCDEFGH"
    longer_shape = [("X", "UINT8", [2, len(data)], b"ABCDEFGH")]
    assert request_key("m", 1, [("X", "UINT8", [2], data)], []) != request_key("m", 1, longer_shape, [])


def test_all_keys_of_many_distinct_requests_are_distinct():
    keys = {request_key("m", 1, fp32_request(16, seed), ["OUTPUT0"]) for seed in range(2000)}
    assert len(keys) == 2000


PINNED_KEYS = [
    (("m", 1, [("INPUT0", "FP32", [1, 4], bytes(range(16)))], ["OUTPUT0"]),
     "dfb33daef950b38b4828f23550358937750a1a149c7c07b0566a38e748231006"),
    (("m", -3, [("A", "UINT8", [4], b"abcd"), ("B", "BYTES", [2, 0], b""), ("C", "INT64", [], np.arange(3, dtype=np.int64))],
      ["Y", "Z"]), "b3dd03d3011c9abcb9cdc3c451b3e3554a5c21ddb97f67cdf1b58fc2d202511b"),
    (("", 0, [], []), "2df40f36925158e928d5841e953f6324d5ae57553ae8cb1b5cca47fa71d324f9"),
    (("m\u00e9", 1, [("\u00fc", "FP32", [1], b"\0" * 4)], ["\u00e9"]),
     "90bd8662397f17d91066b0893253586d78dc19b11ce5c5c9108d119d66ba121b"),
]
"""Keys computed by the first implementation, which hashed one assembled copy of the material: a
change to how the key is computed must not change a key (it would silently empty every cache)."""


@pytest.mark.parametrize("args, digest", PINNED_KEYS, ids=["one input", "several inputs", "empty", "non-ASCII"])
def test_request_keys_are_stable(args, digest):
    assert request_key(*args).hex() == digest


def test_request_key_hashes_input_bytes_in_place():
    data = np.random.default_rng(0).standard_normal(1 << 21, dtype=np.float32)  # 8 MiB
    inputs = [("INPUT0", "FP32", [1, data.size], data)]
    request_key("m", 1, inputs, ["OUTPUT0"])
    tracemalloc.start()
    try:
        request_key("m", 1, inputs, ["OUTPUT0"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"request_key allocated {peak} bytes for an {data.nbytes}-byte input"


def test_request_key_rejects_malformed_requests_clearly():
    with pytest.raises(TypeError, match="input name must be str"):
        request_key("m", 1, [(b"INPUT0", "FP32", [1], b"\0" * 4)], [])
    with pytest.raises(TypeError, match="output name must be str"):
        request_key("m", 1, [], [None])
    with pytest.raises(TypeError, match="'INPUT0': data must be a C-contiguous bytes-like object"):
        request_key("m", 1, [("INPUT0", "FP32", [2], np.zeros(4, dtype=np.float32)[::2])], [])
    with pytest.raises(TypeError, match="'INPUT0': data must be a C-contiguous bytes-like object"):
        request_key("m", 1, [("INPUT0", "FP32", [2], [1.0, 2.0])], [])
    with pytest.raises(TypeError):
        request_key(None, 1, [], [])


# --- LRU under a byte budget ----------------------------------------------------------------


def test_eviction_is_least_recently_used_and_a_hit_refreshes_recency():
    value = b"v" * 100
    per_entry = entry_size(b"k0", value)
    cache = ResponseCache(3 * per_entry)
    for name in (b"k0", b"k1", b"k2"):
        cache.put("m", name, value)
    assert cache.get("m", b"k0") == value  # k0 is now the most recently used; k1 the least.

    cache.put("m", b"k3", value)
    assert cache.get("m", b"k1") is None
    assert [cache.get("m", k) is not None for k in (b"k0", b"k2", b"k3")] == [True, True, True]

    cache.put("other", b"k4", value)  # The budget is shared: the LRU entry goes, whatever its model.
    assert cache.get("m", b"k0") is None
    assert cache.stats("m").evictions == 2
    assert cache.total_bytes == 3 * per_entry == cache.budget_bytes


def test_a_large_put_evicts_as_many_entries_as_it_needs():
    cache = ResponseCache(4 * entry_size(b"k0", b"x"))
    for i in range(4):
        cache.put("m", b"k%d" % i, b"x")
    big = b"y" * ENTRY_OVERHEAD
    cache.put("m", b"big", big)
    assert cache.get("m", b"big") == big
    assert len(cache) == 3  # It needs two small entries' room: k0 and k1, the oldest, go.
    assert cache.get("m", b"k0") is None and cache.get("m", b"k1") is None
    assert cache.get("m", b"k2") == b"x" and cache.get("m", b"k3") == b"x"
    assert cache.total_bytes <= cache.budget_bytes


def test_randomised_operations_match_the_reference_and_never_exceed_the_budget():
    rng = random.Random(4)
    budget = 40 * ENTRY_OVERHEAD
    cache, reference = ResponseCache(budget), ReferenceLRU(budget)
    models = ["a", "b", "c"]
    keys = [b"key-%d" % i for i in range(60)]
    for step in range(20_000):
        model, key = rng.choice(models), rng.choice(keys)
        operation = rng.random()
        if operation < 0.55:
            assert cache.get(model, key) == reference.get(model, key), step
        elif operation < 0.995:
            value = rng.randbytes(rng.choice([0, 10, 200, 1000, 5000, budget]))
            cache.put(model, key, value)
            reference.put(model, key, value)
        else:
            assert cache.drop_model(model) == reference.drop_model(model)
        assert cache.total_bytes == reference.total <= budget, step
        assert len(cache) == len(reference.entries)
    for model in models:
        assert cache.stats(model) == reference.stats(model)
    assert sum(cache.stats(m).evictions for m in models) > 100


def test_put_replaces_an_existing_value_and_recharges_its_size():
    cache = ResponseCache(1 << 20)
    cache.put("m", b"k", b"short")
    cache.put("m", b"k", b"a longer value")
    assert cache.get("m", b"k") == b"a longer value"
    assert len(cache) == 1
    assert cache.total_bytes == cache.stats("m").bytes == entry_size(b"k", b"a longer value")


def test_an_entry_larger_than_the_budget_is_not_stored():
    cache = ResponseCache(1000)
    cache.put("m", b"small", b"s")
    cache.put("m", b"big", b"x" * 1000)
    assert cache.get("m", b"big") is None
    assert cache.get("m", b"small") == b"s"  # Nothing was evicted for it.

    cache.put("m", b"small", b"x" * 1000)  # A newer, oversize value drops the stale one.
    assert cache.get("m", b"small") is None
    assert cache.total_bytes == 0 and len(cache) == 0

    assert ResponseCache(0).budget_bytes == 0
    with pytest.raises(ValueError, match="budget"):
        ResponseCache(-1)


def test_keys_and_values_must_be_bytes():
    cache = ResponseCache(1 << 20)
    with pytest.raises(TypeError):
        cache.put("m", bytearray(b"k"), b"v")
    with pytest.raises(TypeError):
        cache.put("m", b"k", None)
    with pytest.raises(TypeError):
        cache.get(None, b"k")


# --- models and stats -------------------------------------------------------------------------


def test_drop_model_removes_only_that_models_entries_and_keeps_its_counters():
    cache = ResponseCache(1 << 20)
    for i in range(5):
        cache.put("a", b"k%d" % i, b"va")
        cache.put("b", b"k%d" % i, b"vb")
    cache.get("a", b"k0")
    cache.get("a", b"nope")

    assert cache.drop_model("a") == 5
    assert cache.drop_model("a") == 0
    assert cache.drop_model("never seen") == 0
    assert cache.stats("a") == CacheStats(hits=1, misses=1, evictions=0, entries=0, bytes=0)
    assert cache.get("a", b"k1") is None
    assert cache.get("b", b"k1") == b"vb"
    assert cache.total_bytes == cache.stats("b").bytes == 5 * entry_size(b"k0", b"vb")

    cache.put("a", b"k0", b"fresh")  # The model's list links were cut cleanly: it caches again.
    assert cache.get("a", b"k0") == b"fresh"
    assert len(cache) == 6


def test_stats_count_hits_misses_evictions_entries_and_bytes_per_model():
    per_entry = entry_size(b"k0", b"v")
    cache = ResponseCache(2 * per_entry)
    assert cache.stats("m") == CacheStats(0, 0, 0, 0, 0)
    cache.get("m", b"k0")
    cache.put("m", b"k0", b"v")
    cache.get("m", b"k0")
    cache.get("m", b"k0")
    cache.put("n", b"k1", b"v")
    cache.put("n", b"k2", b"v")
    assert cache.stats("m") == CacheStats(hits=2, misses=1, evictions=1, entries=0, bytes=0)
    assert cache.stats("n") == CacheStats(hits=0, misses=0, evictions=0, entries=2, bytes=2 * per_entry)


def test_entry_overhead_covers_what_an_entry_really_costs():
    cache = ResponseCache(1 << 40)
    cache.put("m", b"warm-up", b"")
    rng = random.Random(0)
    for count in (10_000, 45_000):  # Just after and just before a dict resize.
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            cache.put("m", rng.randbytes(32), rng.randbytes(100))
        cost = (tracemalloc.get_traced_memory()[0] - before) / count - 132
        tracemalloc.stop()
        assert 0 < cost <= ENTRY_OVERHEAD, cost
        cache.drop_model("m")


def test_many_interleaved_clients_only_ever_get_their_own_answers():
    cache = ResponseCache(200 * entry_size(b"x" * 32, b"x" * 64))
    requests = [fp32_request(16, seed) for seed in range(500)]

    def answer(inputs) -> bytes:
        return np.frombuffer(inputs[0][3], dtype=np.float32)[:16].tobytes()[::-1]

    async def client(seed: int) -> int:
        rng = random.Random(seed)
        hits = 0
        for _ in range(300):
            inputs = requests[min(int(rng.paretovariate(1.1)), len(requests)) - 1]
            key = request_key("m", 1, inputs, ["OUTPUT0"])
            cached = cache.get("m", key)
            if cached is None:
                await asyncio.sleep(0)
                cache.put("m", key, answer(inputs))
            else:
                assert cached == answer(inputs)
                hits += 1
            await asyncio.sleep(0)
        return hits

    async def main() -> int:
        return sum(await asyncio.gather(*(client(seed) for seed in range(32))))

    hits = asyncio.run(main())
    assert cache.stats("m").hits == hits > 0
    assert cache.total_bytes <= cache.budget_bytes


# --- --cache-size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("0", 0),
        ("1048576", 1048576),
        ("512B", 512),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("256MiB", 256 * 1024**2),
        ("256 MB", 256 * 1000**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("2gb", 2 * 1000**3),
        (" 8 kib ", 8192),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "12 potatoes", "1 MiB 2", "1e6", "0.1KiB", "1.5B", "1M"])
def test_parse_size_rejects_bad_input_with_a_clear_message(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
