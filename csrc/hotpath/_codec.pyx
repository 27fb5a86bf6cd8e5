# cython: language_level=3
"""Native codec for the Open Inference Protocol's BYTES tensors (4-byte little-endian length, then bytes)."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

import numpy as np


class BytesFormatError(ValueError):
    """A BYTES buffer whose length prefixes do not add up."""


def split_bytes(const unsigned char[::1] buf, Py_ssize_t count) -> list:
    """Split a length-prefixed BYTES buffer into exactly `count` byte strings."""
    cdef Py_ssize_t pos = 0, n = buf.shape[0], i
    cdef uint32_t length
    out = []
    for i in range(count):
        if pos + 4 > n:
            raise BytesFormatError(f"element {i} of {count}: buffer ends at byte {n}, inside its 4-byte length prefix")
        length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16) | (<uint32_t>buf[pos + 3] << 24)
        pos += 4
        if pos + length > n:
            raise BytesFormatError(f"element {i} of {count}: length prefix says {length} bytes but only {n - pos} remain")
        out.append(PyBytes_FromStringAndSize(<const char*>&buf[pos], length))
        pos += length
    if pos != n:
        raise BytesFormatError(f"{n - pos} bytes left over after {count} elements")
    return out


def join_bytes(items) -> bytes:
    """Serialize byte strings (or str, encoded UTF-8) into one length-prefixed BYTES buffer."""
    cdef Py_ssize_t total = 0, pos = 0, length
    cdef bytes item_bytes
    encoded = [x.encode() if isinstance(x, str) else bytes(x) for x in items]
    for item_bytes in encoded:
        total += 4 + len(item_bytes)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = out
    for item_bytes in encoded:
        length = len(item_bytes)
        dst[pos] = length & 0xFF
        dst[pos + 1] = (length >> 8) & 0xFF
        dst[pos + 2] = (length >> 16) & 0xFF
        dst[pos + 3] = (length >> 24) & 0xFF
        memcpy(dst + pos + 4, <const char*>item_bytes, length)
        pos += 4 + length
    return out
