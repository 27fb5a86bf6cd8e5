"""The response cache: answers repeated requests without queueing or running the model.

`request_key` turns one request into an exact 32-byte key; `ResponseCache` keeps encoded responses
under those keys, least recently used first out, within a server-wide byte budget (the `--cache-size` flag).
"""

from hotpath.serving._cache import ENTRY_OVERHEAD, CacheStats, ResponseCache, request_key

__all__ = ["ENTRY_OVERHEAD", "CacheStats", "ResponseCache", "request_key"]
