# cython: language_level=3
"""Native LRU response cache: exact request keys and byte-budgeted, true-LRU bookkeeping.

Entries live in one dict per model (key -> _Entry) and on one intrusive, circular doubly-linked
list shared by all models, most recently used first. The list links are borrowed pointers: the
model's dict owns each entry, so entries hold no references that could form cycles and are never
tracked by the garbage collector.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from hashlib import blake2b
from typing import NamedTuple

ENTRY_OVERHEAD = 256
"""Bytes charged per entry on top of len(key) + len(value).

It is what an entry really costs CPython on a 64-bit build, rounded up: the entry object, the key's
and value's bytes headers and the model dict's slot with its share of the dict's spare capacity
come to 165-185 bytes (measured with tracemalloc; the tests check the bound).
"""

cdef Py_ssize_t _OVERHEAD = ENTRY_OVERHEAD


class CacheStats(NamedTuple):
    """One model's cache counters (cumulative) and its current footprint."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int


@cython.final
cdef class _Shard:
    """One model's entries and counters."""

    cdef dict entries
    cdef Py_ssize_t bytes
    cdef unsigned long long hits, misses, evictions

    def __cinit__(self):
        self.entries = {}


@cython.final
cdef class _Entry:
    """One cached response and its place in the LRU list (links and shard are borrowed)."""

    cdef bytes key
    cdef bytes value
    cdef Py_ssize_t size
    cdef PyObject* shard
    cdef PyObject* prev
    cdef PyObject* next


# noexcept: pointer moves only, nothing here can raise.
cdef inline void _unlink(_Entry entry) noexcept:
    # Unchecked casts of a link: every link points at a live _Entry (the root or a stored entry).
    (<_Entry>entry.prev).next = entry.next
    (<_Entry>entry.next).prev = entry.prev


@cython.final
cdef class ResponseCache:
    """A true-LRU cache of encoded responses under one byte budget shared by all models.

    Each entry is charged len(key) + len(value) + ENTRY_OVERHEAD bytes. A put evicts least recently
    used entries, of any model, until the new entry fits, so total_bytes never exceeds
    budget_bytes; an entry that could not fit in an empty cache is not stored. A hit makes its entry
    the most recently used.

    Not thread-safe: call it from one thread, the server's event loop.
    """

    cdef dict _shards
    cdef _Entry _root
    cdef Py_ssize_t _budget
    cdef Py_ssize_t _total
    cdef Py_ssize_t _count

    def __cinit__(self, Py_ssize_t budget_bytes):
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self._budget = budget_bytes
        self._shards = {}
        self._root = _Entry.__new__(_Entry)
        # Borrowed links (see the module docstring): the root is owned by self._root.
        self._root.prev = <PyObject*>self._root
        self._root.next = <PyObject*>self._root

    @property
    def budget_bytes(self) -> int:
        """The byte budget given at construction."""
        return self._budget

    @property
    def total_bytes(self) -> int:
        """Bytes charged by all entries now stored; never more than budget_bytes."""
        return self._total

    def __len__(self) -> int:
        return self._count

    def get(self, str model_name not None, bytes key not None):
        """Return the value stored under key for model_name, or None; counts a hit or a miss."""
        cdef _Shard shard = self._shard(model_name)
        cdef _Entry entry = shard.entries.get(key)
        if entry is None:
            shard.misses += 1
            return None
        shard.hits += 1
        _unlink(entry)
        self._push_front(entry)
        return entry.value

    def put(self, str model_name not None, bytes key not None, bytes value not None) -> None:
        """Store value under key for model_name as the most recently used entry, replacing any old one."""
        cdef _Shard shard = self._shard(model_name)
        cdef _Entry entry = shard.entries.get(key)
        if entry is not None:
            self._remove(entry)
        cdef Py_ssize_t size = len(key) + len(value) + _OVERHEAD
        if size > self._budget:
            return
        while self._total + size > self._budget:
            self._evict_lru()
        entry = _Entry.__new__(_Entry)
        entry.key = key
        entry.value = value
        entry.size = size
        entry.shard = <PyObject*>shard  # borrowed: self._shards owns every shard, and never drops one
        shard.entries[key] = entry
        shard.bytes += size
        self._total += size
        self._count += 1
        self._push_front(entry)

    def drop_model(self, str model_name not None) -> int:
        """Remove every entry of model_name (on unload or reload) and return how many there were.

        The model's hit, miss and eviction counters are kept: they are cumulative.
        """
        cdef _Shard shard = self._shards.get(model_name)
        if shard is None:
            return 0
        cdef _Entry entry
        for entry in shard.entries.values():
            _unlink(entry)
        cdef Py_ssize_t dropped = len(shard.entries)
        self._total -= shard.bytes
        self._count -= dropped
        shard.bytes = 0
        shard.entries = {}
        return dropped

    def stats(self, str model_name not None) -> CacheStats:
        """model_name's counters and footprint; all zero for a model the cache has never seen."""
        cdef _Shard shard = self._shards.get(model_name)
        if shard is None:
            return CacheStats(0, 0, 0, 0, 0)
        return CacheStats(shard.hits, shard.misses, shard.evictions, len(shard.entries), shard.bytes)

    cdef _Shard _shard(self, str model_name):
        cdef _Shard shard = self._shards.get(model_name)
        if shard is None:
            shard = _Shard.__new__(_Shard)
            self._shards[model_name] = shard
        return shard

    # noexcept: pointer moves only, nothing here can raise.
    cdef inline void _push_front(self, _Entry entry) noexcept:
        # Borrowed links: the model's dict owns `entry`; the root's next is a live _Entry.
        entry.prev = <PyObject*>self._root
        entry.next = self._root.next
        (<_Entry>self._root.next).prev = <PyObject*>entry
        self._root.next = <PyObject*>entry

    cdef void _remove(self, _Entry entry) except *:
        cdef _Shard shard = <_Shard>entry.shard  # unchecked: entry.shard is only ever set to a _Shard
        _unlink(entry)
        shard.bytes -= entry.size
        self._total -= entry.size
        self._count -= 1
        del shard.entries[entry.key]

    cdef void _evict_lru(self) except *:
        # Unchecked casts: only called while the cache holds an entry, so root.prev is a stored
        # _Entry (not the root), and its shard is a _Shard.
        cdef _Entry lru = <_Entry>self._root.prev
        (<_Shard>lru.shard).evictions += 1
        self._remove(lru)


# noexcept on the _put_* writers: a memcpy into space the caller sized, nothing can raise.
cdef inline char* _put_u32(char* dst, uint32_t value) noexcept:
    memcpy(dst, &value, 4)
    return dst + 4


cdef inline char* _put_i64(char* dst, int64_t value) noexcept:
    memcpy(dst, &value, 8)
    return dst + 8


cdef inline char* _put_text(char* dst, const char* text, Py_ssize_t length) noexcept:
    dst = _put_u32(dst, <uint32_t>length)  # fits: names and datatypes come from gRPC messages, < 2 GiB
    memcpy(dst, text, length)
    return dst + length


cdef const char* _utf8(object text, Py_ssize_t* length, str what) except NULL:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, got {type(text).__name__}")
    return PyUnicode_AsUTF8AndSize(text, length)


def request_key(str model_name not None, int64_t model_version, inputs, outputs) -> bytes:
    """The 32-byte cache key of one inference request.

    The key material is the model name and version, then for each input, in the given order, its
    name, datatype, shape and raw bytes, then the requested output names. Every string and buffer is
    length-prefixed and every list count-prefixed, so two different requests never produce the same
    material. Pass outputs sorted: the key is order-sensitive, and a request that names its outputs
    in another order would only miss, never hit a wrong entry.

    The key is the 256-bit BLAKE2b digest of that material rather than the material itself, so an
    entry costs 32 bytes of key whatever the input size. That suffices because BLAKE2b is
    collision-resistant: producing two materials with the same 256-bit digest takes about 2**128
    work, far out of reach on purpose, and the chance that any two of n distinct requests collide
    by accident is below n**2 / 2**257 (under 2**-177 even for 2**40 entries).

    The material is hashed piece by piece and never assembled: the framing (everything but the
    inputs' bytes) is written into one small buffer, and each input's bytes go to the hash where they
    lie, between the framing before and after them.
    """
    cdef Py_ssize_t n_inputs = len(inputs)
    cdef Py_ssize_t slots = max(n_inputs, 1)
    cdef Py_ssize_t i, j, total, length, start
    cdef const char* text
    cdef char* base
    cdef char* dst
    # One block: each input's buffer view, then its rank, then where its framing ends (the offset
    # in `framing` after which its bytes are hashed). The casts carve that block: Py_buffer's size
    # is a multiple of 8, so the Py_ssize_t arrays after the views are aligned.
    cdef Py_buffer* views = <Py_buffer*>malloc(slots * (sizeof(Py_buffer) + 2 * sizeof(Py_ssize_t)))
    if views is NULL:
        raise MemoryError()
    cdef Py_ssize_t* ndims = <Py_ssize_t*>&views[slots]
    cdef Py_ssize_t* ends = &ndims[slots]
    cdef Py_ssize_t acquired = 0
    cdef list fields = []
    cdef list output_names = list(outputs)
    cdef bytes framing
    hasher = blake2b(digest_size=32)
    update = hasher.update
    try:
        _utf8(model_name, &length, "model_name")
        total = 4 + length + 8 + 4 + 4
        for i in range(n_inputs):
            name, datatype, shape, data = inputs[i]
            fields.append((name, datatype, shape, data))
            _utf8(name, &length, "input name")
            total += 4 + length
            _utf8(datatype, &length, "input datatype")
            ndims[i] = len(shape)
            total += 4 + length + 4 + 8 * ndims[i] + 8
            try:
                PyObject_GetBuffer(data, &views[i], PyBUF_SIMPLE)
            except (TypeError, ValueError, BufferError) as exc:
                raise TypeError(f"input {name!r}: data must be a C-contiguous bytes-like object ({exc})") from exc
            acquired += 1
        for name in output_names:
            _utf8(name, &length, "output name")
            total += 4 + length

        framing = PyBytes_FromStringAndSize(NULL, total)
        base = PyBytes_AS_STRING(framing)
        text = _utf8(model_name, &length, "model_name")
        dst = _put_text(base, text, length)
        dst = _put_i64(dst, model_version)
        dst = _put_u32(dst, <uint32_t>n_inputs)  # fits: a request's inputs are counted in a gRPC message
        for i in range(n_inputs):
            name, datatype, shape, _ = fields[i]
            text = _utf8(name, &length, "input name")
            dst = _put_text(dst, text, length)
            text = _utf8(datatype, &length, "input datatype")
            dst = _put_text(dst, text, length)
            dst = _put_u32(dst, <uint32_t>ndims[i])  # fits: a rank is a handful of dims
            for j in range(ndims[i]):
                dst = _put_i64(dst, shape[j])
            dst = _put_i64(dst, views[i].len)
            ends[i] = dst - base
        dst = _put_u32(dst, <uint32_t>len(output_names))  # fits, as the input count
        for name in output_names:
            text = _utf8(name, &length, "output name")
            dst = _put_text(dst, text, length)

        frame = memoryview(framing)
        start = 0
        for i in range(n_inputs):
            update(frame[start:ends[i]])
            update(fields[i][3])  # the buffer viewed above; the hash reads it in place
            start = ends[i]
        update(frame[start:])
    finally:
        for i in range(acquired):
            PyBuffer_Release(&views[i])
        free(views)
    return hasher.digest()
