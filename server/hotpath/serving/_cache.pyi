from collections.abc import Sequence
from typing import NamedTuple

ENTRY_OVERHEAD: int

class CacheStats(NamedTuple):
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int

class ResponseCache:
    def __init__(self, budget_bytes: int) -> None: ...
    @property
    def budget_bytes(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    def __len__(self) -> int: ...
    def get(self, model_name: str, key: bytes) -> bytes | None: ...
    def put(self, model_name: str, key: bytes, value: bytes) -> None: ...
    def drop_model(self, model_name: str) -> int: ...
    def stats(self, model_name: str) -> CacheStats: ...

def request_key(
    model_name: str,
    model_version: int,
    inputs: Sequence[tuple[str, str, Sequence[int], bytes | bytearray | memoryview]],
    outputs: Sequence[str],
) -> bytes: ...
